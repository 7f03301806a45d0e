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
