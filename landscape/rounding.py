"""Layer-by-layer rounding on a fixed grid: what AdaRound and GPTQ share.

A clipping vector α fixes every weight site's grid (step Δ, offset, integer code range); a
rounding rule then chooses each weight's code to reconstruct the layer's output, layer by layer
in network order. The layer is linear in its kernel, so its reconstruction error over all
recorded examples is a quadratic form in the kernel. With P the layer's input patches (M rows:
examples × output positions; K the kernel's fan-in) and Y the float network's output,

    mean over rows of ‖P W̃ − Y‖²  =  Σ_c (w̃_cᵀ G w̃_c − 2 w̃_cᵀ B_c) + t,
    G = PᵀP / M (K, K),   B = PᵀY / M (K, C),   t = ‖Y‖² / M

(:func:`input_statistics`). A rule is a function ``rule(x, y, kernel, scale, offset, lo, hi,
gemm) → RoundingFit`` over one layer's recorded inputs ``x`` and float outputs ``y``;
:func:`round_network` records the inputs (from the network rounded so far, activations
quantized at α: asymmetric reconstruction; or from the float network), calls the rule per
layer, and assembles a :class:`~landscape.export.QuantizedNetwork`. Rules here:
:func:`landscape.adaround` (learnt rounding) and :func:`landscape.gptq` (error-compensating
greedy rounding). Each layer keeps round-to-nearest when the rule reconstructs worse.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from landscape import checks, export, runtime, sites
from landscape import layers as qlayers
from landscape.data import spread_rows
from landscape.layerwise import layer_inputs, layer_mse, record_layers

__all__ = ["INPUTS", "RoundingFit", "RoundingResult", "input_statistics", "keep_better", "nearest_codes",
           "round_network", "zero_code"]

INPUTS = ("quantized", "float")
DEFAULT_NUM_IMAGES = 256  # calibration images recorded when num_images is None


@dataclasses.dataclass(frozen=True)
class RoundingFit:
    """One layer's rounding by a rule.

    Attributes:
        codes: the integer codes, the kernel's shape (int32 array).
        mse_nearest: output MSE of round-to-nearest on the recorded examples.
        mse: output MSE of ``codes`` (≤ ``mse_nearest``).
        flipped: fraction of weights whose code differs from round-to-nearest.
        kept: False when round-to-nearest was kept (the rule's rounding reconstructed worse).
        history: the rule's progress (AdaRound: output MSE of the hard rounding every
            ``iterations // 10`` steps; empty for a one-pass rule).
    """

    codes: np.ndarray
    mse_nearest: float
    mse: float
    flipped: float
    kept: bool
    history: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class RoundingResult:
    """What :func:`round_network` (and so ``adaround``, ``gptq``) returns.

    Attributes:
        method: the rule's name ("adaround", "gptq").
        network: the :class:`~landscape.export.QuantizedNetwork` with the rule's codes (its
            ``accuracy``, ``apply``, ``save`` as for :func:`~landscape.export.quantize_network`).
        nearest: the same network rounded to nearest (the loss's own quantization at α).
        layers: weight site name → :class:`RoundingFit`, network order.
        seconds: wall time.
    """

    method: str
    network: export.QuantizedNetwork
    nearest: export.QuantizedNetwork
    layers: dict[str, RoundingFit]
    seconds: float

    def __repr__(self) -> str:
        width = max([len(n) for n in self.layers] + [5])
        lines = [f"RoundingResult({self.method}, {len(self.layers)} layers, seconds={self.seconds:.1f})",
                 f"  {'layer':<{width}}  mse_nearest         mse  flipped"]
        for name, f in self.layers.items():
            lines.append(f"  {name:<{width}}  {f.mse_nearest:11.3e}  {f.mse:10.3e}  {f.flipped:7.3f}"
                         + ("" if f.kept else "  (nearest kept)"))
        return "\n".join(lines)


def zero_code(scale, offset, lo, hi):
    """The code z with Δ·z + offset = 0 (per channel, float64), or None where the grid has no
    zero level (the midrise grid's offset is half a step off): where a pruned weight can stay 0."""
    zero = -np.asarray(offset, np.float64) / np.asarray(scale, np.float64)
    return zero if np.all((zero == np.round(zero)) & (lo <= zero) & (zero <= hi)) else None


def check_number(value, name: str, *, integer: bool = False, allow_zero: bool = False):
    """``value`` as an int or float if it is a finite positive (or zero) number, else a ValueError."""
    valid = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
             and (value > 0 or (allow_zero and value == 0)))
    if not valid or (integer and not isinstance(value, numbers.Integral)):
        sign = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name}={value!r} must be a {sign} {'integer' if integer else 'number'}")
    return int(value) if integer else float(value)


@jax.jit
def nearest_codes(kernel, scale, offset, lo, hi):
    """Round-to-nearest codes clip(round((W − offset) / Δ), lo, hi), as the loss's quantizer
    rounds (half to even); one compiled program per kernel shape."""
    return jnp.clip(jnp.round((kernel - offset) / scale), lo, hi)


def keep_better(x, y, gemm, codes, nearest, scale, offset, history=()) -> RoundingFit:
    """The :class:`RoundingFit` of ``codes``, or of ``nearest`` when that reconstructs the layer better."""
    mse_nearest = layer_mse(gemm, x, y, nearest * scale + offset)
    mse = layer_mse(gemm, x, y, codes * scale + offset)
    kept = mse <= mse_nearest
    chosen = codes if kept else nearest
    return RoundingFit(np.asarray(chosen, np.int32), mse_nearest, min(mse, mse_nearest),
                       float(np.mean(np.asarray(chosen) != np.asarray(nearest))), bool(kept), tuple(history))


def input_statistics(x, y, kernel_shape, gemm, chunk: int = 32, precision: str = "highest"):
    """The layer's reconstruction error as a quadratic form in its kernel (module docstring).

    P comes from the layer's own product with an identity kernel (K output channels), so any
    layer whose output channel c depends only on W[..., c] (dense, convolution) works. That
    product runs at ``precision`` ("highest": a GPU's TF32 would round the patches to 10 bits).

    Returns:
        (G, B, t) as float64 numpy arrays (K, K), (K, C) and a float.
    """
    runtime.check_precision(precision, "input_statistics")
    with jax.default_matmul_precision(precision):  # read while tracing, and part of jit's key
        return _input_statistics(x, y, kernel_shape, gemm, chunk)


def _input_statistics(x, y, kernel_shape, gemm, chunk):
    groups = qlayers.feature_groups(gemm)
    if groups > 1:
        raise ValueError(f"the layer's product is a grouped convolution (feature_group_count={groups}, kernel "
                         f"{tuple(kernel_shape)}): its output channels read different inputs, so there is no one "
                         "quadratic form; fit each group on its own input channels with an ungrouped product "
                         "(round_network does)")
    for name, a in (("x", x), ("y", y)):
        n = np.shape(a)[0] if np.ndim(a) else 0
        if n == 0:
            raise ValueError(f"{name} has 0 examples; the layer's statistics need at least one input")
        if not np.all(np.isfinite(np.asarray(a))):
            raise ValueError(f"{name} has {int(np.sum(~np.isfinite(np.asarray(a))))} NaN/inf entries; the layer's "
                             "statistics need finite inputs and outputs")
    if np.shape(x)[0] != np.shape(y)[0]:
        raise ValueError(f"x has {np.shape(x)[0]} examples and y {np.shape(y)[0]}; they must be the same ones")
    k = int(np.prod(kernel_shape[:-1]))
    eye = jnp.eye(k, dtype=jnp.float32).reshape(*kernel_shape[:-1], k)
    patches = functools.partial(_patches, gemm, eye=eye)
    x, y = np.asarray(x, np.float32), np.asarray(y)  # host slices: no eager program per chunk shape
    G, B, t, rows = np.zeros((k, k)), np.zeros((k, kernel_shape[-1])), 0.0, 0
    for start in range(0, x.shape[0], chunk):
        P = np.asarray(patches(x[start:start + chunk]), np.float64)
        if start == 0:  # the check reuses the first chunk's patches: no program of its own shape
            _check_patches(P, x[:chunk], kernel_shape, gemm)
        Y = np.asarray(y[start:start + chunk], np.float64).reshape(P.shape[0], -1)
        G += P.T @ P
        B += P.T @ Y
        t += float(np.sum(Y * Y))
        rows += P.shape[0]
    return G / rows, B / rows, t / rows


def _check_patches(P, xb, kernel_shape, gemm):
    """Raise unless gemm(xb, W) = P · W for a random kernel W: each output channel must read only
    its own kernel (a grouped convolution does not)."""
    probe = np.random.default_rng(0).standard_normal(kernel_shape).astype(np.float32)
    direct = np.asarray(gemm(xb, probe), np.float64).reshape(-1, kernel_shape[-1])
    via = P @ probe.reshape(P.shape[1], -1)
    if not np.allclose(direct, via, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(direct).max()))):
        raise ValueError(f"the layer's product is not P · W for a kernel of shape {kernel_shape} (a grouped "
                         "convolution?): layer-wise rounding here needs each output channel to read only its "
                         "own kernel")


@functools.partial(jax.jit, static_argnums=0)
def _patches(gemm, xb, eye):
    """The input patches P (rows, K) of ``xb``: the layer's product with an identity kernel."""
    return gemm(xb, eye).reshape(-1, eye.shape[-1])


def round_network(loss, alpha, rule: Callable[..., RoundingFit], *, method: str, num_images: int | None = None,
                  inputs: str = "quantized") -> RoundingResult:
    """Round every quantized weight site of ``loss`` with ``rule``, layer by layer.

    Args:
        loss: a :class:`~landscape.ClipLoss` without bias correction (its sites, widths, grid,
            per-channel α and BN folding are used; its calibration images are the data).
        alpha: (n,) clipping vector, e.g. ``loss.init("mse")`` or ``lapq(loss).alpha``.
        rule: ``rule(x, y, kernel, scale, offset, lo, hi, gemm) → RoundingFit`` for one layer
            (see the module docstring); called with the loss's precision active.
        method: the rule's name, for messages and the result.
        num_images: calibration images recorded: ``num_images`` of the loss's set spread over it
            (:func:`landscape.data.spread_rows`; at most its size; default None: 256, or all
            when it has fewer).
        inputs: "quantized" (each layer's input from the network rounded so far, activations
            quantized at α) or "float" (the float network's inputs). A layer applied more than
            once is fitted on its first application, with a warning naming it.

    Returns:
        :class:`RoundingResult`; ``result.network.accuracy(data.test)`` evaluates it.
    """
    t0 = time.perf_counter()
    checks.check_clip_loss(loss, method)
    if loss.options.get("bias_correction"):
        raise ValueError(f"{method} needs a ClipLoss built with bias_correction=False: the rounding fits the "
                         "per-channel error itself, and the codes would not be the loss's grid")
    if inputs not in INPUTS:
        raise ValueError(f"inputs={inputs!r} is not allowed; use one of {INPUTS}")
    if num_images is None:
        num_images = min(DEFAULT_NUM_IMAGES, int(loss.n_calib))
    num_images = check_number(num_images, "num_images", integer=True)
    if num_images > loss.n_calib:
        raise ValueError(f"num_images={num_images} exceeds the loss's {loss.n_calib} calibration images; "
                         "use at most that many, or a ClipLoss on a larger calibration set")
    nearest = export.quantize_network(loss, alpha)  # checks α; the loss's own round-to-nearest
    names = [n for n, s in nearest.sites.items() if s.kind == "weight"]
    if not names:
        raise ValueError(f"{loss!r} quantizes no weight site: nothing to round")
    with jax.default_matmul_precision(loss.precision):  # the loss's products, read while tracing
        fits, codes, kernels = _round_layers(loss, np.asarray(alpha, np.float32), nearest, names, rule, num_images,
                                             inputs)
    variables = nearest.variables
    for name in names:
        variables = _with_kernel(variables, name, kernels[name])
    network = dataclasses.replace(nearest, variables=variables, codes=codes)
    return RoundingResult(method, network, nearest, fits, time.perf_counter() - t0)


def _round_layers(loss, alpha, nearest, names, rule, num_images, inputs):
    x = jnp.asarray(np.asarray(loss.calib.x[spread_rows(len(loss.calib.x), num_images)], np.float32))
    act = {n: s for n, s in nearest.sites.items() if s.kind == "activation"}
    act_specs = {n: sites.SiteSpec(s.bits, s.grid) for n, s in act.items()}
    act_alphas = {n: float(s.alpha[0]) for n, s in act.items()}
    float_inputs = layer_inputs(loss.model, names, {}, {})(loss.variables, x)
    quantized_inputs = layer_inputs(loss.model, names, act_specs, act_alphas)
    # the layers' own products, strides and padding bound (one example suffices)
    gemms = {n: gemm for n, (_, _, gemm) in
             record_layers(loss.model, loss.variables, x[:1], names, precision=loss.precision).items()}

    def kernel_of(variables, name):
        node = variables["params"]
        for part in name.split("/"):
            node = node[part]
        return node["kernel"]

    current = loss.variables  # float kernels, replaced (in new dicts) as layers finish
    codes, fits = dict(nearest.codes), {}
    for name in names:
        site = nearest.sites[name]
        w = kernel_of(loss.variables, name)
        y = gemms[name](float_inputs[name], w)
        xq = quantized_inputs(current, x)[name] if inputs == "quantized" else float_inputs[name]
        lo, hi = site.code_range()
        if qlayers.feature_groups(gemms[name]) > 1:
            fit = _round_groups(rule, xq, y, w, site.scale, site.offset, lo, hi, gemms[name])
        else:
            fit = rule(xq, y, w, site.scale, site.offset, lo, hi, gemms[name])
        fits[name] = fit
        codes[name] = fit.codes.astype(nearest.codes[name].dtype)
        # placed like the float kernel: same input types, so quantized_inputs compiles once
        if np.array_equal(codes[name], nearest.codes[name]):
            values = kernel_of(nearest.variables, name)
        else:  # the codes' grid values as the loss's quantizer forms them (not NumPy's Δ·q + offset: an ulp off)
            near = np.asarray(fit.codes, np.float64) * site.scale + site.offset  # within an ulp of the grid
            values = export.grid_weights(loss, alpha, _with_kernel(current, name, jnp.asarray(near, np.float32)))
            values = np.asarray(values[name][0], np.float32)
            got = np.rint((values.astype(np.float64) - site.offset) / site.scale)
            if not np.array_equal(got, fit.codes):  # a guard: the grid value of a code is that code
                raise AssertionError(f"{name}: the loss's quantizer moved {int(np.sum(got != fit.codes))} codes")
        rounded = jax.device_put(np.asarray(values, np.float32), w.sharding)
        current = _with_kernel(current, name, rounded)
    return fits, codes, {name: kernel_of(current, name) for name in names}


def _round_groups(rule, x, y, w, scale, offset, lo, hi, gemm) -> RoundingFit:
    """``rule`` on each group of a grouped convolution (g = ``feature_group_count``) apart: group j
    is an ordinary convolution (same strides, padding and dilation) of input channels [j·C_in/g, (j+1)·C_in/g)
    with output channels [j·C_out/g, (j+1)·C_out/g), whose error is its own quadratic form; the
    layer's output MSE is the mean of the groups' (each group has as many outputs)."""
    groups = qlayers.feature_groups(gemm)
    one = qlayers.conv_general(gemm.strides, gemm.padding, dilation=gemm.dilation)
    x, y, w = np.asarray(x), np.asarray(y), np.asarray(w)
    k, co = w.shape[-2], w.shape[-1] // groups
    channels = w.shape[-1]
    scale = np.broadcast_to(np.asarray(scale, np.float32), (channels,))
    offset = np.broadcast_to(np.asarray(offset, np.float32), (channels,))
    fits = []
    for j in range(groups):
        out = slice(j * co, (j + 1) * co)
        fits.append(rule(x[..., j * k:(j + 1) * k], y[..., out], w[..., out], scale[out], offset[out], lo, hi, one))
    codes = np.concatenate([f.codes for f in fits], axis=-1)
    histories = {len(f.history) for f in fits}
    history = tuple(np.mean([f.history for f in fits], axis=0).tolist()) if len(histories) == 1 else ()
    return RoundingFit(codes, float(np.mean([f.mse_nearest for f in fits])), float(np.mean([f.mse for f in fits])),
                       float(np.mean([f.flipped for f in fits])), any(f.kept for f in fits), history)


def _with_kernel(variables, name: str, kernel):
    """``variables`` with the kernel of layer ``name`` replaced (new dicts along the path)."""
    def set_in(node, path):
        node = dict(node)
        node[path[0]] = set_in(node[path[0]], path[1:]) if len(path) > 1 else kernel
        return node

    return set_in(variables, ["params", *name.split("/"), "kernel"])
