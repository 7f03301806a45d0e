"""Grouped and depthwise convolutions (QuantConv(feature_group_count=g)) through every consumer of
conv kernels: the layer against flax.linen.Conv, MACs, ClipLoss (per-tensor and per-channel α,
bias correction, BN folding), calibration and LAPQ, the clip Hessian, export, GPTQ/AdaRound (per
group), CLE through depthwise layers, LUQ, K:M sparse training (plain K:M on any group count,
transposable where M divides Cout/g) and AdaPrune's refusal."""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
import models
from landscape import quantizers
from landscape.adaprune import adaprune
from landscape.gptq import gptq_layer
from landscape.layers import BatchNorm, QuantConv, QuantDense, QuantReLU, conv_general, feature_groups
from landscape.layerwise import layer_mse, record_layers


class GroupNet(nn.Module):
    """stem → conv → depthwise (g = 8) + BN → grouped (g = 2, biased) → pointwise → dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = QuantReLU(name="r1")(BatchNorm(name="bn1")(QuantConv(8, name="c1")(x), train))
        x = QuantReLU(name="r2")(BatchNorm(name="bn2")(QuantConv(8, name="c2")(x), train))
        x = QuantConv(8, strides=2, feature_group_count=8, name="dw")(x)
        x = QuantReLU(name="r3")(BatchNorm(name="dw_bn")(x, train))
        x = QuantReLU(name="r4")(QuantConv(12, feature_group_count=2, use_bias=True, name="gc")(x))
        x = QuantReLU(name="r5")(QuantConv(16, (1, 1), name="pw")(x))
        return QuantDense(10, name="fc")(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def group_net(digits):
    return ls.train.fit(GroupNet(), digits, epochs=8)


@pytest.mark.parametrize("groups,c_in,features,kw", [
    (2, 6, 4, {}),
    (6, 6, 6, {"strides": 2}),                  # depthwise
    (6, 6, 12, {"padding": "SAME", "strides": (2, 1)}),  # depthwise, channel multiplier 2
    (3, 6, 9, {"kernel_size": (1, 3), "padding": "VALID", "use_bias": True}),
])
def test_grouped_conv_equals_flax_conv(groups, c_in, features, kw):
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, c_in))
    ours = QuantConv(features, feature_group_count=groups, **kw)
    variables = ours.init(jax.random.key(1), x)
    kernel = variables["params"]["kernel"]
    ks = kw.get("kernel_size", (3, 3))
    assert kernel.shape == (*ks, c_in // groups, features)
    flax_kw = {"padding": kw.get("padding", [(k // 2, k // 2) for k in ks]), "strides": kw.get("strides", 1),
               "use_bias": kw.get("use_bias", False)}
    theirs = nn.Conv(features, ks, feature_group_count=groups, **flax_kw)
    params = {"kernel": kernel}
    if flax_kw["use_bias"]:
        params["bias"] = jax.random.normal(jax.random.key(2), (features,))
    with jax.default_matmul_precision("highest"):
        got = ours.apply({"params": params}, x)
        want = theirs.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    # the product carries its group count; ordinary products stay the one cached callable
    assert feature_groups(conv_general((1, 1), ((1, 1), (1, 1)), groups)) == groups
    assert conv_general((1, 1), ((1, 1), (1, 1))) is conv_general((1, 1), ((1, 1), (1, 1)), 1)
    assert feature_groups(conv_general((1, 1), ((1, 1), (1, 1)))) == 1


def test_group_count_errors():
    with pytest.raises(ValueError, match=r"feature_group_count=3 does not divide features=8"):
        QuantConv(8, feature_group_count=3)
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"feature_group_count=.* is not allowed; allowed: a positive int"):
            QuantConv(8, feature_group_count=bad)
    layer = QuantConv(6, feature_group_count=3, name="g3")
    with pytest.raises(ValueError, match=r"QuantConv 'g3': feature_group_count=3 must divide both the input "
                                         r"channels \(C_in=4\) and features \(C_out=6\)"):
        layer.init(jax.random.key(0), jnp.zeros((1, 5, 5, 4)))


@pytest.mark.filterwarnings("ignore:weight_sensitivity")
def test_grouped_macs_and_bops(group_net, digits):
    all_sites, pairs = ls.sites_of(group_net.model, group_net.variables, digits.calib.x[:1])
    macs = {s.name: s.macs for s in all_sites if s.kind == "weight"}
    # out_h · out_w · kh · kw · (C_in / g) · C_out
    assert macs["dw"] == 4 * 4 * 3 * 3 * (8 // 8) * 8
    assert macs["gc"] == 4 * 4 * 3 * 3 * (8 // 2) * 12
    assert macs["c2"] == 8 * 8 * 3 * 3 * 8 * 8
    assert ("dw", "dw_bn", 1e-5) in pairs
    loss = ls.ClipLoss(group_net, digits.calib, w_bits=4, a_bits=None)
    sens = ls.weight_sensitivity(loss, bits=(4, 8), num_probes=4, seed=0)  # MACs only: few probes
    assert {"dw", "gc"} <= set(sens.sites)
    assert dict(zip(sens.sites, sens.macs.tolist(), strict=True)) == {n: macs[n] for n in sens.sites}
    assert sens.bops(dict.fromkeys(sens.sites, 8), a_bits=4) == sum(macs[n] * 8 * 4 for n in sens.sites)


@pytest.mark.parametrize("hvp", ["linearize", "recompute"])
def test_weight_spectrum_of_grouped_convs_in_probe_blocks(group_net, digits, hvp):
    """HVPs in blocks (probe_batch > 1, the default on accelerators) of a grouped network whose data
    sit on a mesh: JAX cannot vmap the grouped kernels' gradient there (NotImplementedError; it
    failed weight_sensitivity on an H200), so the block runs row by row, with the same probes
    giving the same trace, per leaf too, and the same density as one vector at a time."""
    from landscape.spectrum import hessian_spectrum

    loss = ls.ClipLoss(group_net, digits.calib, w_bits=4, a_bits=None)
    kw = dict(top_k=1, trace=True, num_probes=6, density=True, density_runs=2, density_steps=8, seed=3, hvp=hvp)
    one, block = (hessian_spectrum(loss.weight_loss(None), loss.variables["params"], probe_batch=b, **kw)
                  for b in (1, 2))
    assert one.n_hvp == block.n_hvp and one.info["hvp"] == block.info["hvp"] == hvp
    assert block.trace == pytest.approx(one.trace, rel=1e-5)
    np.testing.assert_allclose(jax.tree.leaves(block.trace_per_leaf), jax.tree.leaves(one.trace_per_leaf),
                               rtol=1e-4, atol=1e-6 * abs(one.trace))
    np.testing.assert_allclose(block.density[1], one.density[1], rtol=1e-4, atol=1e-6 * one.density[1].max())


def _quantized(w, alpha, bits, grid, correct):
    w_hat = quantizers.quantize(w, alpha, bits, grid)
    return w_hat - quantizers.bias_shift(w_hat, w) if correct else w_hat


@pytest.mark.parametrize("per_channel,bias_correction", [(False, False), (True, False), (True, True)])
def test_clip_loss_quantizes_grouped_kernels_as_a_hand_forward(group_net, digits, per_channel, bias_correction):
    """Weights only (activations FP32), BN folded into the depthwise conv: ClipLoss's logits are
    the float network's with each kernel quantized by hand (per output channel: the last axis)."""
    x = digits.test.x[:64]
    loss = ls.ClipLoss(group_net, digits.calib, w_bits=4, a_bits=None, per_channel=per_channel,
                       bias_correction=bias_correction, fold_bn=True)
    names = [s.name for s in loss.sites]
    assert {"dw", "gc"} <= set(names)
    with jax.default_matmul_precision("highest"):
        float_logits = group_net.model.apply(group_net.variables, x)
        folded = group_net.model.apply({**group_net.variables, "params": loss.params,
                                        "batch_stats": loss.variables["batch_stats"]}, x)
    np.testing.assert_allclose(np.asarray(folded), np.asarray(float_logits), atol=2e-5 * np.abs(float_logits).max())
    alpha = np.asarray(loss.init("mse"))
    sizes = {s.name: (s.channels if per_channel else 1) for s in loss.sites}
    assert sizes["dw"] == (8 if per_channel else 1) and len(alpha) == sum(sizes.values())
    params = jax.tree.map(lambda a: a, flax.core.unfreeze(loss.params))
    for name, sl in loss.site_slices().items():
        a = jnp.asarray(alpha[sl])
        params[name]["kernel"] = _quantized(params[name]["kernel"], a if per_channel else a[0], 4,
                                            loss.specs[name].grid, bias_correction)
    with jax.default_matmul_precision("highest"):
        want = group_net.model.apply({"params": params, "batch_stats": loss.variables["batch_stats"]}, x)
    got = loss.logits(alpha, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_lapq_hessian_and_export_on_grouped_layers(group_net, digits, tmp_path):
    loss = ls.ClipLoss(group_net, digits.calib, w_bits=4, a_bits=4)
    fp32 = ls.ClipLoss(group_net, digits.calib, w_bits=16, a_bits=16)
    # at 16 bits with max clipping the quantized network is the float one (to a few 1e-4 of the loss)
    float_loss = float(np.mean(np.asarray(
        jax.nn.log_softmax(group_net.apply(digits.calib.x))[np.arange(len(digits.calib.y)), digits.calib.y])))
    assert float(fp32(fp32.init("max"))) == pytest.approx(-float_loss, rel=1e-3, abs=1e-4)
    init = np.asarray(loss.init("mse"))
    res = ls.lapq(loss, p_grid=(2.0, 3.0, 4.0), maxiter=1)
    assert np.isfinite(res.loss) and res.loss <= float(loss(res.init_alpha)) + 1e-6
    H = ls.clip_hessian(loss, init)
    assert H.shape == (loss.n, loss.n) and np.allclose(H, H.T)
    dw = loss.site_slices()["dw"]
    assert np.all(np.diag(H)[dw] >= 0) and np.any(np.diag(H)[dw] > 0)
    qnet = ls.export.quantize_network(loss, res.alpha)
    acc = loss.accuracy(res.alpha, digits.test)
    assert qnet.accuracy(digits.test) == pytest.approx(acc, abs=1e-9)
    assert qnet.codes["dw"].shape == (3, 3, 1, 8) and qnet.codes["gc"].shape == (3, 3, 4, 12)
    ls.export.save(qnet, str(tmp_path / "q"))
    back = ls.export.load(group_net.model, str(tmp_path / "q"))
    assert back.accuracy(digits.test) == pytest.approx(acc, abs=1e-9)


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_rounding_fits_each_group_and_beats_round_to_nearest(group_net, digits, method):
    """The grouped layers are rounded group by group; the layer's output MSE, measured with its own
    grouped product on the recorded float inputs, is what the fit reports and at most nearest's."""
    loss = ls.ClipLoss(group_net, digits.calib, w_bits=3, a_bits=None, per_channel=True)
    alpha = loss.init("mse")
    kw = {"iterations": 200} if method == "adaround" else {}
    result = getattr(ls, method)(loss, alpha, num_images=64, inputs="float", **kw)
    x = jnp.asarray(digits.calib.x[ls.data.spread_rows(len(digits.calib.x), 64)])  # the images recorded
    io = record_layers(loss.model, loss.variables, x, ["dw", "gc"])
    improved = 0
    for name in ("dw", "gc"):
        fit, site = result.layers[name], result.network.sites[name]
        X, Y, gemm = io[name]
        assert feature_groups(gemm) == (8 if name == "dw" else 2)
        w = np.asarray(fit.codes, np.float64) * site.scale + site.offset
        near = np.asarray(result.nearest.codes[name], np.float64) * site.scale + site.offset
        with jax.default_matmul_precision("highest"):
            mse = layer_mse(gemm, X, Y, jnp.asarray(w, jnp.float32))
            mse_near = layer_mse(gemm, X, Y, jnp.asarray(near, jnp.float32))
        assert mse == pytest.approx(fit.mse, rel=1e-4) and mse_near == pytest.approx(fit.mse_nearest, rel=1e-4)
        assert mse <= mse_near * (1 + 1e-6)
        improved += mse < 0.99 * mse_near
    assert improved >= 1
    acc = result.network.accuracy(digits.test)
    assert acc >= result.nearest.accuracy(digits.test) - 0.05


def test_gptq_layer_refuses_a_grouped_product_given_directly():
    gemm = conv_general((1, 1), ((1, 1), (1, 1)), 4)
    x = np.ones((2, 5, 5, 4), np.float32)
    w = np.ones((3, 3, 1, 4), np.float32)
    with pytest.raises(ValueError, match=r"grouped convolution \(feature_group_count=4, kernel \(3, 3, 1, 4\)\)"):
        gptq_layer(x, gemm(x, w), w, 0.1, 0.0, -4, 3, gemm)


def test_equalization_through_depthwise_and_grouped_layers(group_net, digits):
    x = digits.calib.x[:32]
    result = ls.equalization.cross_layer_equalization(group_net.model, group_net.variables, x)
    # DFQ's conv → depthwise → grouped → pointwise chain: every pair is equalized
    assert set(result.pairs) == {("c1", "c2"), ("c2", "dw"), ("dw", "gc"), ("gc", "pw")}
    assert not result.rejected
    folded = ls.folding.fold_batchnorm(group_net.model, group_net.variables, jnp.asarray(x[:1]))
    with jax.default_matmul_precision("highest"):
        before = np.asarray(group_net.model.apply(folded, x))
        after = np.asarray(group_net.model.apply(result.variables, x))
    np.testing.assert_allclose(after, before, atol=1e-4 * np.abs(before).max())
    p = result.variables["params"]

    def input_ranges(kernel, groups):  # range of input channel i = j·k + r over group j's outputs
        kernel = np.abs(np.asarray(kernel))
        k, c_out = kernel.shape[-2:]
        g = kernel.reshape(-1, k, groups, c_out // groups).max(axis=(0, 3))  # (k, groups)
        return g.T.reshape(-1)

    for a, b, g in (("c2", "dw", 8), ("dw", "gc", 2), ("gc", "pw", 1)):
        r_a = np.abs(np.asarray(p[a]["kernel"])).max(axis=(0, 1, 2))
        np.testing.assert_allclose(r_a, input_ranges(p[b]["kernel"], g), rtol=1e-3)
    # the depthwise kernel's channel ranges moved (it was rescaled on both sides)
    assert not np.allclose(np.abs(np.asarray(p["dw"]["kernel"])).max(axis=(0, 1, 2)),
                           np.abs(np.asarray(folded["params"]["dw"]["kernel"])).max(axis=(0, 1, 2)), rtol=1e-2)


def test_luq_products_and_training_on_grouped_layers(digits):
    gemm = conv_general((1, 1), ((1, 1), (1, 1)), 2)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 2, 6))
    z = ls.luq.luq_gemm(x, w, jax.random.key(2), gemm)
    want = nn.Conv(6, (3, 3), padding=1, feature_group_count=2, use_bias=False).apply(
        {"params": {"kernel": ls.luq.sawb(w, signed=True)}}, ls.luq.sawb(x))
    np.testing.assert_allclose(np.asarray(z), np.asarray(want), rtol=1e-5, atol=1e-5)
    # 4-bit forward and FP4 backward through the grouped layers: it learns
    net = ls.train.fit(GroupNet(), digits, epochs=4, recipe=ls.luq.Recipe(finetune_epochs=0))
    losses = [h["train_loss"] for h in net.history]
    assert losses[-1] < 0.9 * losses[0] and net.accuracy(digits.test) > 0.3


def test_adaprune_refuses_grouped_layers(group_net, digits):
    with pytest.raises(ValueError, match=r"adaprune: layer 'gc' is a grouped convolution .*layers=\["):
        adaprune(group_net, digits.calib, keep=2, block=4, layers=["gc", "pw"], iterations=1)
    layers = {layer.name: layer.groups for layer in ls.sparsity.gemm_layers(group_net.model, group_net.variables,
                                                                            digits.calib.x[:1])}
    assert layers == {"c1": 1, "c2": 1, "dw": 8, "gc": 2, "pw": 1, "fc": 1}
    # the ungrouped layers of the same network still prune
    res = adaprune(group_net, digits.calib, keep=2, block=4, layers=["pw"], iterations=5,
                               recalibrate_bn=False)
    assert res is not None


def _group_rows_are_nm(mask, groups, keep, block):
    """Every row of the GEMM matrix, restricted to one group's columns, K:M in consecutive blocks of M
    columns: the mask the backward data gradient of each input channel of that group sees."""
    m = ls.sparsity.gemm_matrix(mask)
    per = m.shape[1] // groups
    blocks = m.reshape(m.shape[0], groups, per // block, block)
    return bool(np.all(blocks.sum(-1) <= keep))


def _masks(net):
    flat = flax.traverse_util.flatten_dict(net.variables["masks"])
    return {"/".join(path[:-1]): np.asarray(mask) for path, mask in flat.items()}


def test_sparse_recipe_on_grouped_layers(digits):
    """Plain K:M masks any grouped conv, depthwise included (each output channel's reduction is a
    column of the GEMM matrix); a transposable mask needs M | Cout/g and is refused otherwise, naming
    the layer and both ways out; ``layers=`` leaves the others dense."""
    with pytest.raises(ValueError, match=r"layer 'dw' is a grouped convolution \(feature_group_count=8, kernel "
                                         r"\(3, 3, 1, 8\)\) with Cout/g = 1 output channels per group; a transposable "
                                         r"K:M mask needs block=4 to divide Cout/g.*transposable=False.*layers="):
        ls.train.fit(GroupNet(), digits, epochs=1, recipe=ls.sparsity.Recipe(keep=2, block=4), cache=False)
    with pytest.raises(ValueError, match=r"layer 'gc' .* Cout/g = 6 output channels per group.*block=4"):
        ls.train.fit(GroupNet(), digits, epochs=1, recipe=ls.sparsity.Recipe(keep=2, block=4, layers=("gc",)),
                     cache=False)

    plain = ls.train.fit(GroupNet(), digits, epochs=2, cache=False,
                         recipe=ls.sparsity.Recipe(keep=2, block=4, transposable=False, update_every=5))
    masks = _masks(plain)
    assert sorted(masks) == ["c2", "dw", "gc", "pw"]
    for name, mask in masks.items():  # K of every M along each output channel's reduction (dw: its 9 taps)
        assert ls.sparsity.is_nm(ls.sparsity.gemm_matrix(mask), keep=2, block=4, axis=0), name
    assert masks["dw"].sum() == 8 * (2 + 2 + 1)  # 9 taps: blocks of 4, 4 and a padded 1
    # the network computes with the masks: zeroing the pruned weights by hand changes no logit
    x = jnp.asarray(digits.test.x[:16])
    pruned = ls.sparsity.apply_masks(plain)
    np.testing.assert_allclose(plain.apply(x), pruned.apply(x), rtol=1e-5, atol=1e-5)
    assert plain.accuracy(digits.test) > 0.3

    recipe = ls.sparsity.Recipe(keep=1, block=2, layers=["gc", "pw"], update_every=5)
    assert recipe.layers == ("gc", "pw") and "layers=('gc', 'pw')" in repr(recipe)
    assert "layers" not in repr(ls.sparsity.Recipe())  # the cache keys of earlier networks stay the same
    trans = ls.train.fit(GroupNet(), digits, epochs=2, cache=False, recipe=recipe)
    masks = _masks(trans)
    assert sorted(masks) == ["gc", "pw"]
    assert ls.sparsity.is_transposable(ls.sparsity.gemm_matrix(masks["gc"]), keep=1, block=2)
    assert _group_rows_are_nm(masks["gc"], groups=2, keep=1, block=2)
    for bad in ([], "", [3], 7):
        with pytest.raises(ValueError, match="layers must be None or a non-empty sequence of layer names"):
            ls.sparsity.Recipe(layers=bad)


def test_ordinary_convs_are_unchanged():
    """g = 1: the same program as before (no feature_group_count), the same kernel, the same sites."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    layer = QuantConv(5, strides=2)
    variables = layer.init(jax.random.key(1), x)
    assert variables["params"]["kernel"].shape == (3, 3, 3, 5)
    got = layer.apply(variables, x)
    want = jax.lax.conv_general_dilated(x, variables["params"]["kernel"], (2, 2), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    model = models.create("resnet8", num_classes=10)
    assert "feature_group_count" not in repr(model)  # the zoo's reprs (cache keys) are the same
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1, :, :, :1]))
    all_sites, _ = ls.sites_of(model, variables, x[:1, :, :, :1])
    stages = ((3 * 3 * 1 * 16 + 2 * 3 * 3 * 16 * 16) * 8 * 8, (3 * 3 * 16 * 32 + 3 * 3 * 32 * 32 + 16 * 32) * 4 * 4,
              (3 * 3 * 32 * 64 + 3 * 3 * 64 * 64 + 32 * 64) * 2 * 2)
    assert sum(s.macs for s in all_sites if s.kind == "weight") == sum(stages) + 64 * 10
