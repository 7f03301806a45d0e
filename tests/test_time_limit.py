"""The suite's per-test time limit (tests/conftest.py): a hanging test fails instead of holding CI."""

from __future__ import annotations

import signal
import time

import pytest
from conftest import TEST_TIMEOUT, time_limit


def test_time_limit_interrupts_a_loop_that_never_ends():
    def spin():
        while True:
            pass

    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"spinning ran past 0.2 s .*LANDSCAPE_TEST_TIMEOUT"):
        with time_limit(0.2, "spinning"):
            spin()
    assert 0.2 <= time.perf_counter() - t0 < 5.0


def test_time_limit_is_cancelled_after_its_block():
    handler = signal.getsignal(signal.SIGALRM)
    with time_limit(0.3, "quick"):
        pass
    time.sleep(0.5)  # an alarm left running would raise here
    assert signal.getsignal(signal.SIGALRM) is handler
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with time_limit(0, "unlimited"):  # 0 turns the limit off
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_every_test_runs_under_a_time_limit():
    """This test itself runs inside pytest_runtest_call's limit."""
    assert TEST_TIMEOUT > 0
    remaining, _ = signal.getitimer(signal.ITIMER_REAL)
    assert 0 < remaining <= TEST_TIMEOUT
