"""LUQ: the quantizers, the backward op and the multiplication-free product (landscape.luq).

Statistical checks use fixed seeds and tolerances several standard errors wide. Test data
come from numpy and shapes repeat across tests: every new JAX shape or static option costs a
compile, which dominates the runtime of this file.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from landscape import luq, train

N = 1000  # size of the shared heavy-tailed test gradient


def heavy_tailed(seed, n=N):
    """Gradient-like values: lognormal(0, 2) magnitudes with random signs."""
    rng = np.random.default_rng(seed)
    mag = np.exp(2.0 * rng.standard_normal(n))
    return jnp.asarray(np.where(rng.random(n) < 0.5, mag, -mag), jnp.float32)


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _draws(g, key, count, bits, samples, max_mode, prng):
    keys = jax.random.split(key, count)
    q = lambda k: luq.quantize_gradient(g, k, bits=bits, samples=samples, max_mode=max_mode, prng=prng)
    return jax.vmap(q)(keys)


def draws(g, seed, count, *, bits=4, samples=1, max_mode="abs", prng="jax"):
    """count independent LUQ draws of g (each an SMP average of ``samples``), on axis 0."""
    return np.asarray(_draws(g, jax.random.key(seed), count, bits, samples, max_mode, prng), np.float64)


def bracket(x, alpha):
    """Independent (numpy, float64) lower/upper levels around |x| on {0, α, 2α, 4α, …}."""
    r = np.abs(np.asarray(x, np.float64)) / alpha
    n = np.floor(np.log2(np.where(r >= 1, r, 1.0)))
    lo = np.where(r >= 1, alpha * 2.0**n, 0.0)
    hi = np.where(r >= 1, alpha * 2.0 ** (n + 1), alpha)
    return lo, hi


# ---------------------------------------------------------------------------------------------
# the gradient quantizer


@pytest.mark.parametrize("max_mode,prng", [("abs", "jax"), ("signed", "jax"), ("abs", "hash")])
def test_unbiased_zscores_variance_and_support(max_mode, prng):
    g = heavy_tailed(0)
    S = 4000
    q = draws(g, 1, S, max_mode=max_mode, prng=prng)
    alpha = float(luq.gradient_alpha(g, max_mode=max_mode))
    g64 = np.asarray(g, np.float64)
    lo, hi = bracket(g64, alpha)
    var = (np.abs(g64) - lo) * (hi - np.abs(g64))
    # float32 arithmetic: one rounding of |g|/α near a level costs ~2^-23·hi·(hi − lo)
    err = np.abs(np.asarray(luq.gradient_variance(g, max_mode=max_mode), np.float64) - var)
    assert np.all(err <= 1e-5 * var + 2.0**-21 * hi * (hi - lo))
    keep = (var > 0) & (np.abs(g64) > 1e-6 * alpha)
    z = (q.mean(0) - g64)[keep] / np.sqrt(var[keep] / S)
    assert keep.sum() > 900
    assert abs(z.mean()) < 0.1
    assert 0.9 < z.std() < 1.1
    assert np.abs(z).max() < 6.0
    # variance per region, summed over its elements (per element: the next test)
    emp = q.var(0)
    under = keep & (np.abs(g64) < alpha)
    inside = keep & (np.abs(g64) >= alpha)
    assert under.sum() > 100 and inside.sum() > 100
    for region in (under, inside):
        assert abs(emp[region].sum() / var[region].sum() - 1) < 0.05
    # every draw is one of the two levels bracketing g, with g's sign (or zero)
    a = np.abs(q)
    assert np.all(np.isclose(a, lo, rtol=1e-6, atol=0) | np.isclose(a, hi, rtol=1e-6, atol=0))
    assert np.all((np.sign(q) == 0) | (np.sign(q) == np.sign(g64)))
    if max_mode == "abs":
        assert a.max() <= float(jnp.max(jnp.abs(g)))  # nothing exceeds (or is clipped below) max|g|


def test_variance_formula_per_element():
    alpha, fracs = 1.0, np.linspace(0.2, 0.8, 7)
    under = fracs * alpha
    bins = np.concatenate([alpha * 2.0 ** (n - 1) * (1 + fracs) for n in range(1, 7)])
    g = jnp.asarray(np.concatenate([[64.0], under, -bins]), jnp.float32)  # max|g| = 2^6 α
    assert float(luq.gradient_alpha(g)) == alpha
    emp = draws(g, 2, 20000).var(0)
    x = np.abs(np.asarray(g, np.float64))
    theory_under = alpha * x[1:8] - x[1:8] ** 2
    n = np.floor(np.log2(x[8:] / alpha)) + 1
    theory_bins = (x[8:] - 2 ** (n - 1) * alpha) * (2**n * alpha - x[8:])
    np.testing.assert_allclose(emp[1:8], theory_under, rtol=0.05)
    np.testing.assert_allclose(emp[8:], theory_bins, rtol=0.05)
    assert emp[0] == 0.0


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_level_set_other_widths(bits):
    g = heavy_tailed(3)
    q = draws(g, 4, 16, bits=bits)
    alpha = float(luq.gradient_alpha(g, bits=bits))
    top = 2 ** (bits - 1) - 2  # strict format: 2^(b−1) − 1 magnitudes and zero
    assert alpha == float(jnp.max(jnp.abs(g))) / 2**top
    levels = np.concatenate([[0.0], alpha * 2.0 ** np.arange(top + 1)]).astype(np.float32)
    assert np.all(np.isin(np.abs(q).astype(np.float32), levels))
    assert np.all((np.sign(q) == 0) | (np.sign(q) == np.sign(np.asarray(g))))


def test_signed_mode_is_the_reference_format():
    g = jnp.array([2.0, 1.0, -10.0, 0.5, -0.001, 0.0], jnp.float32)
    alpha = float(luq.gradient_alpha(g, max_mode="signed"))
    assert alpha == 2.0 / 128  # signed max / 2^7, not max|g| / 2^6
    q = draws(g, 5, 64, max_mode="signed")
    k = np.log2(np.abs(q[q != 0]) / alpha)
    assert np.all(k == np.round(k)) and k.min() >= 0
    # −10 lies between 2^9 α = 8 and 2^10 α = 16: above the top code 2^7 α, never clipped
    assert set(np.unique(q[:, 2])) == {-8.0, -16.0}
    # max(g) ≤ 0: the reference code's α would be ≤ 0; fall back to max|g|
    neg = -jnp.abs(g)
    assert float(luq.gradient_alpha(neg, max_mode="signed")) == 10.0 / 128
    assert np.all(np.isfinite(draws(neg, 0, 64, max_mode="signed")))


def reference_code_luq(g, rng, count):
    """A numpy transcription (float64) of the reference code's backward quantizer
    (reference/luq_nm.md §1.4): signed max, α = max/2^7, stochastic underflow with one uniform,
    then the paper's eqs. (13–14) — uniform noise of one bin width, round to the nearest power
    with the 4/3 factor, clamped below to the lower power — with a second uniform."""
    g = np.asarray(g, np.float64)
    alpha = g.max() / 2**7
    shape = (count, g.size)
    u_under, noise = rng.random(shape), rng.random(shape) - 0.5
    g1 = np.where(np.abs(g) < alpha, alpha * np.sign(g), g) * np.ones(shape)
    g1 = np.where(np.abs(g) < alpha * u_under, 0.0, g1)
    r = np.where(g1 != 0, np.abs(g1) / alpha, 1.0)  # zeros stay zeros (last line)
    lo = 2.0 ** np.floor(np.log2(r))
    q = 2.0 ** np.floor(np.log2((r + lo * noise) * 4.0 / 3.0)) * alpha
    return np.where(g1 == 0, 0.0, np.sign(g1) * np.maximum(q, alpha * lo))


def test_signed_mode_draws_as_the_reference_code_does():
    """Our direct rounding (up iff U < the linear fraction) and the reference code's noise + 4/3
    rounding are the same distribution: per element, the frequency of every level agrees
    within 5 standard errors of the difference of two binomial proportions."""
    alpha = 2.0 / 128  # signed max 2.0
    ratios = [128.0, 0.3, 0.8, 1.0, 1.25, 1.5, 1.75, 3.0, 5.0, 100.0, 127.0]
    g = np.array(ratios + [-1.6, -12.5, -640.0]) * alpha  # −640 α: beyond the top code, not clipped
    n = 20000
    ours = draws(jnp.asarray(g, jnp.float32), 7, n, max_mode="signed")
    theirs = reference_code_luq(g, np.random.default_rng(7), n)
    for e in range(g.size):
        levels = np.union1d(np.unique(ours[:, e]), np.unique(theirs[:, e]))
        assert len(levels) <= 2, (g[e] / alpha, levels / alpha)
        for v in levels:
            p, q = (ours[:, e] == v).mean(), (theirs[:, e] == v).mean()
            pooled = (p + q) / 2
            assert abs(p - q) <= 5 * np.sqrt(2 * pooled * (1 - pooled) / n) + 1e-12, (g[e] / alpha, v / alpha, p, q)
        assert abs(theirs[:, e].mean() - g[e]) <= 5 * theirs[:, e].std() / np.sqrt(n) + 1e-12  # the oracle is unbiased


@pytest.mark.parametrize("max_mode", ["abs", "signed"])
def test_levels_are_fixed_points(max_mode):
    top = 6 if max_mode == "abs" else 7
    alpha = 0.37 / 2**top
    mags = alpha * 2.0 ** np.arange(top + 1)
    g = jnp.asarray(np.concatenate([mags, -mags, [0.0, 0.0]]), jnp.float32)
    assert float(luq.gradient_alpha(g, max_mode=max_mode)) == pytest.approx(alpha, rel=1e-7)
    q = draws(g, 6, 64, max_mode=max_mode)
    assert np.array_equal(q, np.broadcast_to(np.asarray(g), q.shape))


def test_zero_and_non_finite_gradients():
    z = luq.quantize_gradient(jnp.zeros((3, 4, 2)), jax.random.key(0), samples=3)
    assert z.shape == (3, 4, 2) and np.all(np.asarray(z) == 0)
    assert np.all(np.asarray(luq.round_gradient(jnp.zeros((3, 4, 2)))) == 0)
    assert float(luq.gradient_alpha(jnp.zeros(3))) == 0.0
    # a NaN/inf gradient poisons the whole tensor instead of silently zeroing it
    assert np.all(np.isnan(luq.quantize_gradient(jnp.array([1.0, jnp.inf, 0.5]), jax.random.key(0))))
    assert np.all(np.isnan(luq.round_gradient(jnp.array([1.0, jnp.nan, 0.5]))))
    # also in the signed mode, whose m = max(g) stays finite next to a −inf
    g = jnp.array([1.0, -jnp.inf, 0.5, -0.25])
    for fn in (functools.partial(luq.quantize_gradient, key=jax.random.key(0)), luq.round_gradient,
               luq.gradient_variance):
        assert np.all(np.isnan(fn(g, max_mode="signed"))), fn


def test_empty_tensors_pass_through():
    """An empty batch is an all-zero one: α = 0, empty outputs and gradients (every entry point
    but quantize_gradient failed in a max reduction)."""
    e = jnp.zeros((0, 3))
    assert float(luq.gradient_alpha(e)) == 0.0 and float(luq.gradient_alpha(e, max_mode="signed")) == 0.0
    for out in (luq.gradient_variance(e), luq.round_gradient(e), luq.sawb(e), luq.sawb_codes(e)[0]):
        assert out.shape == (0, 3)
    assert float(luq.sawb_codes(e)[1]) == 1.0
    w = jnp.ones((3, 2))
    for mode in ("luq", "rdn", "none"):
        z, vjp = jax.vjp(lambda a, mode=mode: luq.luq_gemm(a, w, jax.random.key(0), jnp.dot, mode=mode), e)
        assert z.shape == (0, 2) and vjp(z)[0].shape == (0, 3)


def test_float16_gemm_rescales_in_float32():
    """z = gemm(codes)·Δ_xΔ_w: in float16 the product of the two steps left the normal range for
    small tensors and was rounded (z off by 4 % at σ = 1e-3); now only z's own rounding is left."""
    rng = np.random.default_rng(0)
    for sd in (1e-1, 3e-3):
        x = jnp.asarray(rng.standard_normal((64, 32)) * sd, jnp.float16)
        w = jnp.asarray(rng.standard_normal((32, 16)) * sd, jnp.float16)
        z = luq.luq_gemm(x, w, None, jnp.dot, mode="none")
        assert z.dtype == jnp.float16
        (cx, sx), (cw, sw) = luq.sawb_codes(x), luq.sawb_codes(w, signed=True)
        exact = (np.asarray(cx, np.float64) @ np.asarray(cw, np.float64)) * float(sx) * float(sw)
        assert np.max(np.abs(np.asarray(z, np.float64) - exact)) / np.max(np.abs(exact)) < 1e-3, sd


def test_float16_gemm_keeps_its_sums_and_gradients_in_float32():
    """The codes' integer sums overflowed float16 (8192 terms of up to 15·7: z = inf), and the
    backward cotangent Q_FP(δ)·Δ_xΔ_w underflowed it before the division by Δ (dx and dW 40 %
    off, a fifth of dW exactly 0, at δ ~ 1e-3). Both now match the float32 straight-through
    product up to float16's own rounding of the operands and results."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0.5, 1.5, (2, 8192)), jnp.float16)
    w = jnp.asarray(rng.uniform(0.005, 0.015, (8192, 4)), jnp.float16)
    z = luq.luq_gemm(x, w, None, jnp.dot, mode="none")
    ref = jnp.dot(luq.sawb(x.astype(jnp.float32)), luq.sawb(w.astype(jnp.float32), signed=True))
    assert z.dtype == jnp.float16 and np.all(np.isfinite(np.asarray(z)))
    np.testing.assert_allclose(np.asarray(z, np.float32), np.asarray(ref), rtol=2e-3)

    x32 = np.maximum(rng.standard_normal((8, 256)), 0).astype(np.float32) * 1e-2  # after a ReLU
    w32 = (rng.standard_normal((256, 16)) * 0.05).astype(np.float32)
    d32 = (rng.standard_normal((8, 16)) * 1e-3).astype(np.float32)  # the incoming cotangent

    def grads(dtype):
        def f(a, b):
            return jnp.sum(luq.luq_gemm(a, b, None, jnp.dot, mode="none") * jnp.asarray(d32, dtype))
        return jax.grad(f, argnums=(0, 1))(jnp.asarray(x32, dtype), jnp.asarray(w32, dtype))

    for g16, g32 in zip(grads(jnp.float16), grads(jnp.float32), strict=True):
        assert g16.dtype == jnp.float16
        g16, g32 = np.asarray(g16, np.float64), np.asarray(g32, np.float64)
        assert np.linalg.norm(g16 - g32) / np.linalg.norm(g32) < 1e-2
        assert np.mean((g16 == 0) & (g32 != 0)) < 0.01


def test_variance_at_the_top_of_float32():
    """The maximum is on a level (variance 0) even where the level above it, 2·max, overflows float32
    (inf · 0 gave NaN there). Variances of the order of (1e38)² overflow to inf, never NaN."""
    g = jnp.array([3e38, -1e38, 2.5e38, 1.0], jnp.float32)
    var = np.asarray(luq.gradient_variance(g), np.float64)
    assert var[0] == 0.0 and not np.any(np.isnan(var))
    assert np.all(var[1:] > 0)


def test_signed_mode_levels_far_above_the_signed_max():
    """The signed mode's levels α·2^k are unbounded above: |g| ≫ max(g) must not overflow."""
    g = jnp.array([1e-37, -1.0, -0.5], jnp.float32)  # |g|/α = 1.3e39 exceeds float32
    r = np.asarray(luq.round_gradient(g, max_mode="signed"))
    assert np.all(r[1:] < 0) and np.all(np.abs(r[1:] / np.asarray(g[1:]) - 1) < 0.5), r
    keys = jax.random.split(jax.random.key(0), 4000)
    q = np.asarray(jax.vmap(lambda k: luq.quantize_gradient(g, k, max_mode="signed", prng="hash"))(keys))
    assert np.all(q[:, 1:] < 0)
    np.testing.assert_allclose(q[:, 1:].mean(0), np.asarray(g[1:]), rtol=0.02)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_levels_round_to_a_narrow_grid_in_arithmetic(dtype):
    """LUQ's levels (dtype values times 2^−j) rounded to dtype's grid exactly as a conversion rounds
    them, subnormals included, by a program without converts: XLA may drop an f32 → f16 → f32 pair
    (excess precision, on by default on GPUs; an H200 measured float16 variances 42 % off)."""
    rng = np.random.default_rng(0)
    values = np.asarray(jnp.asarray(rng.uniform(0.5, 2, 500) * 2.0 ** rng.integers(-10, 3, 500), dtype), np.float32)
    levels = (values[:, None] * 2.0 ** -np.arange(150)[None]).astype(np.float32).ravel()
    levels = levels[levels >= np.finfo(np.float32).smallest_normal]  # XLA:CPU flushes float32 subnormals
    on_grid = jax.jit(lambda v: luq._on_grid(v, dtype))
    converted = np.asarray(jnp.asarray(levels).astype(dtype).astype(jnp.float32))
    if dtype != jnp.bfloat16:  # its subnormals lie below float32's normals
        assert np.sum(converted != levels) > 100  # the subnormal range is exercised
    np.testing.assert_array_equal(np.asarray(on_grid(levels)), converted)
    assert " convert(" not in on_grid.lower(levels).compile().as_text()


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_narrow_dtypes_stay_unbiased_on_their_own_levels(dtype):
    """float16 rounds levels below 2^-14 to its subnormal grid: the probabilities must be
    measured between the rounded levels (the exact ones gave a −4.8 % bias at max|g| = 1e-5)."""
    g = jnp.asarray(np.array([1e-5, 3e-7, 1e-6, 2e-6, -5e-7], np.float32), dtype)
    keys = jax.random.split(jax.random.key(1), 40_000)
    q = jax.vmap(lambda k: luq.quantize_gradient(g, k, prng="hash"))(keys)
    assert q.dtype == dtype
    q = np.asarray(q, np.float64)
    g64 = np.asarray(g, np.float64)
    se = q.std(0) / np.sqrt(len(keys))
    assert np.sum(se > 0) >= 3  # the max is a fixed point; the others are rounded at random
    # the closed-form variance is float32 (in float16 it underflowed to 0 here)
    var = luq.gradient_variance(g)
    assert var.dtype == jnp.float32
    # (element 1 rounds up with probability ~2^-22: its variance, 8.5e-22, is 0 in 40,000 draws)
    np.testing.assert_allclose(q.var(0), np.asarray(var, np.float64), rtol=0.1, atol=1e-18)
    np.testing.assert_array_equal(q.mean(0)[se == 0], g64[se == 0])
    z = (q.mean(0) - g64)[se > 0] / se[se > 0]
    assert np.all(np.abs(z) < 5), z
    # every draw is one of the two levels bracketing |g| on the dtype's grid
    levels = np.unique(np.abs(q))
    assert np.all(np.asarray(jnp.asarray(levels, dtype), np.float64) == levels)


def test_scale_equivariance_with_same_key():
    g = heavy_tailed(7)
    key = jax.random.key(8)
    q = np.asarray(luq.quantize_gradient(g, key))
    for c in [2.0**-20, 2.0**9]:
        assert np.array_equal(np.asarray(luq.quantize_gradient(c * g, key)), c * q)
    for c in [0.37, 3.0, 1.0e4]:
        np.testing.assert_allclose(np.asarray(luq.quantize_gradient(c * g, key)), c * q, rtol=1e-6)


@pytest.mark.parametrize("prng", ["jax", "hash"])
def test_draws_do_not_follow_the_global_threefry_layout(prng):
    """landscape draws in the classic threefry layout whatever jax_threefry_partitionable says
    (runtime.classic_threefry): a seed gives the same rounding in every session."""
    g, key = heavy_tailed(3), jax.random.key(4)
    runs = []
    for layout in (True, False):
        with jax.threefry_partitionable(layout):
            runs.append(np.asarray(luq.quantize_gradient(g, key, samples=2, prng=prng)))
            plain = np.asarray(jax.random.bits(key, (4, 4), jnp.uint32))  # JAX's own draw follows it
        runs.append(plain)
    np.testing.assert_array_equal(runs[0], runs[2])
    assert not np.array_equal(runs[1], runs[3])


@pytest.mark.parametrize("prng", ["jax", "hash"])
def test_smp_variance_falls_as_one_over_n(prng):
    g = heavy_tailed(0)
    total = float(jnp.sum(luq.gradient_variance(g)))
    g64 = np.asarray(g, np.float64)
    for n, count in ((1, 4000), (2, 2000), (8, 2000)):
        q = draws(g, 10 + n, count, samples=n, prng=prng)
        assert abs(q.var(0).sum() * n / total - 1) < 0.06, n
        # bias unchanged: the summed mean error is within 4 standard errors of zero
        assert abs((q.mean(0) - g64).sum()) < 4 * np.sqrt(total / n / count)


def test_round_to_nearest_is_the_biased_baseline():
    g = heavy_tailed(11)
    alpha = float(luq.gradient_alpha(g))
    r = np.asarray(luq.round_gradient(g), np.float64)
    g64 = np.asarray(g, np.float64)
    lo, hi = bracket(g64, alpha)
    a = np.abs(g64)
    nearest = np.where(a - lo >= hi - a, hi, lo)
    np.testing.assert_allclose(np.abs(r), nearest, rtol=1e-6)
    assert np.all((np.sign(r) == 0) | (np.sign(r) == np.sign(g64)))
    # eq. (6) of the paper: MSE(SR) = (x − lo)(hi − x) ≥ min(x − lo, hi − x)² = MSE(RDN)
    mse_sr = np.asarray(luq.gradient_variance(g), np.float64)
    assert np.all(mse_sr >= (r - g64) ** 2 * (1 - 1e-5))
    # deterministic underflow: everything below α/2 vanishes
    assert np.all(r[a < 0.499 * alpha] == 0)


def test_round_to_nearest_breaks_ties_away_from_zero():
    """Exact ties (fraction 1/2 in the bracket) go up, away from zero, as documented: at
    max|g| = 64 (α = 1, levels 0, 1, 2, 4, …, 64) the midpoints 48, 0.5, −1.5 and 3 round to
    64, 1, −2 and 4 (rounding only above 1/2 gave 32, 0, −1 and 2)."""
    g = jnp.array([64.0, 48.0, 0.5, -1.5, 3.0], jnp.float32)
    assert float(luq.gradient_alpha(g)) == 1.0
    np.testing.assert_array_equal(np.asarray(luq.round_gradient(g)), [64.0, 64.0, 1.0, -2.0, 4.0])


def test_vmap_and_key_types():
    g = heavy_tailed(12, 64).reshape(8, 8)
    key = jax.random.key(13)
    # vmap over rows: each row is its own tensor with its own α
    rows = jax.vmap(luq.gradient_alpha)(g)
    np.testing.assert_allclose(rows, jnp.max(jnp.abs(g), axis=1) / 64, rtol=1e-7)
    keys = jax.random.split(key, 8)
    q = jax.vmap(luq.quantize_gradient)(g, keys)
    assert np.array_equal(q[3], luq.quantize_gradient(g[3], keys[3]))
    raw = jax.random.PRNGKey(0)  # raw uint32 keys work too
    assert luq.quantize_gradient(g, raw).shape == g.shape
    assert luq.quantize_gradient(g, jax.random.key(0, impl="rbg")).shape == g.shape


def test_hash_bits_uniform_independent_and_keyed():
    n = 1 << 16
    key = jax.random.key(40)
    w = np.asarray(luq.hash_bits(key, (n,)), np.uint64)
    assert np.array_equal(w, np.asarray(luq.hash_bits(key, (n,))))  # deterministic per key
    assert np.array_equal(np.asarray(luq.hash_bits(key, (4, n // 4))).ravel(), w)  # flat index
    # chi-square over 256 bins, for the top, middle and low byte: 255 dof, mean 255, sd 22.6
    for shift in (24, 12, 0):
        counts = np.bincount(((w >> shift) & 255).astype(np.int64), minlength=256)
        chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
        assert 150 < chi2 < 370, (shift, chi2)
    u = w / 2.0**32
    assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / n)
    # neighbours in the index, and the same index under another key, are uncorrelated
    other = np.asarray(luq.hash_bits(jax.random.key(41), (n,)), np.uint64) / 2.0**32
    for a, b in ((u[:-1], u[1:]), (u[::2], u[1::2]), (u, other)):
        assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(len(a))
    # vmap over keys equals one call per key
    keys = jax.random.split(key, 3)
    batched = jax.vmap(lambda k: luq.hash_bits(k, (5,)))(keys)
    assert np.array_equal(batched[1], luq.hash_bits(keys[1], (5,)))


def test_hash_rounding_probabilities():
    # P(up) equals the linear fraction inside the bracket (binomial tolerance, 4 sd)
    g = jnp.array([64.0, 0.25, 0.75, 1.5, 3.0, 5.0, 40.0], jnp.float32)  # α = 1
    p_up = np.array([0.25, 0.75, 0.5, 0.5, 0.25, 0.25])
    low = np.array([0.0, 0.0, 1.0, 2.0, 4.0, 32.0])
    q = draws(g, 42, 20000, prng="hash")
    freq = (q[:, 1:] > low).mean(0)
    assert np.all(np.abs(freq - p_up) < 4 * np.sqrt(p_up * (1 - p_up) / 20000))


# ---------------------------------------------------------------------------------------------
# SAWB


def test_sawb_scale_levels_and_rounding():
    x = normal(14, (64, 32))
    codes, scale = luq.sawb_codes(x)
    xn = np.asarray(x, np.float64)
    clip = 12.1 * np.sqrt(np.mean(xn**2)) - 12.2 * np.mean(np.abs(xn))
    assert float(scale) == pytest.approx(clip / 7, rel=1e-5)
    assert 2.2 < clip / xn.std() < 2.55  # ≈ 2.37σ for a Gaussian
    c = np.asarray(codes)
    assert c.min() >= -7 and c.max() <= 7 and len(np.unique(c)) <= 15
    q = luq.sawb(x)
    assert np.array_equal(np.asarray(q), c.astype(np.float32) * np.float32(scale))
    # round to nearest, half to even (numpy's rule as well), after the clamp
    t = np.clip(np.asarray(x) / np.float32(scale), -7, 7)
    assert np.array_equal(c, np.round(t).astype(np.int32))
    # non-negative input: unsigned grid 0..15 over [0, clip]
    r = jax.nn.relu(x)
    rc, rs = luq.sawb_codes(r)
    rn = np.asarray(r, np.float64)
    rclip = 12.1 * np.sqrt(np.mean(rn**2)) - 12.2 * np.mean(rn)
    assert float(rs) == pytest.approx(rclip / 15, rel=1e-5)
    assert np.asarray(rc).min() == 0 and np.asarray(rc).max() <= 15
    assert len(np.unique(np.asarray(rc))) >= 12  # the codes above 7 are in use
    # weights: the signed grid can be forced
    pc, _ = luq.sawb_codes(r, signed=True)
    assert np.asarray(pc).max() == 7


def test_sawb_reference_levels_are_the_reference_codes():
    """``levels="reference"``: the reference code's Qn/Qp and Δ = 2·clip / (Qp − Qn) with the
    same clip: weights [−8, 8] (17 levels), non-negative activations [0, 15] over [0, 2·clip],
    activations with a negative entry [−8, 15]."""
    x = normal(14, (64, 32))
    for data, signed, qn, qp in ((x, True, -8, 8), (jax.nn.relu(x), None, 0, 15), (x, None, -8, 15),
                                 (x, False, 0, 15)):
        codes, scale = luq.sawb_codes(data, signed=signed, levels="reference")
        xn = np.asarray(data, np.float64)
        clip = 12.1 * np.sqrt(np.mean(xn**2)) - 12.2 * np.mean(np.abs(xn))
        assert float(scale) == pytest.approx(2 * clip / (qp - qn), rel=1e-5), (signed, qn, qp)
        c = np.asarray(codes)
        t = np.clip(np.asarray(data) / np.float32(scale), qn, qp)
        assert np.array_equal(c, np.round(t).astype(np.int32))
        assert c.min() >= qn and c.max() <= qp and (c.min() == qn or qn == 0) and c.max() > qp // 2
        q = luq.sawb(data, signed=signed, levels="reference")
        assert np.array_equal(np.asarray(q), c.astype(np.float32) * np.float32(scale))
    # the strict grid differs (±7 on the same clip)
    assert not np.array_equal(np.asarray(luq.sawb(x, signed=True)),
                              np.asarray(luq.sawb(x, signed=True, levels="reference")))
    # the module docstring's figures (discrepancy 3): the code's [0, 2·clip] costs post-ReLU
    # activations 4.0× (N(0, 1)) and 2.9× (Laplace) the MSE of [0, clip]; its 17 weight levels
    # (a fifth bit) beat ±7
    rng = np.random.default_rng(0)

    def mse_ratio(v, **kw):
        v = jnp.asarray(v, jnp.float32)
        return float(jnp.mean((luq.sawb(v, levels="reference", **kw) - v) ** 2)
                     / jnp.mean((luq.sawb(v, **kw) - v) ** 2))

    assert 3.7 < mse_ratio(np.maximum(rng.standard_normal(200_000), 0)) < 4.3
    assert 2.6 < mse_ratio(np.maximum(rng.laplace(size=200_000), 0)) < 3.2
    assert 0.7 < mse_ratio(rng.standard_normal(200_000), signed=True) < 0.95


def test_sawb_guard_and_zero():
    # constant magnitude: 12.1·rms − 12.2·mean|x| = −0.1·c < 0; the guard clip = mean|x| = c
    x = jnp.array([0.3, -0.3, 0.3, 0.3, -0.3], jnp.float32)
    codes, scale = luq.sawb_codes(x)
    assert float(scale) > 0
    np.testing.assert_allclose(luq.sawb(x), x, rtol=1e-6)
    assert np.array_equal(np.abs(np.asarray(codes)), np.full(5, 7))
    z = luq.sawb(jnp.zeros(5))
    assert np.all(np.asarray(z) == 0) and np.all(np.isfinite(z))
    # an inf makes the scale NaN and the output NaN, not a finite tensor clamped at scale 1
    for bad in ([1.0, jnp.inf, 2.0], [1.0, -jnp.inf, 2.0, -0.5]):
        assert np.all(np.isnan(luq.sawb(jnp.array(bad, jnp.float32)))), bad


def test_sawb_rounds_exact_ties_half_to_even():
    """coeffs=(0, 0) makes the clip the guard's mean|x| = 7, so Δ = 7/7 = 1 exactly and x/Δ lands
    on the ties: half to even gives 0, 2, −2 (round half up gave 1, 3, −1), 23.5 clamps to 7."""
    x = jnp.array([0.5, 2.5, -1.5, 23.5], jnp.float32)
    codes, scale = luq.sawb_codes(x, coeffs=(0, 0))
    assert float(scale) == 1.0
    np.testing.assert_array_equal(np.asarray(codes), [0, 2, -2, 7])
    np.testing.assert_array_equal(np.asarray(luq.sawb(x, coeffs=(0, 0))), [0.0, 2.0, -2.0, 7.0])


def test_sawb_straight_through():
    # light tails: for U(−1, 1) the SAWB clip is ≈ 0.88, so the largest values are clipped
    x = jnp.asarray(np.random.default_rng(15).uniform(-1, 1, (16, 8)), jnp.float32)
    _, scale = luq.sawb_codes(x)
    assert np.any(np.abs(np.asarray(x) / float(scale)) > 7.5)
    cot = normal(16, x.shape)
    _, vjp = jax.vjp(luq.sawb, x)
    assert np.array_equal(np.asarray(vjp(cot)[0]), np.asarray(cot))
    # forward mode too (forward-over-reverse HVPs go through it)
    _, tangent = jax.jvp(luq.sawb, (x,), (cot,))
    assert np.array_equal(np.asarray(tangent), np.asarray(cot))
    batched = jax.vmap(luq.sawb)(x)  # per-row statistics under vmap
    assert np.array_equal(np.asarray(batched[2]), np.asarray(luq.sawb(x[2])))


# ---------------------------------------------------------------------------------------------
# the backward op


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.jit, static_argnums=0)
def backward_by_mode(gemm, x, w, ct, key):
    """(z, dx, dw) of luq_gemm for modes "luq" and "none", and the same from the GEMM's own
    VJP at the INT4 operands applied to the cotangent each mode should pass on."""
    out, ref = {}, {}
    xq, wq = luq.sawb(x), luq.sawb(w, signed=True)
    z_float, vjp_q = jax.vjp(gemm, xq, wq)
    for mode, dq in (("luq", luq.quantize_gradient(ct, key)), ("none", ct)):
        z, vjp = jax.vjp(lambda a, b, mode=mode: luq.luq_gemm(a, b, key, gemm, mode=mode), x, w)
        out[mode], ref[mode] = (z, *vjp(ct)), (z_float, *vjp_q(dq))
    return out, ref


@pytest.mark.parametrize("gemm,xshape,wshape", [
    (jnp.dot, (16, 12), (12, 10)),
    (conv, (2, 6, 6, 3), (3, 3, 3, 4)),
])
def test_one_sample_feeds_both_backward_gemms(gemm, xshape, wshape):
    x = jax.nn.relu(normal(17, xshape))
    w = normal(18, wshape)
    zshape = jax.eval_shape(gemm, x, w).shape
    ct = heavy_tailed(19, int(np.prod(zshape))).reshape(zshape)
    out, ref = backward_by_mode(gemm, x, w, ct, jax.random.key(20))
    assert np.array_equal(out["luq"][0], out["none"][0])  # forward untouched by backward
    for mode in ("luq", "none"):
        for got, want in zip(out[mode], ref[mode], strict=True):  # z, dx, dw
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    assert not np.allclose(out["luq"][2], out["none"][2], rtol=1e-3)  # the backward did quantize


def test_luq_identity_backward_per_mode():
    z, ct, key = normal(31, (6, 10)), heavy_tailed(32, 60).reshape(6, 10), jax.random.key(33)

    @jax.jit
    def both_ways(z, ct, key):
        out = {}
        for mode in ("luq", "rdn", "none"):
            kw = {"samples": 2} if mode == "luq" else {}
            y, vjp = jax.vjp(lambda z, mode=mode, kw=kw: luq.luq_identity(z, key, mode=mode, **kw), z)
            out[mode] = (y, vjp(ct)[0])
        want = {"luq": luq.quantize_gradient(ct, key, samples=2), "rdn": luq.round_gradient(ct), "none": ct}
        return out, want

    out, want = both_ways(z, ct, key)
    for mode, (y, dz) in out.items():
        assert np.array_equal(y, z) and np.array_equal(dz, want[mode])
    assert not np.array_equal(want["luq"], want["rdn"])


def test_forward_modes_and_jit():
    x, w, key = normal(21, (8, 6)), normal(22, (6, 5)), jax.random.key(23)
    f = jax.jit(lambda x, w, k: luq.luq_gemm(x, w, k, jnp.dot, samples=2))
    # the integer GEMM makes zeros and signs independent of how XLA orders the sums
    z_jit, z_eager = f(x, w, key), luq.luq_gemm(x, w, key, jnp.dot)
    assert np.array_equal(np.sign(z_jit), np.sign(z_eager))
    np.testing.assert_allclose(z_jit, z_eager, rtol=1e-6)
    np.testing.assert_allclose(z_jit, luq.sawb(x) @ luq.sawb(w, signed=True), rtol=1e-6, atol=1e-6)
    wonly = luq.luq_gemm(x, w, None, jnp.dot, mode="none", quantize_forward="weights")
    assert np.array_equal(wonly, x @ luq.sawb(w, signed=True))
    fp = luq.luq_gemm(x, w, None, jnp.dot, mode="none", quantize_forward=False)
    assert np.array_equal(fp, x @ w)
    ref = luq.luq_gemm(x, w, None, jnp.dot, mode="none", forward_levels="reference")
    want = luq.sawb(x, levels="reference") @ luq.sawb(w, signed=True, levels="reference")
    np.testing.assert_allclose(ref, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(ref, z_eager)
    ref_w = luq.luq_gemm(x, w, None, jnp.dot, mode="none", quantize_forward="weights", forward_levels="reference")
    assert np.array_equal(ref_w, x @ luq.sawb(w, signed=True, levels="reference"))


class TinyNet(nn.Module):
    """Two dense layers whose products go through a GEMM hook, as the library layers do."""

    hook: object

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate((16, 4)):
            kernel = self.param(f"w{i}", nn.initializers.lecun_normal(), (x.shape[-1], width))
            x = self.hook(self, x, kernel, jnp.dot)
            x = nn.relu(x) if i == 0 else x
        return x


def test_layer_hook_draws_from_the_luq_collection():
    x = normal(24, (32, 8))
    net, ref = TinyNet(luq.layer_hook()), TinyNet(luq.layer_hook(mode="none"))
    params = jax.jit(ref.init)(jax.random.key(0), x)  # mode "none" needs no rng at all

    @jax.jit
    def run(rng):
        loss = lambda p: jnp.sum(net.apply(p, x, rngs={"luq": rng}) ** 2)
        return net.apply(params, x, rngs={"luq": rng}), jax.grad(loss)(params)["params"]["w0"]

    (y1, g1), (_, g1b), (_, g2) = run(jax.random.key(2)), run(jax.random.key(2)), run(jax.random.key(3))
    assert np.array_equal(g1, g1b)  # same rng, same draw
    assert not np.array_equal(g1, g2)  # each step's rng gives a fresh draw
    np.testing.assert_allclose(y1, jax.jit(ref.apply)(params, x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# whole-network gradient bias (luq_nm.md §3.1 #12)

WIDTHS = (64, 128, 128, 10)


def mlp_setup():
    digits = load_digits()
    x = jnp.asarray(digits.data[:64] / 16.0, jnp.float32)
    y = jnp.asarray(digits.target[:64])
    rng = np.random.default_rng(25)
    params = [jnp.asarray(rng.standard_normal((a, b)) * np.sqrt(2.0 / a), jnp.float32)
              for a, b in zip(WIDTHS[:-1], WIDTHS[1:], strict=True)]
    return params, x, y


def mlp_grad(params, x, y, key, **kw):
    """Flattened kernel gradients of a 64-128-128-10 ReLU MLP, every GEMM through luq_gemm."""

    def loss(params):
        h = x
        for i, w in enumerate(params):
            h = luq.luq_gemm(h, w, jax.random.fold_in(key, i), jnp.dot, **kw)
            h = jax.nn.relu(h) if i < len(params) - 1 else h
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], axis=1))

    return jnp.concatenate([g.ravel() for g in jax.grad(loss)(params)])


@jax.jit
def gradient_errors(params, x, y, keys):
    """Relative L2 error of the mean LUQ gradient over S = 1, 16, 256 draws (one key each),
    and of the round-to-nearest gradient, against the FP32 backward of the same forward."""
    ref = mlp_grad(params, x, y, keys[0], mode="none")
    rdn = mlp_grad(params, x, y, keys[0], mode="rdn")
    d = jax.vmap(lambda k: mlp_grad(params, x, y, k))(keys) - ref
    rms = lambda d: jnp.sqrt(jnp.mean(jnp.sum(d**2, axis=-1)))
    group = lambda s: d.reshape(-1, s, d.shape[-1]).mean(1)
    errs = [rms(d), rms(group(16)), rms(group(256)), jnp.linalg.norm(rdn - ref)]
    return jnp.stack(errs) / jnp.linalg.norm(ref)


def test_mlp_weight_gradient_unbiased_luq_biased_rdn():
    params, x, y = mlp_setup()
    # The PRNG does not matter to the tower property; rbg keys compile faster than threefry.
    keys = jax.random.split(jax.random.key(26, impl="rbg"), 512)
    err1, err16, err256, err_rdn = np.asarray(gradient_errors(params, x, y, keys))
    print(f"rel. gradient error: LUQ S=1 {err1:.4f} S=16 {err16:.4f} S=256 {err256:.4f}; RDN {err_rdn:.4f}")
    # unbiased: the error is pure variance, ∝ 1/√S (a bias would flatten it)
    assert 0.02 < err1 < 0.5
    assert 0.9 < err16 * 4 / err1 < 1.1
    assert 0.85 < err256 * 16 / err1 < 1.15
    # round to nearest is deterministic and biased: its error does not average away
    assert err_rdn > 0.1 and err_rdn > 10 * err256


# ---------------------------------------------------------------------------------------------
# multiplication-free product


def test_shift_add_matmul_exact():
    rng = np.random.default_rng(27)
    a = rng.integers(-8, 9, size=(9, 33)).astype(np.int8)
    sign = rng.integers(-1, 2, size=(33, 7))
    exponent = rng.integers(0, 8, size=(33, 7))
    acc = luq.shift_add_matmul(a, (sign, exponent))
    assert acc.dtype == jnp.int32
    assert np.array_equal(np.asarray(acc), a.astype(np.int64) @ (sign * 2**exponent))
    # float path: entries ±2^e, negative exponents too, decomposed exactly by frexp
    g = (sign * 2.0 ** (exponent - 12)).astype(np.float32)
    out = luq.shift_add_matmul(a, g)
    assert np.array_equal(np.asarray(out), a.astype(np.float32) @ g)
    assert np.array_equal(np.asarray(jax.jit(luq.shift_add_matmul)(a, g)), np.asarray(out))


def test_shift_add_matmul_reproduces_the_luq_weight_gradient():
    x = jax.nn.relu(normal(28, (32, 20)))  # activation a: (batch, in)
    delta = heavy_tailed(29, 32 * 6).reshape(32, 6)  # neural gradient δ: (batch, out)
    codes, scale = luq.sawb_codes(x)
    dq = luq.quantize_gradient(delta, jax.random.key(30))
    alpha = luq.gradient_alpha(delta)
    # weight-gradient GEMM Q_INT(a)ᵀ · Q_FP(δ): INT4 codes against FP4 codes, then one rescale
    acc = luq.shift_add_matmul(codes.T, dq / alpha)
    assert np.array_equal(np.asarray(acc), np.asarray(codes.T, np.float32) @ np.asarray(dq / alpha))
    dw = acc * (scale * alpha)
    np.testing.assert_allclose(dw, luq.sawb(x).T @ dq, rtol=1e-5, atol=1e-6 * float(jnp.abs(dw).max()))


# ---------------------------------------------------------------------------------------------
# fine-tuning schedule and bad inputs


def test_finetune_schedule_is_triangular():
    lr = luq.finetune_schedule(0.001, 0.1, 100, end=0.0)
    vals = np.asarray(jax.vmap(lr)(jnp.arange(151)))
    assert vals[0] == pytest.approx(0.001) and vals[50] == pytest.approx(0.1) and vals[100] == 0.0
    assert vals[25] == pytest.approx(0.0505) and vals[75] == pytest.approx(0.05)
    assert np.all(np.diff(vals[:51]) > 0) and np.all(np.diff(vals[50:101]) < 0)
    assert np.all(vals[100:] == 0.0)
    # odd T: the peak on step ⌊T/2⌋, as fit runs it (the float knot T/2 = 2.5 never reached the peak)
    odd = np.asarray(jax.vmap(luq.finetune_schedule(0.0, 0.01, 5))(jnp.arange(6)))
    np.testing.assert_allclose(odd, [0.0, 0.005, 0.01, 0.01 * 2 / 3, 0.01 / 3, 0.0], atol=1e-9)
    np.testing.assert_array_equal(odd, np.asarray(jax.vmap(train.triangular_schedule(0.0, 0.01, 5))(jnp.arange(6))))


def test_bad_inputs():
    g, key = jnp.ones(4), jax.random.key(0)
    ints = np.ones((2, 3), int)
    cases = [
        (lambda: luq.quantize_gradient(g, key, bits=1), "bits"),
        (lambda: luq.quantize_gradient(g, key, bits=8), "bits"),
        (lambda: luq.quantize_gradient(g, key, bits=4.0), "bits"),
        (lambda: luq.quantize_gradient(g, key, samples=0), "samples"),
        (lambda: luq.quantize_gradient(g, key, samples=True), "samples"),
        (lambda: luq.quantize_gradient(g, key, max_mode="max"), "max_mode"),
        (lambda: luq.quantize_gradient(jnp.ones(4, jnp.int32), key), "floating"),
        (lambda: luq.round_gradient(g, bits=9), "bits"),
        (lambda: luq.gradient_alpha(g, max_mode=None), "max_mode"),
        (lambda: luq.sawb(g, bits=3), "coeffs"),
        (lambda: luq.sawb(g, bits=1), "bits"),
        (lambda: luq.sawb(g, signed="yes"), "signed"),
        (lambda: luq.sawb(g, bits=3, coeffs=(1.0,)), "coeffs"),
        (lambda: luq.sawb(g, levels="paper"), "levels.*strict"),
        (lambda: luq.layer_hook(forward_levels=None), "levels"),
        (lambda: luq.quantize_gradient(g, key, prng="threefry"), "prng"),
        (lambda: luq.layer_hook(prng=None), "prng"),
        (lambda: luq.hash_bits(key, (-1,)), "shape"),
        (lambda: luq.hash_bits(key, (1 << 20, 1 << 13)), "2\\^32"),
        (lambda: luq.luq_identity(g, key, mode="sr"), "mode"),
        (lambda: luq.luq_identity(g, None), "key"),
        # a raw key of another implementation's shape (rbg's (4,) under threefry)
        (lambda: luq.quantize_gradient(g, jnp.zeros(4, jnp.uint32)), r"uint32, shape \(2,\) here"),
        (lambda: luq.luq_identity(g, None, mode="rdn", samples=2), "samples"),
        (lambda: luq.luq_gemm(g, g, key, jnp.dot, quantize_forward="inputs"), "quantize_forward"),
        (lambda: luq.luq_gemm(g, g, key, jnp.dot, forward_bits=3), "coeffs"),
        (lambda: luq.layer_hook(collection=""), "collection"),
        (lambda: luq.layer_hook(max_mode="absolute"), "max_mode"),
        (lambda: luq.shift_add_matmul(np.ones((2, 3)), np.ones((3, 2))), "integer"),
        (lambda: luq.shift_add_matmul(ints, np.full((3, 2), 3.0)),
         r"2\^e \(a zero-mantissa FP value\); a gradient from quantize_gradient\(g, key\) is α·2\^e: pass it "
         r"divided by gradient_alpha\(g\)"),
        (lambda: luq.shift_add_matmul(ints, (np.full((3, 2), 2), np.ones((3, 2), int))), "sign"),
        (lambda: luq.shift_add_matmul(ints, (np.ones((3, 2), int), -np.ones((3, 2), int))), "exponent"),
        (lambda: luq.shift_add_matmul(ints, (np.ones((3, 2), int), np.full((3, 2), 30))), "overflow"),
        (lambda: luq.shift_add_matmul(ints, np.ones((4, 2))), "shape"),
        (lambda: luq.finetune_schedule(0.1, 0.2, 1), "steps"),
        (lambda: luq.finetune_schedule(-0.1, 0.2, 10), "start"),
        (lambda: luq.finetune_schedule("0.1", 0.2, 10), "start must be a finite learning rate"),
        (lambda: luq.finetune_schedule(None, 0.2, 10), "start must be a finite learning rate"),
        (lambda: luq.quantize_gradient(g, None), "key must be a JAX PRNG key"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    empty = jnp.zeros((0, 3))  # nothing to quantize: returned as it is
    assert luq.quantize_gradient(empty, key).shape == (0, 3)


def test_key_must_be_one_prng_key():
    """An int, a string or a batch of keys is named, with the keys allowed; typed, raw and traced keys pass."""
    g = jnp.ones(4)
    for bad, got in ((0, "got int 0"), ("a", "got str 'a'"), (jax.random.split(jax.random.key(0), 3), r"shape \(3,\)"),
                     (np.zeros(2, np.int32), "dtype int32")):
        for fn in (lambda k: luq.quantize_gradient(g, k), lambda k: luq.hash_bits(k, (4,)),
                   lambda k: luq.luq_identity(g, k)):
            with pytest.raises(ValueError, match=rf"key must be a JAX PRNG key, one key: jax.random.key\(seed\) or "
                                                 rf"jax.random.PRNGKey\(seed\).*{got}"):
                fn(bad)
    typed = luq.quantize_gradient(g, jax.random.key(0))
    raw = luq.quantize_gradient(g, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(typed), np.asarray(raw))
    traced = jax.jit(lambda k: luq.quantize_gradient(g, k))(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(typed))


def test_numpy_scalars_are_numbers():
    """A learning rate or SAWB coefficients from a numpy array are accepted as Python numbers are."""
    recipe = luq.Recipe(finetune_lr=np.float32(0.01))
    assert type(recipe.finetune_lr) is float and recipe.finetune_lr == pytest.approx(0.01)
    g = heavy_tailed(3)
    np.testing.assert_array_equal(np.asarray(luq.sawb(g, coeffs=(np.float32(12.1), 12.2))),
                                  np.asarray(luq.sawb(g, coeffs=(float(np.float32(12.1)), 12.2))))
    for bad in (True, np.bool_(True)):
        with pytest.raises(ValueError, match="finetune_lr must be a finite learning rate > 0"):
            luq.Recipe(finetune_lr=bad)
        with pytest.raises(ValueError, match="coeffs must be two finite numbers"):
            luq.sawb(g, coeffs=(bad, 12.2))
