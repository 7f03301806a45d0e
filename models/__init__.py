"""The Flax model zoo of `landscape`."""
