"""Cross-layer equalization: the function is unchanged, the paired channel ranges end equal,
and exactly the pairs without another reader of their activation are equalized."""

from __future__ import annotations

import dataclasses
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
import models
from landscape.equalization import cross_layer_equalization
from landscape.layers import BatchNorm, QuantConv, QuantDense, QuantReLU


class SidePath(nn.Module):
    """conv → BN(conv) + ``weight``·conv → ReLU → dense: the conv's output has a second reader
    besides its BN, so folding the BN would change what that side path sees."""

    weight: float = 0.1

    @nn.compact
    def __call__(self, x, train=False):
        y = QuantConv(4, name="conv")(x)
        h = QuantReLU(name="relu")(BatchNorm(name="bn")(y, train) + self.weight * y)
        return QuantDense(10, name="fc")(jnp.mean(h, axis=(1, 2)))


def ranges(kernel, axis):
    axes = tuple(i for i in range(kernel.ndim) if i != axis % kernel.ndim)
    return np.max(np.abs(np.asarray(kernel)), axis=axes)


@pytest.fixture(scope="module")
def resnet20():
    model = models.create("resnet20", num_classes=10)
    x = jax.random.normal(jax.random.key(1), (16, 12, 12, 3))
    variables = model.init(jax.random.key(0), x[:1])
    # Every parameter nonzero (the initialisation zeroes the classifier and the blocks' last BN
    # scales, which would hide any change of the function) and BN statistics away from the
    # identity, so that folding moves the kernels.
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(2), len(leaves) + 1)
    noisy = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=False)]
    params = jax.tree.unflatten(tree, noisy)
    stats = jax.tree.map(lambda v: v + jax.random.uniform(keys[-1], v.shape, minval=0.2, maxval=1.5),
                         variables["batch_stats"])
    return model, {"params": params, "batch_stats": stats}, x


def test_equalization_keeps_the_function_and_balances_the_pairs(resnet20):
    model, variables, x = resnet20
    eq = cross_layer_equalization(model, variables, x[:8])
    # Exactly the in-block pairs conv1 → conv2: every other candidate feeds a skip connection too.
    blocks = [f"layer{s}_{b}" for s in (1, 2, 3) for b in range(3)]
    assert eq.pairs == tuple((f"{blk}/conv1", f"{blk}/conv2") for blk in blocks)
    assert len(eq.rejected) > 0 and all(p not in eq.pairs for p in eq.rejected)
    # Same logits on inputs the search never saw, within float rounding.
    before = model.apply(variables, x[8:], train=False)
    after = model.apply(eq.variables, x[8:], train=False)
    scale = float(jnp.abs(before).max())
    assert scale > 0.1
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-4, atol=1e-4 * scale)
    assert eq.max_logit_change < 1e-4 * scale
    # Each equalized channel has the same range in both kernels, and the ranges did change.
    folded = ls.folding.fold_batchnorm(model, variables, x[:1])
    for a, b in eq.pairs:
        pa, pb = eq.variables["params"], folded["params"]
        ka = pa[a.split("/")[0]][a.split("/")[1]]["kernel"]
        kb = pa[b.split("/")[0]][b.split("/")[1]]["kernel"]
        np.testing.assert_allclose(ranges(ka, -1), ranges(kb, -2), rtol=1e-5)
        ka0 = pb[a.split("/")[0]][a.split("/")[1]]["kernel"]
        np.testing.assert_allclose(ranges(ka, -1) * eq.scales[(a, b)], ranges(ka0, -1), rtol=1e-5)
        assert np.std(np.log(eq.scales[(a, b)])) > 0.05
    assert "pairs" in repr(eq)


def test_equalized_network_quantizes_through_clip_loss(tiny_net, digits):
    eq = cross_layer_equalization(tiny_net.model, tiny_net.variables, digits.calib.x[:32])
    # The cnn's chain conv → BN → ReLU (→ max-pool) → conv: the pair across the pooling counts,
    # a per-channel positive scale passes max-pooling as it passes ReLU.
    assert eq.pairs == (("conv0_0", "conv0_1"), ("conv0_1", "conv1_0"), ("conv1_0", "conv1_1"))
    before = tiny_net.model.apply(tiny_net.variables, digits.calib.x[32:96], train=False)
    after = tiny_net.model.apply(eq.variables, digits.calib.x[32:96], train=False)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(before).max()))
    net = dataclasses.replace(tiny_net, variables=eq.variables)
    loss = ls.ClipLoss(net, digits.calib, w_bits=8, a_bits=None)
    folded = ls.ClipLoss(tiny_net, digits.calib, w_bits=8, a_bits=None, fold_bn=True)
    # At 8 bits quantization barely matters: both losses are the FP32 network's.
    assert float(loss(loss.init("max"))) == pytest.approx(float(folded(folded.init("max"))), rel=2e-2)


def test_equalization_errors(resnet20):
    model, variables, x = resnet20
    with pytest.raises(ValueError, match="tol=0"):
        cross_layer_equalization(model, variables, x, tol=0)
    with pytest.raises(ValueError, match="max_rounds=0"):
        cross_layer_equalization(model, variables, x, max_rounds=0)
    with pytest.raises(ValueError, match="variables must be the network's variables"):
        cross_layer_equalization(model, variables["params"], x)
    with pytest.raises(ValueError, match=r"non-empty batch of finite images \(N, ...\), got shape \(0, "):
        cross_layer_equalization(model, variables, x[:0])


def test_equalization_without_batchnorm():
    # The zoo's MLP: dense → ReLU → dense → ReLU → dense, biases and no BN.
    model = models.create("mlp", num_classes=10)
    x = jax.random.normal(jax.random.key(3), (24, 8, 8, 1))
    variables = model.init(jax.random.key(4), x[:1])
    eq = cross_layer_equalization(model, variables, x[:12])
    names = [s.name for s in ls.sites_of(model, variables, x[:1])[0] if s.kind == "weight"]
    assert eq.pairs == tuple(zip(names[:-1], names[1:], strict=True)) and not eq.rejected
    before = np.asarray(model.apply(variables, x[12:], train=False))
    after = np.asarray(model.apply(eq.variables, x[12:], train=False))
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5 * np.abs(before).max())
    for a, b in eq.pairs:
        np.testing.assert_allclose(ranges(eq.variables["params"][a]["kernel"], -1),
                                   ranges(eq.variables["params"][b]["kernel"], -2), rtol=1e-3)


def test_equalization_leaves_a_transformer_alone():
    """The ViT's dense layers read signed sites (LayerNorm, GELU, attention outputs): no positive
    scale passes them, so there is no candidate pair, nothing rejected, and the weights are kept."""
    model = models.create("vit", num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32)
    x = jax.random.normal(jax.random.key(5), (8, 8, 8, 1))
    variables = model.init(jax.random.key(6), x[:1])
    eq = cross_layer_equalization(model, variables, x)
    assert eq.pairs == () and eq.rejected == () and eq.max_logit_change == 0.0
    jax.tree.map(np.testing.assert_array_equal, eq.variables["params"], variables["params"])


def test_folding_refuses_a_conv_whose_output_has_another_reader(digits):
    """A conv read by its BN and by a side path: folding would scale what the side path sees.
    It changed the logits by 0.26 (of 2.8) silently, and CLE, measuring against the folded
    network, reported no change; now both refuse, naming the pair."""
    model, x = SidePath(), digits.calib.x[:16]
    variables = model.init(jax.random.key(0), x[:1])
    variables = {**variables, "params": {**variables["params"], "bn": {"scale": jnp.array([3.0, 0.2, 1.5, 0.5]),
                                                                       "bias": jnp.zeros(4)}}}
    with pytest.raises(ValueError, match="the output of conv → bn is also read besides its BatchNorm"):
        ls.folding.fold_batchnorm(model, variables, x[:1])
    net = ls.train.Network(model, variables, config={}, history=[])
    with pytest.raises(ValueError, match="conv → bn"):
        ls.ClipLoss(net, digits.calib, w_bits=4, a_bits=None, quantize_first_last=True, fold_bn=True)
    with pytest.raises(ValueError, match="conv → bn"):
        cross_layer_equalization(model, variables, x)
    # A plain conv → BN folds as before: the logits stay put.
    cnn = models.create("cnn", num_classes=10, widths=(4,))
    v = cnn.init(jax.random.key(0), x[:1])
    folded = ls.folding.fold_batchnorm(cnn, v, x[:1])
    np.testing.assert_allclose(cnn.apply(folded, x, train=False), cnn.apply(v, x, train=False), atol=1e-5)


def test_equalization_tolerance_and_rounds_are_checked(digits):
    cnn = models.create("cnn", num_classes=10, widths=(4,))
    x = digits.calib.x[:8]
    v = cnn.init(jax.random.key(0), x[:1])
    for tol in (float("inf"), True, 1.0, 1.5, 0.0, "1e-4"):  # inf kept the skip-connection pairs of resnet8
        with pytest.raises(ValueError, match=r"must be a number in \(0, 1\)"):
            cross_layer_equalization(cnn, v, x, tol=tol)
    with pytest.raises(ValueError, match="max_rounds=True must be a positive integer"):
        cross_layer_equalization(cnn, v, x, max_rounds=True)
    assert cross_layer_equalization(cnn, v, x, tol=np.float32(1e-3)).max_logit_change >= 0


def test_equalization_names_a_network_passed_for_its_module_and_images_in_another_layout(tiny_net, digits):
    """CLE(net, ...) failed inside Network.apply with a TypeError, and flat or NCHW images with
    Flax's ScopeParamShapeError naming only kernel shapes."""
    x = digits.calib.x[:16]
    with pytest.raises(ValueError, match=r"cross_layer_equalization needs a flax module, got a trained Network; "
                                         r"pass its module \(and variables\): net.model, net.variables"):
        cross_layer_equalization(tiny_net, tiny_net.variables, x)
    for bad in (x.reshape(16, -1), x.transpose(0, 3, 1, 2)):
        with pytest.raises(ValueError, match=re.escape(f"images x have shape {bad.shape}, which the network's "
                                                       "variables do not fit (images are NHWC")):
            cross_layer_equalization(tiny_net.model, tiny_net.variables, bad)


def test_folding_is_the_formula_with_epsilon_and_the_conv_bias(digits):
    """W' = W·s and b' = b·s with s = γ/√(σ² + ε), the BN left as scale 1, bias β − μ·s, mean 0 and
    var 1 − ε (an exact identity plus bias). A conv with a bias and a BN with a large ε (0.5) and small
    variances make each term count: ε left out of s or of the var, or the conv bias left unscaled,
    moved these logits (and the folding refused them as a side path)."""
    class BiasedConvBN(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            y = BatchNorm(epsilon=0.5, name="bn")(QuantConv(4, use_bias=True, name="conv")(x), train)
            return QuantDense(10, name="fc")(jnp.mean(QuantReLU(name="relu")(y), axis=(1, 2)))

    model, x = BiasedConvBN(), jnp.asarray(digits.calib.x[:16])
    v = model.init(jax.random.key(0), x[:1])
    gamma, beta = jnp.array([1.5, 0.4, 2.0, 0.8]), jnp.array([0.3, -0.2, 0.1, 0.5])
    mean, var = jnp.array([0.2, -0.5, 1.0, 0.0]), jnp.array([0.05, 0.3, 0.1, 2.0])
    bias = jnp.array([1.0, -0.7, 0.4, 0.2])
    params = {**v["params"], "conv": {**v["params"]["conv"], "bias": bias}, "bn": {"scale": gamma, "bias": beta}}
    v = {"params": params, "batch_stats": {"bn": {"mean": mean, "var": var}}}
    folded = ls.folding.fold_batchnorm(model, v, x[:1])
    s = np.asarray(gamma) / np.sqrt(np.asarray(var) + 0.5)
    np.testing.assert_allclose(folded["params"]["conv"]["kernel"], np.asarray(params["conv"]["kernel"]) * s, rtol=1e-6)
    np.testing.assert_allclose(folded["params"]["conv"]["bias"], np.asarray(bias) * s, rtol=1e-6)
    np.testing.assert_allclose(folded["params"]["bn"]["bias"], np.asarray(beta) - np.asarray(mean) * s, rtol=1e-6)
    np.testing.assert_allclose(folded["params"]["bn"]["scale"], np.ones(4))
    np.testing.assert_allclose(folded["batch_stats"]["bn"]["mean"], np.zeros(4))
    np.testing.assert_allclose(np.asarray(folded["batch_stats"]["bn"]["var"]) + 0.5, np.ones(4), rtol=1e-7)
    before, after = model.apply(v, x, train=False), model.apply(folded, x, train=False)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * float(jnp.abs(before).max()))


def test_equalization_is_the_closed_form_on_one_pair_with_biases_and_dead_channels():
    """One dense → ReLU → dense pair with hand-set weights: s_c = √(r_a,c / r_b,c), layer a's kernel
    column and bias divided by s_c, layer b's kernel row multiplied by it, b's bias kept. A channel
    that layer a never drives (r_a = 0) or layer b never reads (r_b = 0) keeps s = 1 (a zero
    range would give s = 0 or ∞, and NaN kernels). One round equalizes a single pair; the second finds
    nothing to move and stops (``max_rounds=1`` runs exactly one)."""
    model = models.create("mlp", num_classes=2, hidden=(4,))
    x = jax.random.normal(jax.random.key(7), (16, 2, 2, 1))
    k0 = np.array([[4.0, -0.5, 0.0, 1.0],
                   [-1.0, 0.25, 0.0, -3.0],
                   [2.0, 0.1, 0.0, 0.5],
                   [0.5, -0.2, 0.0, 2.0]], np.float32)  # channel 2 is dead (r_a = 0)
    b0 = np.array([0.3, -0.2, 0.7, 0.4], np.float32)  # nonzero biases: a bias left unscaled moves the logits
    k1 = np.array([[0.25, -1.0], [2.0, 8.0], [1.0, -1.5], [0.0, 0.0]], np.float32)  # channel 3 unread (r_b = 0)
    b1 = np.array([0.1, -0.3], np.float32)
    variables = {"params": {"fc0": {"kernel": jnp.asarray(k0), "bias": jnp.asarray(b0)},
                            "fc1": {"kernel": jnp.asarray(k1), "bias": jnp.asarray(b1)}}}
    s = np.array([np.sqrt(4.0 / 1.0), np.sqrt(0.5 / 8.0), 1.0, 1.0], np.float32)  # [2, 1/4, 1, 1]
    eq = cross_layer_equalization(model, variables, x)
    assert eq.pairs == (("fc0", "fc1"),) and not eq.rejected
    assert eq.rounds == 2
    np.testing.assert_allclose(eq.scales[("fc0", "fc1")], s, rtol=1e-6)
    p = eq.variables["params"]
    np.testing.assert_allclose(p["fc0"]["kernel"], k0 / s, rtol=1e-6)
    np.testing.assert_allclose(p["fc0"]["bias"], b0 / s, rtol=1e-6)
    np.testing.assert_allclose(p["fc1"]["kernel"], k1 * s[:, None], rtol=1e-6)
    np.testing.assert_allclose(p["fc1"]["bias"], b1, rtol=1e-6)
    before, after = model.apply(variables, x), model.apply(eq.variables, x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * float(jnp.abs(before).max()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # one round equalizes one pair: nothing to warn of
        once = cross_layer_equalization(model, variables, x, max_rounds=1)
    assert once.rounds == 1
    np.testing.assert_allclose(once.scales[("fc0", "fc1")], s, rtol=1e-6)


def test_folding_refuses_a_side_path_that_moves_the_logits_by_under_one_percent(digits):
    """In true float32 folding is exact to ~1e-6 of the logits, so a change above FOLD_TOL = 1e-3
    of max |logit| is a side path, at any scale of the logits; the TF32 allowance FOLD_TOL_FAST = 2e-2
    is for faster precisions only (at "highest" it let this side path, ~0.5 % of the logits, fold
    silently)."""
    model, x = SidePath(weight=0.005), jnp.asarray(digits.calib.x[:16])
    variables = model.init(jax.random.key(0), x[:1])
    variables = {**variables, "params": {**variables["params"], "bn": {"scale": jnp.array([3.0, 0.2, 1.5, 0.5]),
                                                                       "bias": jnp.zeros(4)}}}
    # the change folding makes, measured here: between FOLD_TOL and FOLD_TOL_FAST of max |logit|
    folded = ls.folding._fold(variables, ls.folding.batchnorm_pairs(model, variables, x[:1]))
    with jax.default_matmul_precision("highest"):
        before = np.asarray(model.apply(variables, x))
        moved = np.abs(np.asarray(model.apply(folded, x)) - before).max() / np.abs(before).max()
    assert ls.folding.FOLD_TOL < moved < ls.folding.FOLD_TOL_FAST
    # The bound is relative: the network is positively homogeneous (no biases, BN at mean 0 and
    # var 1), so at x · 1e-4 the logits and their change shrink alike, and the side path is refused.
    for scale in (1.0, 1e-4):
        with pytest.raises(ValueError, match="the output of conv → bn is also read besides its BatchNorm"):
            ls.folding.fold_batchnorm(model, variables, scale * x)


def test_equalization_tolerance_is_relative_to_the_largest_logit():
    """A pair is kept when the logits move by at most tol · max |logit|, at any scale of the logits
    (the network is positively homogeneous here: no biases, so scaling x scales the logits). At
    logits ~1e5 float rounding alone moves them by more than 1e-4 in absolute terms, and the exact
    pair must still be kept; at logits ~1e-5 a skip path reading the ReLU moves them by less than
    1e-4, and the pair must still be rejected."""
    class Skip(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = QuantReLU(name="relu")(QuantDense(6, use_bias=False, name="fc0")(x.reshape(len(x), -1)))
            return QuantDense(3, use_bias=False, name="fc1")(h) + jnp.sum(h, axis=-1, keepdims=True)

    x = jax.random.normal(jax.random.key(8), (16, 2, 2, 1))
    mlp = models.create("mlp", num_classes=3, hidden=(6,))
    v = mlp.init(jax.random.key(9), x[:1])
    v = {"params": {name: {"kernel": layer["kernel"], "bias": jnp.zeros_like(layer["bias"])}
                    for name, layer in v["params"].items()}}
    big = cross_layer_equalization(mlp, v, 1e5 * x)
    assert big.pairs == (("fc0", "fc1"),) and big.max_logit_change > 1e-4
    skip = Skip()
    w = skip.init(jax.random.key(9), x[:1])
    small = cross_layer_equalization(skip, w, 1e-5 * x)
    assert small.pairs == () and small.rejected == (("fc0", "fc1"),)


def test_equalization_rounds_run_until_no_pair_moves():
    """A chain fc0 → fc1 → fc2 → fc3 (ReLUs between) of diagonal middle layers whose last pair is
    balanced after the first round while the first pair is not (the middle pair's rescaling
    unbalanced it again): rounds go on until no pair moves, not just the last one, and every pair
    ends with equal ranges."""
    model = models.create("mlp", num_classes=2, hidden=(2, 2, 2))
    x = jax.random.normal(jax.random.key(10), (8, 2, 2, 1))
    kernels = {"fc0": [[16.0, 0.5], [1.0, 1.0], [-2.0, 0.2], [3.0, -0.5]],  # column ranges 16, 1
               "fc1": [[1.0, 0.0], [0.0, 1.0]], "fc2": [[1.0, 0.0], [0.0, 4.0]],
               "fc3": [[2.0, 0.5], [1.0, -2.0]]}  # row ranges 2, 2: round 1 leaves fc2 → fc3 balanced
    variables = {"params": {name: {"kernel": jnp.asarray(k, jnp.float32), "bias": jnp.zeros(len(k[0]))}
                            for name, k in kernels.items()}}
    eq = cross_layer_equalization(model, variables, x)
    assert eq.pairs == (("fc0", "fc1"), ("fc1", "fc2"), ("fc2", "fc3"))
    assert eq.rounds > 2
    # stopped by max_rounds before the ranges are equal: said, not silent
    with pytest.warns(RuntimeWarning, match="after max_rounds=2 rounds the paired ranges still differ"):
        assert cross_layer_equalization(model, variables, x, max_rounds=2).rounds == 2
    p = eq.variables["params"]
    for a, b in eq.pairs:
        np.testing.assert_allclose(ranges(p[a]["kernel"], -1), ranges(p[b]["kernel"], -2), rtol=1e-5)
    # Every scale of the first round ≤ 1 (s = [1/2, 1] and [1/2, 1/2]): a round moves the
    # network when any |log s| is large, whichever its sign.
    model = models.create("mlp", num_classes=2, hidden=(2, 2))
    kernels = {"fc0": [[1.0, -0.5], [0.5, 1.0]], "fc1": [[4.0, 0.0], [0.0, 1.0]], "fc2": [[8.0, 1.0], [-4.0, 2.0]]}
    variables = {"params": {name: {"kernel": jnp.asarray(k, jnp.float32), "bias": jnp.zeros(len(k[0]))}
                            for name, k in kernels.items()}}
    eq = cross_layer_equalization(model, variables, jax.random.normal(jax.random.key(11), (8, 2, 1, 1)))
    assert eq.pairs == (("fc0", "fc1"), ("fc1", "fc2")) and eq.rounds > 2
    p = eq.variables["params"]
    for a, b in eq.pairs:
        np.testing.assert_allclose(ranges(p[a]["kernel"], -1), ranges(p[b]["kernel"], -2), rtol=1e-5)


def test_equalization_checks_the_kept_pairs_together(monkeypatch):
    """Each kept pair is exact on its own, so the pairs together should be too; were a rescaling
    round to break that (simulated here: every rescaling after the pair's trial scales layer b's
    kernel by 1.1 more), the result is refused, not returned with moved logits."""
    import landscape.equalization as eq_module

    model = models.create("mlp", num_classes=2, hidden=(4,))
    x = jax.random.normal(jax.random.key(12), (8, 2, 2, 1))
    variables = model.init(jax.random.key(13), x[:1])
    real, calls = eq_module._rescale, []

    def drifting(flat, a, b, bn, s, groups=1):
        out = real(flat, a, b, bn, s, groups)
        calls.append(b)
        if len(calls) > 1:
            out[f"params/{b}/kernel"] = out[f"params/{b}/kernel"] * np.float32(1.1)
        return out

    monkeypatch.setattr(eq_module, "_rescale", drifting)
    with pytest.raises(RuntimeError, match="the kept pairs together move the logits by"):
        cross_layer_equalization(model, variables, x)
