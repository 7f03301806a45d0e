"""The shared argument checks: numpy scalars pass where Python numbers do; bools, strings and
non-finite values do not, and the message names the argument, the value and what is allowed."""

import re

import numpy as np
import pytest

from landscape import checks


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_check_int_accepts_python_and_numpy_integers(value):
    out = checks.check_int(value, "n")
    assert out == 3 and type(out) is int  # a Python int: JSON configurations and range() take it


@pytest.mark.parametrize("value", [True, np.bool_(True), "3", 3.0, np.float32(3.0), None, 0, -2])
def test_check_int_refuses_bools_strings_floats_and_small_values(value):
    with pytest.raises(ValueError, match=re.escape(f"n={value!r} must be a positive integer")):
        checks.check_int(value, "n")


def test_check_int_names_its_minimum():
    assert checks.check_int(0, "seed", minimum=0) == 0
    with pytest.raises(ValueError, match=re.escape("seed=-1 must be an integer >= 0")):
        checks.check_int(-1, "seed", minimum=0)
    with pytest.raises(ValueError, match=re.escape("num=1 must be an integer >= 2")):
        checks.check_int(1, "num", minimum=2)


@pytest.mark.parametrize("value", [0.1, np.float32(0.1), np.float64(0.1), 2, np.int64(2)])
def test_check_positive_accepts_python_and_numpy_numbers(value):
    out = checks.check_positive(value, "lr")
    assert out == float(value) and type(out) is float


@pytest.mark.parametrize("value", [True, np.bool_(True), "0.1", None, 0, 0.0, -1.0, np.float32(-1),
                                   float("nan"), float("inf"), np.float32("inf")])
def test_check_positive_refuses_bools_strings_and_non_finite_or_non_positive_values(value):
    with pytest.raises(ValueError, match=re.escape(f"lr={value!r} must be a positive finite number")):
        checks.check_positive(value, "lr")


def test_check_positive_with_allow_zero():
    assert checks.check_positive(0, "weight_decay", allow_zero=True) == 0.0
    assert checks.check_positive(np.float32(5e-4), "weight_decay", allow_zero=True) == pytest.approx(5e-4)
    for bad in (-1e-4, float("nan"), False):
        with pytest.raises(ValueError, match=re.escape(f"weight_decay={bad!r} must be a finite number >= 0")):
            checks.check_positive(bad, "weight_decay", allow_zero=True)


def test_as_alpha_beyond_float32_range_is_inf_without_a_numpy_overflow_warning():
    """A float64 α above float32's range is +inf, which the loss reports as +inf: numpy's cast
    had printed "overflow encountered in cast" on the way."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = checks.as_alpha(np.array([1.0, 1e300, -1e300]))
    assert out.dtype == np.float32 and out[0] == 1.0 and out[1] == np.inf and out[2] == -np.inf
