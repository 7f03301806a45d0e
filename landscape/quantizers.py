"""Uniform fake-quantizers with a clipping value α, following the LAPQ reference semantics.

Three grids, all per-tensor by default (α a scalar) or per output channel (α broadcast
against the tensor's last axis):

* ``"midrise"`` (weights, the reference's default): 2^M levels spread symmetrically over
  [−α, α] with no zero level::

      Δ = 2α / (2^M − 1)
      q = clip((x + α) / Δ, 0, 2^M − 1)
      x̂ = (round(q) · Δ − α)                   e.g. M = 2: {−1, −1/3, 1/3, 1}·α

* ``"unsigned"`` (post-ReLU activations): levels kΔ for k = 0..2^M − 1::

      Δ = α / (2^M − 1),   x̂ = round(clip(x / Δ, 0, 2^M − 1)) · Δ

* ``"midtread"`` (signed, with a zero level: signed activations, an option for weights):
  2^M − 1 levels symmetric about 0::

      Δ = α / (2^(M−1) − 1),   x̂ = round(clip(x / Δ, −(2^(M−1) − 1), 2^(M−1) − 1)) · Δ

Rounding is round-half-to-even (``jnp.round``, as ``torch.round``); Δ is floored at 1e-8.
Rounding is straight-through, ``z + stop_gradient(round(z) − z)``, so the derivative with
respect to α is the LSQ-style almost-everywhere derivative: inside the range
∂x̂/∂α = (round(z) − z)·∂Δ/∂α, and ∂x̂/∂α = ±1 where x is clipped at ±α (0 below an
unsigned grid).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRIDS = ("midrise", "unsigned", "midtread")
WEIGHT_GRIDS = ("midrise", "midtread")  # "unsigned" would clip every negative weight to 0
MIN_BITS, MAX_BITS = 2, 16
DELTA_FLOOR = 1e-8
# The largest clipping value: the midrise grid's top level, 2α before subtracting α, overflows
# float32 (max 3.4e38) above about 1.7e38, and then 0·inf makes the loss NaN.
ALPHA_MAX = 1e38


def valid_alpha(alpha):
    """Elementwise: a clipping value, 0 < α ≤ ALPHA_MAX (NaN and ±inf fail). numpy or jax."""
    return (alpha > 0) & (alpha <= ALPHA_MAX)


def check_bits(bits, where: str = "quantizer") -> int | None:
    """Validate a bit width: an int in [2, 16], or None for FP32. Returns it unchanged."""
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int | jnp.integer) or not (
        MIN_BITS <= int(bits) <= MAX_BITS
    ):
        raise ValueError(
            f"{where}: bits={bits!r} is not allowed; use an integer in [{MIN_BITS}, {MAX_BITS}] "
            "or None for FP32"
        )
    return int(bits)


def check_grid(grid: str, where: str = "quantizer") -> str:
    if grid not in GRIDS:
        raise ValueError(f"{where}: grid={grid!r} is not allowed; use one of {GRIDS}")
    return grid


def num_levels(bits: int, grid: str) -> int:
    """Number of distinct levels of a ``grid`` at ``bits``: 2^M, or 2^M − 1 for midtread."""
    return 2**bits - 1 if grid == "midtread" else 2**bits


def step_size(alpha, bits: int, grid: str):
    """Δ(α) for a grid, floored at 1e-8. ``alpha`` any shape."""
    if grid == "midrise":
        delta = 2.0 * alpha / (2**bits - 1)
    elif grid == "unsigned":
        delta = alpha / (2**bits - 1)
    else:
        delta = alpha / (2 ** (bits - 1) - 1)
    return jnp.maximum(delta, DELTA_FLOOR)


def round_ste(z):
    """Round half to even with a straight-through gradient: z + stop_gradient(round(z) − z)."""
    return z + jax.lax.stop_gradient(jnp.round(z) - z)


def quantize(x, alpha, bits: int, grid: str):
    """Fake-quantize ``x`` on ``grid`` with clipping value ``alpha`` (broadcast against x).

    Args:
      x: array of any shape.
      alpha: scalar or an array broadcastable to x (per-channel: shape (C,) for x (..., C)).
      bits: M in [2, 16].
      grid: "midrise" | "unsigned" | "midtread".
    Returns:
      x̂ with x's shape and dtype; differentiable in x and α through straight-through rounding.
    """
    alpha = jnp.asarray(alpha, x.dtype)
    delta = step_size(alpha, bits, grid).astype(x.dtype)
    if grid == "midrise":
        top = 2**bits - 1
        z = jnp.clip((x + alpha) / delta, 0.0, top)
        return round_ste(z) * delta - alpha
    if grid == "unsigned":
        top = 2**bits - 1
        z = jnp.clip(x / delta, 0.0, top)
        return round_ste(z) * delta
    top = 2 ** (bits - 1) - 1
    z = jnp.clip(x / delta, -top, top)
    return round_ste(z) * delta


def levels(alpha: float, bits: int, grid: str):
    """The sorted level set of a grid (for tests and plots): (num_levels,) float32."""
    if grid == "midrise":
        delta = 2.0 * alpha / (2**bits - 1)
        return jnp.arange(2**bits, dtype=jnp.float32) * delta - alpha
    if grid == "unsigned":
        return jnp.arange(2**bits, dtype=jnp.float32) * (alpha / (2**bits - 1))
    top = 2 ** (bits - 1) - 1
    return jnp.arange(-top, top + 1, dtype=jnp.float32) * (alpha / top)


def bias_correct(w_hat, w, channel_axis: int = -1):
    """Per output channel, shift the quantized weight's mean back to the FP32 weight's mean.

    Ŵ_c ← Ŵ_c − (mean(Ŵ_c) − mean(W_c)), means over every axis but ``channel_axis``
    (the reference's data-free bias correction, applied inside every loss evaluation).
    """
    return w_hat - bias_shift(w_hat, w, channel_axis)


def bias_shift(w_hat, w, channel_axis: int = -1):
    """mean(Ŵ_c) − mean(W_c) per output channel, keeping w's rank (size 1 on every other axis)."""
    axes = tuple(i for i in range(w.ndim) if i != channel_axis % w.ndim)
    return jnp.mean(w_hat, axis=axes, keepdims=True) - jnp.mean(w, axis=axes, keepdims=True)
