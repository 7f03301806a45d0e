"""Shared fixtures. Tests run offline, without ../shared, in a private cache directory."""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import shutil
import signal
import tempfile
import threading

import pytest

# Before anything caches: a per-session cache directory (removed when the session ends; a
# LANDSCAPE_CACHE given by the caller is the caller's and stays) and no progress bars.
if "LANDSCAPE_CACHE" not in os.environ:
    os.environ["LANDSCAPE_CACHE"] = tempfile.mkdtemp(prefix="landscape-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LANDSCAPE_CACHE"], ignore_errors=True)
os.environ.setdefault("LANDSCAPE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# On a GPU the tests hold to what they hold on CPU: reproducible runs (no atomics-based
# reductions) and true float32 products (the numerical tests compare with float64 references,
# which TF32's 10-bit mantissa cannot meet). Neither setting changes anything on CPU.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()
# Several test processes (pytest -n) share one GPU: each takes memory as it needs it instead of
# preallocating 75% of it, which makes the second worker run out of memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

import landscape  # noqa: E402  (sets the XLA:CPU guard flag before any JAX computation)

if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")
landscape.enable_compilation_cache()  # identical programs across tests compile once


# pytest-xdist (``--dist loadfile``) hands whole files to idle workers in collection order. The
# longest files go first (longest-processing-time first), so the workers finish together instead
# of one running a two-minute file alone at the end.
LONGEST_FILES_FIRST = ("test_paper_repro.py", "test_lapq.py", "test_clip_loss.py", "test_spectrum.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: same order within a file


# A test that hangs (an iterative solver whose loop never ends) fails after TEST_TIMEOUT seconds
# instead of holding CI until its 90-minute limit. SIGALRM raises in the test's Python code. A hang
# inside compiled code, which a signal cannot interrupt (the library has no unbounded XLA loop),
# gets every thread's stack written to stderr a minute later by pytest's own faulthandler_timeout
# (pyproject.toml), so the CI log shows where it is.
TEST_TIMEOUT = float(os.environ.get("LANDSCAPE_TEST_TIMEOUT", "600"))


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    """Raise TimeoutError in the block after ``seconds`` (0: no limit; the main thread only)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{what} ran past {seconds:g} s (the limit is LANDSCAPE_TEST_TIMEOUT, in seconds)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with time_limit(TEST_TIMEOUT, f"the setup of {item.nodeid}"):  # module fixtures train networks
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with time_limit(TEST_TIMEOUT, item.nodeid):
        yield


@pytest.fixture
def count_compilations():
    """``with count_compilations() as compiled:`` counts the XLA compilations inside the block,
    by program name (a collections.Counter)."""

    @contextlib.contextmanager
    def counting():
        compiled = collections.Counter()

        def listen(event, duration, fun_name=None, **_):
            if event == "/jax/core/compile/backend_compile_duration":
                compiled[fun_name] += 1

        jax.monitoring.register_event_duration_secs_listener(listen)
        try:
            yield compiled
        finally:
            jax.monitoring.unregister_event_duration_listener(listen)

    return counting


@pytest.fixture(scope="session")
def digits():
    import landscape as ls

    return ls.data.load("digits", calib_size=256, seed=0)


@pytest.fixture(scope="session")
def digits_net(digits):
    """The default resnet8 on digits (trained once per session, ~12 s on 2 cores)."""
    import landscape as ls
    import models

    return ls.train.fit(models.create("resnet8", num_classes=10), digits)


@pytest.fixture(scope="session")
def tiny_net(digits):
    """A small CNN trained briefly: cheap to compile, for mechanics tests."""
    import landscape as ls
    import models

    return ls.train.fit(models.create("cnn", num_classes=10, widths=(8, 16)), digits, epochs=3)
