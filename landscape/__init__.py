"""landscape: the loss landscape of compressed neural networks, in JAX."""
