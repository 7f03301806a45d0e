"""LUQ: the quantizers, the backward op and the multiplication-free product (landscape.luq).

Statistical checks use fixed keys and tolerances several standard errors wide.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from landscape import luq


def heavy_tailed(key, n):
    """Gradient-like values: lognormal(0, 2) magnitudes with random signs."""
    k1, k2 = jax.random.split(key)
    mag = jnp.exp(2.0 * jax.random.normal(k1, (n,)))
    return jnp.where(jax.random.bernoulli(k2, 0.5, (n,)), mag, -mag).astype(jnp.float32)


def draws(g, key, count, **kw):
    """count independent single-sample LUQ draws of g, stacked on axis 0."""
    return jax.jit(jax.vmap(lambda k: luq.quantize_gradient(g, k, **kw)))(jax.random.split(key, count))


def bracket(x, alpha):
    """Independent (numpy, float64) lower/upper levels around |x| on {0, α, 2α, 4α, …}."""
    r = np.abs(np.asarray(x, np.float64)) / alpha
    n = np.floor(np.log2(np.where(r >= 1, r, 1.0)))
    lo = np.where(r >= 1, alpha * 2.0**n, 0.0)
    hi = np.where(r >= 1, alpha * 2.0 ** (n + 1), alpha)
    return lo, hi


# ---------------------------------------------------------------------------------------------
# the gradient quantizer


@pytest.mark.parametrize("max_mode", ["abs", "signed"])
def test_unbiased_zscores_and_variance(max_mode):
    g = heavy_tailed(jax.random.key(0), 1000)
    S = 4000
    q = np.asarray(draws(g, jax.random.key(1), S, max_mode=max_mode), np.float64)
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
    # Variance per region, summed over elements (the per-element check is the next test).
    emp = q.var(0)
    under = keep & (np.abs(g64) < alpha)
    inside = keep & (np.abs(g64) >= alpha)
    assert under.sum() > 100 and inside.sum() > 100
    for region in (under, inside):
        assert abs(emp[region].sum() / var[region].sum() - 1) < 0.05


def test_variance_formula_per_element():
    alpha, fracs = 1.0, np.linspace(0.2, 0.8, 7)
    under = fracs * alpha
    bins = np.concatenate([alpha * 2.0 ** (n - 1) * (1 + fracs) for n in range(1, 7)])
    g = jnp.asarray(np.concatenate([[64.0], under, -bins]), jnp.float32)  # max|g| = 2^6 α
    assert float(luq.gradient_alpha(g)) == alpha
    S = 20000
    emp = np.asarray(draws(g, jax.random.key(2), S), np.float64).var(0)
    x = np.abs(np.asarray(g, np.float64))
    theory_under = alpha * x[1:8] - x[1:8] ** 2
    n = np.floor(np.log2(x[8:] / alpha)) + 1
    theory_bins = (x[8:] - 2 ** (n - 1) * alpha) * (2**n * alpha - x[8:])
    np.testing.assert_allclose(emp[1:8], theory_under, rtol=0.05)
    np.testing.assert_allclose(emp[8:], theory_bins, rtol=0.05)
    assert emp[0] == 0.0


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_support_signs_and_brackets_abs(bits):
    g = heavy_tailed(jax.random.key(3), 3000)
    q = np.asarray(draws(g, jax.random.key(4), 8, bits=bits))
    alpha = float(luq.gradient_alpha(g, bits=bits))
    top = 2 ** (bits - 1) - 2
    assert alpha == float(jnp.max(jnp.abs(g))) / 2**top
    levels = np.concatenate([[0.0], alpha * 2.0 ** np.arange(top + 1)])
    assert np.all(np.isin(np.abs(q), levels.astype(np.float32)))
    assert np.abs(q).max() <= float(jnp.max(jnp.abs(g)))
    s = np.sign(np.asarray(g))
    assert np.all((np.sign(q) == 0) | (np.sign(q) == s))
    lo, hi = bracket(g, alpha)
    assert np.all(np.isclose(np.abs(q), lo, rtol=1e-6) | np.isclose(np.abs(q), hi, rtol=1e-6))


def test_signed_mode_is_the_reference_format():
    g = jnp.array([2.0, 1.0, -10.0, 0.5, -0.001, 0.0], jnp.float32)
    alpha = float(luq.gradient_alpha(g, max_mode="signed"))
    assert alpha == 2.0 / 128  # signed max / 2^7, not max|g| / 2^6
    q = np.asarray(draws(g, jax.random.key(5), 64, max_mode="signed"))
    k = np.log2(np.abs(q[q != 0]) / alpha)
    assert np.all(k == np.round(k)) and k.min() >= 0
    # −10 lies between 2^9 α = 8 and 2^10 α = 16: above the top code 2^7 α, never clipped.
    assert set(np.unique(q[:, 2])) <= {-8.0, -16.0}
    # max(g) ≤ 0: the reference code's α would be ≤ 0; fall back to max|g|.
    neg = -jnp.abs(g)
    assert float(luq.gradient_alpha(neg, max_mode="signed")) == 10.0 / 128
    assert np.all(np.isfinite(luq.quantize_gradient(neg, jax.random.key(0), max_mode="signed")))


@pytest.mark.parametrize("max_mode", ["abs", "signed"])
def test_levels_are_fixed_points(max_mode):
    alpha = 0.37 / 2**6 if max_mode == "abs" else 0.37 / 2**7
    top = 6 if max_mode == "abs" else 7
    mags = alpha * 2.0 ** np.arange(top + 1)
    g = jnp.asarray(np.concatenate([mags, -mags, [0.0, 0.0]]), jnp.float32)
    assert float(luq.gradient_alpha(g, max_mode=max_mode)) == pytest.approx(alpha, rel=1e-7)
    q = draws(g, jax.random.key(6), 32, max_mode=max_mode)
    assert np.array_equal(np.asarray(q), np.broadcast_to(np.asarray(g), q.shape))
    for shape in [(5,), (3, 4, 2)]:
        z = luq.quantize_gradient(jnp.zeros(shape), jax.random.key(0), samples=3)
        assert z.shape == shape and np.all(np.asarray(z) == 0)


def test_scale_equivariance_with_same_key():
    g = heavy_tailed(jax.random.key(7), 2000)
    key = jax.random.key(8)
    q = np.asarray(luq.quantize_gradient(g, key))
    for c in [2.0**-20, 2.0**9]:
        assert np.array_equal(np.asarray(luq.quantize_gradient(c * g, key)), c * q)
    for c in [0.37, 3.0, 1.0e4]:
        np.testing.assert_allclose(np.asarray(luq.quantize_gradient(c * g, key)), c * q, rtol=1e-6)


def test_smp_variance_falls_as_one_over_n():
    g = heavy_tailed(jax.random.key(9), 400)
    total = float(jnp.sum(luq.gradient_variance(g)))
    g64 = np.asarray(g, np.float64)
    for n in (1, 2, 4, 8):
        keys = jax.random.split(jax.random.key(10 + n), 3000)
        q = np.asarray(jax.jit(jax.vmap(lambda k, n=n: luq.quantize_gradient(g, k, samples=n)))(keys))
        emp = q.var(0).sum()
        assert abs(emp * n / total - 1) < 0.06, (n, emp * n / total)
        # bias unchanged: the mean error is within a few standard errors of zero
        assert abs((q.mean(0) - g64).sum()) < 4 * np.sqrt(total / n / 3000)


def test_round_to_nearest_is_the_biased_baseline():
    g = heavy_tailed(jax.random.key(11), 2000)
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
    assert np.all(r[a < 0.5 * alpha * 0.999] == 0)


def test_jit_and_vmap():
    g = heavy_tailed(jax.random.key(12), 64).reshape(8, 8)
    key = jax.random.key(13)
    f = jax.jit(luq.quantize_gradient, static_argnames=("bits", "samples", "max_mode"))
    assert np.array_equal(f(g, key, samples=2), luq.quantize_gradient(g, key, samples=2))
    # vmap over rows: each row is its own tensor with its own α
    rows = jax.vmap(lambda r: luq.gradient_alpha(r))(g)
    np.testing.assert_allclose(rows, jnp.max(jnp.abs(g), axis=1) / 64, rtol=1e-7)
    keys = jax.random.split(key, 8)
    q = jax.vmap(luq.quantize_gradient)(g, keys)
    assert np.array_equal(q[3], luq.quantize_gradient(g[3], keys[3]))
    raw = jax.random.PRNGKey(0)  # raw uint32 keys work too
    assert luq.quantize_gradient(g, raw).shape == g.shape


def test_non_finite_gradient_is_visible():
    g = jnp.array([1.0, jnp.inf, 0.5])
    assert np.all(np.isnan(luq.quantize_gradient(g, jax.random.key(0))))
    assert np.all(np.isnan(luq.round_gradient(jnp.array([1.0, jnp.nan]))))


# ---------------------------------------------------------------------------------------------
# SAWB


def test_sawb_scale_levels_and_rounding():
    x = jax.random.normal(jax.random.key(14), (64, 32))
    codes, scale = luq.sawb_codes(x)
    xn = np.asarray(x, np.float64)
    clip = 12.1 * np.sqrt(np.mean(xn**2)) - 12.2 * np.mean(np.abs(xn))
    assert float(scale) == pytest.approx(clip / 7, rel=1e-5)
    assert 2.2 < clip / xn.std() < 2.55  # ≈ 2.37σ for a Gaussian
    c = np.asarray(codes)
    assert c.min() >= -7 and c.max() <= 7 and len(np.unique(c)) <= 15
    q = luq.sawb(x)
    assert np.array_equal(np.asarray(q), c.astype(np.float32) * np.float32(scale))
    # round to nearest, half to even (numpy's rule as well), then clamp
    t = np.clip(np.asarray(x) / np.float32(scale), -7, 7)
    assert np.array_equal(c, np.round(t).astype(np.int32))
    # non-negative input: unsigned grid 0..15 over [0, clip]
    r = jax.nn.relu(x)
    rc, rs = luq.sawb_codes(r)
    rn = np.asarray(r, np.float64)
    rclip = 12.1 * np.sqrt(np.mean(rn**2)) - 12.2 * np.mean(rn)
    assert float(rs) == pytest.approx(rclip / 15, rel=1e-5)
    assert np.asarray(rc).min() == 0 and np.asarray(rc).max() <= 15
    assert len(np.unique(np.asarray(rc))) >= 12  # the range above 7 is in use
    # weights: the signed grid can be forced
    pc, _ = luq.sawb_codes(jnp.abs(x), signed=True)
    assert np.asarray(pc).max() == 7
    # levels are fixed points of a second pass only up to the scale change; the rounding is
    # deterministic: same input, same output
    assert np.array_equal(np.asarray(luq.sawb(x)), np.asarray(q))


def test_sawb_guard_and_zero():
    # constant magnitude: 12.1·rms − 12.2·mean|x| = −0.1·c < 0; the guard clip = mean|x| = c
    x = jnp.array([0.3, -0.3, 0.3, 0.3, -0.3], jnp.float32)
    codes, scale = luq.sawb_codes(x)
    assert float(scale) > 0
    np.testing.assert_allclose(luq.sawb(x), x, rtol=1e-6)
    assert np.array_equal(np.abs(np.asarray(codes)), np.full(5, 7))
    z = luq.sawb(jnp.zeros((3, 3)))
    assert np.all(np.asarray(z) == 0) and np.all(np.isfinite(z))


def test_sawb_straight_through():
    # light tails: for U(−1, 1) the SAWB clip is ≈ 0.88, so the largest values are clipped
    x = jax.random.uniform(jax.random.key(15), (16, 8), minval=-1.0, maxval=1.0)
    codes, scale = luq.sawb_codes(x)
    assert np.any(np.abs(np.asarray(x) / float(scale)) > 7.5)
    cot = jax.random.normal(jax.random.key(16), x.shape)
    _, vjp = jax.vjp(luq.sawb, x)
    assert np.array_equal(np.asarray(vjp(cot)[0]), np.asarray(cot))
    # forward-mode too (forward-over-reverse HVPs go through it)
    _, tangent = jax.jvp(luq.sawb, (x,), (cot,))
    assert np.array_equal(np.asarray(tangent), np.asarray(cot))
    assert np.array_equal(jax.jit(luq.sawb)(x), luq.sawb(x))
    batched = jax.vmap(luq.sawb)(x)
    assert np.array_equal(np.asarray(batched[2]), np.asarray(luq.sawb(x[2])))


# ---------------------------------------------------------------------------------------------
# the backward op


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("gemm,xshape,wshape", [
    (jnp.dot, (16, 12), (12, 10)),
    (conv, (2, 6, 6, 3), (3, 3, 3, 4)),
])
def test_one_sample_feeds_both_backward_gemms(gemm, xshape, wshape):
    kx, kw, kc, key = jax.random.split(jax.random.key(17), 4)
    x = jax.nn.relu(jax.random.normal(kx, xshape))
    w = jax.random.normal(kw, wshape)
    xq, wq = luq.sawb(x), luq.sawb(w, signed=True)
    z_ref = luq.luq_gemm(x, w, None, gemm, mode="none")
    np.testing.assert_allclose(z_ref, gemm(xq, wq), rtol=1e-6, atol=1e-6)
    ct = jax.random.normal(kc, z_ref.shape) * jnp.exp(jax.random.normal(kc, z_ref.shape))
    outs = {}
    for mode in ("luq", "rdn", "none"):
        z, vjp = jax.vjp(lambda a, b, mode=mode: luq.luq_gemm(a, b, key, gemm, mode=mode, samples=1), x, w)
        outs[mode] = vjp(ct)
        assert np.array_equal(np.asarray(z), np.asarray(z_ref))  # forward untouched by backward
    _, vjp_q = jax.vjp(gemm, xq, wq)  # autodiff of the GEMM at the saved INT4 operands
    for mode, dq in (("luq", luq.quantize_gradient(ct, key)), ("rdn", luq.round_gradient(ct)),
                     ("none", ct)):
        dx, dw = vjp_q(dq)
        np.testing.assert_allclose(outs[mode][0], dx, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(outs[mode][1], dw, rtol=1e-5, atol=1e-6)
    # luq_identity alone: identity forward, quantized cotangent backward; key gets no gradient
    _, vjp_id = jax.vjp(lambda z: luq.luq_identity(z, key, samples=2), z_ref)
    assert np.array_equal(vjp_id(ct)[0], luq.quantize_gradient(ct, key, samples=2))


def test_forward_modes_and_jit():
    x = jax.random.normal(jax.random.key(18), (8, 6))
    w = jax.random.normal(jax.random.key(19), (6, 5))
    key = jax.random.key(20)
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
    # a vmap over keys gives independent backward draws, one forward
    keys = jax.random.split(key, 4)
    gw = jax.vmap(lambda k: jax.grad(lambda w: jnp.sum(luq.luq_gemm(x, w, k, jnp.dot) ** 2))(w))(keys)
    assert not np.array_equal(gw[0], gw[1])


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
    x = jax.random.normal(jax.random.key(21), (32, 8))
    net = TinyNet(luq.layer_hook(samples=1))
    params = net.init({"params": jax.random.key(0), "luq": jax.random.key(1)}, x)

    def grads(rng):
        loss = lambda p: jnp.sum(net.apply(p, x, rngs={"luq": rng}) ** 2)
        return jax.grad(loss)(params)["params"]

    g1, g1b, g2 = grads(jax.random.key(2)), grads(jax.random.key(2)), grads(jax.random.key(3))
    assert np.array_equal(g1["w0"], g1b["w0"])  # same rng, same draw
    assert not np.array_equal(g1["w0"], g2["w0"])
    ref = TinyNet(luq.layer_hook(mode="none"))
    y_luq = net.apply(params, x, rngs={"luq": jax.random.key(2)})
    assert np.array_equal(y_luq, ref.apply(params, x))  # mode "none" needs no rng at all


# ---------------------------------------------------------------------------------------------
# whole-network gradient bias (luq_nm.md §3.1 #12)

WIDTHS = (64, 128, 128, 10)


def mlp_setup():
    digits = load_digits()
    x = jnp.asarray(digits.data[:128] / 16.0, jnp.float32)
    y = jnp.asarray(digits.target[:128])
    keys = jax.random.split(jax.random.key(22), len(WIDTHS) - 1)
    params = [jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a)
              for k, a, b in zip(keys, WIDTHS[:-1], WIDTHS[1:], strict=True)]
    return params, x, y


def mlp_grad(params, x, y, key, **kw):
    def loss(params):
        h = x
        for i, w in enumerate(params):
            h = luq.luq_gemm(h, w, jax.random.fold_in(key, i), jnp.dot, **kw)
            h = jax.nn.relu(h) if i < len(params) - 1 else h
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], axis=1))

    return jnp.concatenate([g.ravel() for g in jax.grad(loss)(params)])


def test_mlp_weight_gradient_unbiased_luq_biased_rdn():
    params, x, y = mlp_setup()
    key = jax.random.key(23)  # unused by the deterministic modes
    ref = mlp_grad(params, x, y, key, mode="none")  # FP32 backward, same INT4 forward
    rdn = mlp_grad(params, x, y, key, mode="rdn")
    norm = float(jnp.linalg.norm(ref))

    def chunk(keys):  # 16 draws: their mean and the sum of single-draw squared errors
        g = jax.vmap(lambda k: mlp_grad(params, x, y, k))(keys)
        return g.mean(0), jnp.sum((g - ref) ** 2)

    keys = jax.random.split(jax.random.key(24), 1024).reshape(64, 16)
    means, sq = jax.lax.map(chunk, keys)
    err1 = np.sqrt(float(jnp.sum(sq)) / 1024) / norm
    err16 = float(jnp.sqrt(jnp.mean(jnp.sum((means - ref) ** 2, axis=1)))) / norm
    m256 = means.reshape(4, 16, -1).mean(1)
    err256 = float(jnp.sqrt(jnp.mean(jnp.sum((m256 - ref) ** 2, axis=1)))) / norm
    err_rdn = float(jnp.linalg.norm(rdn - ref)) / norm
    print(f"rel. gradient error: LUQ S=1 {err1:.4f} S=16 {err16:.4f} S=256 {err256:.4f}; RDN {err_rdn:.4f}")
    # unbiased: the error is pure variance, ∝ 1/√S
    assert 0.9 < err16 * 4 / err1 < 1.1
    assert 0.85 < err256 * 16 / err1 < 1.15
    # round-to-nearest is deterministic and biased: its error does not average away
    assert err_rdn > 0.1 and err_rdn > 10 * err256


# ---------------------------------------------------------------------------------------------
# multiplication-free product


def test_shift_add_matmul_exact():
    rng = np.random.default_rng(0)
    a = rng.integers(-8, 9, size=(9, 33)).astype(np.int8)
    sign = rng.integers(-1, 2, size=(33, 7))
    exponent = rng.integers(0, 8, size=(33, 7))
    acc = luq.shift_add_matmul(a, (sign, exponent))
    assert acc.dtype == jnp.int32
    assert np.array_equal(np.asarray(acc), a.astype(np.int64) @ (sign * 2**exponent))
    # float path: entries ±2^e with negative exponents too, decomposed exactly by frexp
    g = (sign * 2.0 ** (exponent - 12)).astype(np.float32)
    out = luq.shift_add_matmul(a, g)
    assert np.array_equal(np.asarray(out), a.astype(np.float32) @ g)
    assert np.array_equal(np.asarray(jax.jit(luq.shift_add_matmul)(a, g)), np.asarray(out))


def test_shift_add_matmul_reproduces_the_luq_gemm():
    kx, kg, key = jax.random.split(jax.random.key(24), 3)
    x = jax.nn.relu(jax.random.normal(kx, (32, 20)))  # activation a: (batch, in)
    delta = heavy_tailed(kg, 32 * 6).reshape(32, 6)  # neural gradient δ: (batch, out)
    codes, scale = luq.sawb_codes(x)
    dq = luq.quantize_gradient(delta, key)
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
    vals = np.asarray([lr(t) for t in range(101)])
    assert vals[0] == pytest.approx(0.001) and vals[50] == pytest.approx(0.1) and vals[100] == 0.0
    assert vals[25] == pytest.approx(0.0505) and vals[75] == pytest.approx(0.05)
    assert np.all(np.diff(vals[:51]) > 0) and np.all(np.diff(vals[50:]) < 0)
    assert float(lr(150)) == 0.0


def test_bad_inputs():
    g, key = jnp.ones(4), jax.random.key(0)
    cases = [
        (lambda: luq.quantize_gradient(g, key, bits=1), "bits"),
        (lambda: luq.quantize_gradient(g, key, bits=8), "bits"),
        (lambda: luq.quantize_gradient(g, key, bits=4.0), "bits"),
        (lambda: luq.quantize_gradient(g, key, samples=0), "samples"),
        (lambda: luq.quantize_gradient(g, key, samples=True), "samples"),
        (lambda: luq.quantize_gradient(g, key, max_mode="max"), "max_mode"),
        (lambda: luq.quantize_gradient(jnp.ones(4, jnp.int32), key), "floating"),
        (lambda: luq.round_gradient(g, bits=9), "bits"),
        (lambda: luq.sawb(g, bits=3), "coeffs"),
        (lambda: luq.sawb(g, bits=1), "bits"),
        (lambda: luq.sawb(g, signed="yes"), "signed"),
        (lambda: luq.sawb(g, bits=3, coeffs=(1.0,)), "coeffs"),
        (lambda: luq.luq_identity(g, key, mode="sr"), "mode"),
        (lambda: luq.luq_identity(g, None), "key"),
        (lambda: luq.luq_identity(g, None, mode="rdn", samples=2), "samples"),
        (lambda: luq.luq_gemm(g, g, key, jnp.dot, quantize_forward="inputs"), "quantize_forward"),
        (lambda: luq.layer_hook(collection=""), "collection"),
        (lambda: luq.layer_hook(max_mode="absolute"), "max_mode"),
        (lambda: luq.shift_add_matmul(np.ones((2, 3)), np.ones((3, 2))), "integer"),
        (lambda: luq.shift_add_matmul(np.ones((2, 3), int), np.full((3, 2), 3.0)), "2\\^e"),
        (lambda: luq.shift_add_matmul(np.ones((2, 3), int), (np.full((3, 2), 2), np.ones((3, 2), int))),
         "sign"),
        (lambda: luq.shift_add_matmul(np.ones((2, 3), int), (np.ones((3, 2), int), -np.ones((3, 2), int))),
         "exponent"),
        (lambda: luq.shift_add_matmul(np.ones((2, 3), int), (np.ones((3, 2), int), np.full((3, 2), 30))),
         "overflow"),
        (lambda: luq.shift_add_matmul(np.ones((2, 3), int), np.ones((4, 2))), "shape"),
        (lambda: luq.finetune_schedule(0.1, 0.2, 1), "steps"),
        (lambda: luq.finetune_schedule(-0.1, 0.2, 10), "start"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
