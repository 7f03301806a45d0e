"""Tests for landscape.adaprune: per-layer re-fit with a fixed mask, BN re-estimation, conversion."""

from __future__ import annotations

import dataclasses
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import adaprune as ap
from landscape import sparsity as sp

SPARSE = ("conv0_1", "conv1_0", "conv1_1")  # tiny CNN layers between the first and the last


def flat(tree) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def converted(tiny_net, digits):
    # 1:4 (75% sparse): magnitude pruning alone wrecks the tiny CNN, so recovery is measurable.
    return ap.adaprune(tiny_net, digits.calib, keep=1, block=4, iterations=150, test=digits.test)


def test_adaprune_masks_fixed_pruned_exactly_zero_and_nm(converted, tiny_net):
    before = flat(tiny_net.variables["params"])
    params = flat(converted.network.variables["params"])
    masks = flat(converted.network.variables["masks"])
    assert sorted(masks) == [f"{n}/kernel" for n in SPARSE]
    for name, mask in masks.items():
        assert sp.is_nm(sp.gemm_matrix(mask), keep=1, block=4, axis=0, exact=True)
        np.testing.assert_array_equal(mask, sp.layer_mask(before[name], keep=1, block=4,
                                                          transposable=False, method="exact"))
        assert np.all(params[name][~mask] == 0.0)
        assert not np.allclose(params[name][mask], before[name][mask])  # kept weights were re-fitted
    assert [r.name for r in converted.layers] == list(SPARSE)
    assert all(r.density == 0.25 for r in converted.layers)
    assert converted.structure == "1:4" and converted.network.recipe.structure == "1:4"


def test_adaprune_reduces_calibration_mse_per_layer(converted):
    for r in converted.layers:
        assert r.mse_after <= 0.8 * r.mse_before, r


def test_adaprune_leaves_skipped_layers_untouched(converted, tiny_net):
    before = flat(tiny_net.variables["params"])
    after = flat(converted.network.variables["params"])
    assert set(before) == set(after)
    for name in before:
        if name.split("/")[0] not in SPARSE and not name.startswith("bn"):
            np.testing.assert_array_equal(after[name], before[name])  # conv0_0 and fc: untouched
    stats_before = flat(tiny_net.variables["batch_stats"])
    stats_after = flat(converted.network.variables["batch_stats"])
    assert any(not np.allclose(stats_after[k], stats_before[k]) for k in stats_before)  # re-estimated


def test_adaprune_accuracy_recovers_over_magnitude_pruning(converted, digits):
    acc = converted.accuracy
    assert acc.final >= acc.magnitude + 0.05
    assert acc.final == converted.network.accuracy(digits.test)
    assert acc.dense > acc.magnitude
    assert "adaprune+BN" in repr(converted) and "conv1_0" in repr(converted)


def test_adaprune_explicit_layer_keeps_everything_else(tiny_net, digits):
    res = ap.adaprune(tiny_net, digits.calib.x[:64], keep=2, block=4, transposable=True,
                      layers=["conv1_0"], iterations=10, recalibrate_bn=False)
    before, after = flat(tiny_net.variables), flat(res.network.variables)
    assert sorted(flat(res.network.variables["masks"])) == ["conv1_0/kernel"]
    mask = flat(res.network.variables["masks"])["conv1_0/kernel"]
    assert sp.is_transposable(sp.gemm_matrix(mask), keep=2, block=4, exact=True)
    for name, value in before.items():
        if name != "params/conv1_0/kernel":
            np.testing.assert_array_equal(after[name], value)
    assert res.accuracy is None and res.structure == "T-2:4"


def test_prune_layer_reaches_least_squares_optimum(monkeypatch):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32)) * 0.3).astype(np.float32)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    y = x @ w
    mask = sp.nm_mask(w, keep=2, block=4, axis=0)
    # the optimum with the mask fixed: one least-squares problem per output column
    best = 0.0
    for j in range(w.shape[1]):
        rows = np.flatnonzero(mask[:, j])
        sol = np.linalg.lstsq(x[:, rows].astype(np.float64), y[:, j], rcond=None)[0]
        best += float(np.sum((x[:, rows] @ sol - y[:, j]) ** 2))
    best /= y.size
    fit = ap.prune_layer(x, y, w, mask, jnp.dot, iterations=300, lr=1e-2, key=jax.random.key(3))
    assert fit.mse_before == pytest.approx(float(np.mean((x @ (w * mask) - y) ** 2)), rel=1e-5)
    assert best <= fit.mse_after <= 1.05 * best < 0.6 * fit.mse_before
    assert np.all(fit.kernel[~mask] == 0.0) and np.all(fit.bias_delta == 0.0)
    assert len(fit.history) == 10
    # a diverged Adam run (NaN) never wins over S ⊙ W and the start
    import landscape.adaprune as adaprune_module

    real = adaprune_module._adam_prune

    def diverged(p, *args, **kw):
        q, hist = real(p, *args, **kw)
        return {"w": q["w"] * np.nan, "b": q["b"]}, hist

    with monkeypatch.context() as patch:
        patch.setattr(adaprune_module, "_adam_prune", diverged)
        bad = ap.prune_layer(x, y, w, mask, jnp.dot, iterations=10)
    assert np.all(np.isfinite(bad.kernel)) and bad.mse_after == pytest.approx(bad.mse_before)
    # outputs or a start of another shape are refused, not broadcast into a wrong fit
    with pytest.raises(ValueError, match=r"y has shape \(400, 1\); gemm\(x, kernel\) has shape \(400, 8\)"):
        ap.prune_layer(x, y[:, :1], w, mask, jnp.dot, iterations=1)
    with pytest.raises(ValueError, match=r"init has shape \(8,\); it must have the kernel's shape \(32, 8\)"):
        ap.prune_layer(x, y, w, mask, jnp.dot, init=w[0], iterations=1)


def test_prune_layer_bias_correction_absorbs_an_offset():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((256, 16)) + 1.0).astype(np.float32)  # non-zero mean inputs
    w = rng.standard_normal((16, 4)).astype(np.float32)
    mask = sp.nm_mask(w, keep=1, block=4, axis=0)
    without = ap.prune_layer(x, x @ w, w, mask, jnp.dot, iterations=300, lr=1e-2)
    with_bias = ap.prune_layer(x, x @ w, w, mask, jnp.dot, bias=True, iterations=300, lr=1e-2)
    assert with_bias.mse_after < without.mse_after
    assert np.any(with_bias.bias_delta != 0.0)


def test_absorb_mean_preserves_group_sums():
    rng = np.random.default_rng(2)
    for shape, M in (((3, 3, 8, 16), 4), ((3, 3, 3, 8), 4), ((20, 6), 8)):  # 27 and 20 rows: padding
        w = rng.standard_normal(shape).astype(np.float32)
        mask = sp.layer_mask(w, keep=M // 2, block=M, transposable=False)
        out = ap.absorb_mean(w, mask, block=M)
        assert out.shape == w.shape and np.all(out[~mask] == 0.0)
        gw, go = sp.gemm_matrix(w), sp.gemm_matrix(out)
        for start in range(0, gw.shape[0], M):
            np.testing.assert_allclose(go[start:start + M].sum(0), gw[start:start + M].sum(0), atol=1e-5)


def test_recalibrated_running_statistics_equal_batch_statistics(tiny_net, digits):
    x = digits.calib.x[:128]
    model, variables = tiny_net.model, tiny_net.variables
    new = ap.recalibrate_batchnorm(model, variables, x)
    train_mode, _ = model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    eval_mode = model.apply(new, jnp.asarray(x), train=False)
    np.testing.assert_allclose(np.asarray(eval_mode), np.asarray(train_mode), rtol=1e-4, atol=1e-4)
    old_eval = model.apply(variables, jnp.asarray(x), train=False)
    assert not np.allclose(np.asarray(old_eval), np.asarray(train_mode), atol=1e-3)


def test_adaprune_bad_arguments(tiny_net, digits):
    with pytest.raises(ValueError, match="calib is a whole Dataset; pass its calibration split, data.calib"):
        ap.adaprune(tiny_net, digits)
    with pytest.raises(ValueError, match="keep must satisfy"):
        ap.adaprune(tiny_net, digits.calib, keep=4, block=4)
    with pytest.raises(ValueError, match="unknown layer name"):
        ap.adaprune(tiny_net, digits.calib, layers=["nope"])
    with pytest.raises(ValueError, match="no layer to prune"):
        ap.adaprune(tiny_net, digits.calib, layers=[])
    with pytest.raises(ValueError, match="iterations=0 must be a positive integer"):
        ap.prune_layer(np.ones((4, 2)), np.ones((4, 2)), np.ones((2, 2)), np.ones((2, 2), bool), jnp.dot,
                       iterations=0)
    with pytest.raises(ValueError, match="bias_lr=nan must be a positive finite number"):
        ap.prune_layer(np.ones((4, 2)), np.ones((4, 2)), np.ones((2, 2)), np.ones((2, 2), bool), jnp.dot,
                       bias_lr=float("nan"))
    with pytest.raises(ValueError, match="boolean array of the kernel's shape"):
        ap.absorb_mean(np.ones((4, 2)), np.ones((4, 2)), block=2)
    with pytest.raises(ValueError, match="non-empty batch"):
        ap.adaprune(tiny_net, np.zeros((0, 8, 8, 1)))
    with pytest.raises(ValueError, match="calibration images must be finite; 64 of"):
        ap.adaprune(tiny_net, np.full((1, 8, 8, 1), np.nan))


def test_adaprune_checks_arguments_before_pruning(tiny_net, digits, monkeypatch):
    """A bad test split, image layout or Adam setting fails at once, not after every layer is pruned."""
    def no_work(*a, **kw):
        raise AssertionError("pruning started before the arguments were checked")

    monkeypatch.setattr(ap, "record_layers", no_work)
    monkeypatch.setattr(ap, "prune_layer", no_work)
    calib = digits.calib
    x = np.asarray(calib.x)
    cases = [
        ({"test": digits}, "test is a whole Dataset; pass its test split, data.test"),
        ({"test": digits.test.x}, "test must be a landscape.data.Split or an"),
        ({"test": (digits.test.x[:, :, :, 0], digits.test.y)}, r"test images have shape \(\d+, 8, 8\); the calibration "
                                                              r"images, and so the network, take \(N, 8, 8, 1\)"),
        ({"test": (digits.test.x, digits.test.y + 10)}, r"test: labels y must be in \[0, 10\)"),
        ({"lr": np.nan}, "lr=nan must be a positive finite number"),
        ({"iterations": 0}, "iterations=0 must be a positive integer"),
        ({"batch_size": 2.5}, "batch_size=2.5 must be a positive integer"),
        ({"dense_first_last": "no"}, "dense_first_last must be True or False"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            ap.adaprune(tiny_net, calib, **kw)
    # calibrating on test images (DESIGN: calibration data come from the training split)
    n_test = len(digits.test.x)
    with pytest.raises(ValueError, match=rf"{n_test} of the {n_test} calibration images are also test images"):
        ap.adaprune(tiny_net, digits.test, test=digits.test)
    mixed = (np.concatenate([x[:4], digits.test.x[5:9]]), np.concatenate([calib.y[:4], digits.test.y[5:9]]))
    with pytest.raises(ValueError, match="^4 of the 8 calibration images are also test images"):
        ap.adaprune(tiny_net, mixed, test=digits.test)
    few = (np.concatenate([x, digits.test.x[5:8]]), np.concatenate([calib.y, digits.test.y[5:8]]))
    with pytest.warns(UserWarning, match=rf"^3 of the {len(x) + 3} calibration images are also test images"), \
            pytest.raises(ValueError, match="no layer to prune"):  # warned, then stopped by the next check
        ap.adaprune(tiny_net, few, test=digits.test, layers=[])
    for bad in (x.reshape(len(x), -1), x.transpose(0, 3, 1, 2)):
        with pytest.raises(ValueError, match=rf"calibration images have shape {re.escape(str(bad.shape))}; this "
                                             r"network takes \(N, 8, 8, 1\)"):
            ap.adaprune(tiny_net, bad)
        with pytest.raises(ValueError, match=rf"calibration images have shape {re.escape(str(bad.shape))}, which "
                                             r"the network's variables do not fit \(images are NHWC"):
            ap.adaprune(dataclasses.replace(tiny_net, input_shape=None), bad)  # a network of unknown input shape
    with pytest.raises(ValueError, match="adaprune needs a trained network"):
        ap.adaprune(tiny_net.model, calib)


def test_adaprune_adds_the_fitted_bias_correction_to_a_dense_layer(digits):
    """The layer's new bias is its old one plus the fitted Δb: the dense network's output of the
    layer minus the pruned one's is then the MSE the report gives. (The CNN's convs have no
    bias; a dense layer between two others, as in an MLP, has one.)"""
    import landscape as ls
    import models

    net = ls.train.fit(models.create("mlp", num_classes=10, hidden=(16, 16)), digits, epochs=2)
    res = ap.adaprune(net, digits.calib, keep=1, block=4, iterations=200, lr=1e-2)
    [report] = res.layers
    assert report.name == "fc1"
    before, after = net.variables["params"], res.network.variables["params"]
    x = np.asarray(digits.calib.x, np.float64).reshape(len(digits.calib.x), -1)
    h = np.maximum(x @ np.asarray(before["fc0"]["kernel"]) + np.asarray(before["fc0"]["bias"]), 0.0)  # fc1's input
    dense = h @ np.asarray(before["fc1"]["kernel"]) + np.asarray(before["fc1"]["bias"])
    pruned = h @ np.asarray(after["fc1"]["kernel"]) + np.asarray(after["fc1"]["bias"])
    assert float(np.mean((pruned - dense) ** 2)) == pytest.approx(report.mse_after, rel=1e-4)
    assert report.mse_after < 0.5 * report.mse_before
    assert np.max(np.abs(np.asarray(after["fc1"]["bias"]) - np.asarray(before["fc1"]["bias"]))) > 0.1


def test_prune_layer_masks_the_start_and_takes_fewer_examples_than_a_batch():
    """A start given as ``init`` is masked (a dense init was kept as the result: a "pruned" layer
    with every weight), the MSE "before" is the magnitude mask's whatever the start, and a layer
    recorded on fewer examples than ``batch_size`` draws batches of all of them (a batch larger
    than the examples failed to draw without replacement)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((20, 16)).astype(np.float32)
    w = rng.standard_normal((16, 4)).astype(np.float32)
    mask = sp.nm_mask(w, keep=1, block=4, axis=0)
    fit = ap.prune_layer(x, x @ w, w, mask, jnp.dot, init=w, iterations=5)  # the dense kernel as the start
    assert np.all(fit.kernel[~mask] == 0.0)
    assert fit.mse_after <= fit.mse_before
    # "before" is the magnitude mask S ⊙ W whatever the start (not the absorb-mean start's MSE)
    start = ap.absorb_mean(w, mask, block=4)
    fit = ap.prune_layer(x, x @ w, w, mask, jnp.dot, init=start, iterations=5)
    assert fit.mse_before == pytest.approx(float(np.mean((x @ (w * mask) - x @ w) ** 2)), rel=1e-5)
    assert fit.mse_before != pytest.approx(float(np.mean((x @ start - x @ w) ** 2)), rel=1e-3)
    fit = ap.prune_layer(x, x @ w, w, mask, jnp.dot, iterations=50, lr=1e-2)  # batch_size 50 > 20 examples
    assert np.all(np.isfinite(fit.kernel)) and len(fit.history) == 10
    assert fit.mse_after < fit.mse_before


def test_adaprune_starts_from_absorb_mean_when_asked(tiny_net, digits, monkeypatch):
    """absorb_mean_init=True hands each layer's prune_layer the absorb-mean start of its kernel
    and mask (it was accepted and recorded in the config, and every layer started from S ⊙ W)."""
    calls = []
    real = ap.prune_layer

    def spy(x, y, kernel, mask, gemm, **kw):
        calls.append((np.asarray(kernel), np.asarray(mask), kw["init"]))
        return real(x, y, kernel, mask, gemm, **kw)

    monkeypatch.setattr(ap, "prune_layer", spy)
    res = ap.adaprune(tiny_net, digits.calib.x[:64], keep=2, block=4, iterations=5, absorb_mean_init=True,
                      recalibrate_bn=False)
    assert len(calls) == len(res.layers) == len(SPARSE)
    for kernel, mask, init in calls:
        assert init is not None
        np.testing.assert_array_equal(init, ap.absorb_mean(kernel, mask, block=4))
    assert res.network.config["adaprune"]["absorb_mean_init"] is True


def test_adaprune_reports_the_magnitude_baselines_of_the_masked_kernels(converted, tiny_net, digits):
    """Accuracy.magnitude and .magnitude_bn are those of S ⊙ W, the latter with BN re-estimated on
    the masked kernels (re-estimated on the dense kernels, the statistics were the dense
    network's, and the "magnitude + BN" baseline read 10 % instead of 58 %)."""
    from landscape import train

    masks = converted.network.variables["masks"]
    magnitude = {**tiny_net.variables, "masks": masks,
                 "params": sp.effective_params({"params": tiny_net.variables["params"], "masks": masks})}
    recipe = sp.Recipe(keep=1, block=4, transposable=False)

    def accuracy(variables):
        return train.Network(tiny_net.model, variables, {}, [], recipe).accuracy(digits.test)

    recalibrated = ap.recalibrate_batchnorm(tiny_net.model, magnitude, np.asarray(digits.calib.x, np.float32))
    assert converted.accuracy.magnitude == accuracy(magnitude)
    assert converted.accuracy.magnitude_bn == accuracy(recalibrated)
    assert converted.accuracy.magnitude_bn > converted.accuracy.magnitude + 0.05  # BN re-estimation helps


def test_prune_layer_adam_is_full_batch_adam_when_a_batch_holds_every_example():
    """With batch_size ≥ the examples every mini-batch is all of them (drawn without replacement),
    so the fit is plain full-batch Adam on the masked kernel, computed here independently with
    optax: the kernel, and the history (the full-set MSE after steps 5, 10, …, 50)."""
    import optax

    rng = np.random.default_rng(7)
    x = rng.standard_normal((20, 16)).astype(np.float32)
    w = rng.standard_normal((16, 4)).astype(np.float32)
    mask = sp.nm_mask(w, keep=1, block=4, axis=0)
    fit = ap.prune_layer(x, x @ w, w, mask, jnp.dot, iterations=50, lr=1e-2, batch_size=64)
    xj, y, m = jnp.asarray(x), jnp.asarray(x @ w), jnp.asarray(mask, jnp.float32)

    def mse(v):
        return jnp.mean(jnp.square(xj @ (v * m) - y))

    tx, v = optax.adam(1e-2), jnp.asarray(w) * m
    state, history = tx.init(v), []
    for step in range(50):
        u, state = tx.update(jax.grad(mse)(v), state, v)
        v = optax.apply_updates(v, u) * m
        if (step + 1) % 5 == 0:
            history.append(float(mse(v)))
    assert float(mse(v)) < 0.95 * fit.mse_before  # the Adam result is the one kept
    np.testing.assert_allclose(fit.kernel, np.asarray(v), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fit.history, history, rtol=1e-4)
    assert fit.mse_after == pytest.approx(history[-1], rel=1e-4)


def test_prune_layer_steps_the_kernel_at_lr_and_the_bias_at_bias_lr():
    """lr moves the kernel and bias_lr the bias correction: with lr = 1e-9 the kernel stays at
    S ⊙ W (within 100 steps of 1e-9) while the bias, at bias_lr = 0.05, absorbs the mean offset of
    the pruned outputs."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((64, 16)) + 1.0).astype(np.float32)
    w = rng.standard_normal((16, 4)).astype(np.float32)
    mask = sp.nm_mask(w, keep=1, block=4, axis=0)
    fit = ap.prune_layer(x, x @ w, w, mask, jnp.dot, bias=True, iterations=100, lr=1e-9, bias_lr=0.05)
    np.testing.assert_allclose(fit.kernel, w * mask, atol=1e-6)
    offset = np.mean(x @ w - x @ (w * mask), axis=0)  # the least-squares bias with the kernel fixed
    np.testing.assert_allclose(fit.bias_delta, offset, rtol=0.1, atol=0.05 * np.abs(offset).max())
    assert fit.mse_after < 0.9 * fit.mse_before


def test_prune_layer_never_returns_worse_than_the_magnitude_mask():
    """A start worse than S ⊙ W that Adam (lr 1e-8, 2 steps) cannot repair: the magnitude mask's
    kernel is kept, with its MSE (the result never does worse than magnitude pruning)."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((32, 16)).astype(np.float32)
    w = rng.standard_normal((16, 4)).astype(np.float32)
    mask = sp.nm_mask(w, keep=2, block=4, axis=0)
    fit = ap.prune_layer(x, x @ w, w, mask, jnp.dot, init=-w, iterations=2, lr=1e-8)
    np.testing.assert_array_equal(fit.kernel, w * mask)
    assert fit.mse_after == fit.mse_before


def test_adaprune_prunes_the_first_and_last_layers_when_asked(tiny_net, digits):
    res = ap.adaprune(tiny_net, digits.calib.x[:32], keep=2, block=4, iterations=2, dense_first_last=False,
                      recalibrate_bn=False)
    names = ["conv0_0", *SPARSE, "fc"]
    assert [r.name for r in res.layers] == names
    assert sorted(flat(res.network.variables["masks"])) == sorted(f"{n}/kernel" for n in names)
    assert res.network.recipe.dense_first_last is False
