import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import quantizers as q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_midrise_levels_exact(bits):
    alpha = 1.0
    x = jnp.linspace(-1.5, 1.5, 20001)
    out = np.unique(np.asarray(q.quantize(x, alpha, bits, "midrise")))
    expected = -1.0 + np.arange(2**bits) * 2.0 / (2**bits - 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert not np.any(np.isclose(out, 0.0, atol=1e-7)), "mid-rise grid has no zero level"
    np.testing.assert_allclose(np.asarray(q.levels(alpha, bits, "midrise")), expected, atol=1e-6)


def test_midrise_two_bit_levels_are_thirds():
    out = np.unique(np.asarray(q.quantize(jnp.linspace(-3, 3, 1001), 2.0, 2, "midrise")))
    np.testing.assert_allclose(out, [-2.0, -2 / 3, 2 / 3, 2.0], rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unsigned_levels_exact(bits):
    x = jnp.linspace(-1.0, 3.0, 40001)
    out = np.unique(np.asarray(q.quantize(x, 2.0, bits, "unsigned")))
    np.testing.assert_allclose(out, np.arange(2**bits) * 2.0 / (2**bits - 1), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_midtread_levels_exact(bits):
    top = 2 ** (bits - 1) - 1
    out = np.unique(np.asarray(q.quantize(jnp.linspace(-2, 2, 20001), 1.0, bits, "midtread")))
    np.testing.assert_allclose(out, np.arange(-top, top + 1) / top, atol=1e-6)


def test_round_half_to_even():
    # unsigned, Δ = 1: 0.5 → 0, 1.5 → 2, 2.5 → 2
    x = jnp.array([0.5, 1.5, 2.5])
    np.testing.assert_array_equal(np.asarray(q.quantize(x, 3.0, 2, "unsigned")), [0.0, 2.0, 2.0])
    # midrise, α = 1.5 at 2 bits: Δ = 1, z = x + 1.5; x = 0 → z = 1.5 → 2 → +0.5 (half to even)
    assert float(q.quantize(jnp.array(0.0), 1.5, 2, "midrise")) == pytest.approx(0.5)


def test_delta_floor():
    assert float(q.step_size(jnp.array(0.0), 4, "unsigned")) == pytest.approx(1e-8)
    out = q.quantize(jnp.array([0.3, -0.2]), 0.0, 4, "midrise")
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("grid", ["midrise", "unsigned", "midtread"])
def test_ste_gradient_wrt_x_is_one_inside_zero_outside(grid):
    x = jnp.array([-2.0, -0.3, 0.2, 0.7, 2.0])
    g = jax.grad(lambda x: jnp.sum(q.quantize(x, 1.0, 3, grid)))(x)
    lo = 0.0 if grid == "unsigned" else -1.0
    inside = (np.asarray(x) > lo) & (np.asarray(x) < 1.0)
    np.testing.assert_array_equal(np.asarray(g), inside.astype(np.float32))


@pytest.mark.parametrize("grid", ["midrise", "unsigned", "midtread"])
@pytest.mark.parametrize("bits", [2, 4])
def test_ste_gradient_wrt_alpha_is_lsq_derivative(grid, bits):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=200).astype(np.float32) * 1.2)
    alpha = 1.0
    g = np.asarray(jax.vmap(jax.grad(lambda a, xi: q.quantize(xi, a, bits, grid), argnums=0),
                            in_axes=(None, 0))(jnp.float32(alpha), x))
    xn = np.asarray(x)
    if grid == "midrise":
        d_delta = 2.0 / (2**bits - 1)
        z = (xn + alpha) / (d_delta * alpha)
        expected = np.where(xn >= alpha, 1.0, np.where(xn <= -alpha, -1.0, (np.round(z) - z) * d_delta))
    elif grid == "unsigned":
        d_delta = 1.0 / (2**bits - 1)
        z = xn / (d_delta * alpha)
        expected = np.where(xn >= alpha, 1.0, np.where(xn <= 0, 0.0, (np.round(z) - z) * d_delta))
    else:
        top = 2 ** (bits - 1) - 1
        z = xn / (alpha / top)
        expected = np.where(xn >= alpha, 1.0, np.where(xn <= -alpha, -1.0, (np.round(z) - z) / top))
    np.testing.assert_allclose(g, expected, atol=1e-5)


@pytest.mark.parametrize("bad", [1, 17, 0, -3, 4.0, "4", True])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits="):
        q.check_bits(bad, "site 'x'")


def test_none_bits_is_fp32_and_bad_grid():
    assert q.check_bits(None) is None
    with pytest.raises(ValueError, match="grid='nope'"):
        q.check_grid("nope")


def test_bias_correct_matches_channel_means():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 6)).astype(np.float32))
    w_hat = q.quantize(w, 1.0, 2, "midrise")
    corrected = q.bias_correct(w_hat, w)
    np.testing.assert_allclose(np.asarray(corrected.mean(axis=(0, 1, 2))),
                               np.asarray(w.mean(axis=(0, 1, 2))), atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: q.quantize(jnp.ones(3), 1.0, 4, "midtred"), "quantize: grid='midtred' is not allowed"),
    (lambda: q.quantize(jnp.ones(3), 1.0, 1, "midtread"), r"quantize: bits=1 is not allowed; use an integer in \[2, "),
    (lambda: q.quantize(jnp.ones(3), 1.0, 0, "midrise"), "quantize: bits=0 is not allowed"),
    (lambda: q.quantize(jnp.ones(3), 1.0, None, "midrise"), "quantize: bits=None"),
    (lambda: q.quantize(np.arange(3), 1.0, 4, "midrise"), "x must be a floating-point array, got dtype int"),
    (lambda: q.quantize(jnp.ones(3, bool), 1.0, 4, "midrise"), "got dtype bool"),
    (lambda: q.step_size(1.0, 1, "midrise"), "step_size: bits=1 is not allowed"),
    (lambda: q.step_size(1.0, 4, "mid"), "step_size: grid='mid' is not allowed"),
    (lambda: q.levels(1.0, 0, "midtread"), "levels: bits=0 is not allowed"),
    (lambda: q.levels(1.0, 4, "midtred"), "levels: grid='midtred' is not allowed"),
    (lambda: q.levels(1.0, None, "midrise"), "levels: bits=None"),
    (lambda: q.quantize(jnp.ones(3), 1.0, jnp.array([3, 4]), "midrise"), r"quantize: bits must be a scalar bit width"),
])
def test_quantize_step_size_and_levels_check_their_arguments(call, match):
    """A grid typo no longer falls through to midtread; bits 0 or 1 and integer x no longer give NaN."""
    with pytest.raises(ValueError, match=match):
        call()


def test_quantize_takes_numpy_and_traced_widths():
    """Widths as numpy integers and as traced data (ClipLoss passes them as float32) still work."""
    x = jnp.linspace(-1.5, 1.5, 101)
    ref = np.asarray(q.quantize(x, 1.0, 3, "midrise"))
    np.testing.assert_array_equal(np.asarray(q.quantize(x, 1.0, np.int64(3), "midrise")), ref)
    traced = jax.jit(lambda b: q.quantize(x, 1.0, b, "midrise"))(jnp.float32(3))
    np.testing.assert_allclose(np.asarray(traced), ref, atol=1e-6)  # 2**b in float32: an ulp apart
    np.testing.assert_array_equal(np.asarray(q.quantize(np.asarray(x), 1.0, 3, "midrise")), ref)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("bits,grid", [(4, "midrise"), (8, "midrise"), (8, "unsigned"), (8, "midtread"),
                                       (16, "midrise")])
def test_half_precision_input_is_quantized_on_the_float32_grid(dtype, bits, grid):
    """float16/bfloat16 x was quantized in its own dtype: levels off the grid by 1.7 steps (bfloat16,
    8 bits), 304 steps (bfloat16, 16 bits) and NaN (float16, 16 bits: the top code 65535 > 65504).
    Now x̂ is the float32 grid level rounded to x's dtype, in x's dtype."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=4000).astype(np.float32)).astype(dtype)
    got = q.quantize(x, 2.5, bits, grid)
    assert got.dtype == dtype
    want = q.quantize(x.astype(jnp.float32), 2.5, bits, grid).astype(dtype)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    g = jax.grad(lambda a: jnp.sum(q.quantize(x, a, bits, grid).astype(jnp.float32)))(jnp.float32(2.5))
    assert np.isfinite(float(g))


@pytest.mark.parametrize("grid", ["midrise", "unsigned", "midtread"])
def test_levels_are_what_quantize_outputs_at_the_delta_floor(grid):
    """At α = 1e-8 (an all-zero tensor's calibrated α) quantize floors Δ at 1e-8; levels() ignored
    the floor and listed levels up to α that quantize never outputs."""
    alpha, bits = 1e-8, 4
    lv = np.asarray(q.levels(alpha, bits, grid))
    x = jnp.linspace(-float(lv.max()) * 1.1, float(lv.max()) * 1.1, 20001)
    out = np.unique(np.asarray(q.quantize(x, alpha, bits, grid)))
    np.testing.assert_allclose(out, lv, rtol=1e-5, atol=1e-15)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_num_levels_counts_the_levels_quantize_outputs(bits):
    """2^M levels on the midrise and unsigned grids, 2^M − 1 on the midtread grid (its zero level and
    2^(M−1) − 1 on each side): by hand, and as the distinct outputs of quantize over a dense sweep."""
    want = {"midrise": 2**bits, "unsigned": 2**bits, "midtread": 2**bits - 1}
    x = jnp.linspace(-1.5, 1.5, 20001)
    for grid, n in want.items():
        assert q.num_levels(bits, grid) == n
        assert np.unique(np.asarray(q.quantize(x, 1.0, bits, grid))).size == n


def test_valid_alpha_is_the_open_closed_range_up_to_alpha_max():
    """0 < α ≤ ALPHA_MAX: 0, negatives, NaN, ±inf and values past 1e38 are invalid."""
    alpha = np.array([0.0, -0.0, -1.0, 1e-30, 1.0, 1e38, 1.1e38, np.inf, -np.inf, np.nan], np.float32)
    want = [False, False, False, True, True, True, False, False, False, False]
    np.testing.assert_array_equal(np.asarray(q.valid_alpha(alpha)), want)
    np.testing.assert_array_equal(np.asarray(q.valid_alpha(jnp.asarray(alpha))), want)


def test_quantize_takes_a_python_list():
    """x without a dtype (a list) is converted: 2-bit midrise at α = 1 has levels ±1/3, ±1."""
    np.testing.assert_allclose(np.asarray(q.quantize([0.3, -0.2, 0.9, -5.0], 1.0, 2, "midrise")),
                               [1 / 3, -1 / 3, 1.0, -1.0], rtol=1e-6)


def test_a_half_precision_alpha_is_kept_in_float32():
    """α given as a bfloat16 array is used in float32 too: in bfloat16 the 8-bit midrise step 2/255
    rounds to 2^−7, and the top level came out 255·2^−7 − 1 = 0.992 instead of α = 1."""
    x = jnp.asarray([5.0, -5.0, 0.0], jnp.bfloat16)
    got = q.quantize(x, jnp.asarray(1.0, jnp.bfloat16), 8, "midrise")
    assert got.dtype == jnp.bfloat16
    out = np.asarray(got.astype(jnp.float32))
    np.testing.assert_array_equal(out[:2], [1.0, -1.0])
    assert abs(out[2]) == pytest.approx(1 / 255, rel=1e-2)  # the two levels next to 0 are ±Δ/2 = ±1/255
