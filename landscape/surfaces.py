"""Loss surfaces and lines: in clip space (through ``loss.batch``) and in weight space.

Clip space — 2-D slices over two sites with every other α fixed, and 1-D cuts::

    surf = loss_surface(loss, alpha, sites=(i, j), span=(0.5, 1.5), num=51)
    surf.x, surf.y      # (num,) absolute α of site i and site j
    surf.z              # (num, num), z[a, b] = L(α with α_i = x[b], α_j = y[a])

Weight space — filter-normalised random directions (Li et al., 2018): each direction is
Gaussian, then every filter (an output channel of a conv kernel, a column of a dense
kernel) is rescaled to the norm of the same filter of the weights; biases and batch-norm
parameters get no direction ("biasbn" ignored, as the loss-landscape default).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from landscape import checks, runtime


@dataclasses.dataclass(frozen=True)
class Surface:
    """A 2-D grid of losses: ``z[a, b]`` is the loss at (``x[b]``, ``y[a]``)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    sites: tuple
    center: np.ndarray

    def __repr__(self) -> str:
        return (f"Surface(sites={self.sites}, grid={self.z.shape}, "
                f"min={np.nanmin(self.z):.4g}, max={np.nanmax(self.z):.4g})")


@dataclasses.dataclass(frozen=True)
class Line:
    """Losses ``values`` along ``points = start + t·direction`` (clip space, :func:`loss_line`);
    from :func:`weight_surface` with one direction, ``points`` is the (num, 1) column of the
    coefficients t, the weights themselves never being materialised per point."""

    t: np.ndarray
    values: np.ndarray
    points: np.ndarray

    def __repr__(self) -> str:
        return f"Line(num={len(self.t)}, min={np.min(self.values):.4g}, max={np.max(self.values):.4g})"


def _site_index(loss, site) -> int:
    if isinstance(site, str):
        names = [s.name for s in loss.sites]
        if site not in names:
            raise ValueError(f"unknown site {site!r}; the loss's sites are {names}")
        slices = loss.site_slices()[site]
        if slices.stop - slices.start != 1:
            raise ValueError(f"site {site!r} has {slices.stop - slices.start} α (per-channel); pick an index")
        return slices.start
    if isinstance(site, bool | np.bool_) or not isinstance(site, int | np.integer) or not 0 <= site < loss.n:
        raise ValueError(f"site index {site!r} must be an integer in [0, {loss.n})")
    return int(site)


def _axis(center: float, span, num: int) -> np.ndarray:
    pair = span.tolist() if isinstance(span, np.ndarray) else span
    if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2 \
            or not all(checks.is_real(v) for v in pair) or not 0 < pair[0] < pair[1] < math.inf:
        raise ValueError(f"span={span!r} must be (lo, hi) with 0 < lo < hi (relative to α)")
    lo, hi = pair
    return np.linspace(lo * center, hi * center, num)


def loss_surface(loss, alpha, *, sites: Sequence = (0, 1), span=(0.5, 1.5), num: int = 51,
                 x=None, y=None) -> Surface:
    """Loss over a 2-D grid of two sites' α, the rest fixed at ``alpha``.

    Args:
      loss: a ClipLoss (anything with ``.batch``, ``.n``, ``.sites``).
      alpha: (n,) the point the slice passes through.
      sites: two site indices or names.
      span: the grid covers [lo·α_i, hi·α_i] (relative), unless ``x``/``y`` give the
        absolute α values directly.
      num: points per axis.
    """
    if isinstance(sites, str) or not isinstance(sites, Sequence) or len(sites) != 2:
        raise ValueError(f"sites={sites!r} must name exactly two sites, e.g. (0, 1) or two site names")
    i, j = (_site_index(loss, s) for s in sites)
    if i == j:
        raise ValueError(f"sites={tuple(sites)!r} name site {i} twice; the two sites must differ")
    num = checks.check_int(num, "num", minimum=2)
    center = np.asarray(alpha, np.float64)
    if center.shape != (loss.n,) or not np.all(np.isfinite(center) & (center > 0)):
        shown = f"min {center.min():.4g}" if center.shape == (loss.n,) else f"shape {center.shape}"
        raise ValueError(f"alpha must be a ({loss.n},) vector of finite α > 0, the point the slice passes "
                         f"through; got {shown}")
    xs = _axis(center[i], span, num) if x is None else np.asarray(x, np.float64)
    ys = _axis(center[j], span, num) if y is None else np.asarray(y, np.float64)
    for name, axis in (("x", xs), ("y", ys)):
        if axis.ndim != 1 or axis.size == 0 or not np.all(np.isfinite(axis)):
            raise ValueError(f"{name} must be a non-empty 1-D array of finite α values, got shape {axis.shape}")
    gx, gy = np.meshgrid(xs, ys)
    points = np.repeat(center[None], gx.size, axis=0)
    points[:, i] = gx.ravel()
    points[:, j] = gy.ravel()
    z = np.asarray(loss.batch(points.astype(np.float32)), np.float64).reshape(gx.shape)
    return Surface(xs, ys, z, (i, j), center)


def loss_line(loss, start, direction, *, t=None, num: int = 71) -> Line:
    """Loss along ``start + t·direction`` (default t ∈ [−0.2, 0.5], ``num`` points).

    With ``direction = start`` this is the scaling line t ↦ (1 + t)·α used for the
    quadratic-near-the-optimum check (the reference's α*·[0.8, 1.5]). The default 71 points step
    t by 0.01, so the grid holds t = 0, the start itself (51 points would step 0.014 and miss it);
    any ``num`` with ``num − 1`` a multiple of 7 puts a point there (to rounding).
    """
    start = np.asarray(start, np.float64)
    direction = np.asarray(direction, np.float64)
    if start.shape != (loss.n,) or direction.shape != (loss.n,):
        raise ValueError(f"start and direction must have shape ({loss.n},); got {start.shape}, "
                         f"{direction.shape}")
    for name, vector in (("start", start), ("direction", direction)):
        if not np.all(np.isfinite(vector)):
            raise ValueError(f"{name} has {int(np.sum(~np.isfinite(vector)))} NaN/inf entries; the line "
                             "needs finite α")
    if t is None:
        num = checks.check_int(num, "num", minimum=2)
    ts = np.linspace(-0.2, 0.5, num) if t is None else np.asarray(t, np.float64)
    if ts.ndim != 1 or ts.size == 0 or not np.all(np.isfinite(ts)):
        raise ValueError(f"t must be a non-empty 1-D array of finite steps, got shape {ts.shape}")
    points = start[None] + ts[:, None] * direction[None]
    values = np.asarray(loss.batch(points.astype(np.float32)), np.float64)
    return Line(ts, values, points)


# --------------------------------------------------------------------------- weight space


def _norm(a, axes):
    return jnp.sqrt(jnp.sum(a * a, axis=axes, keepdims=True))


def random_direction(params, seed: int = 0, *, norm: str = "filter"):
    """A random direction in weight space, shaped like ``params`` (a pytree).

    As in Li et al. (2018), the leaves with two or more dimensions (kernels, embeddings: any
    pytree's weight matrices, not only Flax's ``kernel``) get a direction and the others
    (biases, BN scale and bias) zeros. norm="filter": each output filter (last axis, Flax's
    layout) rescaled to the norm of the same filter of ``params`` (Li et al.'s filter
    normalisation); "layer": whole leaves rescaled; "none": raw Gaussian. For a conv (kh, kw, Cin,
    Cout) or dense (in, out) kernel that is the reference's per-output filter; Li et al. do not
    define a filter for other matrices, where the last axis is used too (an embedding table
    (vocab, features) gets one per feature, where the reference's first-axis split would give one
    per token; a ViT's (1, tokens, dim) position table one per dim).

    Raises:
        ValueError: ``params`` has no leaf of two or more dimensions (a direction would be zero).
    """
    if norm not in ("filter", "layer", "none"):
        raise ValueError(f"norm={norm!r} is not allowed; use 'filter', 'layer' or 'none'")
    checks.check_int(seed, "seed", minimum=0)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not any(jnp.ndim(w) >= 2 for _, w in leaves):
        shapes = [tuple(jnp.shape(w)) for _, w in leaves]
        raise ValueError(f"params has no leaf of two or more dimensions (shapes {shapes[:8]}"
                         f"{' …' if len(shapes) > 8 else ''}): random_direction perturbs weight matrices and "
                         "kernels and leaves 1-D leaves (biases, BN parameters) at zero, so the direction "
                         "would be zero")
    for path, w in leaves:
        if jnp.ndim(w) >= 2 and not jnp.issubdtype(jnp.result_type(w), jnp.floating):
            raise ValueError(f"params{jax.tree_util.keystr(path)} has dtype {jnp.result_type(w)}; a direction "
                             "needs floating-point weight leaves")
    out = []
    with runtime.classic_threefry():  # the split and the draws
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        for (_, w), key in zip(leaves, keys, strict=True):
            w = jnp.asarray(w)
            if w.ndim < 2:
                out.append(jnp.zeros_like(w))
                continue
            # Drawn and normalised in at least float32: a float16 sum of squares overflows
            # (above 65504) past ~65k entries, and the scale became 0.
            dtype = w.dtype
            work = jnp.promote_types(dtype, jnp.float32)
            d, w = jax.random.normal(key, w.shape, work), w.astype(work)
            if norm == "filter":
                axes = tuple(range(w.ndim - 1))
                scale = _norm(w, axes) / (_norm(d, axes) + 1e-10)
                d = d * scale
            elif norm == "layer":
                d = d * jnp.linalg.norm(w) / (jnp.linalg.norm(d) + 1e-10)
            out.append(d.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def weight_surface(f: Callable, params, directions: Sequence, *, span=(-1.0, 1.0), num: int = 21,
                   chunk: int = 16):
    """f(params + a·d₁ [+ b·d₂]) over a grid: a 1-D :class:`Line` or a 2-D :class:`Surface`.

    ``f``: pytree → scalar (e.g. ``loss.weight_loss(alpha)``); ``directions``: one or two
    pytrees shaped like ``params`` (see :func:`random_direction`). Evaluated with ``vmap``
    in chunks of ``chunk`` grid points. ``params`` and the directions are arguments of the
    compiled program, which is cached weakly per f (per function for a
    ``jax.tree_util.Partial``, its bound arrays passed as data; see
    :func:`landscape.runtime.split_partial`): other directions, another point, another α of a
    ``weight_loss`` compile nothing.
    """
    if not isinstance(directions, list | tuple) or len(directions) not in (1, 2):
        raise ValueError("directions must be a list of one (line) or two (surface) pytrees shaped like "
                         f"params, e.g. [random_direction(params)]; got {type(directions).__name__}"
                         + (f" of length {len(directions)}" if isinstance(directions, list | tuple) else ""))
    structure = jax.tree.structure(params)
    for k, d in enumerate(directions):
        if jax.tree.structure(d) != structure:
            raise ValueError(f"directions[{k}] is not shaped like params (tree structure {jax.tree.structure(d)} "
                             f"against {structure}); pass a list of pytrees, e.g. [random_direction(params)]")
    checks.check_int(num, "num", minimum=2)
    checks.check_int(chunk, "chunk")
    if (not isinstance(span, Sequence | np.ndarray) or len(span) != 2 or not all(checks.is_real(v) for v in span)
            or not all(np.isfinite(span)) or span[0] >= span[1]):
        raise ValueError(f"span={span!r} must be (lo, hi) with finite lo < hi")
    coords = np.linspace(span[0], span[1], num)
    if len(directions) == 1:
        grid = coords[:, None]
    else:
        ga, gb = np.meshgrid(coords, coords)
        grid = np.stack([ga.ravel(), gb.ravel()], axis=1)

    fn, bound = runtime.split_partial(f)
    program = _grid_program(fn)
    directions = tuple(directions)
    pad = (-len(grid)) % chunk
    padded = np.concatenate([grid, np.repeat(grid[:1], pad, axis=0)]).astype(np.float32)
    values = np.concatenate([np.asarray(program(padded[s:s + chunk], params, directions, bound))
                             for s in range(0, len(padded), chunk)])
    if values.ndim != 1:
        raise ValueError(f"f must return a scalar, got output of shape {values.shape[1:]}; reduce it (e.g. mean)")
    values = values[: len(grid)].astype(np.float64)
    if len(directions) == 1:
        return Line(coords, values, grid)
    return Surface(coords, coords, values.reshape(num, num), ("d1", "d2"), np.zeros(2))


_GRID_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _grid_program(fn):
    """The jitted (coefficients (chunk, k), params, k directions, bound data or None) → (chunk,)
    values of fn(params + Σ_k c_k d_k), vmapped over the coefficients; cached weakly on fn
    (:func:`landscape.runtime.weak_entry`)."""
    per_fn, fn_ref = runtime.weak_entry(_GRID_PROGRAMS, fn)
    if "grid" not in per_fn:
        def at(c, params, directions, data):
            shifted = params
            for k, d in enumerate(directions):
                shifted = jax.tree.map(lambda p, v, k=k: p + c[k] * v, shifted, d)
            return runtime.call_split(fn_ref(), data, shifted)

        per_fn["grid"] = jax.jit(jax.vmap(at, in_axes=(0, None, None, None)))
    return per_fn["grid"]
