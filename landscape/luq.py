"""LUQ: 4-bit training with INT4 forward GEMMs and logarithmic unbiased 4-bit neural gradients.

Chmiel, Banner, Hoffer, Ben-Yaacov, Soudry, "Accurate Neural Training with 4-bit Matrix
Multiplications at Standard Formats" (ICLR 2023; arXiv 2112.10769, first titled "Logarithmic
Unbiased Quantization"). For a conv/dense layer with weight W, input a and output z, with the
neural gradient δ = ∂C/∂z, all three GEMMs run in 4 bits::

    forward   z      = Q_INT(W) · Q_INT(a)          Q_INT: INT4, SAWB scale, round to nearest
    backward  ∂C/∂a  = Q_INT(W)ᵀ · Q_FP(δ)          Q_FP : FP4 [1 sign, 3 exponent, 0 mantissa],
    update    ∂C/∂W  = Q_FP(δ) · Q_INT(a)ᵀ                 LUQ (stochastic, unbiased) rounding

with one sample of Q_FP(δ) feeding both backward GEMMs. Because E[Q_FP(δ) | δ] = δ and the
backward pass is linear in δ, the weight gradient is unbiased for the STE gradient of the
INT4 forward (the tower property, layer by layer).

Pieces (all pure, jit-compatible and vmappable; integer/str options are static):

* :func:`quantize_gradient` — the LUQ quantizer Q_FP, with SMP (``samples`` > 1);
  :func:`round_gradient` — the biased round-to-nearest FP4 baseline in the same format;
  :func:`gradient_alpha`, :func:`gradient_variance` — its underflow threshold α and the
  closed-form per-element variance of one draw.
* :func:`sawb` — the INT4 forward quantizer (straight-through); :func:`sawb_codes` — its
  integer codes and scale.
* :func:`luq_identity` — identity in the forward pass, Q_FP(cotangent) in the backward pass;
  :func:`luq_gemm` — ``z = gemm(Q_INT(x), Q_INT(w))`` followed by :func:`luq_identity`;
  :func:`layer_hook` — that product as a ``hook(module, x, kernel, gemm)`` for the GEMM hook of
  :mod:`landscape.layers`, drawing its key with ``module.make_rng("luq")``.
* :func:`shift_add_matmul` — the multiplication-free INT4 × FP4 product (MF-BPROP) in integer
  shifts and adds.
* :func:`finetune_schedule` — the triangular learning rate of the high-precision fine-tuning
  phase (FNT).
* :class:`Recipe` — the whole method for :func:`landscape.train.fit`, every zoo model, no
  per-model code: INT4 forward and LUQ backward on all conv/dense layers but the first and
  last, SMP, then the FNT phase (:class:`FinetuneRecipe`); evaluation with the INT4 forward.
  Ablation modes: FP4 round-to-nearest backward, INT4 forward only, FP32.
* :func:`gradient_error` — the whole-network gradient under a recipe against the FP32 backward
  of the same forward, averaged over S draws (unbiased: error ∝ 1/√S).
* :func:`hash_bits` — the counter-based random bits behind ``prng="hash"``: the recipe's
  default source, about 4× cheaper than threefry on CPU, fused into the rounding kernel.

Discrepancies between the paper, its reference code and the project notes, settled here
(``reference/luq_nm.md`` §5):

1. **α and the format.** The paper's eq. (11), α = max|δ| / 2^(2^(b−1)) "with b = 3", gives
   only five magnitudes and is inconsistent with its own FP4 claim; the reference code uses
   α = max(δ)/2^7, whose nine magnitudes {0, α, 2α, …, 2^7 α} (17 signed values) need 5 bits.
   Default (``max_mode="abs"``): α = max|δ| / 2^(2^(b−1) − 2), i.e. for b = 4 the 2^(b−1) = 8
   exponent codes per sign hold zero and the seven magnitudes α·2^k, k = 0..6, with the
   largest equal to max|δ| — a strict [1, 3, 0] code. ``max_mode="signed"`` reproduces the
   reference code (signed max, α = max/2^(2^(b−1) − 1)); it is *not* strictly b-bit.
2. **Which maximum.** max|δ| (paper text) by default; the code's signed max(δ) under
   ``max_mode="signed"``, where gradients more negative than −max(δ) are rounded to powers
   above 2^7 α (still unbiased, outside the format). If max(δ) ≤ 0 the code's α is ≤ 0 and
   its output is NaN; here the signed mode falls back to max|δ| in that case.
3. **SAWB levels.** The code uses 17 weight levels [−8, 8] (five bits) and, for activations
   with a negative entry, the range [−8, 15]. Signed tensors use the symmetric INT4 grid
   ±(2^(b−1) − 1) = ±7 here: 15 levels fit a two's-complement nibble (−8 unused), zero is a
   level, and the grid is symmetric so the forward adds no sign-dependent bias. Non-negative
   tensors (post-ReLU activations) use the unsigned grid {0, …, 2^b − 1} over [0, clip]: the
   SAWB clip is a clipping threshold on either grid. The code spreads its 16 unsigned codes
   over [0, 2·clip], leaving half of them above almost every value: on ReLU'd N(0, 1) and
   Laplace samples its quantization MSE is 4.0× and 2.9× that of [0, clip] (its 17 weight
   levels, a fifth bit, give N(0, 1) weights 0.83× the MSE of ±7).
   ``levels="reference"`` (:func:`sawb`; ``Recipe(forward_levels="reference")``) takes the
   code's level sets, for comparisons with it.
4. **SAWB guard.** clip = c1·√mean(x²) − c2·mean|x| is ≤ 0 when the magnitudes are nearly
   constant (√mean(x²)/mean|x| < c2/c1); the code then divides by it. Here the clip is floored
   at mean|x|: inactive for Gaussian, Laplace or post-ReLU tensors (clip ≈ 2.4σ, 3.5σ, 3.7σ
   against mean|x| ≤ 0.8σ), continuous, and for exactly constant magnitudes it equals
   max|x|, which represents such a tensor without error. An all-zero tensor maps to zeros.
   The statistics are those of the tensor as a whole, batch included (as in the code), so a LUQ
   network's evaluation depends on the batch it runs in; ``Network.accuracy`` runs its last,
   smaller batch unpadded, so no padding rows enter them.
5. **Fine-tuning learning rate.** The printed eq. (17) is garbled; :func:`finetune_schedule`
   is the intended triangle that ``fit`` runs (linear up from the last 4-bit LR to a peak over
   ⌊T/2⌋ steps, then linear down to ``end``).
6. **First/last layers.** Not stated in the paper's main text; the reference wrappers replace
   every conv/linear layer. The quantizers take whatever GEMM they are given; :class:`Recipe`
   keeps the first and last product (call order) FP32 by default, like the LAPQ reference and
   most 4-bit work, and quantizes them too with ``quantize_first_last=True``.
7. **SMP placement.** The mean of the N draws of δ feeds both backward GEMMs, as in the code
   (by linearity the same as averaging the N weight gradients, the paper's description).
8. **BatchNorm after FNT.** The paper is silent on it. FNT trains with high-precision
   activations, so the BatchNorm running statistics it accumulates are those of that forward,
   while inference runs the INT4 forward. On MNIST the mismatch cost 1.1 to 3.5 points
   (``bench/luq.py``, seeds 0, 1, 2: 96.99, 94.74, 95.23 % with the FNT running statistics;
   98.08, 98.24, 97.77 % with them re-estimated under the INT4 forward on 2048 images).
   :class:`Recipe` re-estimates them after the FNT phase on ``finetune_bn_images`` training
   images (0: keep the FNT ones).

Stochastic rounding is implemented directly — round up iff U < (linear fraction inside the
bracket), U drawn as 32 random bits — rather than with the paper's "add noise, then round to
the nearest power with a 4/3 factor" (eqs. 13–14). The two have the same distribution
(``tests/test_luq.py`` compares the level frequencies of ``max_mode="signed"`` with a numpy
transcription of the reference code's noise-and-4/3 path, element by element); the direct form
needs one random word instead of two, no log2 of noisy values, and is exact at powers of two
(exponents come from ``frexp``, never from a float log2). The fraction inside the bracket comes
from a float32 division of mantissas, so the probability of rounding up is that fraction to
about 2^-23 (measured: at most 8.4e-8 from the exact one over 10^5 elements), compared with a
32-bit uniform word: each element's bias is below about 2^-23 of the width of its bracket.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from landscape import checks, data, layers, runtime, sparsity, train

__all__ = [
    "LAYERS_COLLECTION",
    "SAWB_COEFFS_4BIT",
    "FinetuneRecipe",
    "GradientError",
    "Recipe",
    "finetune_schedule",
    "gradient_alpha",
    "gradient_error",
    "gradient_variance",
    "hash_bits",
    "layer_hook",
    "luq_gemm",
    "luq_identity",
    "quantize_gradient",
    "round_gradient",
    "sawb",
    "sawb_codes",
    "shift_add_matmul",
]

MAX_MODES = ("abs", "signed")
MODES = ("luq", "rdn", "none")
PRNGS = ("jax", "hash")
SAWB_LEVELS = ("strict", "reference")
SAWB_COEFFS_4BIT = (12.1, 12.2)
"""The SAWB regression coefficients (c1, c2) for 4 bits, as hard-coded in the LUQ code."""

_TWO_POW_32 = 4294967296.0


# --------------------------------------------------------------------------------------------
# validation


def _check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _check_choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _check_float_array(name, x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x


def _check_key(key, where="key"):
    """One JAX PRNG key: a typed key, ``jax.random.key(seed)`` (shape ()), or a raw uint32 key,
    ``jax.random.PRNGKey(seed)``, of the default implementation's shape ((2,) for threefry, (4,)
    for rbg). Shape and dtype only, so it also passes a traced key under jit and vmap (where a
    key of a batch is one key)."""
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    raw = _raw_key_shape(str(jax.config.jax_default_prng_impl))
    if dtype is not None and shape is not None:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and tuple(shape) == ():
            return key
        if dtype == np.uint32 and tuple(shape) == raw:
            return key
    got = (f"a {type(key).__name__} of dtype {dtype} and shape {tuple(shape)}" if dtype is not None
           and shape is not None else f"{type(key).__name__} {key!r:.60}")
    raise ValueError(f"{where} must be a JAX PRNG key, one key: jax.random.key(seed) or "
                     f"jax.random.PRNGKey(seed) (uint32, shape {raw} here; split it for several draws), got {got}")


@functools.cache
def _raw_key_shape(impl: str) -> tuple[int, ...]:
    """The shape of a raw key of the default PRNG implementation ``impl`` (no computation)."""
    return tuple(jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape)


def _is_concrete(*xs):
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _pow2(k):
    """Exact float32 2^k for integer k (clamped to the normal range [−126, 127])."""
    k = jnp.clip(jnp.asarray(k, jnp.int32), -126, 127)
    return lax.bitcast_convert_type(lax.shift_left(k + 127, jnp.int32(23)), jnp.float32)


# --------------------------------------------------------------------------------------------
# the logarithmic gradient format


def _exponent_span(bits, max_mode):
    """E with α = m / 2^E: the largest level is 2^E α (= m in the strict mode)."""
    return 2 ** (bits - 1) - (2 if max_mode == "abs" else 1)


def _check_gradient_args(bits, max_mode):
    # bits = 2 is the ternary format {0, ±max|g|}; beyond 7, α = m / 2^126 leaves float32.
    bits = _check_int("bits", bits, 2, 7)
    return bits, _check_choice("max_mode", max_mode, MAX_MODES)


def _reference_max(g, max_mode, *, with_abs=False):
    """The maximum m that fixes α = m / 2^E (float32 scalar; 0 for an all-zero g); with
    ``with_abs``, (m, max|g|)."""
    m_abs = jnp.max(jnp.abs(g), initial=0.0)  # initial: an empty g has m = 0, as an all-zero one
    m = m_abs
    if max_mode == "signed":
        m_signed = jnp.max(g, initial=-jnp.inf)
        m = jnp.where(m_signed > 0, m_signed, m_abs)
    return (m, m_abs) if with_abs else m


def _scale_pow2(x, k):
    """x · 2^k for integer k in [−252, 254] (two exact power-of-two factors; _pow2 alone
    clamps k to [−126, 127]). Cheaper than jnp.ldexp, which XLA expands into many ops."""
    k1 = jnp.clip(k, -126, 127)
    return x * _pow2(k1) * _pow2(k - k1)


def _on_grid(level, dtype):
    """LUQ levels (float32 normals; each a dtype value times 2^−j, j ≥ 0) rounded to the narrow
    ``dtype``'s grid, as float32. Such a level is already on the grid where ``dtype`` is normal;
    below, it rounds to a multiple of ``dtype``'s smallest subnormal, ties to even, as a conversion
    does. In arithmetic, not through an f32 → f16 → f32 convert pair, which XLA may drop (excess
    precision, allowed by default on GPUs): an H200 then measured float16 variances 42 % off."""
    info = jnp.finfo(dtype)
    if info.smallest_normal <= np.finfo(np.float32).smallest_normal:
        return level  # bfloat16: float32's exponent range, so every level in it is on the grid
    e = int(np.log2(float(info.smallest_subnormal)))  # −24 for float16, −9 for float8_e4m3fn
    subnormal = jnp.round(level * np.float32(2.0**-e)) * np.float32(2.0**e)
    return jnp.where(level >= float(info.smallest_normal), level, subnormal)


class _Bracket:
    """Where each |g|/α sits on the grid {0, 1, 2, 4, …}: between lo and hi = next level.

    ``frac`` = (x − lo)/(hi − lo) ∈ [0, 1): x itself below 1, else 2·mantissa − 1, exact given
    x, which is the float32 quotient of |g|'s and the maximum's mantissas (rounded once: about
    2^-23 relative).
    ``k_lo`` is the exponent of lo (unused below 1, where lo = 0 and hi = α).

    x is kept as a mantissa and an exponent, never formed: in the signed mode |g| may exceed
    m = max(g) by any factor, and x = |g|/α would overflow float32 (g = [1e-37, −1] gave −0
    for the −1). For a float16 (or bfloat16) ``dtype``, the result's, the levels are those of
    that dtype and ``frac`` is measured between them: float16 rounds levels below 2^−14 to its
    subnormal grid, and a fraction of the exact levels would then bias E[Q] (by −4.8 % at
    max|g| = 1e-5).
    """

    def __init__(self, g, bits, max_mode, dtype=jnp.float32):
        g32 = g.astype(jnp.float32)
        a = jnp.abs(g32)
        m, m_abs = _reference_max(g32, max_mode, with_abs=True)
        span = _exponent_span(bits, max_mode)
        safe_m = jnp.where(m > 0, m, 1.0)
        mant_g, ex_g = jnp.frexp(a)
        mant_m, ex_m = jnp.frexp(safe_m)
        q = mant_g / mant_m  # in (1/2, 2), or 0 for g = 0: |g|/m without over- or underflow
        above = q >= 1.0
        mant = jnp.where(above, 0.5 * q, q)  # x = mant · 2^ex, mant ∈ [1/2, 1) (exact halving)
        ex = ex_g - ex_m + span + above.astype(jnp.int32)
        self.m, self.span, self.sign = m, span, jnp.sign(g32)
        self.below = (ex <= 0) | (mant_g == 0)
        self.frac = jnp.where(self.below, _scale_pow2(mant, jnp.maximum(jnp.minimum(ex, 0), -252)),
                              2.0 * mant - 1.0)
        self.k_lo = ex - 1
        # A NaN/inf anywhere makes the whole result NaN (max|g|, not m: in the signed mode
        # max(g) stays finite next to a −inf)
        self.finite = jnp.isfinite(m_abs)
        self.narrow = jnp.dtype(dtype).itemsize < 4
        self.dtype = dtype
        if self.narrow:
            lo = self.level(jnp.zeros_like(self.below))
            hi = self.level(jnp.ones_like(self.below))
            # |g| is a value of dtype, so the rounded levels still bracket it; frac < 1 keeps
            # the 2^32 threshold of the draw in range (|g| = hi: P(up) = 1 − 2^−24)
            frac = jnp.where(hi > lo, (a - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0)
            self.frac = jnp.clip(frac, 0.0, np.float32(1.0 - 2.0**-24))

    def level(self, up):
        """|level| chosen by the boolean ``up`` (float32, rounded to ``dtype``'s grid)."""
        k = jnp.where(self.below, 0, self.k_lo + up.astype(jnp.int32))
        mag = jnp.where(self.below & ~up, 0.0, _scale_pow2(self.m, k - self.span))
        return _on_grid(mag, self.dtype) if self.narrow else mag

    def value(self, up):
        """The level chosen by the boolean ``up`` (broadcast over leading sample axes)."""
        return jnp.where(self.finite, self.sign * self.level(up), jnp.nan)


def gradient_alpha(g, *, bits=4, max_mode="abs"):
    """Underflow threshold α of the LUQ format for the tensor ``g`` (float32 scalar).

    α = m / 2^E with m = max|g|, E = 2^(bits−1) − 2 (``"abs"``, strict) or m = max(g),
    E = 2^(bits−1) − 1 (``"signed"``, the reference code; m falls back to max|g| when
    max(g) ≤ 0). The nonzero levels are α·2^k, k = 0..E (k unbounded above in the signed
    mode). α = 0 for an all-zero ``g``.
    """
    bits, max_mode = _check_gradient_args(bits, max_mode)
    return _alpha_kernel(_check_float_array("g", g), bits, max_mode)


# The kernels are jitted so that eager calls compile once per shape and configuration
# instead of dispatching op by op; inside an outer jit they are inlined.
@functools.partial(jax.jit, static_argnums=(1, 2))
def _alpha_kernel(g, bits, max_mode):
    return _reference_max(g.astype(jnp.float32), max_mode) * _pow2(-_exponent_span(bits, max_mode))


def gradient_variance(g, *, bits=4, max_mode="abs"):
    """Per-element variance of one LUQ draw (closed form): float32, same shape as ``g``.

    Stochastic rounding between adjacent levels lo < |g| < hi has variance
    (|g| − lo)(hi − |g|): α|g| − g² below α (lo = 0, hi = α) and
    (|g| − 2^(n−1)α)(2^n α − |g|) inside the bin [2^(n−1)α, 2^n α]; zero on levels.
    float32 whatever ``g``'s dtype: a variance is of the order of g², which float16 cannot hold
    (N(0, 1e-3²) gradients gave 0 for about half the elements, and |g| = 300 gave inf).
    """
    bits, max_mode = _check_gradient_args(bits, max_mode)
    return _variance_kernel(_check_float_array("g", g), bits, max_mode)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _variance_kernel(g, bits, max_mode):
    b = _Bracket(g, bits, max_mode, g.dtype)
    width = b.level(jnp.ones_like(b.below)) - b.level(jnp.zeros_like(b.below))  # hi − lo
    # On a level (frac = 0) the variance is 0 even where hi = 2·max overflows float32 (inf · 0).
    var = jnp.where(b.frac > 0, (width * b.frac) * (width * (1.0 - b.frac)), 0.0)
    return jnp.where(b.finite, var, jnp.nan)


def quantize_gradient(g, key, *, bits=4, samples=1, max_mode="abs", prng="jax"):
    """LUQ: logarithmic unbiased quantization of a neural gradient (per tensor).

    Levels {0, ±α·2^k : 0 ≤ k ≤ E} with α from :func:`gradient_alpha`. Each element is
    rounded stochastically to one of the two levels bracketing it, up with probability equal
    to its linear fraction inside the bracket::

        |g| < α            →  sign(g)·α  w.p. |g|/α,  else 0           (stochastic underflow)
        2^(n−1)α ≤ |g| < 2^n α
                           →  sign(g)·2^n α  w.p. (|g| − 2^(n−1)α)/(2^(n−1)α),
                              else sign(g)·2^(n−1)α                     (log. stochastic rounding)

    so E[Q(g)] = g element-wise (variance: :func:`gradient_variance`). The largest level is
    max|g| itself (``"abs"``): nothing is clipped, levels are fixed points, signs are kept,
    Q(c·g) = c·Q(g) for c > 0 with the same key (bit-exact for powers of two, otherwise up
    to the float rounding of |g|/max|g|), and an all-zero ``g`` gives zeros. A non-finite
    ``g`` gives an all-NaN result.

    Args:
      g: float array, any shape (e.g. δ of shape (batch, features) or (N, H, W, C)).
      key: a JAX PRNG key (typed or raw uint32).
      bits: total bits of the sign/exponent format [1, bits − 1, 0], 2..7 (static).
      samples: N ≥ 1 (static). N > 1 averages N independent draws (SMP): variance ÷ N, still
        unbiased; the average is no longer on the FP4 grid (by linearity, averaging δ before
        the GEMMs equals averaging the GEMM outputs, as the paper describes). For a float16 or
        bfloat16 ``g`` the average is rounded to nearest in that dtype, which keeps a small
        bias where it falls between two of its values: exact expectations over the draws, for
        2000 values under a maximum of 255/128 (a full mantissa), gave a mean relative bias of
        −4.5e-4 (N = 2) and −6.3e-4 (N = 3, at most 1.1e-3) in bfloat16 (8 significant bits),
        none measurable in float16; a single draw (N = 1) is on
        the grid and exactly unbiased in every dtype. The draws are materialised together:
        N × ``g.size`` random words.
      max_mode: ``"abs"`` (strict b-bit, default) or ``"signed"`` (the reference code's
        signed max and α = max/2^7 at 4 bits; 9 magnitudes, not a 4-bit code).
      prng: where the 32 random bits per element and sample come from (static):
        ``"jax"`` — ``jax.random.bits(key, …)`` with the key's own implementation
        (threefry by default, in its classic layout: :func:`landscape.runtime.classic_threefry`);
        ``"hash"`` — :func:`hash_bits`, a counter-based integer hash
        keyed by 64 bits drawn from ``key``, computed inside the rounding kernel. Same
        distribution for every purpose here (tests check both); on CPU ``"hash"`` costs
        about as much as the rounding itself, threefry about 4× more (see
        ``bench/luq_overhead.py``).

    Returns:
      array of ``g``'s shape and dtype.
    """
    bits, max_mode = _check_gradient_args(bits, max_mode)
    samples = _check_int("samples", samples, 1, 1 << 16)
    prng = _check_choice("prng", prng, PRNGS)
    g = _check_float_array("g", g)
    key = _check_key(key)
    if g.size == 0:  # nothing to quantize (and no maximum to scale by)
        return g
    return _luq_kernel(g, key, bits, samples, max_mode, prng)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _luq_kernel(g, key, bits, samples, max_mode, prng):
    b = _Bracket(g, bits, max_mode, g.dtype)
    # Round up iff U < frac with U uniform on the 2^32 integers; frac·2^32 < 2^32 is exact.
    shape = (samples,) + g.shape
    if prng == "jax":
        with runtime.classic_threefry():
            bits_u = jax.random.bits(key, shape, jnp.uint32)
    else:
        bits_u = _hash_kernel(key, shape)
    threshold = (b.frac * _TWO_POW_32).astype(jnp.uint32)
    draws = b.value(bits_u < threshold)
    return jnp.mean(draws, axis=0).astype(g.dtype)


# Multipliers of "lowbias32" (C. Wellons, hash-prospector): a bijective 32-bit mixer whose
# output bits each flip with probability ≈ 1/2 (bias 0.17%) when any input bit flips.
_MIX = (0x7FEB352D, 0x846CA68B)


def _mix32(h):
    h = h ^ (h >> 16)
    h = h * jnp.uint32(_MIX[0])
    h = h ^ (h >> 15)
    h = h * jnp.uint32(_MIX[1])
    return h ^ (h >> 16)


def _hash_kernel(key, shape):
    size = math.prod(shape)
    if size > 1 << 32:
        raise ValueError(f"hash_bits numbers elements with uint32 counters: at most 2^32, got {size}")
    with runtime.classic_threefry():
        seed = jax.random.bits(key, (2,), jnp.uint32)
    counter = lax.iota(jnp.uint32, size).reshape(shape)
    # Two keyed rounds: with one, another seed would only re-index the same sequence.
    return _mix32(_mix32(counter ^ seed[..., 0]) ^ seed[..., 1])


def hash_bits(key, shape):
    """Random uint32 words of ``shape`` from a counter-based hash (the ``prng="hash"`` source).

    word[i] = h(h(i ⊕ s₀) ⊕ s₁) for the flat index i, with (s₀, s₁) = ``jax.random.bits(key,
    (2,))`` and h the bijective mixer "lowbias32". Elementwise integer arithmetic (two
    multiplies per round) that XLA fuses into the consumer, where threefry costs ~20 rounds
    per pair of words and a round trip through memory. Not a cryptographic generator: it is
    meant for stochastic rounding, where only the uniformity of each word and the
    independence of words at different indices and keys matter (both tested). Works under
    vmap over keys; at most 2^32 words per call.
    """
    shape = tuple(_check_int("shape entry", d, 0, 1 << 32) for d in shape)
    return _hash_kernel(_check_key(key), shape)


def round_gradient(g, *, bits=4, max_mode="abs"):
    """Round-to-nearest in the LUQ format: the biased FP4 baseline of the ablations.

    Same levels and α as :func:`quantize_gradient`; each element goes to the nearer of its
    two bracketing levels in linear distance (up iff the fraction ≥ 1/2, ties away from zero;
    below α this is a deterministic underflow at α/2). Deterministic, so no key.
    """
    bits, max_mode = _check_gradient_args(bits, max_mode)
    return _rdn_kernel(_check_float_array("g", g), bits, max_mode)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rdn_kernel(g, bits, max_mode):
    b = _Bracket(g, bits, max_mode, g.dtype)
    return b.value(b.frac >= 0.5).astype(g.dtype)


# --------------------------------------------------------------------------------------------
# SAWB: the INT4 forward quantizer


_FORWARD_NAMES = ("forward_bits", "forward_levels")  # the forward quantizer's SAWB arguments, named in errors


def _sawb_args(bits, signed, coeffs, levels="strict", names=("bits", "levels")):
    bits = _check_int(names[0], bits, 2, 8)
    levels = _check_choice(names[1], levels, SAWB_LEVELS)
    if signed is not None and not isinstance(signed, bool):
        raise ValueError(f"signed must be None, True or False, got {signed!r}")
    if coeffs is None:
        if bits != 4:
            raise ValueError(
                f"SAWB coefficients are built in only for {names[0]}=4, got {names[0]}={bits}; "
                "pass coeffs=(c1, c2) for other widths"
            )
        coeffs = SAWB_COEFFS_4BIT
    ok = isinstance(coeffs, tuple | list) and len(coeffs) == 2
    if not ok or not all(checks.is_real(c) and np.isfinite(c) for c in coeffs):  # numpy scalars too
        raise ValueError(f"coeffs must be two finite numbers (c1, c2), got {coeffs!r}")
    return bits, signed, (float(coeffs[0]), float(coeffs[1])), levels


def _sawb_grid(x, bits, signed, coeffs, levels):
    """(scale, lowest code, highest code) for the tensor x (float32 scalars)."""
    c1, c2 = coeffs
    n = max(x.size, 1)  # an empty x has the statistics of an all-zero one: clip 0, scale 1
    mean_abs = jnp.sum(jnp.abs(x)) / n
    clip = c1 * jnp.sqrt(jnp.sum(x * x) / n) - c2 * mean_abs
    clip = jnp.maximum(clip, mean_abs)  # the guard, see the module docstring (item 4)
    neg = jnp.min(x, initial=0.0) < 0 if signed is None else jnp.asarray(signed)
    full = 2 ** bits - 1
    if levels == "strict":  # Δ = clip / (top code): the top code sits at the clip
        half = 2 ** (bits - 1) - 1
        lo, hi = jnp.where(neg, -half, 0), jnp.where(neg, half, full)
        span = hi
    elif signed is True:  # the reference code's weights: codes ±2^(b−1), Δ = 2·clip / 2^b
        lo, hi, span = -(2 ** (bits - 1)), 2 ** (bits - 1), 2 ** (bits - 1)
    else:  # its activations: Δ = 2·clip / (Qp − Qn), Qn = −2^(b−1) if a value is negative, else 0
        lo, hi = jnp.where(neg, -(2 ** (bits - 1)), 0), full
        span = (hi - lo) / 2
    scale = clip / span
    # all-zero tensor: any scale gives zeros; a NaN scale (an inf in x) stays NaN, visibly
    scale = jnp.where(clip == 0, 1.0, scale)
    return scale, lo, hi


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _sawb_round(x, bits, signed, coeffs, levels):
    x32 = x.astype(jnp.float32)
    scale, lo, hi = _sawb_grid(x32, bits, signed, coeffs, levels)
    return jnp.round(jnp.clip(x32 / scale, lo, hi)), scale  # jnp.round: half to even


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _sawb_ste(x, bits, signed, coeffs, levels):
    codes, scale = _sawb_round(x, bits, signed, coeffs, levels)
    return (codes * scale).astype(x.dtype)


@_sawb_ste.defjvp
def _sawb_ste_jvp(bits, signed, coeffs, levels, primals, tangents):
    (x,), (dx,) = primals, tangents
    # Straight-through, as in the reference code: the identity everywhere, clipped entries
    # and the data-dependent scale included.
    return _sawb_ste(x, bits, signed, coeffs, levels), dx


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _codes_ste(x, bits, signed, coeffs, levels):
    codes, scale = _sawb_round(x, bits, signed, coeffs, levels)
    return codes.astype(x.dtype), scale


@_codes_ste.defjvp
def _codes_ste_jvp(bits, signed, coeffs, levels, primals, tangents):
    (x,), (dx,) = primals, tangents
    codes, scale = _codes_ste(x, bits, signed, coeffs, levels)
    # codes·scale is straight-through in x (the scale is held constant, as in sawb)
    return (codes, scale), (dx / scale.astype(dx.dtype), jnp.zeros_like(scale))


def sawb_codes(x, *, bits=4, signed=None, coeffs=None, levels="strict"):
    """Integer codes and scale of the SAWB quantizer: ``sawb(x) == codes * scale``.

    Returns ``(codes, scale)``: int32 codes of ``x``'s shape in [−(2^(b−1) − 1), 2^(b−1) − 1]
    (signed grid) or [0, 2^b − 1] (unsigned grid) — with ``levels="reference"`` in
    [−2^(b−1), 2^(b−1)] (``signed=True``), [−2^(b−1), 2^b − 1] or [0, 2^b − 1] — and the float32
    scalar step. Arguments as in :func:`sawb`.
    """
    bits, signed, coeffs, levels = _sawb_args(bits, signed, coeffs, levels)
    x = _check_float_array("x", x)
    codes, scale = _sawb_round(x, bits, signed, coeffs, levels)
    return codes.astype(jnp.int32), scale


def sawb(x, *, bits=4, signed=None, coeffs=None, levels="strict"):
    """INT-b forward quantizer with the SAWB scale, round to nearest, straight-through.

    Per tensor (statistics over all elements)::

        clip  = max(c1·√mean(x²) − c2·mean|x|,  mean|x|)
        signed grid   (min x < 0):  Δ = clip / (2^(b−1) − 1),   codes −(2^(b−1)−1) … 2^(b−1)−1
        unsigned grid (min x ≥ 0):  Δ = clip / (2^b − 1),       codes 0 … 2^b − 1
        Q(x)  = Δ · round_half_even(clamp(x/Δ, lowest, highest))

    The backward pass is the identity (STE, no clipping mask), as in the LUQ code. For a
    Gaussian tensor clip ≈ 2.37σ. See the module docstring (items 3–4) for the level set and
    the guard. ``levels="reference"`` takes the reference code's level sets instead (same clip)::

        signed=True   Δ = clip / 2^(b−1),        codes −2^(b−1) … 2^(b−1)   (2^b + 1 levels)
        other, min x ≥ 0:  Δ = 2·clip / (2^b − 1),  codes 0 … 2^b − 1     (up to 2·clip)
        other, min x < 0:  Δ = 2·clip / (3·2^(b−1) − 1),  codes −2^(b−1) … 2^b − 1

    Args:
      x: float array, any shape.
      bits: code width b, 2..8 (static). (c1, c2) = (12.1, 12.2) are built in for b = 4 only.
      signed: None picks the grid from the data (min x < 0); True forces the signed grid
        (weights, as in the reference code); False the unsigned one (negatives clip to 0).
      coeffs: optional (c1, c2) SAWB regression coefficients.
      levels: ``"strict"`` (INT-b grids, default) or ``"reference"`` (the reference code's
        ranges, above; not strictly b-bit: 17 weight levels and 24 or 16 activation codes at
        b = 4), static.

    Returns:
      array of ``x``'s shape and dtype.
    """
    bits, signed, coeffs, levels = _sawb_args(bits, signed, coeffs, levels)
    x = _check_float_array("x", x)
    return _sawb_ste(x, bits, signed, coeffs, levels)


# --------------------------------------------------------------------------------------------
# the backward op and the quantized product


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _luq_identity(z, key, bits, samples, max_mode, prng):
    return z


def _luq_identity_fwd(z, key, bits, samples, max_mode, prng):
    return z, key


def _luq_identity_bwd(bits, samples, max_mode, prng, key, ct):
    # The key is an integer primal: its cotangent is None (a symbolic zero).
    q = quantize_gradient(ct, key, bits=bits, samples=samples, max_mode=max_mode, prng=prng)
    return q, None


_luq_identity.defvjp(_luq_identity_fwd, _luq_identity_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _rdn_identity(z, bits, max_mode):
    return z


def _rdn_identity_fwd(z, bits, max_mode):
    return z, None


def _rdn_identity_bwd(bits, max_mode, _, ct):
    return (round_gradient(ct, bits=bits, max_mode=max_mode),)


_rdn_identity.defvjp(_rdn_identity_fwd, _rdn_identity_bwd)


def _check_backward_args(bits, samples, max_mode, mode):
    bits, max_mode = _check_gradient_args(bits, max_mode)
    samples = _check_int("samples", samples, 1, 1 << 16)
    mode = _check_choice("mode", mode, MODES)
    if mode != "luq" and samples != 1:
        raise ValueError(f"samples > 1 (SMP) needs mode='luq', got samples={samples}, mode={mode!r}")
    return bits, samples, max_mode, mode


def luq_identity(z, key, *, bits=4, samples=1, max_mode="abs", mode="luq", prng="jax"):
    """Identity in the forward pass; quantizes the cotangent in the backward pass.

    ``mode="luq"``: the cotangent δ becomes ``quantize_gradient(δ, key, bits=…, samples=…,
    max_mode=…, prng=…)``; ``"rdn"``: ``round_gradient(δ, …)`` (biased baseline, ``key`` unused and
    may be None); ``"none"``: plain identity. Place it on a GEMM output and both backward
    GEMMs receive the same quantized δ. The key is a primal input (custom_vjp), so the op
    works under jit, vmap (also over keys) and inside Flax modules.

    Args:
      z: float array (the GEMM output), any shape.
      key: PRNG key (mode "luq"); None allowed for the other modes.

    Returns:
      ``z`` unchanged.
    """
    bits, samples, max_mode, mode = _check_backward_args(bits, samples, max_mode, mode)
    prng = _check_choice("prng", prng, PRNGS)
    z = _check_float_array("z", z)
    if mode == "none":
        return z
    if mode == "rdn":
        return _rdn_identity(z, bits, max_mode)
    if key is None:
        raise ValueError("mode='luq' needs a PRNG key, got key=None")
    return _luq_identity(z, _check_key(key), bits, samples, max_mode, prng)


def _check_quantize_forward(value):
    if value is True or value is False or (isinstance(value, str) and value == "weights"):
        return value
    raise ValueError(f"quantize_forward must be True, False or 'weights', got {value!r}")


def luq_gemm(x, w, key, gemm, *, bits=4, samples=1, max_mode="abs", mode="luq",
             quantize_forward=True, forward_bits=4, forward_levels="strict", prng="jax"):
    """One 4-bit layer product: z = gemm(Q_INT(x), Q_INT(w)), backward through Q_FP.

    ``gemm`` is any bilinear callable ``gemm(x, w) -> z`` (``jnp.dot``, or a convolution with
    fixed strides/padding). With both operands quantized it runs on the integer codes,
    z = gemm(c_x, c_w)·(Δ_x Δ_w) (:func:`sawb_codes`), as INT4 hardware does; bilinearity
    makes this gemm(Q_INT(x), Q_INT(w)). The codes are float32 whatever the operands' dtype
    (z is cast back to ``x``'s), exact even in TF32/bf16 matmul inputs, and their sums are exact
    in float32 while |Σ c_x c_w| < 2^24 (over 10^5 terms of 15·7),
    so z does not depend on the summation order up to the rescale (the SAWB scales, being
    reductions, may differ by an ulp between compilations, which moves no zero and no sign).

    Autodiff of ``gemm`` then computes the activation gradient from c_w and the weight
    gradient from c_x — the tensors saved by the forward — both from the same sample
    Q_FP(δ) of :func:`luq_identity` (in MF-BPROP form: :func:`shift_add_matmul`).
    Straight-through for x and w, with the SAWB scales held constant.

    Args:
      x: layer input; ``sawb`` with the grid chosen from the data (unsigned after a ReLU).
      w: kernel; ``sawb`` on the signed grid.
      key: PRNG key for the backward draw (None allowed unless ``mode="luq"``).
      gemm: bilinear callable.
      bits, samples, max_mode, mode, prng: backward quantizer, as in :func:`luq_identity`.
      quantize_forward: True (x and w to INT), ``"weights"`` (w only: the fine-tuning phase),
        False (full-precision forward).
      forward_bits: INT width of the forward quantizer (SAWB coefficients built in for 4).
      forward_levels: the SAWB level sets, ``"strict"`` or ``"reference"`` (:func:`sawb`).

    Returns:
      z, the value of ``gemm(Q_INT(x), Q_INT(w))`` (the backward mode never changes it).
    """
    bits, samples, max_mode, mode = _check_backward_args(bits, samples, max_mode, mode)
    quantize_forward = _check_quantize_forward(quantize_forward)
    _, _, coeffs, levels = _sawb_args(forward_bits, None, None, forward_levels, _FORWARD_NAMES)
    if quantize_forward is True:
        # Integer GEMM, then one rescale. The integer sums are exact in any summation order,
        # so zeros and signs of z (hence every ReLU mask after it) are reproducible across
        # jit, vmap and backends; a float GEMM of the dequantized operands turns exact
        # zeros into ±ulp noise that flips masks between compilations and biases
        # gradient comparisons.
        x = _check_float_array("x", x)
        w = _check_float_array("w", w)
        # Codes, integer GEMM and rescale all in float32, whatever the operands' dtype; only z
        # is cast back. In float16 the integer sums overflowed (65504 < 8192 terms of 15·7: z
        # was inf), Δ_x·Δ_w fell below the normal range (z off by 2–4 % at σ = 1e-3), and in the
        # backward the cotangent Q_FP(δ)·Δ_x·Δ_w reaching the GEMM underflowed before the
        # division by Δ (gradients 40 % off, 19 % of dW exactly 0, at δ ~ 1e-3).
        cx, sx = _codes_ste(x.astype(jnp.float32), forward_bits, None, coeffs, levels)
        cw, sw = _codes_ste(w.astype(jnp.float32), forward_bits, True, coeffs, levels)
        z = (gemm(cx, cw) * (sx * sw)).astype(x.dtype)
    elif quantize_forward == "weights":
        z = gemm(x, sawb(w, bits=forward_bits, signed=True, levels=levels))
    else:
        z = gemm(x, w)
    return luq_identity(z, key, bits=bits, samples=samples, max_mode=max_mode, mode=mode, prng=prng)


def layer_hook(*, bits=4, samples=1, max_mode="abs", mode="luq", quantize_forward=True,
               forward_bits=4, forward_levels="strict", prng="jax", collection="luq") -> Callable:
    """:func:`luq_gemm` as a GEMM hook ``hook(module, x, kernel, gemm) -> y``.

    For ``mode="luq"`` the key is ``module.make_rng(collection)``, so every layer and every
    step gets a fresh draw from the ``rngs={collection: key}`` passed to ``apply``. Arguments
    are validated here, once.
    """
    _check_backward_args(bits, samples, max_mode, mode)
    _check_choice("prng", prng, PRNGS)
    _check_quantize_forward(quantize_forward)
    _sawb_args(forward_bits, None, None, forward_levels, _FORWARD_NAMES)
    if not isinstance(collection, str) or not collection:
        raise ValueError(f"collection must be a non-empty string, got {collection!r}")

    def hook(module, x, kernel, gemm):
        key = module.make_rng(collection) if mode == "luq" else None
        return luq_gemm(x, kernel, key, gemm, bits=bits, samples=samples, max_mode=max_mode,
                        mode=mode, quantize_forward=quantize_forward, forward_bits=forward_bits,
                        forward_levels=forward_levels, prng=prng)

    return hook


# --------------------------------------------------------------------------------------------
# multiplication-free backward GEMM


@jax.jit
def _shift_add(a, sign, exponent):
    # Σ_k ±(a[m, k] << e[k, n]): shifts, a conditional negation and an integer sum.
    a, sign, exponent = (t.astype(jnp.int32) for t in (a, sign, exponent))
    terms = jnp.left_shift(a[:, :, None], exponent[None, :, :])
    terms = jnp.where(sign[None] > 0, terms, jnp.where(sign[None] < 0, -terms, 0))
    return jnp.sum(terms, axis=1, dtype=jnp.int32)


@jax.jit
def _decompose_pow2(g):
    """g = sign·2^(rel + e_min) for entries 0 or ±2^e; also whether every entry is of that form."""
    mant, ex = jnp.frexp(jnp.abs(g))
    nonzero = g != 0
    e = ex - 1
    e_min = jnp.min(jnp.where(nonzero, e, jnp.iinfo(jnp.int32).max))
    e_min = jnp.where(jnp.any(nonzero), e_min, 0)
    rel = jnp.where(nonzero, e - e_min, 0)
    return jnp.sign(g).astype(jnp.int32), rel, e_min, jnp.all(~nonzero | (mant == 0.5))


@jax.jit
def _shift_add_scaled(a, sign, rel, e_min):
    # int32 → float32 is exact below 2^24; the scaling by 2^e_min is an exponent add
    return _shift_add(a, sign, rel).astype(jnp.float32) * _pow2(e_min)


def _check_no_overflow(a, sign, exponent):
    if not _is_concrete(a, sign, exponent):
        return
    weights = np.where(np.asarray(sign) != 0, 2.0 ** np.asarray(exponent, np.float64), 0.0)
    bound = np.abs(np.asarray(a, np.float64)) @ weights
    if bound.size and bound.max() >= 2.0**31:
        raise ValueError(f"shift-add sum may overflow int32 (bound {bound.max():.3g} ≥ 2^31)")


def shift_add_matmul(a_int, g_fp4):
    """INT × FP4 matrix product with integer shifts and adds only (MF-BPROP check).

    An FP4 value with a zero-bit mantissa is s·2^e, so each product a·s·2^e is the integer
    ``a << e`` with its sign flipped when s < 0: no multiplier is needed. The other order of
    operands is the transpose, (gᵀ aᵀ)ᵀ.

    Args:
      a_int: integer array (M, K), e.g. :func:`sawb_codes` codes.
      g_fp4: either
        * a pair ``(sign, exponent)`` of integer arrays (K, N), sign ∈ {−1, 0, 1} (0 encodes
          zero) and exponent ≥ 0 — returns the int32 sums Σ_k s·(a << e) exactly; or
        * a float array (K, N) whose entries are 0 or ±2^e for integers e (e.g. a LUQ
          gradient divided by its α, :func:`gradient_alpha`). It is decomposed exactly with
          ``frexp`` into sign and exponent − e_min (e_min the smallest exponent present); the
          int32 sums are converted to float32 and scaled by 2^e_min (an exponent add) —
          equal to the float product ``a @ g`` whenever that product is exact in float32
          (|sums| < 2^24 units of 2^e_min).

    Raises ValueError (on concrete inputs) for a non-integer ``a_int``, a float entry that is
    not 0 or ±2^e, a sign outside {−1, 0, 1}, a negative exponent, or an int32 overflow.
    Memory is M·K·N int32: a check, not a fast kernel.
    """
    a = jnp.asarray(a_int)
    if not jnp.issubdtype(a.dtype, jnp.integer):
        raise ValueError(f"a_int must be an integer array, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"a_int must have shape (M, K), got {a.shape}")
    if isinstance(g_fp4, tuple | list):
        if len(g_fp4) != 2:
            raise ValueError(f"g_fp4 as a tuple must be (sign, exponent), got {len(g_fp4)} items")
        sign, exponent = (jnp.asarray(t) for t in g_fp4)
        for name, t in (("sign", sign), ("exponent", exponent)):
            if not jnp.issubdtype(t.dtype, jnp.integer):
                raise ValueError(f"{name} must be an integer array, got dtype {t.dtype}")
        if sign.shape != exponent.shape or sign.ndim != 2 or sign.shape[0] != a.shape[1]:
            raise ValueError(f"sign/exponent must both have shape ({a.shape[1]}, N), "
                             f"got {sign.shape} and {exponent.shape}")
        if _is_concrete(sign, exponent):
            if not np.all(np.abs(np.asarray(sign)) <= 1):
                raise ValueError("sign entries must be -1, 0 or 1")
            if not np.all(np.asarray(exponent) >= 0):
                raise ValueError(f"exponent entries must be ≥ 0, got min {int(np.min(exponent))}")
        _check_no_overflow(a, sign, exponent)
        return _shift_add(a, sign, exponent)

    g = _check_float_array("g_fp4", g_fp4).astype(jnp.float32)
    if g.ndim != 2 or g.shape[0] != a.shape[1]:
        raise ValueError(f"g_fp4 must have shape ({a.shape[1]}, N), got {g.shape}")
    sign, rel, e_min, exact = _decompose_pow2(g)
    if _is_concrete(g) and not bool(exact):
        raise ValueError("g_fp4 entries must be 0 or ±2^e (a zero-mantissa FP value); a gradient from "
                         "quantize_gradient(g, key) is α·2^e: pass it divided by gradient_alpha(g)")
    _check_no_overflow(a, sign, rel)
    return _shift_add_scaled(a, sign, rel, e_min)


# --------------------------------------------------------------------------------------------
# fine-tuning schedule


def finetune_schedule(start, peak, steps, end=0.0):
    """Triangular learning rate of the high-precision fine-tuning phase (FNT, paper §5.2): the
    schedule ``train.fit`` runs for a :class:`Recipe` with ``finetune_epochs`` (one implementation,
    :func:`landscape.train.triangular_schedule`, with its arguments checked here).

    The intended form of the paper's eq. (17), whose print lacks the factor t and restarts the
    decay from the wrong value, with h = ⌊T/2⌋ (so that the peak is reached on a step)::

        lr(t) = start + t·(peak − start)/h               0 ≤ t ≤ h
              = peak + (t − h)·(end − peak)/(T − h)      h < t ≤ T   (constant after)

    ``start`` is the last learning rate of the 4-bit run, ``peak`` the fine-tuning base LR.
    Returns an optax-style schedule ``count -> lr`` (float32 scalar).
    """
    steps = _check_int("steps", steps, 2, 1 << 40)
    for name, v in (("start", start), ("peak", peak), ("end", end)):
        if isinstance(v, bool | str) or v is None or np.ndim(v) != 0 or not np.isfinite(float(v)) or v < 0:
            raise ValueError(f"{name} must be a finite learning rate ≥ 0, got {v!r}")
    return train.triangular_schedule(float(start), float(peak), steps, float(end))


# --------------------------------------------------------------------------------------------
# the training recipe

LAYERS_COLLECTION = "luq_layers"
"""Variable collection marking the 4-bit layers: ``variables[LAYERS_COLLECTION][path]["index"]``
(the layer's position in call order) exists exactly for the layers the recipe quantizes."""

RECIPE_MODES = ("luq", "rdn", "none", "fp32")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _marked(module) -> bool:
    return module.has_variable(LAYERS_COLLECTION, "index")


def _only_marked(hook):
    """``hook`` on the marked layers, the plain FP32 product on the others."""
    if hook is None:
        return None

    def selective(module, x, kernel, gemm):
        return hook(module, x, kernel, gemm) if _marked(module) else gemm(x, kernel)

    return selective


def _check_phase(phase):
    return _check_choice("phase", phase, ("train", "eval"))


_FINETUNE_BN_IMAGES = 2048  # Recipe's default: its repr omits it when there is no FNT phase


@dataclasses.dataclass(frozen=True, repr=False, kw_only=True)
class Recipe(train.Recipe):
    """LUQ 4-bit training for :func:`landscape.train.fit`, any network built from the library layers.

    ``fit(model, data, recipe=Recipe())`` trains with, on every selected conv/dense layer::

        forward   z = Q_INT(W) · Q_INT(a)                       (:func:`luq_gemm`, INT4 SAWB)
        backward  ∂C/∂a = Q_INT(W)ᵀ · Q_FP(δ),  ∂C/∂W = Q_FP(δ) · Q_INT(a)ᵀ

    with one sample Q_FP(δ) (the mean of ``samples`` draws: SMP) feeding both backward GEMMs,
    drawn from the ``"luq"`` PRNG stream that ``fit`` passes each step (fresh per layer and
    step, reproducible from ``fit``'s seed). Then, with ``finetune_epochs`` > 0, the
    high-precision fine-tuning phase (FNT, paper §5.2): weights stay INT4, activations and
    gradients are FP32, and the learning rate follows the triangle of
    :func:`landscape.train.triangular_schedule` from the last learning rate of the 4-bit phase
    (0 under ``fit``'s cosine schedule) up to ``finetune_lr`` at mid-phase and back to 0.
    After it, every BatchNorm's running statistics are re-estimated under the INT4 forward on
    ``finetune_bn_images`` training images (:func:`landscape.train.recalibrate_batchnorm`):
    the FNT phase accumulated them under FP32 activations, not the forward that evaluation runs
    (discrepancy 8 of the module docstring).

    **Evaluation** (``Network.apply`` / ``accuracy`` of the trained network, and the per-epoch
    test accuracy of both phases) uses the INT4 forward: Q_INT(W)·Q_INT(a) on the selected
    layers, for every mode but ``"fp32"``.

    Layer selection: :meth:`init_variables` traces the network's conv/dense products in call
    order (abstractly, :func:`landscape.sparsity.gemm_layers`) and marks the selected ones in
    the ``"luq_layers"`` collection (:data:`LAYERS_COLLECTION`), so a trained or cached
    network carries its selection. With ``quantize_first_last=False`` (default) the first
    and the last product (stem and classifier) stay FP32 in every phase — forward and
    backward — as usual for 4-bit networks (the LUQ paper's main text leaves this open; its
    code wraps every layer: ``quantize_first_last=True``). Unmarked layers are FP32.

    Args:
      bits: width of the backward gradient format [1, bits − 1, 0] (4: FP4).
      samples: SMP draws averaged per step (mode ``"luq"`` only); default 2 for ``"luq"``,
        1 otherwise.
      finetune_epochs: epochs of the FNT phase (0: none).
      quantize_first_last: also quantize the first and last layer.
      mode: ``"luq"`` (INT4 forward, LUQ backward), ``"rdn"`` (INT4 forward, biased FP4
        round-to-nearest backward, :func:`round_gradient`), ``"none"`` (INT4 forward only,
        FP32 backward) or ``"fp32"`` (no quantization: plain training under this interface).
      max_mode: the gradient format's maximum, see :func:`quantize_gradient`.
      forward_bits: INT width of the forward (SAWB coefficients are built in for 4).
      forward_levels: SAWB level sets of the forward, ``"strict"`` (INT-b) or ``"reference"``
        (the reference code's, discrepancy 3; :func:`sawb`).
      finetune_lr: peak learning rate of the FNT phase.
      finetune_bn_images: training images (drawn with the fine-tuning phase's seed, ``fit``'s
        seed + 1) on which the BatchNorm statistics are re-estimated after FNT; 0 keeps the
        statistics of the FNT phase.
      prng: random bits of the LUQ draws, ``"hash"`` (default: cheap on CPU) or ``"jax"``
        (the stream key's threefry); see :func:`quantize_gradient`.

    ``repr`` is the constructor call (``finetune_bn_images`` omitted at its default without an
    FNT phase, so :meth:`main_phase` keeps its identity): it is the recipe's identity in
    ``fit``'s training cache.
    """

    bits: int = 4
    samples: int | None = None
    finetune_epochs: int = 1
    quantize_first_last: bool = False
    mode: str = "luq"
    max_mode: str = "abs"
    forward_bits: int = 4
    forward_levels: str = "strict"
    finetune_lr: float = 0.01
    prng: str = "hash"
    finetune_bn_images: int = _FINETUNE_BN_IMAGES

    def __post_init__(self):
        mode = _check_choice("mode", self.mode, RECIPE_MODES)
        samples = (2 if mode == "luq" else 1) if self.samples is None else self.samples
        bits, samples, max_mode, _ = _check_backward_args(
            self.bits, samples, self.max_mode, "none" if mode == "fp32" else mode)
        _sawb_args(self.forward_bits, None, None, self.forward_levels, _FORWARD_NAMES)
        lr = self.finetune_lr
        if not checks.is_real(lr) or not (np.isfinite(lr) and lr > 0):  # numpy scalars too
            raise ValueError(f"finetune_lr must be a finite learning rate > 0, got {lr!r}")
        fields = dict(bits=bits, samples=samples, max_mode=max_mode, finetune_lr=float(lr),
                      finetune_epochs=_check_int("finetune_epochs", self.finetune_epochs, 0, 1 << 20),
                      finetune_bn_images=_check_int("finetune_bn_images", self.finetune_bn_images,
                                                    0, 1 << 30),
                      quantize_first_last=_check_bool("quantize_first_last", self.quantize_first_last),
                      prng=_check_choice("prng", self.prng, PRNGS))
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    # -- the train.Recipe protocol

    @property
    def rng_streams(self) -> tuple[str, ...]:
        return ("luq",) if self.mode == "luq" else ()

    @property
    def finetune(self):
        if self.finetune_epochs == 0:
            return None
        return FinetuneRecipe(self), self.finetune_epochs, self.finetune_lr

    def main_phase(self) -> Recipe:
        """This recipe without its FNT phase (``fit`` trains and caches that network first)."""
        return dataclasses.replace(self, finetune_epochs=0, finetune_bn_images=_FINETUNE_BN_IMAGES)

    def init_variables(self, model, variables, x):
        """``variables`` with the ``"luq_layers"`` marks of the layers this recipe quantizes.

        ``x`` is an example batch (one image is enough): the products are traced, not run.
        Raises ValueError when the selection is empty for a quantizing mode.
        """
        variables = {k: v for k, v in variables.items() if k != LAYERS_COLLECTION}
        if self.mode == "fp32":
            return variables
        found = sparsity.gemm_layers(model, variables, jnp.asarray(x)[:1])
        chosen = found if self.quantize_first_last else found[1:-1]
        if not chosen:
            raise ValueError(
                f"{self!r} quantizes no layer: the model has {len(found)} landscape.layers conv/dense layer(s)"
                + (" (flax.linen's own layers are not seen: build them from landscape.layers)" if not found else
                   " and the first and last stay FP32 (pass quantize_first_last=True)")
            )
        marks = {layer.path + ("index",): jnp.asarray(layer.index, jnp.int32) for layer in chosen}
        return {**variables, LAYERS_COLLECTION: flax.traverse_util.unflatten_dict(marks)}

    def gemm_hook(self, phase: str):
        """The GEMM hook of ``phase``: ``"train"`` (4-bit forward and backward) or ``"eval"``
        (the INT4 forward). None in mode ``"fp32"``."""
        phase = _check_phase(phase)
        if self.mode == "fp32":
            return None
        if phase == "eval":
            return _only_marked(layer_hook(mode="none", forward_bits=self.forward_bits,
                                           forward_levels=self.forward_levels))
        return _only_marked(layer_hook(
            bits=self.bits, samples=self.samples, max_mode=self.max_mode, mode=self.mode,
            forward_bits=self.forward_bits, forward_levels=self.forward_levels, prng=self.prng,
            collection="luq"))

    # -- helpers

    @staticmethod
    def quantized_layers(variables) -> tuple[str, ...]:
        """Names ("/"-joined module paths) of the marked layers of ``variables``, in call order."""
        flat = flax.traverse_util.flatten_dict(dict(variables.get(LAYERS_COLLECTION, {})))
        order = sorted((int(v), "/".join(path[:-1])) for path, v in flat.items())
        return tuple(name for _, name in order)

    def __repr__(self) -> str:
        return (
            f"luq.Recipe(mode={self.mode!r}, bits={self.bits}, samples={self.samples}, "
            f"max_mode={self.max_mode!r}, forward_bits={self.forward_bits}, "
            + (f"forward_levels={self.forward_levels!r}, " if self.forward_levels != "strict" else "")
            + f"prng={self.prng!r}, "
            f"quantize_first_last={self.quantize_first_last}, "
            f"finetune_epochs={self.finetune_epochs}, finetune_lr={self.finetune_lr!r}"
            + (f", finetune_bn_images={self.finetune_bn_images})"
               if self.finetune_epochs or self.finetune_bn_images != _FINETUNE_BN_IMAGES else ")")
        )


class FinetuneRecipe(train.Recipe):
    """The FNT phase of a :class:`Recipe` (``Recipe.finetune``): the marked layers compute
    x · Q_INT(W) with FP32 activations and an FP32 backward (straight-through for W); the
    evaluation hook is the parent's INT4 forward. No random stream. :meth:`finish` re-estimates
    the BatchNorm statistics under that INT4 forward."""

    def __init__(self, parent: Recipe):
        if not isinstance(parent, Recipe):
            raise ValueError(f"parent must be a luq.Recipe, got {parent!r}")
        self.parent = parent

    def gemm_hook(self, phase: str):
        phase = _check_phase(phase)
        p = self.parent
        if phase == "eval" or p.mode == "fp32":
            return p.gemm_hook(phase)
        return _only_marked(layer_hook(mode="none", quantize_forward="weights",
                                       forward_bits=p.forward_bits, forward_levels=p.forward_levels))

    def finish(self, model, variables, train_split, seed):
        """``variables`` with the BatchNorm running statistics re-estimated under the INT4
        forward on ``parent.finetune_bn_images`` images of ``train_split`` drawn with ``seed``
        (unchanged without BatchNorm, with 0 images, or in mode ``"fp32"``, whose FNT forward
        is already the evaluation forward)."""
        n = self.parent.finetune_bn_images
        if n == 0 or self.parent.mode == "fp32" or "batch_stats" not in variables:
            return variables
        idx = data.calibration_index(len(train_split), min(n, len(train_split)), seed)
        return train.recalibrate_batchnorm(model, variables, train_split.x[idx],
                                           hook=self.gemm_hook("eval"))

    def __repr__(self) -> str:
        return f"{self.parent!r}.finetune"


# --------------------------------------------------------------------------------------------
# whole-network gradient bias


@dataclasses.dataclass(frozen=True, repr=False)
class GradientError:
    """Relative error of a recipe's whole-network gradient, averaged over S draws.

    Attributes:
      samples: the S values, ascending.
      rel_error: (len(samples),) ‖mean of S draws − g‖ / ‖g‖ (root mean square over groups),
        with g the gradient of the same INT4 forward with an FP32 backward.
      draws: draws computed (split into ``draws // S`` disjoint groups for each S).
      recipe: repr of the recipe.
    """

    samples: tuple[int, ...]
    rel_error: np.ndarray
    draws: int
    recipe: str

    @property
    def slope(self) -> float:
        """Least-squares slope of log(rel_error) against log(S): −1/2 for an unbiased
        quantizer (pure variance), → 0 for a biased one."""
        if len(self.samples) < 2 or not np.all(self.rel_error > 0):
            return float("nan")
        return float(np.polyfit(np.log(self.samples), np.log(self.rel_error), 1)[0])

    def __repr__(self) -> str:
        errs = ", ".join(f"S={s}: {e:.4g}" for s, e in zip(self.samples, self.rel_error, strict=True))
        return f"GradientError({errs}; slope={self.slope:.3f}, draws={self.draws}, recipe={self.recipe})"


def gradient_error(model, variables, x, y, *, recipe, samples=(1, 16, 256), draws=None, seed=0,
                   batch_size=16) -> GradientError:
    """How far the gradient under ``recipe`` is from the FP32 backward of the same forward.

    For draws k = 1..K with independent ``"luq"`` keys, ĝ_k is the gradient of the mean
    cross-entropy of ``model.apply(variables, x, train=True)`` (batch statistics) with
    respect to every parameter, under ``recipe.gemm_hook("train")``; g is the same with the
    backward quantizer off (mode ``"none"``: the same INT4 forward, an FP32 backward). For
    each S::

        rel_error(S) = sqrt(mean_groups ‖(1/S) Σ_{k ∈ group} ĝ_k − g‖²) / ‖g‖

    over K // S disjoint groups. Unbiased backward (LUQ): rel_error ∝ 1/√S; a biased one
    (``mode="rdn"``) keeps a floor — the paper's argument (eq. 8) at network level. BN and
    ReLU backward are linear in the upstream cotangent, so unbiasedness per layer carries
    through the network (tower property).

    Args:
      model, variables: a network (``variables`` as from ``model.init``; the recipe's layer
        marks are (re)computed here).
      x, y: one batch, (N, H, W, C) and (N,) int.
      recipe: a :class:`Recipe`; deterministic modes are evaluated once.
      samples: S values (positive integers).
      draws: K (default 2·max(samples)); must be ≥ max(samples).
      seed: seed of the draws.
      batch_size: draws computed at once (memory: that many gradients' activations).
    """
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a luq.Recipe, got {recipe!r}")
    samples = tuple(sorted(_check_int("samples entry", s, 1, 1 << 20) for s in samples))
    if not samples:
        raise ValueError("samples must name at least one S")
    draws = 2 * samples[-1] if draws is None else _check_int("draws", draws, 1, 1 << 24)
    if draws < samples[-1]:
        raise ValueError(f"draws must be >= max(samples) = {samples[-1]}, got {draws}")
    batch_size = _check_int("batch_size", batch_size, 1, 1 << 20)
    x, y = jnp.asarray(x), jnp.asarray(y)
    variables = recipe.init_variables(model, dict(variables), x[:1])
    reference = recipe if recipe.mode == "fp32" else dataclasses.replace(recipe, mode="none", samples=1)

    def flat_grad(hook, variables, x, y, key, dropout_key):
        def loss(p):
            with layers.gemm_hook(hook):
                # one dropout mask for the reference and every draw: only the backward differs
                logits, _ = model.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"],
                                        rngs={"luq": key, train.DROPOUT_STREAM: dropout_key})
            log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
            return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))

        grads = jax.grad(loss)(variables["params"])
        return jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])

    # Data and variables are arguments, not closed-over constants, which XLA would try to fold.
    @jax.jit
    def deviations(variables, x, y, keys, dropout_key):
        g = flat_grad(reference.gemm_hook("train"), variables, x, y, keys[0], dropout_key)
        hook = recipe.gemm_hook("train")
        d = lax.map(lambda k: flat_grad(hook, variables, x, y, k, dropout_key) - g, keys,
                    batch_size=min(batch_size, keys.shape[0]))
        return d, jnp.linalg.norm(g)

    k = draws if recipe.mode == "luq" else 1
    with runtime.classic_threefry():
        keys = jax.random.split(jax.random.key(seed), k)
        dropout_key = jax.random.fold_in(jax.random.key(seed), train.DROPOUT_FOLD)  # unused by a model without dropout
    d, norm = deviations(variables, x, y, keys, dropout_key)
    d = np.asarray(d, np.float64)
    errs = []
    for s in samples:
        if k == 1:  # deterministic: every average is the one gradient
            errs.append(np.linalg.norm(d[0]))
            continue
        groups = d[: (k // s) * s].reshape(k // s, s, -1).mean(1)
        errs.append(np.sqrt(np.mean(np.sum(groups**2, axis=1))))
    return GradientError(samples, np.asarray(errs) / float(norm), k, repr(recipe))
