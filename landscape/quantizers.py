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
    if not isinstance(grid, str) or grid not in GRIDS:
        raise ValueError(f"{where}: grid={grid!r} is not allowed; use one of {GRIDS}")
    return grid


def _check_width(bits, where: str):
    """The bit width of :func:`quantize`, :func:`step_size`, :func:`levels`: an integer in [2, 16]
    (not None: FP32 is no grid), or a scalar JAX array — ClipLoss passes the widths as traced
    data, one program for every width, so their range is its to check. Static, so free per call."""
    if isinstance(bits, jax.Array):
        if bits.ndim != 0:
            raise ValueError(f"{where}: bits must be a scalar bit width, got an array of shape {bits.shape}")
        return bits
    if bits is None:
        raise ValueError(f"{where}: bits=None (FP32) has no grid; use an integer in [{MIN_BITS}, {MAX_BITS}]")
    return check_bits(bits, where)


def num_levels(bits: int, grid: str) -> int:
    """Number of distinct levels of a ``grid`` at ``bits``: 2^M, or 2^M − 1 for midtread."""
    return 2**bits - 1 if grid == "midtread" else 2**bits


def step_size(alpha, bits: int, grid: str):
    """Δ(α) for a grid, floored at 1e-8. ``alpha`` any shape; ``bits`` in [2, 16]."""
    bits = _check_width(bits, "step_size")
    check_grid(grid, "step_size")
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
      x: floating-point array of any shape.
      alpha: scalar or an array broadcastable to x (per-channel: shape (C,) for x (..., C)).
      bits: M in [2, 16] (or a scalar JAX array: traced widths are not range-checked).
      grid: "midrise" | "unsigned" | "midtread".
    Returns:
      x̂ with x's shape and dtype; differentiable in x and α through straight-through rounding.
      Half-precision x (float16, bfloat16) is quantized in float32, so x̂ is the grid level
      rounded to x's dtype (α too is kept in float32).
    Raises:
      ValueError: an unknown grid, a width outside [2, 16] or an integer/bool ``x`` (its rounding
        would make every value NaN or 0). The checks run once per trace, at no cost per call.
    """
    bits = _check_width(bits, "quantize")
    check_grid(grid, "quantize")
    if not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantize: x must be a floating-point array, got dtype {x.dtype}; convert it, "
                         "e.g. x.astype(np.float32)")
    # Half-precision x (float16, bfloat16) is quantized in float32 and the result cast back: in its
    # own dtype the code z = (x + α)/Δ, round(z)·Δ − α and even α itself lose the grid (bfloat16 holds
    # integers exactly only up to 256: 8-bit levels came out 1.7 steps off, and float16's largest
    # finite value 65504 is below the 16-bit top code 65535, which made every level NaN).
    dtype = x.dtype
    compute = jnp.promote_types(dtype, jnp.float32)
    x = x.astype(compute)
    alpha = jnp.asarray(alpha, compute)
    delta = step_size(alpha, bits, grid).astype(compute)
    if grid == "midrise":
        top = 2**bits - 1
        z = jnp.clip((x + alpha) / delta, 0.0, top)
        return (round_ste(z) * delta - alpha).astype(dtype)
    if grid == "unsigned":
        top = 2**bits - 1
        z = jnp.clip(x / delta, 0.0, top)
        return (round_ste(z) * delta).astype(dtype)
    top = 2 ** (bits - 1) - 1
    z = jnp.clip(x / delta, -top, top)
    return (round_ste(z) * delta).astype(dtype)


def levels(alpha: float, bits: int, grid: str):
    """The sorted level set of a grid (for tests and plots): (num_levels,) float32.

    The levels :func:`quantize` outputs, with its Δ floor: below α ≈ 1e-8·(2^M − 1) they run past α
    (kΔ with Δ = 1e-8; at α = 1e-8, the α of an all-zero tensor, 4-bit unsigned levels reach 1.5e-7).
    """
    bits = check_bits(bits, "levels")
    if bits is None:
        raise ValueError(f"levels: bits=None (FP32) has no grid; use an integer in [{MIN_BITS}, {MAX_BITS}]")
    check_grid(grid, "levels")
    delta = step_size(jnp.float32(alpha), bits, grid)
    if grid == "midrise":
        return jnp.arange(2**bits, dtype=jnp.float32) * delta - alpha
    if grid == "unsigned":
        return jnp.arange(2**bits, dtype=jnp.float32) * delta
    top = 2 ** (bits - 1) - 1
    return jnp.arange(-top, top + 1, dtype=jnp.float32) * delta


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
