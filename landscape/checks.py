"""Argument checks shared by the public API: each names the bad value and what is allowed.

Python's truthiness and numpy's scalar types make three mistakes silent unless checked: a string
such as "no" passed as an on/off option counts as on, ``True`` passes for the integer 1, and a
numpy scalar (``np.float32(3.0)`` from a sweep's grid) fails an ``isinstance(v, float)`` test that
was meant to reject strings. These helpers get all three right.
"""

from __future__ import annotations

import contextlib
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


def as_alpha(alpha, name: str = "alpha") -> np.ndarray:
    """A clipping vector as a float32 numpy array (its shape is the caller's to check).

    An object that is not an array of numbers is named, and one that holds a clipping vector
    (a :class:`~landscape.lapq.LAPQResult`) gets the attribute to pass: NumPy's own message
    ("float() argument must be a string or a real number, not 'LAPQResult'") names neither.
    """
    if isinstance(alpha, str | bytes) or alpha is None:
        raise ValueError(f"{name} must be an (n,) array of clipping values; got {alpha!r}")
    kind = getattr(getattr(alpha, "dtype", None), "kind", None)
    if kind in ("c", "b"):  # complex would lose its imaginary part (a ComplexWarning), bool become 1.0
        raise ValueError(f"{name} must be real numbers; got dtype {alpha.dtype}")
    try:
        with np.errstate(over="ignore"):  # beyond float32's range: +inf, which the loss reports as +inf
            return np.asarray(alpha, np.float32)
    except (TypeError, ValueError) as e:
        kind = type(alpha).__name__
        hint = " — pass its clipping vector, res.alpha" if hasattr(alpha, "alpha") else ""
        raise ValueError(f"{name} must be an (n,) array of clipping values; got a {kind}{hint}") from e


def check_clip_loss(loss, what: str) -> None:
    """``loss`` must be a :class:`~landscape.ClipLoss` (or an object with its interface: ``n``,
    ``sites``, ``init``, ``options``); else a ValueError naming what was passed and how to build one."""
    if all(hasattr(loss, attr) for attr in ("n", "sites", "init", "options")):
        return
    import jax

    if isinstance(loss, jax.tree_util.Partial):
        hint = "; pass the ClipLoss itself, not loss.alpha_loss()"
    elif hasattr(loss, "model") and hasattr(loss, "variables"):
        hint = ("; build one from the trained network: ls.ClipLoss(net, data.calib, w_bits=4, a_bits=4)")
    else:
        hint = " (e.g. ls.ClipLoss(net, data.calib, w_bits=4, a_bits=4))"
    raise ValueError(f"{what} needs a ClipLoss, got a {type(loss).__name__}{hint}")


def check_network(net, what: str) -> None:
    """``net`` must be a trained network: an object with ``.model`` and ``.variables``, such as the
    :class:`~landscape.train.Network` that :func:`landscape.train.fit` returns."""
    import flax.linen as nn

    if isinstance(net, nn.Module):
        raise ValueError(f"{what} needs a trained network (a landscape.train.Network, e.g. net = "
                         f"ls.train.fit(model, data)), got the flax module {type(net).__name__}: pass net, "
                         "not net.model")
    if not (hasattr(net, "model") and hasattr(net, "variables")):
        raise ValueError(f"{what} needs a trained network (a landscape.train.Network, e.g. net = "
                         f"ls.train.fit(model, data), or any object with .model and .variables), got a "
                         f"{type(net).__name__}")


def check_module(model, what: str) -> None:
    """``model`` must be a Flax Linen module (``models.create(...)``); a trained network or a
    model's name is named, with the right call."""
    import flax.linen as nn

    if isinstance(model, nn.Module):
        check_call_signature(model, what)
        return
    if hasattr(model, "model") and hasattr(model, "variables"):
        got = f"a trained {type(model).__name__}; pass its module (and variables): net.model, net.variables"
    else:
        got = f"a {type(model).__name__} {model!r:.60}; build one, e.g. models.create('cnn', num_classes=10)"
    raise ValueError(f"{what} needs a flax module, got {got}")


def check_call_signature(model, what: str) -> None:
    """The contract every model of the library's is called by: ``model.apply(variables, x,
    train=...)``, so ``__call__(self, x, train: bool = False)`` returning (N, classes) logits.
    A module without ``train`` otherwise fails deep in Flax with an unexpected keyword."""
    import inspect

    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):  # no signature to read: let the call itself decide
        return
    if "train" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        required = [n for n, p in list(params.items())[2:] if p.default is p.empty and n != "train"
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not required:
            return
        problem = f"also requires {required}, which the library never passes"
    else:
        problem = "takes no train argument"
    raise ValueError(f"{what}: {type(model).__name__}.__call__{inspect.signature(type(model).__call__)} {problem}; "
                     "the library calls model.apply(variables, x, train=...), so define "
                     "__call__(self, x, train: bool = False) returning (N, classes) logits")


def check_logits(out, model, what: str) -> int:
    """``out``, what ``model.apply`` returned (an array or its abstract shape), must be (N, classes)
    logits; returns the number of classes. A model with several outputs otherwise failed later on
    ``'tuple' object has no attribute 'shape'``."""
    if getattr(out, "ndim", None) != 2:
        got = f"shape {out.shape}" if hasattr(out, "shape") else f"a {type(out).__name__}"
        raise ValueError(f"{what}: {type(model).__name__} must return (N, classes) logits, got {got}; a model "
                         "with several outputs needs a wrapper that returns the logits alone")
    return int(out.shape[-1])


def check_image_shape(shape, expected, what: str) -> None:
    """Images of shape ``shape`` (N, ...) against the per-example shape ``expected`` a network
    takes (None: unknown, nothing checked); ``what`` names them in the error ("calib images").
    A flat, channel-less or NCHW batch otherwise fails inside Flax with a message about kernel
    shapes only."""
    if expected is None:
        return
    shape, expected = tuple(int(d) for d in shape), tuple(int(d) for d in expected)
    if shape[1:] != expected:
        layout = " (NHWC)" if len(expected) == 3 else ""
        raise ValueError(f"{what} have shape {shape}; this network takes (N, "
                         f"{', '.join(map(str, expected))}){layout}")


def check_finite_images(x, what: str) -> None:
    """Every value of the images ``x`` (N, ...) finite, else a ValueError naming how many images
    hold NaN or inf and where the first one is."""
    x = np.asarray(x)
    if np.isfinite(np.sum(x, dtype=np.float64)):  # float64 cannot overflow here: finite iff every value is
        return
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(len(x), -1).any(axis=1))
        where = ", ".join(str(int(i)) for i in np.argwhere(bad)[0])
        listed = ", ".join(map(str, rows[:5])) + (", ..." if rows.size > 5 else "")
        raise ValueError(f"{what} images must be finite: {rows.size} of {len(x)} hold NaN or inf (images "
                         f"{listed}; {int(bad.sum())} values in all), the first at x[{where}]")


@contextlib.contextmanager
def explained_input_shape(shape, what: str):
    """Re-raise Flax's ``ScopeParamShapeError`` inside the block, which names only kernel shapes,
    as a ValueError naming the shape of the images (``what``: "calib images"), where the network's
    own input shape is not known to check it beforehand."""
    from flax.errors import ScopeParamShapeError

    try:
        yield
    except ScopeParamShapeError as e:
        raise ValueError(f"{what} have shape {tuple(shape)}, which the network's variables do not fit "
                         f"(images are NHWC, (N, H, W, C), of the shape the network was trained on): "
                         f"{str(e).splitlines()[0]}") from e
