"""GPTQ: the Cholesky update against the explicit least-squares re-solve it stands for, the
float-input case against the published algorithm's fixed point, and the rounded network."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import landscape as ls
from landscape import quantizers
from landscape.gptq import gptq_layer, gptq_rows


def quadratic(k=12, c=3, seed=0):
    """An SPD H with correlated rows (as a layer's input moments) and an optimum W*."""
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(200, 4)) @ rng.normal(size=(4, k)) + 0.1 * rng.normal(size=(200, k))
    H = p.T @ p / 200 + 1e-3 * np.eye(k)
    return H, rng.normal(size=(k, c))


def resolve_rows(w_star, H, scale, offset, lo, hi, order):
    """Reference: round rows in ``order``; after each, set the rows not yet rounded to the
    exact minimiser of (Ŵ − W*)ᵀ H (Ŵ − W*) given every row rounded so far (a fresh solve)."""
    w = np.array(w_star, np.float64)
    codes = np.zeros_like(w)
    done = []
    for i in order:
        codes[i] = np.clip(np.round((w[i] - offset) / scale), lo, hi)
        done.append(i)
        free = [j for j in range(len(w)) if j not in done]
        if free:
            fixed_delta = (codes[done] * scale + offset) - w_star[done]
            w[free] = w_star[free] - np.linalg.solve(H[np.ix_(free, free)], H[np.ix_(free, done)] @ fixed_delta)
    return codes.astype(np.int32)


def error(H, w_star, w):
    d = w - w_star
    return float(np.einsum("kc,kl,lc->", d, H, d))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cholesky_update_equals_the_explicit_re_solve(seed):
    H, w_star = quadratic(seed=seed)
    scale, offset, lo, hi = 0.4, -1.4, 0, 7  # 3-bit midrise grid over [-1.4, 1.4]
    order = np.random.default_rng(seed).permutation(len(H))
    codes = gptq_rows(w_star, H, scale, offset, lo, hi, order)
    np.testing.assert_array_equal(codes, resolve_rows(w_star, H, scale, offset, lo, hi, order))
    # the lazy batch update (blocks of 5 rows: two boundaries inside K = 12) gives the same codes
    np.testing.assert_array_equal(gptq_rows(w_star, H, scale, offset, lo, hi, order, block=5), codes)
    nearest = np.clip(np.round((w_star - offset) / scale), lo, hi)
    assert not np.array_equal(codes, nearest)  # the feedback moved some codes
    # error feedback lowers the quadratic error against rounding each weight on its own
    assert error(H, w_star, codes * scale + offset) < error(H, w_star, nearest * scale + offset)


def test_uncorrelated_inputs_give_round_to_nearest():
    rng = np.random.default_rng(3)
    H = np.diag(rng.uniform(0.5, 2.0, 10))  # no coupling between rows: nothing to compensate
    w_star = rng.normal(size=(10, 4))
    codes = gptq_rows(w_star, H, 0.25, 0.0, -7, 7)
    np.testing.assert_array_equal(codes, np.clip(np.round(w_star / 0.25), -7, 7))
    with pytest.raises(ValueError, match="permutation"):
        gptq_rows(w_star, H, 0.25, 0.0, -7, 7, order=[0] * 10)
    with pytest.raises(ValueError, match="permutation of range"):
        gptq_rows(w_star, H, 0.25, 0.0, -7, 7, order=np.arange(10.0))  # floats index nothing
    with pytest.raises(ValueError, match="lo=7, hi=-7 is empty"):
        gptq_rows(w_star, H, 0.25, 0.0, 7, -7)
    with pytest.raises(ValueError, match="scale .* must be positive, got min 0"):
        gptq_rows(w_star, H, 0.0, 0.0, -7, 7)
    # non-finite or misshapen input: a NaN gave codes of -2^31 for its whole output channel
    bad = w_star.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="w_star has 1 NaN/inf entries"):
        gptq_rows(bad, H, 0.25, 0.0, -7, 7)
    with pytest.raises(ValueError, match="H has 100 NaN/inf entries"):
        gptq_rows(w_star, np.full((10, 10), np.nan), 0.25, 0.0, -7, 7)
    with pytest.raises(ValueError, match=r"H has shape \(3, 3\); w_star has K = 10 rows, so H must be \(10, 10\)"):
        gptq_rows(w_star, np.eye(3), 0.25, 0.0, -7, 7)
    x, w = rng.normal(size=(6, 10)).astype(np.float32), rng.normal(size=(10, 4)).astype(np.float32)
    for xs, match in ((x[:0], "x has 0 examples"), (np.where(x > 1.5, np.nan, x), "x has .* NaN/inf entries")):
        with pytest.raises(ValueError, match=match):
            gptq_layer(xs, xs @ w, w, 0.25, 0.0, -7, 7, lambda a, b: a @ b)


def test_gptq_layer_improves_output_error_and_keeps_nearest_when_worse():
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(512, 3)) @ rng.normal(size=(3, 16)) + 0.05 * rng.normal(size=(512, 16))).astype(np.float32)
    w = rng.normal(size=(16, 4)).astype(np.float32)
    alpha = float(np.abs(w).max())
    scale = float(quantizers.step_size(alpha, 3, "midrise"))
    fit = gptq_layer(x, x @ w, w, scale, -alpha, 0, 7, lambda a, b: a @ b)
    assert fit.kept and fit.mse < 0.5 * fit.mse_nearest and fit.flipped > 0
    assert fit.history == ()
    direct = float(np.mean((x @ (fit.codes * scale - alpha) - x @ w) ** 2))
    assert direct == pytest.approx(fit.mse, rel=1e-4)
    # weights already on the grid: nearest is exact, and GPTQ (damped) cannot beat an error of 0
    on_grid = (np.clip(np.round((w + alpha) / scale), 0, 7) * scale - alpha).astype(np.float32)
    exact = gptq_layer(x, x @ on_grid, on_grid, scale, -alpha, 0, 7, lambda a, b: a @ b)
    assert exact.mse == exact.mse_nearest == pytest.approx(0.0, abs=1e-10)
    assert exact.flipped == 0.0
    with pytest.raises(ValueError, match="damp=0"):
        gptq_layer(x, x @ w, w, scale, -alpha, 0, 7, lambda a, b: a @ b, damp=0)
    with pytest.raises(ValueError, match="act_order=1"):
        gptq_layer(x, x @ w, w, scale, -alpha, 0, 7, lambda a, b: a @ b, act_order=1)


def test_gptq_network(tiny_net, digits):
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=2, a_bits=4)
    alpha = loss.init("mse")
    res = ls.gptq(loss, alpha, num_images=128)
    assert res.method == "gptq" and "gptq" in repr(res)
    weights = [s.name for s in loss.sites if s.kind == "weight"]
    assert list(res.layers) == weights
    assert res.nearest.accuracy(digits.test) == pytest.approx(float(loss.accuracy(alpha, digits.test)), abs=1e-9)
    for name in weights:
        fit, codes = res.layers[name], res.network.codes[name]
        lo, hi = res.network.sites[name].code_range()
        assert fit.mse <= fit.mse_nearest and codes.min() >= lo and codes.max() <= hi
        # the loss's grid values of the codes: Δ·q + offset to an ulp (XLA's fused multiply-add)
        np.testing.assert_allclose(np.asarray(res.network.variables["params"][name]["kernel"]),
                                   res.network.dequantize(name), rtol=1e-6, atol=1e-7)
    assert sum(f.mse for f in res.layers.values()) < 0.9 * sum(f.mse_nearest for f in res.layers.values())
    again = ls.gptq(loss, alpha, num_images=128)
    for name in weights:
        np.testing.assert_array_equal(res.network.codes[name], again.network.codes[name])  # deterministic
    floats = ls.gptq(loss, alpha, num_images=64, inputs="float", act_order=False)
    assert set(floats.layers) == set(weights)
    with pytest.raises(ValueError, match="gptq needs a ClipLoss built with bias_correction=False"):
        ls.gptq(loss.with_options(bias_correction=True), alpha)
    with pytest.raises(ValueError, match="damp=-1"):
        ls.gptq(loss, alpha, damp=-1)


def test_float_inputs_give_published_gptq_centred_on_the_float_kernel():
    """With y = x W (the float network's own inputs), B = G W, so W* = W: gptq_layer is GPTQ on W
    with H = G + λI, as published (act-order: rows by decreasing H_kk)."""
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(400, 4)) @ rng.normal(size=(4, 10)) + 0.1 * rng.normal(size=(400, 10))).astype(np.float32)
    w = rng.normal(size=(10, 3)).astype(np.float32)
    scale, offset = 0.3, -1.05  # 3-bit midrise over [-1.05, 1.05]
    fit = gptq_layer(x, x @ w, w, scale, offset, 0, 7, lambda a, b: a @ b, damp=0.01)
    G = x.astype(np.float64).T @ x.astype(np.float64) / len(x)
    H = G + 0.01 * np.mean(np.diag(G)) * np.eye(10)
    published = gptq_rows(w, H, scale, offset, 0, 7, np.argsort(-np.diag(H), kind="stable"))
    assert fit.kept
    np.testing.assert_array_equal(fit.codes, published)


def test_gptq_per_channel_midtread_folded(tiny_net, digits):
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=3, a_bits=None, per_channel=True, weight_grid="midtread",
                       fold_bn=True)
    res = ls.gptq(loss, loss.init("mse"), num_images=64, inputs="float")
    for name, fit in res.layers.items():
        site, codes = res.network.sites[name], res.network.codes[name]
        assert site.per_channel and np.unique(site.scale).size > 1
        assert codes.min() >= -3 and codes.max() <= 3 and fit.mse <= fit.mse_nearest
        np.testing.assert_allclose(np.asarray(res.network.variables["params"][name]["kernel"]),
                                   codes * site.scale, rtol=1e-6, atol=1e-7)  # midtread: no offset
    assert sum(f.mse for f in res.layers.values()) < sum(f.mse_nearest for f in res.layers.values())


def test_gptq_layer_defaults_are_the_documented_objective():
    """Without options, gptq_layer is the module docstring's algorithm with the reference's 1 %
    damping and act-order: H = G + λI, λ = 0.01 · mean diag G, W* = H⁻¹ (B + λ W), rows by
    decreasing H_kk. Inputs that are not the float ones (y ≠ x W) make W* depend on λ too; the
    round-to-nearest it is compared with is the float kernel's."""
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(300, 3)) @ rng.normal(size=(3, 12)) + 0.05 * rng.normal(size=(300, 12))).astype(np.float32)
    x *= rng.uniform(0.2, 3.0, 12).astype(np.float32)  # unequal H_kk: act-order is not the identity
    w = rng.normal(size=(12, 4)).astype(np.float32)
    xq = (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)  # the quantized network's inputs
    y = x @ w
    scale, offset = 0.3, -1.05  # 3-bit midrise over [-1.05, 1.05]
    fit = gptq_layer(xq, y, w, scale, offset, 0, 7, lambda a, b: a @ b)
    P, Y = xq.astype(np.float64), y.astype(np.float64)
    G, B = P.T @ P / len(P), P.T @ Y / len(P)
    lam = 0.01 * np.mean(np.diag(G))
    H = G + lam * np.eye(12)
    w_star = np.linalg.solve(H, B + lam * w)
    order = np.argsort(-np.diag(H), kind="stable")
    assert not np.array_equal(order, np.arange(12))
    expect = gptq_rows(w_star, H, scale, offset, 0, 7, order)
    assert fit.kept
    np.testing.assert_array_equal(fit.codes, expect)
    # nearest (the fallback, and what mse_nearest and flipped refer to) rounds the float kernel W,
    # not W*: the loss's own round-to-nearest
    nearest = np.clip(np.round((w - offset) / scale), 0, 7)
    assert not np.array_equal(nearest, np.clip(np.round((w_star - offset) / scale), 0, 7))
    assert fit.mse_nearest == pytest.approx(float(np.mean((P @ (nearest * scale + offset) - Y) ** 2)), rel=1e-4)
    assert fit.flipped == pytest.approx(float(np.mean(fit.codes != nearest)))
    # and those options are what they decide: another damping or the natural order differ
    assert not np.array_equal(fit.codes, gptq_layer(xq, y, w, scale, offset, 0, 7, lambda a, b: a @ b,
                                                    damp=0.1).codes)
    assert not np.array_equal(fit.codes, gptq_layer(xq, y, w, scale, offset, 0, 7, lambda a, b: a @ b,
                                                    act_order=False).codes)


def test_gptq_hands_its_options_to_every_layer(tiny_net, digits, monkeypatch):
    """gptq(loss, alpha, damp=..., act_order=...) rounds every layer with those options (and by
    default with damp=0.01, act_order=True, the loss's precision)."""
    gptq_module = importlib.import_module("landscape.gptq")  # the attribute landscape.gptq is the function
    real, seen = gptq_module.gptq_layer, []

    def spy(*args, **kw):
        seen.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(gptq_module, "gptq_layer", spy)
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=3, a_bits=None)
    alpha = loss.init("mse")
    weights = [s.name for s in loss.sites if s.kind == "weight"]
    ls.gptq(loss, alpha, num_images=16, inputs="float")
    assert seen == [dict(damp=0.01, act_order=True, precision=loss.precision)] * len(weights)
    seen.clear()
    ls.gptq(loss, alpha, num_images=16, inputs="float", damp=0.2, act_order=False)
    assert seen == [dict(damp=0.2, act_order=False, precision=loss.precision)] * len(weights)


def test_pinned_weights_keep_the_zero_code_and_feed_their_error_back():
    """A pruned weight (exactly 0 in the kernel) stays 0: GPTQ's feedback had un-pruned N:M
    networks. Pinning is a rounding like any other, so the explicit re-solve with the pinned codes
    forced gives the same codes."""
    H, w_star = quadratic(seed=5)
    scale, offset, lo, hi = 0.4, 0.0, -3, 3  # midtread: code 0 is the value 0
    rng = np.random.default_rng(5)
    pinned = rng.random(w_star.shape) < 0.5
    order = rng.permutation(len(H))
    codes = gptq_rows(w_star, H, scale, offset, lo, hi, order, pinned=pinned)
    assert np.all(codes[pinned] == 0) and np.any(codes[~pinned] != 0)
    # reference: the re-solve of test_cholesky_update_equals_the_explicit_re_solve with pinned codes
    w = np.array(w_star, np.float64)
    expect = np.zeros_like(w)
    done = []
    for i in order:
        expect[i] = np.where(pinned[i], 0, np.clip(np.round((w[i] - offset) / scale), lo, hi))
        done.append(i)
        free = [j for j in range(len(w)) if j not in done]
        if free:
            fixed_delta = expect[done] * scale + offset - w_star[done]
            w[free] = w_star[free] - np.linalg.solve(H[np.ix_(free, free)], H[np.ix_(free, done)] @ fixed_delta)
    np.testing.assert_array_equal(codes, expect.astype(np.int32))
    with pytest.raises(ValueError, match="pinned entries need a grid with a zero level"):
        gptq_rows(w_star, H, 0.4, -1.4, 0, 7, pinned=pinned)  # midrise: no zero level
    with pytest.raises(ValueError, match=r"pinned has shape \(2, 2\)"):
        gptq_rows(w_star, H, scale, offset, lo, hi, pinned=np.ones((2, 2), bool))


def test_gptq_layer_keeps_a_pruned_kernels_zeros():
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(512, 3)) @ rng.normal(size=(3, 16)) + 0.05 * rng.normal(size=(512, 16))).astype(np.float32)
    w = rng.normal(size=(16, 4)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0  # pruned
    alpha = float(np.abs(w).max())
    scale = float(quantizers.step_size(alpha, 3, "midtread"))
    fit = gptq_layer(x, x @ w, w, scale, 0.0, -3, 3, lambda a, b: a @ b)
    assert np.all(fit.codes[w == 0] == 0) and fit.mse < fit.mse_nearest
