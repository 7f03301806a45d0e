"""AdaRound: learn whether each weight rounds up or down (Nagel et al., ICML 2020).

Round-to-nearest minimises each weight's own error, not the layer's output error. With the grid
fixed by a clipping vector α (a rule or :func:`landscape.lapq`), AdaRound keeps every weight on
one of its two neighbouring levels and picks between them to reconstruct the layer's output. Per
layer, with z = (W − offset)/Δ the weight in grid units (:mod:`landscape.quantizers`), ⌊z⌋ its
lower level and h(V) ∈ [0, 1] a learnt soft rounding,

    W̃(V) = Δ · clip(⌊z⌋ + h(V), lo, hi) + offset,   h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1), ζ = 1.1, γ = −0.1

    min_V  mean over (examples, positions) of ‖ X̃ ⊛ W̃(V) − X ⊛ W ‖²  +  λ Σ (1 − |2h(V) − 1|^β)

where ⊛ is the layer's product (bias excluded), X the layer's input in the float network, X̃ its
input in the network quantized so far (earlier layers already rounded, activations quantized at
α: the paper's asymmetric reconstruction; ``inputs="float"`` uses X), and the regulariser, off
for the first ``warmup`` fraction of the steps, pushes h to 0 or 1 while β falls linearly from 20
to 2. V starts where h(V) equals the fractional part z − ⌊z⌋ (round-to-nearest in the limit). The
result rounds up where h(V) ≥ 1/2. λ = 0.01 and the β schedule are the paper's.

The paper runs Adam (lr 1e-3) for 10,000–20,000 steps on mini-batches of 32 recorded examples.
The layer is linear in its kernel, so the reconstruction error over all recorded examples is a
quadratic form in W̃ with the input patches' second moments G = PᵀP/M and cross moments
B = PᵀY/M (:func:`input_statistics`, computed once per layer): every step here is exact over the
whole recorded set and costs a (K, K) × (K, C) product, K the kernel's fan-in. With no sampling
noise, 1000 full-batch Adam steps at lr 1e-2 are the default.

Choices: a layer keeps round-to-nearest when AdaRound's hard rounding reconstructs the recorded
examples worse (so no layer gets worse on the calibration data); weights clipped at ±α stay at the
end level. The loss must not use bias correction (AdaRound fits the rounding's mean error itself).
The result is a :class:`~landscape.export.QuantizedNetwork`: integer codes, the loss's per-site
scales, activations quantized at α.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape import export, runtime, sites
from landscape import layers as qlayers
from landscape.adaprune import record_layers

__all__ = ["AdaRoundResult", "RoundingFit", "adaround", "input_statistics", "round_layer", "soft_rounding"]

ZETA, GAMMA = 1.1, -0.1  # the stretch of the rectified sigmoid: h reaches 0 and 1 exactly
INPUTS = ("quantized", "float")


def soft_rounding(v):
    """h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1), the rectified sigmoid (any shape)."""
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse_soft_rounding(h):
    """V with h(V) = h for h in (0, 1) (clipped just inside so V stays finite)."""
    p = jnp.clip((h - GAMMA) / (ZETA - GAMMA), 1e-4, 1.0 - 1e-4)
    return jnp.log(p) - jnp.log1p(-p)


@dataclasses.dataclass(frozen=True)
class RoundingFit:
    """One layer's rounding (:func:`round_layer`).

    Attributes:
        codes: the integer codes, the kernel's shape (float-valued integers; int32 array).
        mse_nearest: output MSE of round-to-nearest on the recorded examples.
        mse: output MSE of ``codes`` (≤ ``mse_nearest``).
        flipped: fraction of weights whose code differs from round-to-nearest.
        adaround_kept: False when round-to-nearest was kept (AdaRound's rounding was worse).
        history: output MSE of the hard rounding of the iterate, every ``iterations // 10`` steps.
    """

    codes: np.ndarray
    mse_nearest: float
    mse: float
    flipped: float
    adaround_kept: bool
    history: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class AdaRoundResult:
    """What :func:`adaround` returns.

    Attributes:
        network: the :class:`~landscape.export.QuantizedNetwork` with the learnt codes (its
            ``accuracy``, ``apply``, ``save`` as for :func:`~landscape.export.quantize_network`).
        nearest: the same network rounded to nearest (the loss's own quantization at α).
        layers: weight site name → :class:`RoundingFit`, network order.
        seconds: wall time.
    """

    network: export.QuantizedNetwork
    nearest: export.QuantizedNetwork
    layers: dict[str, RoundingFit]
    seconds: float

    def __repr__(self) -> str:
        width = max([len(n) for n in self.layers] + [5])
        lines = [f"AdaRoundResult({len(self.layers)} layers, seconds={self.seconds:.1f})",
                 f"  {'layer':<{width}}  mse_nearest         mse  flipped"]
        for name, f in self.layers.items():
            lines.append(f"  {name:<{width}}  {f.mse_nearest:11.3e}  {f.mse:10.3e}  {f.flipped:7.3f}"
                         + ("" if f.adaround_kept else "  (nearest kept)"))
        return "\n".join(lines)


def _check_number(value, name: str, *, integer: bool = False, allow_zero: bool = False):
    valid = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
             and (value > 0 or (allow_zero and value == 0)))
    if not valid or (integer and not isinstance(value, numbers.Integral)):
        sign = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name}={value!r} must be a {sign} {'integer' if integer else 'number'}")
    return int(value) if integer else float(value)


def _checked_options(iterations=1000, reg=0.01, beta=(20.0, 2.0), warmup=0.2, lr=1e-2):
    """:func:`round_layer`'s options, validated (the defaults are its defaults)."""
    iterations = _check_number(iterations, "iterations", integer=True)
    lr = _check_number(lr, "lr")
    reg = _check_number(reg, "reg", allow_zero=True)
    if not (isinstance(warmup, numbers.Real) and 0.0 <= warmup < 1.0):
        raise ValueError(f"warmup={warmup!r} must be a fraction in [0, 1)")
    try:
        b_start, b_end = (float(b) for b in beta)
    except (TypeError, ValueError):
        b_start = b_end = float("nan")
    if not (b_start >= b_end > 0):
        raise ValueError(f"beta={beta!r} must be (start, end) with start ≥ end > 0")
    return iterations, reg, (b_start, b_end), float(warmup), lr


def _output_mse(gemm, x, y, w, chunk: int = 256) -> float:
    total = 0.0
    for start in range(0, x.shape[0], chunk):
        d = gemm(x[start:start + chunk], w) - y[start:start + chunk]
        total += float(jnp.sum(jnp.square(d)))
    return total / y.size


def input_statistics(x, y, kernel_shape, gemm, chunk: int = 32, precision: str = "highest"):
    """The layer's reconstruction error as a quadratic form in its kernel.

    With P the layer's input patches (M rows: examples × output positions; K = the kernel's size
    without its output axis) the product is ``gemm(x, W) = P · W`` (W as (K, C)), so

        mean over rows of ‖P W̃ − Y‖²  =  Σ_c (w̃_cᵀ G w̃_c − 2 w̃_cᵀ B_c) + t,
        G = PᵀP / M (K, K),   B = PᵀY / M (K, C),   t = ‖Y‖² / M.

    P comes from the layer's own product with an identity kernel (K output channels), so any
    layer whose output channel c depends only on W[..., c] (dense, convolution) works. That
    product runs at ``precision`` ("highest": a GPU's TF32 would round the patches to 10 bits).

    Returns:
        (G, B, t) as float64 numpy arrays and a float.
    """
    runtime.check_precision(precision, "input_statistics")
    with jax.default_matmul_precision(precision):  # read while tracing, and part of jit's key
        return _input_statistics(x, y, kernel_shape, gemm, chunk)


def _input_statistics(x, y, kernel_shape, gemm, chunk):
    k = int(np.prod(kernel_shape[:-1]))
    eye = jnp.eye(k, dtype=jnp.float32).reshape(*kernel_shape[:-1], k)
    patches = jax.jit(lambda xb: gemm(xb, eye).reshape(-1, k))
    probe = np.asarray(jax.random.normal(jax.random.key(0), kernel_shape), np.float32)
    direct = np.asarray(gemm(x[:1], probe)).reshape(-1, kernel_shape[-1])
    via = np.asarray(patches(x[:1])) @ probe.reshape(k, -1)
    if not np.allclose(direct, via, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(direct).max()))):
        raise ValueError(f"the layer's product is not P · W for a kernel of shape {kernel_shape} (a grouped "
                         "convolution?): AdaRound here needs each output channel to read only its own kernel")
    G, B, t, rows = np.zeros((k, k)), np.zeros((k, kernel_shape[-1])), 0.0, 0
    for start in range(0, x.shape[0], chunk):
        P = np.asarray(patches(x[start:start + chunk]), np.float64)
        Y = np.asarray(y[start:start + chunk], np.float64).reshape(P.shape[0], -1)
        G += P.T @ P
        B += P.T @ Y
        t += float(np.sum(Y * Y))
        rows += P.shape[0]
    return G / rows, B / rows, t / rows


def round_layer(x, y, kernel, scale, offset, lo: int, hi: int, gemm, *, iterations: int = 1000,
                reg: float = 0.01, beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2,
                lr: float = 1e-2, precision: str = "highest") -> RoundingFit:
    """Learn one layer's rounding (the AdaRound step; see the module docstring).

    The reconstruction error is evaluated exactly over all of ``x`` through the input statistics
    of :func:`input_statistics` (G, B, t): each step costs a (K, K) × (K, C) product instead of
    the layer over a mini-batch, and there is no sampling noise (nothing random at all).

    Args:
        x: the layer's inputs (N, ...) in the network quantized so far; y: its float outputs
            ``gemm(x_float, kernel)`` (N, ..., C).
        kernel: the float kernel W (..., C); scale, offset: Δ and the grid's offset, scalars or
            (C,) per output channel; lo, hi: the grid's integer code range.
        gemm: the layer's product ``gemm(x, w)``, linear in w.
        iterations, lr: Adam steps (full batch).
        reg, beta, warmup: λ, the (start, end) of β and the fraction of steps without the
            regulariser.
        precision: matmul/convolution precision of the layer's products ("highest": true
            float32; a ``jax.default_matmul_precision`` value).

    Returns:
        :class:`RoundingFit`.
    """
    options = _checked_options(iterations, reg, beta, warmup, lr)
    runtime.check_precision(precision, "round_layer")
    with jax.default_matmul_precision(precision):
        return _round_layer(x, y, kernel, scale, offset, lo, hi, gemm, *options, precision)


def _round_layer(x, y, kernel, scale, offset, lo, hi, gemm, iterations, reg, beta, warmup, lr, precision):
    b_start, b_end = beta
    w = jnp.asarray(kernel, jnp.float32)
    scale, offset = jnp.asarray(scale, jnp.float32), jnp.asarray(offset, jnp.float32)
    x, y = jnp.asarray(x), jnp.asarray(y)
    G, B, t = input_statistics(x, y, w.shape, gemm, precision=precision)
    G, B = jnp.asarray(G, jnp.float32), jnp.asarray(B, jnp.float32)
    k, channels = G.shape[0], w.shape[-1]
    z = (w - offset) / scale
    base = jnp.floor(z)
    nearest = jnp.clip(jnp.round(z), lo, hi)
    start_reg = int(warmup * iterations)
    report_every = max(1, iterations // 10)
    tx = optax.adam(lr)

    def weights(codes):
        return codes * scale + offset

    def hard(v):
        return jnp.clip(base + (soft_rounding(v) >= 0.5), lo, hi)

    def reconstruction(kernel):
        """mean over rows of Σ_c (ŷ_c − y_c)², up to the constant t."""
        wm = kernel.reshape(k, channels)
        return jnp.sum(wm * (jnp.matmul(G, wm, precision="highest") - 2.0 * B))

    def objective(v, b, on):
        h = soft_rounding(v)
        rec = reconstruction(weights(jnp.clip(base + h, lo, hi)))
        return rec + on * reg * jnp.sum(1.0 - jnp.abs(2.0 * h - 1.0) ** b)

    @jax.jit
    def run(v):
        def body(i, carry):
            v, s, hist = carry
            progress = jnp.clip((i - start_reg) / max(iterations - start_reg, 1), 0.0, 1.0)
            b = b_end + (b_start - b_end) * (1.0 - progress)  # β: start → end after the warm-up
            on = (i >= start_reg).astype(jnp.float32)  # the regulariser is off during the warm-up
            u, s = tx.update(jax.grad(objective)(v, b, on), s, v)
            v = optax.apply_updates(v, u)
            hist = jax.lax.cond((i + 1) % report_every == 0,
                                lambda h: h.at[(i + 1) // report_every - 1].set(
                                    (reconstruction(weights(hard(v))) + t) / channels),
                                lambda h: h, hist)
            return v, s, hist

        hist = jnp.zeros((iterations // report_every,), jnp.float32)
        v, _, hist = jax.lax.fori_loop(0, iterations, body, (v, tx.init(v), hist))
        return v, hist

    v, hist = run(_inverse_soft_rounding(z - base))
    learnt = hard(v)
    mse_nearest = _output_mse(gemm, x, y, weights(nearest))
    mse = _output_mse(gemm, x, y, weights(learnt))
    kept = mse <= mse_nearest
    codes = learnt if kept else nearest
    return RoundingFit(np.asarray(codes, np.int32), mse_nearest, min(mse, mse_nearest),
                       float(jnp.mean(codes != nearest)), bool(kept), tuple(float(h) for h in np.asarray(hist)))


def _layer_inputs(model, names, act_specs, act_alphas):
    """A jitted ``(variables, x) → {name: the layer's input}`` with the activation sites in
    ``act_specs`` quantized at ``act_alphas`` (none: the float network)."""
    wanted = set(names)

    def run(variables, x):
        store = {}

        def record(module, inputs, kernel, gemm):
            name = "/".join(module.path)
            if name in wanted and name not in store:
                store[name] = inputs
            return gemm(inputs, kernel)

        with qlayers.gemm_hook(record), sites.quantizing(act_specs, act_alphas):
            model.apply(variables, x, train=False)
        return store

    return jax.jit(run)


def adaround(loss, alpha, *, num_images: int = 256, inputs: str = "quantized", **round_kw) -> AdaRoundResult:
    """AdaRound every quantized weight site of ``loss`` on the grid that ``alpha`` sets.

    Args:
        loss: a :class:`~landscape.ClipLoss` without bias correction (its sites, widths, grid,
            per-channel α and BN folding are used; its calibration images are the data).
        alpha: (n,) clipping vector, e.g. ``loss.init("mse")`` or ``lapq(loss).alpha``.
        num_images: calibration images recorded (the first ``num_images`` of the loss's set).
        inputs: "quantized" (each layer's input from the network rounded so far, activations
            quantized at α; the paper's choice) or "float" (the float network's inputs). A layer
            applied more than once is fitted on its first application.
        **round_kw: passed to :func:`round_layer` (iterations, reg, beta, warmup, lr); every
            product runs at the loss's ``precision``.

    Returns:
        :class:`AdaRoundResult`; ``result.network.accuracy(data.test)`` evaluates it.
    """
    t0 = time.perf_counter()
    if loss.options.get("bias_correction"):
        raise ValueError("adaround needs a ClipLoss built with bias_correction=False: AdaRound fits the "
                         "rounding's per-channel error itself, and the codes would not be the loss's grid")
    if inputs not in INPUTS:
        raise ValueError(f"inputs={inputs!r} is not allowed; use one of {INPUTS}")
    num_images = _check_number(num_images, "num_images", integer=True)
    if "precision" in round_kw:
        raise ValueError(f"adaround runs at the loss's precision ({loss.precision!r}); build the ClipLoss with "
                         "precision=... instead of passing it here")
    _checked_options(**round_kw)  # bad options fail here, before any recording
    nearest = export.quantize_network(loss, alpha)  # checks α; the loss's own round-to-nearest
    names = [n for n, s in nearest.sites.items() if s.kind == "weight"]
    if not names:
        raise ValueError(f"{loss!r} quantizes no weight site: nothing to round")
    with jax.default_matmul_precision(loss.precision):  # the loss's products, read while tracing
        return _adaround(loss, nearest, names, num_images, inputs, round_kw, t0)


def _adaround(loss, nearest, names, num_images, inputs, round_kw, t0):
    x = jnp.asarray(np.asarray(loss.calib.x[:num_images], np.float32))
    act = {n: s for n, s in nearest.sites.items() if s.kind == "activation"}
    act_specs = {n: sites.SiteSpec(s.bits, s.grid) for n, s in act.items()}
    act_alphas = {n: float(s.alpha[0]) for n, s in act.items()}
    float_inputs = _layer_inputs(loss.model, names, {}, {})(loss.variables, x)
    quantized_inputs = _layer_inputs(loss.model, names, act_specs, act_alphas)
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
        fit = round_layer(xq, y, w, site.scale, site.offset, lo, hi, gemms[name], precision=loss.precision,
                          **round_kw)
        fits[name] = fit
        codes[name] = fit.codes.astype(nearest.codes[name].dtype)
        current = _with_kernel(current, name, jnp.asarray(fit.codes * site.scale + site.offset, jnp.float32))
    variables = nearest.variables
    for name in names:
        s = nearest.sites[name]
        variables = _with_kernel(variables, name, jnp.asarray(codes[name].astype(np.float32) * s.scale + s.offset))
    network = dataclasses.replace(nearest, variables=variables, codes=codes)
    return AdaRoundResult(network, nearest, fits, time.perf_counter() - t0)


def _with_kernel(variables, name: str, kernel):
    """``variables`` with the kernel of layer ``name`` replaced (new dicts along the path)."""
    def set_in(node, path):
        node = dict(node)
        node[path[0]] = set_in(node[path[0]], path[1:]) if len(path) > 1 else kernel
        return node

    return set_in(variables, ["params", *name.split("/"), "kernel"])
