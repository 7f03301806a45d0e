"""AdaRound: each layer's learnt rounding against every rounding of a small layer, and the
rounded network against the loss's own quantization."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
from landscape import quantizers
from landscape.adaround import _inverse_soft_rounding, adaround, round_layer, soft_rounding


def test_soft_rounding_reaches_both_ends_and_inverts():
    v = jnp.linspace(-8.0, 8.0, 101)
    h = soft_rounding(v)
    assert float(h.min()) == 0.0 and float(h.max()) == 1.0
    assert bool(jnp.all(jnp.diff(h) >= 0))
    frac = jnp.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(soft_rounding(_inverse_soft_rounding(frac)), frac, atol=1e-6)


def small_layers(count=5, seed=0):
    """Dense layers 8 → 2 whose inputs have rank 3 (plus noise): the rounding has room to
    compensate, as in a real layer, and 2^16 roundings can be enumerated."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        x = (rng.normal(size=(256, 3)) @ rng.normal(size=(3, 8)) + 0.05 * rng.normal(size=(256, 8)))
        w = rng.normal(size=(8, 2))
        yield x.astype(np.float32), w.astype(np.float32)


def test_round_layer_against_every_rounding():
    better = 0
    for x, w in small_layers():
        alpha = float(np.abs(w).max())
        scale = float(quantizers.step_size(alpha, 2, "midrise"))
        offset = -alpha
        # λ = 0.1, not the default 0.01: λ weighs the regulariser against the reconstruction error,
        # and these layers' errors at 2 bits are 10–100× a trained network's (0.35–15 vs 0.04–0.08
        # on the MNIST resnet20); with 0.01 only two of the five leave round-to-nearest.
        fit = round_layer(x, x @ w, w, scale, offset, 0, 3, lambda a, b: a @ b, iterations=1000, reg=0.1)
        z = (w - offset) / scale
        # every code is the floor or the ceiling of the weight in grid units, inside the range
        assert np.all((fit.codes == np.floor(z)) | (fit.codes == np.ceil(z)))
        assert fit.codes.min() >= 0 and fit.codes.max() <= 3
        flips = np.array(list(itertools.product((0, 1), repeat=w.size)), np.float32).reshape(-1, *w.shape)
        every = np.clip(np.floor(z)[None] + flips, 0, 3) * scale + offset
        mses = np.mean((np.einsum("nd,kdc->knc", x, every) - (x @ w)[None]) ** 2, axis=(1, 2))
        mse = float(np.mean((x @ (fit.codes * scale + offset) - x @ w) ** 2))
        assert mse == pytest.approx(fit.mse, rel=1e-4)
        assert fit.mse <= fit.mse_nearest
        assert np.mean(mses < fit.mse - 1e-6) < 0.05  # better than 95 % of the 65,536 roundings
        better += fit.mse < 0.9 * fit.mse_nearest
    assert better >= 3  # and clearly better than round-to-nearest on most layers


def test_adaround_network(tiny_net, digits):
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=2, a_bits=4)
    alpha = loss.init("mse")
    res = adaround(loss, alpha, num_images=128, iterations=200)
    again = adaround(loss, alpha, num_images=128, iterations=200)
    weights = [s.name for s in loss.sites if s.kind == "weight"]
    assert list(res.layers) == weights
    # round-to-nearest is the loss's own quantization
    assert res.nearest.accuracy(digits.test) == pytest.approx(float(loss.accuracy(alpha, digits.test)), abs=1e-9)
    for name in weights:
        fit, codes, nearest = res.layers[name], res.network.codes[name], res.nearest.codes[name]
        assert fit.mse <= fit.mse_nearest
        assert np.array_equal(codes, again.network.codes[name])  # deterministic
        assert np.max(np.abs(codes.astype(int) - nearest.astype(int))) <= 1
        lo, hi = res.network.sites[name].code_range()
        assert codes.min() >= lo and codes.max() <= hi
        assert fit.flipped == pytest.approx(float(np.mean(codes != nearest)))
        kernel = res.network.variables["params"][name]["kernel"]
        # the loss's grid values of the codes: Δ·q + offset to an ulp (XLA's fused multiply-add)
        np.testing.assert_allclose(np.asarray(kernel), res.network.dequantize(name), rtol=1e-6, atol=1e-7)
    assert sum(f.flipped for f in res.layers.values()) > 0
    assert sum(f.mse for f in res.layers.values()) < 0.9 * sum(f.mse_nearest for f in res.layers.values())
    assert "mse_nearest" in repr(res)
    floats = adaround(loss, alpha, num_images=64, inputs="float", iterations=50)
    assert set(floats.layers) == set(weights)


def test_adaround_errors(tiny_net, digits):
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=3, a_bits=None)
    alpha = loss.init("mse")
    with pytest.raises(ValueError, match="bias_correction=False"):
        adaround(loss.with_options(bias_correction=True), alpha)
    with pytest.raises(ValueError, match="inputs='wrong'"):
        adaround(loss, alpha, inputs="wrong")
    with pytest.raises(ValueError, match="iterations=0"):
        adaround(loss, alpha, iterations=0)
    with pytest.raises(ValueError, match="beta="):
        adaround(loss, alpha, beta=(2.0, 20.0))
    with pytest.raises(ValueError, match="warmup=1.0"):
        adaround(loss, alpha, warmup=1.0)
    with pytest.raises(ValueError, match="warmup=False"):
        adaround(loss, alpha, warmup=False)
    with pytest.raises(ValueError, match=r"adaround: unknown options \['iters'\]; round_layer takes iterations"):
        adaround(loss, alpha, iters=10)
    with pytest.raises(ValueError, match="alpha has shape"):
        adaround(loss, alpha[:-1])
    with pytest.raises(ValueError, match="quantizes no weight site"):
        adaround(loss.with_options(w_bits=None, a_bits=4), loss.with_options(w_bits=None, a_bits=4).init("max"))


def test_adaround_per_channel_midtread_folded(tiny_net, digits):
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=3, a_bits=None, per_channel=True, weight_grid="midtread",
                       fold_bn=True)
    alpha = loss.init("mse")
    res = adaround(loss, alpha, num_images=64, iterations=100, inputs="float")
    for name, fit in res.layers.items():
        site = res.network.sites[name]
        assert site.per_channel and site.grid == "midtread" and np.unique(site.scale).size > 1
        lo, hi = site.code_range()
        codes = res.network.codes[name]
        assert (lo, hi) == (-3, 3) and codes.min() >= lo and codes.max() <= hi
        assert fit.mse <= fit.mse_nearest
        np.testing.assert_allclose(np.asarray(res.network.variables["params"][name]["kernel"]),
                                   codes * site.scale, rtol=1e-6, atol=1e-7)  # midtread: no offset
    assert sum(f.mse for f in res.layers.values()) < sum(f.mse_nearest for f in res.layers.values())


def test_layers_of_one_shape_share_the_compiled_rounding_loop(digits_net, digits):
    """resnet8 repeats kernel shapes: the Adam loop compiles once per shape, not once per layer."""
    from landscape.adaround import _optimize as loop

    loss = ls.ClipLoss(digits_net, digits.calib, w_bits=3, a_bits=None)
    loop.clear_cache()
    result = adaround(loss, loss.init("max"), num_images=16, iterations=7)  # a step count no other test uses
    shapes = {np.shape(codes) for codes in result.network.codes.values()}
    assert len(result.layers) > len(shapes) >= 2  # some layers share a shape
    assert loop._cache_size() == len(shapes)


def _quantized_input_layer(seed):
    """A dense layer 8 → 2 at 2 bits whose recorded inputs are not the float ones (y ≠ x W), as
    for every layer after the first with inputs="quantized"."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(256, 3)) @ rng.normal(size=(3, 8)) + 0.05 * rng.normal(size=(256, 8))).astype(np.float32)
    xq = (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
    w = rng.normal(size=(8, 2)).astype(np.float32)
    alpha = float(np.abs(w).max())
    return xq, x @ w, w, float(quantizers.step_size(alpha, 2, "midrise")), -alpha


@pytest.mark.parametrize("seed", [0, 1])
def test_beta_falls_from_its_start_after_the_warm_up(seed):
    """β runs from beta[0] (20: a flat regulariser that leaves h free) down to beta[1] (2: pulls
    h to 0 or 1): with one regularised step (the last of 10, warmup 0.9), that step uses β =
    beta[0], so (20, 2) is (20, 20) there and not (2, 2). A schedule running the other way
    (2 → 20) pinned every h at once."""
    xq, y, w, scale, offset = _quantized_input_layer(seed)

    def run(beta):
        return round_layer(xq, y, w, scale, offset, 0, 3, lambda a, b: a @ b, iterations=10, warmup=0.9,
                           reg=10.0, lr=1.0, beta=beta)

    falling, flat, steep = run((20.0, 2.0)), run((20.0, 20.0)), run((2.0, 2.0))
    assert flat.history != steep.history  # β decides this step
    assert falling.history == flat.history
    np.testing.assert_array_equal(falling.codes, flat.codes)


def test_history_is_the_hard_roundings_error_every_tenth_of_the_steps():
    """history[k] is the output MSE (per output channel, as mse) of the hard rounding after step
    (k + 1) · iterations/10: its last entry is the learnt codes' MSE. An index off by one left
    history[0] at 0 and dropped the last report; a missing 1/C made it C times the MSE."""
    x, w = next(small_layers(1, seed=2))
    alpha = float(np.abs(w).max())
    scale = float(quantizers.step_size(alpha, 2, "midrise"))
    fit = round_layer(x, x @ w, w, scale, -alpha, 0, 3, lambda a, b: a @ b, iterations=200, reg=0.1)
    assert len(fit.history) == 10 and min(fit.history) > 0
    assert fit.kept and fit.flipped > 0
    assert fit.history[-1] == pytest.approx(fit.mse, rel=1e-3)
    assert fit.history[0] == pytest.approx(fit.mse_nearest, rel=1e-3)  # no reg in the warm-up: still nearest
    short = round_layer(x, x @ w, w, scale, -alpha, 0, 3, lambda a, b: a @ b, iterations=7)
    assert len(short.history) == 7  # fewer than 10 steps: one report per step


def test_adaround_hands_its_options_to_every_layer(tiny_net, digits):
    """adaround(loss, alpha, iterations=..., ...) runs every layer with those options (they were
    validated, then dropped: every layer ran the default 1000 steps)."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=3, a_bits=None)
    res = adaround(loss, loss.init("mse"), num_images=16, inputs="float", iterations=5)
    assert [len(f.history) for f in res.layers.values()] == [5] * len(res.layers)


def test_round_layer_defaults_are_the_papers():
    """Without options round_layer runs λ = 0.01, β 20 → 2 after a 20 % warm-up, 1000 Adam steps
    at lr 1e-2 (the module docstring): the same codes and history as those options spelt out."""
    xq, y, w, scale, offset = _quantized_input_layer(0)
    gemm = lambda a, b: a @ b  # noqa: E731
    default = round_layer(xq, y, w, scale, offset, 0, 3, gemm)
    spelt = round_layer(xq, y, w, scale, offset, 0, 3, gemm, iterations=1000, reg=0.01, beta=(20.0, 2.0),
                        warmup=0.2, lr=1e-2)
    assert len(default.history) == 10 and default.history == spelt.history
    np.testing.assert_array_equal(default.codes, spelt.codes)
    other = round_layer(xq, y, w, scale, offset, 0, 3, gemm, iterations=1000, reg=0.1)
    assert other.history != default.history  # λ matters here


@pytest.mark.parametrize("seed", [2, 3])
def test_round_layer_with_weights_beyond_alpha(seed):
    """A clipping α below max|W| (an MSE rule's) puts weights beyond the grid, where W̃ stays at the
    end level: the soft objective must clip ⌊z⌋ + h(V) as the hard rounding does, or it optimises
    weights the layer never runs (the rounding found was 2.4-2.7× the best one's MSE, here 1.1-1.3×)."""
    x, w = next(small_layers(1, seed=seed))
    alpha = 0.6 * float(np.abs(w).max())
    scale, offset = float(quantizers.step_size(alpha, 2, "midrise")), -alpha
    assert np.sum(np.abs(w) > alpha) >= 1
    fit = round_layer(x, x @ w, w, scale, offset, 0, 3, lambda a, b: a @ b, iterations=1000, reg=0.1)
    z = (w - offset) / scale
    flips = np.array(list(itertools.product((0, 1), repeat=w.size)), np.float32).reshape(-1, *w.shape)
    every = np.clip(np.floor(z)[None] + flips, 0, 3) * scale + offset
    best = float(np.min(np.mean((np.einsum("nd,kdc->knc", x, every) - (x @ w)[None]) ** 2, axis=(1, 2))))
    assert fit.kept and fit.mse < 0.7 * fit.mse_nearest
    assert fit.mse <= 1.3 * best


def test_weights_on_a_level_can_move_and_pruned_zeros_stay():
    """A weight exactly on a grid level started on h's clip edge, where jit's rounding left its
    gradient exactly 0: asked for a kernel one step up (a target 0.8 step above every weight), the
    layer kept all of its codes (MSE 0.215 against 0.013). Exact zeros on the midtread grid are
    pruned weights: they keep the zero code (as in GPTQ) whatever the target asks."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 32)).astype(np.float32)
    w = (rng.standard_normal((32, 8)) * 0.1).astype(np.float32)
    scale = np.float32(quantizers.step_size(np.float32(np.abs(w).max()), 3, "midtread"))
    on_grid = (np.round(w / scale) * scale).astype(np.float32)
    on_grid[on_grid == 0] = scale  # no zeros here: nothing pinned
    on_grid[0] = 0.0  # but one pruned row
    codes = np.round(on_grid / scale)

    def gemm(a, k):
        return jnp.matmul(a, k, precision="highest")

    y = np.asarray(gemm(x, on_grid + 0.8 * scale))
    fit = round_layer(x, y, on_grid, scale, 0.0, -3, 3, gemm)
    moved = fit.codes != codes
    assert not np.any(moved[0]) and np.all(fit.codes[0] == 0)  # the pruned row stays at 0
    free = codes[1:] < 3  # can round up
    assert np.mean(moved[1:][free]) > 0.9 and np.all(fit.codes[1:][moved[1:]] == codes[1:][moved[1:]] + 1)
    assert fit.kept and fit.mse < 0.2 * fit.mse_nearest
