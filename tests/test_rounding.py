"""The layer-wise rounding machinery that AdaRound and GPTQ share: the quadratic form of a
layer's reconstruction error, and round_network driving a rule of one's own."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
from landscape.rounding import RoundingFit, input_statistics, keep_better, round_network


def test_input_statistics_give_the_reconstruction_error_of_a_conv():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(6, 7, 7, 3)), jnp.float32)
    w, w2 = (jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32) for _ in range(2))

    def conv(inputs, kernel, groups=1):
        return jax.lax.conv_general_dilated(inputs, kernel, (2, 2), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=groups, precision="highest")

    y = conv(x, w)
    G, B, t = input_statistics(x, y, w.shape, conv, chunk=4)  # two chunks
    wm = np.asarray(w2, np.float64).reshape(27, 4)
    quadratic = float(np.sum(wm * (G @ wm - 2.0 * B)) + t)
    direct = float(np.mean(np.sum(np.square(np.asarray(conv(x, w2)) - np.asarray(y)), axis=-1)))
    assert quadratic == pytest.approx(direct, rel=1e-4)
    # a grouped convolution is not P · W: refused
    wg = jnp.ones((3, 3, 1, 3))
    with pytest.raises(ValueError, match="grouped"):
        input_statistics(x, conv(x, wg, 3), wg.shape, lambda a, b: conv(a, b, 3))


def test_round_network_drives_a_rule_of_ones_own(tiny_net, digits):
    """A new rule is one function: here round-to-nearest, then every code pushed one level up
    (clipped): the first reproduces the loss's own network, the second reconstructs worse, so
    every layer keeps nearest."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=3, a_bits=4)
    alpha = loss.init("mse")
    calls = []

    def nearest_rule(x, y, kernel, scale, offset, lo, hi, gemm):
        calls.append(x.shape)
        codes = jnp.clip(jnp.round((jnp.asarray(kernel) - offset) / scale), lo, hi)
        return keep_better(x, y, gemm, codes, codes, scale, offset)

    def shifted_rule(x, y, kernel, scale, offset, lo, hi, gemm):
        nearest = jnp.clip(jnp.round((jnp.asarray(kernel) - offset) / scale), lo, hi)
        return keep_better(x, y, gemm, jnp.clip(nearest + 1, lo, hi), nearest, scale, offset)

    same = round_network(loss, alpha, nearest_rule, method="nearest", num_images=32)
    weights = [s.name for s in loss.sites if s.kind == "weight"]
    assert same.method == "nearest" and list(same.layers) == weights and len(calls) == len(weights)
    assert all(shape[0] == 32 for shape in calls)  # num_images calibration images
    for name in weights:
        np.testing.assert_array_equal(same.network.codes[name], same.nearest.codes[name])
        assert isinstance(same.layers[name], RoundingFit) and same.layers[name].flipped == 0.0

    worse = round_network(loss, alpha, shifted_rule, method="shifted", num_images=32, inputs="float")
    assert not any(f.kept for f in worse.layers.values())
    for name in weights:
        np.testing.assert_array_equal(worse.network.codes[name], worse.nearest.codes[name])
    # nearest kept everywhere is the loss's own network, to the last bit of every logit
    x = digits.test.x[:359]
    np.testing.assert_array_equal(np.asarray(worse.network.apply(x)), np.asarray(loss.logits(alpha, x)))
    with pytest.raises(ValueError, match="num_images=0"):
        round_network(loss, alpha, nearest_rule, method="nearest", num_images=0)
    n = loss.n_calib
    with pytest.raises(ValueError, match=f"num_images={n + 1} exceeds the loss's {n} calibration images"):
        round_network(loss, alpha, nearest_rule, method="nearest", num_images=n + 1)
    calls.clear()
    small = loss.with_options(calib=(digits.calib.x[:48], digits.calib.y[:48]))
    round_network(small, alpha, nearest_rule, method="nearest")  # default: 256, or all 48 when fewer
    assert {shape[0] for shape in calls} == {48}


def test_rounded_kernels_are_the_loss_grid_values_of_their_codes(tiny_net, digits):
    """GPTQ's kernels are formed as the loss's quantizer forms grid values (a fused multiply-add),
    so re-quantizing them through the loss gives them back to the last bit; NumPy's Δ·q + offset
    put hundreds of entries per layer an ulp off the grid, and later layers were fitted on those."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    alpha = loss.init("mse")
    res = ls.gptq(loss, alpha, num_images=64, inputs="float")
    again = ls.export.grid_weights(loss, alpha, res.network.variables)
    changed = 0
    for name, codes in res.network.codes.items():
        node = res.network.variables["params"]
        for part in name.split("/"):
            node = node[part]
        np.testing.assert_array_equal(np.asarray(again[name][0]), np.asarray(node["kernel"]), err_msg=name)
        changed += int(np.sum(codes != res.nearest.codes[name]))
    assert changed > 100  # GPTQ moved codes, so these kernels are not nearest's


def test_round_network_names_what_it_was_given(tiny_net, digits):
    """A Network for the loss failed with an AttributeError ('precision'), a LAPQResult for α with
    NumPy's "float() argument must be ... not 'LAPQResult'"."""
    def rule(*args):
        raise AssertionError("not reached")

    with pytest.raises(ValueError, match=r"gptq needs a ClipLoss, got a Network; build one from the trained "
                                         r"network: ls.ClipLoss\(net, data.calib"):
        round_network(tiny_net, np.ones(6, np.float32), rule, method="gptq")
    for name, public in (("gptq", ls.gptq), ("adaround", ls.adaround)):  # they read loss.precision first
        with pytest.raises(ValueError, match=rf"{name} needs a ClipLoss, got a Network; build one"):
            public(tiny_net, np.ones(6, np.float32))
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    alpha = np.asarray(loss.init("max"))
    res = importlib.import_module("landscape.lapq").LAPQResult(alpha, 1.0, "batched", None, alpha, 1.0, 1, 0.0, [],
                                                                 False, "")
    for run in (lambda: round_network(loss, res, rule, method="adaround"), lambda: ls.gptq(loss, res)):
        with pytest.raises(ValueError, match=r"alpha must be an \(n,\) array of clipping values; got a LAPQResult "
                                             r"— pass its clipping vector, res.alpha"):
            run()


def test_nearest_codes_round_ties_to_even_as_the_loss_quantizer():
    """nearest_codes is the loss's round-to-nearest (half to even): rounding ties up (⌊z + ½⌋) gave
    a "nearest" that was not the loss's own quantization for weights sitting on a tie, so a layer
    that kept nearest ran other weights than the loss."""
    from landscape import quantizers
    from landscape.rounding import nearest_codes

    alpha, scale, offset = 1.75, 0.5, -1.75  # 3-bit midrise: Δ = 2α/7 = 0.5 exactly
    z = np.array([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 0.25, 6.75, 9.0, -2.0], np.float32)
    w = (z * scale + offset).astype(np.float32)  # exact: every tie is a tie in float32
    codes = np.asarray(nearest_codes(w, np.float32(scale), np.float32(offset), np.float32(0), np.float32(7)))
    np.testing.assert_array_equal(codes, [0, 2, 2, 4, 4, 6, 6, 0, 7, 7, 0])
    np.testing.assert_array_equal(codes * scale + offset, np.asarray(quantizers.quantize(w, alpha, 3, "midrise")))


def test_keep_better_reports_the_rounding_it_keeps():
    """When a rule's codes reconstruct worse, the fit holds nearest's codes and must describe them:
    its mse was the rejected codes' (above mse_nearest) and its flipped fraction the rejected
    codes' changes, though the network runs nearest. Codes equal to nearest count as kept."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    w = rng.normal(size=(6, 3)).astype(np.float32)
    y = x @ w
    scale, offset, gemm = np.float32(0.5), np.float32(-1.75), (lambda a, b: a @ b)
    nearest = np.asarray(jnp.clip(jnp.round((w - offset) / scale), 0, 7))
    worse = np.clip(nearest + 1, 0, 7)

    def mse(codes):
        return float(np.mean((x.astype(np.float64) @ (codes * scale + offset) - y) ** 2))

    assert mse(worse) > 2 * mse(nearest)
    fit = keep_better(x, y, gemm, worse, nearest, scale, offset)
    assert not fit.kept and fit.codes.dtype == np.int32
    np.testing.assert_array_equal(fit.codes, nearest)
    assert fit.flipped == 0.0
    assert fit.mse == fit.mse_nearest == pytest.approx(mse(nearest), rel=1e-5)
    # the other way round: the rule's codes win, and the flipped fraction counts their changes
    fit = keep_better(x, y, gemm, nearest, worse, scale, offset)
    assert fit.kept and fit.flipped == pytest.approx(np.mean(nearest != worse))
    assert fit.mse == pytest.approx(mse(nearest), rel=1e-5) and fit.mse_nearest == pytest.approx(mse(worse), rel=1e-5)
    # a rule that reproduces nearest did not reconstruct worse: it is kept
    same = keep_better(x, y, gemm, nearest, nearest, scale, offset)
    assert same.kept and same.flipped == 0.0 and same.mse == same.mse_nearest


def test_quantized_inputs_come_from_the_network_rounded_so_far(tiny_net, digits):
    """inputs="quantized" fits each layer on its input in the network rounded so far (earlier
    layers at their codes, activations at α), not on the float kernels' network with quantized
    activations: the latter drops the error the earlier layers' rounding left. The target is the
    float network's output of the layer (asymmetric reconstruction), not the float kernel applied
    to the quantized input, which leaves nothing to correct."""
    from landscape.layerwise import layer_inputs
    from landscape.sites import SiteSpec

    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=2, a_bits=4)
    alpha = loss.init("mse")
    seen = []

    def nearest_rule(x, y, kernel, scale, offset, lo, hi, gemm):
        seen.append((np.asarray(x), np.asarray(y), np.asarray(kernel), gemm))
        codes = jnp.clip(jnp.round((jnp.asarray(kernel) - offset) / scale), lo, hi)
        return keep_better(x, y, gemm, codes, codes, scale, offset)

    res = round_network(loss, alpha, nearest_rule, method="nearest", num_images=32)
    names = list(res.layers)
    act = {n: s for n, s in res.network.sites.items() if s.kind == "activation"}
    specs = {n: SiteSpec(s.bits, s.grid) for n, s in act.items()}
    alphas = {n: float(s.alpha[0]) for n, s in act.items()}
    x = jnp.asarray(digits.calib.x[ls.data.spread_rows(len(digits.calib.x), 32)])  # the images recorded
    rounded = layer_inputs(loss.model, names, specs, alphas)(res.network.variables, x)
    with_float_kernels = layer_inputs(loss.model, names, specs, alphas)(loss.variables, x)
    float_network = layer_inputs(loss.model, names, {}, {})(loss.variables, x)
    assert len(seen) == len(names)
    for name, (xq, y, kernel, gemm) in zip(names, seen, strict=True):
        np.testing.assert_allclose(xq, np.asarray(rounded[name]), rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(y, np.asarray(gemm(float_network[name], kernel)), rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    last = names[-1]
    assert np.max(np.abs(np.asarray(rounded[last]) - np.asarray(with_float_kernels[last]))) > 1e-2
    assert np.max(np.abs(np.asarray(rounded[last]) - np.asarray(float_network[last]))) > 1e-2
