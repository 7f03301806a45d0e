"""Argument checks shared by the public API: each names the bad value and what is allowed.

Python's truthiness and numpy's scalar types make three mistakes silent unless checked: a string
such as "no" passed as an on/off option counts as on, ``True`` passes for the integer 1, and a
numpy scalar (``np.float32(3.0)`` from a sweep's grid) fails an ``isinstance(v, float)`` test that
was meant to reject strings. These helpers get all three right.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def is_real(value) -> bool:
    """A real number, numpy scalars included; not a bool and not a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def is_positive_finite(value) -> bool:
    """A real number, finite and > 0."""
    return is_real(value) and math.isfinite(value) and value > 0


def check_flag(value, name: str) -> bool:
    """An on/off option: ``True`` or ``False`` (numpy's bools too), nothing else."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name}={value!r} must be True or False")
    return bool(value)


def check_int(value, name: str, minimum: int = 1) -> int:
    """An integer (numpy's too, not a bool) ≥ ``minimum``; returned as a Python int.

    A whole float (``3.0``) is refused too: ``range``, array shapes and slicing reject it later,
    far from the argument that carried it.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}={value!r} must be {wanted}")
    return int(value)


def check_positive(value, name: str, allow_zero: bool = False) -> float:
    """A finite real number (numpy's too, not a bool) > 0, or ≥ 0 with ``allow_zero``; returned
    as a Python float.

    Finite because an infinite or NaN rate, step or penalty does not fail where it is passed but
    turns every later result into NaN. The float return keeps numpy scalars out of the JSON
    configurations and cache keys built from these values.
    """
    if not (is_real(value) and math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        wanted = "a finite number >= 0" if allow_zero else "a positive finite number"
        raise ValueError(f"{name}={value!r} must be {wanted}")
    return float(value)
