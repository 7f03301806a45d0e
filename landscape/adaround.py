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
α: the paper's asymmetric reconstruction, taken before the activation function and the bias,
which the paper's final objective includes: the error is then an exact quadratic form in W̃;
``inputs="float"`` uses X), and the regulariser, off
for the first ``warmup`` fraction of the steps, pushes h to 0 or 1 while β falls linearly from 20
to 2. V starts where h(V) equals the fractional part z − ⌊z⌋ (round-to-nearest in the limit),
moved 1e-4 inside (0, 1) so that a weight exactly on a level can still move (h's clip edge had
left its gradient 0). The result rounds up where h(V) ≥ 1/2. λ = 0.01 and the β schedule are the
paper's. A weight that is exactly 0 (pruned) keeps the zero code where the grid has one
(midtread), as in GPTQ, so a K:M network's rounding stays K:M.

The paper runs Adam (lr 1e-3) for 10,000–20,000 steps on mini-batches of 32 recorded examples.
The layer is linear in its kernel, so the reconstruction error over all recorded examples is a
quadratic form in W̃ with the input patches' second moments G = PᵀP/M and cross moments
B = PᵀY/M (:func:`landscape.rounding.input_statistics`, computed once per layer): every step here is exact over the
whole recorded set and costs a (K, K) × (K, C) product, K the kernel's fan-in. With no sampling
noise, 1000 full-batch Adam steps at lr 1e-2 are the default.

Choices: a layer keeps round-to-nearest when AdaRound's hard rounding reconstructs the recorded
examples worse (so no layer gets worse on the calibration data); weights clipped at ±α stay at the
end level. The loss must not use bias correction (AdaRound fits the rounding's mean error itself).
Recording and assembling the network are :func:`landscape.rounding.round_network`'s; the result's
``network`` is a :class:`~landscape.export.QuantizedNetwork`: integer codes, the loss's per-site
scales, activations quantized at α.
"""

from __future__ import annotations

import functools
import inspect
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape import checks, runtime
from landscape.rounding import (
    RoundingFit,
    RoundingResult,
    check_number,
    input_statistics,
    keep_better,
    nearest_codes,
    round_network,
    zero_code,
)

__all__ = ["adaround", "round_layer", "soft_rounding"]

ZETA, GAMMA = 1.1, -0.1  # the stretch of the rectified sigmoid: h reaches 0 and 1 exactly


def soft_rounding(v):
    """h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1), the rectified sigmoid (any shape)."""
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


# V starts where h(V) is at least this far inside (0, 1): a weight exactly on a level (fraction 0)
# started on h's clip edge, where jit's rounding (h = −3.5e-9 before the clip) left its gradient
# exactly 0, so it could never round up (a layer of on-grid weights with a target one step up kept
# all 256 codes: MSE 0.215 against 0.013).
H_START_MARGIN = 1e-4


def _inverse_soft_rounding(h):
    """V with h(V) = h for h in [``H_START_MARGIN``, 1 − ``H_START_MARGIN``] (h is clipped into it)."""
    p = (jnp.clip(h, H_START_MARGIN, 1.0 - H_START_MARGIN) - GAMMA) / (ZETA - GAMMA)
    return jnp.log(p) - jnp.log1p(-p)


def _checked_options(iterations=1000, reg=0.01, beta=(20.0, 2.0), warmup=0.2, lr=1e-2):
    """:func:`round_layer`'s options, validated (the defaults are its defaults)."""
    iterations = check_number(iterations, "iterations", integer=True)
    lr = check_number(lr, "lr")
    reg = check_number(reg, "reg", allow_zero=True)
    if isinstance(warmup, bool) or not (isinstance(warmup, numbers.Real) and 0.0 <= warmup < 1.0):
        raise ValueError(f"warmup={warmup!r} must be a fraction in [0, 1)")
    try:
        b_start, b_end = (float(b) for b in beta)
    except (TypeError, ValueError):
        b_start = b_end = float("nan")
    if not (b_start >= b_end > 0):
        raise ValueError(f"beta={beta!r} must be (start, end) with start ≥ end > 0")
    return iterations, reg, (b_start, b_end), float(warmup), lr


def round_layer(x, y, kernel, scale, offset, lo: int, hi: int, gemm, *, iterations: int = 1000,
                reg: float = 0.01, beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2,
                lr: float = 1e-2, precision: str = "highest") -> RoundingFit:
    """Learn one layer's rounding (the AdaRound step; see the module docstring).

    The reconstruction error is evaluated exactly over all of ``x`` through the input statistics
    (G, B, t) of :func:`landscape.rounding.input_statistics`: each step costs a (K, K) × (K, C) product instead of
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
        :class:`~landscape.rounding.RoundingFit`.
    """
    options = _checked_options(iterations, reg, beta, warmup, lr)
    runtime.check_precision(precision, "round_layer")
    with jax.default_matmul_precision(precision):
        return _round_layer(x, y, kernel, scale, offset, lo, hi, gemm, *options, precision)


def _round_layer(x, y, kernel, scale, offset, lo, hi, gemm, iterations, reg, beta, warmup, lr, precision):
    w = np.asarray(kernel, np.float32)
    scale, offset = np.asarray(scale, np.float32), np.asarray(offset, np.float32)
    G, B, t = input_statistics(x, y, w.shape, gemm, precision=precision)
    schedule = dict(iterations=iterations, start_reg=int(warmup * iterations),
                    report_every=max(1, iterations // 10))
    # Every layer's data enter as arguments: layers of one shape share one compiled program.
    f32 = np.float32
    # A pruned weight (exactly 0: an N:M network's) stays at the zero level where the grid has one,
    # as in GPTQ: the reconstruction would otherwise un-prune it (the midrise grid has no 0).
    pinned = (w == 0) if zero_code(scale, offset, lo, hi) is not None else np.zeros(w.shape, bool)
    codes, nearest, hist = _optimize(w, pinned, G.astype(f32), B.astype(f32), f32(t), scale, offset, f32(lo),
                                     f32(hi), f32(reg), f32(beta[0]), f32(beta[1]), f32(lr), **schedule)
    return keep_better(x, y, gemm, np.asarray(codes), np.asarray(nearest), scale, offset,
                       (float(h) for h in np.asarray(hist)))


@functools.partial(jax.jit, static_argnames=("iterations", "start_reg", "report_every"))
def _optimize(w, pinned, G, B, t, scale, offset, lo, hi, reg, b_start, b_end, lr, *, iterations, start_reg,
              report_every):
    """``iterations`` full-batch Adam steps on V from round-to-nearest's soft equivalent; returns
    (the hard codes, round-to-nearest's codes, the reconstruction error of the hard rounding
    every ``report_every`` steps). ``pinned`` weights (exact zeros on a grid with a zero level)
    keep h = 0, their zero code."""
    z = (w - offset) / scale
    base = jnp.floor(z)
    nearest = nearest_codes(w, scale, offset, lo, hi)
    v = _inverse_soft_rounding(z - base)
    k, channels = G.shape[0], base.shape[-1]
    tx = optax.adam(lr)

    def weights(codes):
        return codes * scale + offset

    def soft(v):
        return jnp.where(pinned, 0.0, soft_rounding(v))

    def hard(v):
        return jnp.clip(base + (soft(v) >= 0.5), lo, hi)

    def reconstruction(kernel):
        """mean over rows of Σ_c (ŷ_c − y_c)², up to the constant t."""
        wm = kernel.reshape(k, channels)
        return jnp.sum(wm * (jnp.matmul(G, wm, precision="highest") - 2.0 * B))

    def objective(v, b, on):
        h = soft(v)
        rec = reconstruction(weights(jnp.clip(base + h, lo, hi)))
        return rec + on * reg * jnp.sum(1.0 - jnp.abs(2.0 * h - 1.0) ** b)

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
    return hard(v), nearest, hist


def adaround(loss, alpha, *, num_images: int | None = None, inputs: str = "quantized", **round_kw) -> RoundingResult:
    """AdaRound every quantized weight site of ``loss`` on the grid that ``alpha`` sets.

    Args:
        loss: a :class:`~landscape.ClipLoss` without bias correction (its sites, widths, grid,
            per-channel α and BN folding are used; its calibration images are the data).
        alpha: (n,) clipping vector, e.g. ``loss.init("mse")`` or ``lapq(loss).alpha``.
        num_images: calibration images recorded: ``num_images`` of the loss's set spread over it
            (:func:`landscape.data.spread_rows`; at most its size; default None: 256, or all
            when it has fewer).
        inputs: "quantized" (each layer's input from the network rounded so far, activations
            quantized at α; the paper's choice) or "float" (the float network's inputs).
        **round_kw: passed to :func:`round_layer` (iterations, reg, beta, warmup, lr); every
            product runs at the loss's ``precision``.

    Returns:
        :class:`~landscape.rounding.RoundingResult` (``method="adaround"``);
        ``result.network.accuracy(data.test)`` evaluates it.
    """
    checks.check_clip_loss(loss, "adaround")
    if "precision" in round_kw:
        raise ValueError(f"adaround runs at the loss's precision ({loss.precision!r}); build the ClipLoss with "
                         "precision=... instead of passing it here")
    allowed = inspect.signature(_checked_options).parameters
    unknown = sorted(set(round_kw) - set(allowed))
    if unknown:
        raise ValueError(f"adaround: unknown options {unknown}; round_layer takes {', '.join(allowed)}")
    _checked_options(**round_kw)  # bad options fail here, before any recording
    rule = functools.partial(round_layer, precision=loss.precision, **round_kw)
    return round_network(loss, alpha, rule, method="adaround", num_images=num_images, inputs=inputs)


