"""Signed activation sites (QuantIdentity) and the Vision Transformer built on them."""

import dataclasses
import re
import types
import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
import models
from landscape.layers import QuantDense, QuantIdentity, QuantReLU


class _Probe(nn.Module):
    """logits = Q(x) @ W + b: one activation site (signed or post-ReLU) feeding one dense layer."""

    signed: bool

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        x = QuantIdentity(name="act")(x) if self.signed else QuantReLU(name="act")(x)
        return QuantDense(3, name="fc")(x)


def _probe(signed, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=40)
    model = _Probe(signed)
    variables = model.init(jax.random.key(seed), jnp.asarray(x))
    return types.SimpleNamespace(model=model, variables=variables), x, y


def _cross_entropy(logits, y):
    logits = logits - logits.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(y)), y]))


@pytest.mark.parametrize("bits", [2, 3])
def test_signed_site_quantizes_on_the_symmetric_grid_with_zero(bits):
    net, x, y = _probe(signed=True)
    loss = ls.ClipLoss(net, (x, y), w_bits=None, a_bits=bits, quantize_first_last=True)
    (site,) = loss.sites
    assert site.kind == "activation" and site.signed and site.grid == "midtread"
    assert loss.specs[site.name].grid == "midtread"
    alpha = 0.8
    top = 2 ** (bits - 1) - 1
    delta = alpha / top
    x_hat = np.clip(np.round(x / delta), -top, top) * delta  # levels kΔ, |k| ≤ 2^(M−1) − 1
    assert (x_hat < 0).any() and (x_hat == 0).any()
    params = net.variables["params"]["fc"]
    expected = _cross_entropy(x_hat @ np.asarray(params["kernel"]) + np.asarray(params["bias"]), y)
    np.testing.assert_allclose(float(loss(jnp.array([alpha]))), expected, rtol=1e-5)
    # The same tensor behind a ReLU is an unsigned site: negatives become 0, levels kΔ, k ≥ 0.
    relu_net, _, _ = _probe(signed=False)
    relu_loss = ls.ClipLoss(relu_net, (x, y), w_bits=None, a_bits=bits, quantize_first_last=True)
    assert not relu_loss.sites[0].signed and relu_loss.specs["act"].grid == "unsigned"


class _Probabilities(nn.Module):
    """logits = Q(softmax(x)) @ W + b: an unsigned non-ReLU site (attention probabilities)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        p = QuantIdentity(signed=False, name="probs")(jax.nn.softmax(x.reshape(x.shape[0], -1), axis=-1))
        return QuantDense(3, name="fc")(p)


def _one_site_loss(model, seed, a_bits):
    """(net, x, y, loss): ``model`` on 40 seeded N(0, 1) rows of 5 features, its activation site at ``a_bits``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=40)
    net = types.SimpleNamespace(model=model, variables=model.init(jax.random.key(seed), jnp.asarray(x)))
    return net, x, y, ls.ClipLoss(net, (x, y), w_bits=None, a_bits=a_bits, quantize_first_last=True)


def test_unsigned_identity_site_quantizes_probabilities_on_the_unsigned_grid():
    net, x, y, loss = _one_site_loss(_Probabilities(), 1, 3)
    (site,) = loss.sites
    assert site.name == "probs" and not site.signed and site.grid == "unsigned"
    alpha = 0.5  # probabilities above α clip to α; levels kΔ, 0 ≤ k ≤ 7, Δ = α / 7
    p = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    p_hat = np.clip(np.round(p / (alpha / 7)), 0, 7) * (alpha / 7)
    assert (p > alpha).any() and (p_hat == 0).any()
    params = net.variables["params"]["fc"]
    expected = _cross_entropy(p_hat @ np.asarray(params["kernel"]) + np.asarray(params["bias"]), y)
    np.testing.assert_allclose(float(loss(jnp.array([alpha]))), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(loss.init("max")), [p.max()], rtol=1e-6)


class _UnsignedIdentity(nn.Module):
    """logits = Q(x) @ W + b with the site declared unsigned: a tensor that does go negative."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return QuantDense(3, name="fc")(QuantIdentity(signed=False, name="act")(x.reshape(x.shape[0], -1)))


def test_init_warns_when_an_unsigned_site_sees_negative_values():
    """The unsigned grid clips negatives to 0: a misdeclared site (GELU, LayerNorm) had lost them silently."""
    _, x, _, loss = _one_site_loss(_UnsignedIdentity(), 2, 4)
    least = f"{float(x.min()):.4g}"
    with pytest.warns(UserWarning, match=rf"unsigned grid see negative values.*act \(least value {re.escape(least)}"):
        loss.init("max")
    # a post-ReLU site, a softmax site (never negative) and a signed site: no warning
    for model in (_Probe(signed=False), _Probabilities(), _Probe(signed=True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _one_site_loss(model, 2, 4)[3].init("max")


@pytest.mark.parametrize("signed", ["false", "no", None, 0.0, 1])
def test_quant_identity_refuses_a_signed_flag_that_is_not_a_bool(signed):
    """signed="false" (read from a config file) had made the site signed, None and 0 unsigned, silently."""
    x = jnp.zeros((2, 5))
    with pytest.raises(ValueError, match=rf"QuantIdentity signed={re.escape(repr(signed))} must be True or False"):
        QuantIdentity(signed=signed).init(jax.random.key(0), x)
    for flag, grid in ((True, "midtread"), (np.bool_(False), "unsigned")):
        m = QuantIdentity(signed=flag)
        (site,), _ = ls.sites.trace_sites(m.apply, m.init(jax.random.key(0), x), x)
        assert site.grid == grid


def test_calibration_rules_see_the_negative_tail_of_a_signed_site():
    net, x, y = _probe(signed=True)
    x[0, 0] = -7.5  # the largest magnitude is negative
    loss = ls.ClipLoss(net, (x, y), w_bits=None, a_bits=4, quantize_first_last=True)
    np.testing.assert_allclose(np.asarray(loss.init("max")), [7.5], rtol=1e-6)
    relu_net, _, _ = _probe(signed=False)
    relu_loss = ls.ClipLoss(relu_net, (x, y), w_bits=None, a_bits=4, quantize_first_last=True)
    np.testing.assert_allclose(np.asarray(relu_loss.init("max")), [x.max()], rtol=1e-6)
    for rule in ("mse", "lp", "aciq", "kl", "percentile"):
        a = np.asarray(loss.init(rule))
        assert a.shape == (1,) and 0 < a[0] <= 7.5 + 1e-6, (rule, a)


def test_vit_builds_with_a_patch_that_divides_the_image():
    model = models.create("vit", num_classes=10, patch=3)
    with pytest.raises(ValueError, match="patch=3 must divide"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="dim=30 must be a multiple of heads=4"):
        models.create("vit", num_classes=10, dim=30).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    # built directly (not through models.create), sizes are checked too: heads=0 and patch=0 had
    # failed with "integer modulo by zero", naming neither; images without a channel axis with
    # "not enough values to unpack"
    for key in ("heads", "patch", "dim", "depth", "mlp_dim"):
        with pytest.raises(ValueError, match=f"ViT {key}=0 must be a positive integer"):
            models.ViT(10, **{key: 0})
    with pytest.raises(ValueError, match=r"ViT: the input must be NHWC .* got shape \(1, 8, 8\)"):
        models.ViT(10).init(jax.random.key(0), jnp.zeros((1, 8, 8)))


@pytest.fixture(scope="module")
def tiny_vit(digits):
    model = models.create("vit", num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32)
    return ls.train.fit(model, digits, epochs=4, lr=0.1)


def test_vit_sites_and_clip_loss(tiny_vit, digits):
    all_sites, pairs = ls.sites_of(tiny_vit.model, tiny_vit.variables, digits.calib.x[:2])
    assert pairs == []  # LayerNorm is not folded
    names = [s.name for s in all_sites]
    assert names == ["embed", "block0/ln1_out", "block0/qkv", "block0/attn_out", "block0/proj",
                     "block0/ln2_out", "block0/fc1", "block0/gelu_out", "block0/fc2", "head_in", "head"]
    acts = [s for s in all_sites if s.kind == "activation"]
    assert all(s.signed for s in acts) and not any(s.signed for s in all_sites if s.kind == "weight")
    # MACs: the 16 tokens of an 8×8 image in 2×2 patches pass through every dense layer.
    macs = {s.name: s.macs for s in all_sites if s.kind == "weight"}
    assert macs["block0/qkv"] == 16 * 16 * 48 and macs["head"] == 16 * 10
    # Each activation site is the direct input of one dense layer.
    feeds = ls.sites.direct_inputs(lambda v, x: tiny_vit.model.apply(v, x), tiny_vit.variables, digits.calib.x[:2])
    assert feeds == {"block0/qkv": "block0/ln1_out", "block0/proj": "block0/attn_out",
                     "block0/fc1": "block0/ln2_out", "block0/fc2": "block0/gelu_out", "head": "head_in"}

    loss = ls.ClipLoss(tiny_vit, digits.calib, w_bits=4, a_bits=3)
    assert [s.name for s in loss.sites] == names[1:-2]  # embed, head and head_in stay FP32
    alpha = loss.init("lp", p=3.0)
    value = float(loss(alpha))
    assert np.isfinite(value) and value > 0
    np.testing.assert_allclose(np.asarray(loss.batch(jnp.stack([alpha, 2 * alpha])))[0], value, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(loss.grad(alpha))))
    H = np.asarray(ls.clip_hessian(loss, alpha, method="ste"))
    assert H.shape == (len(alpha), len(alpha)) and np.allclose(H, H.T)
    res = ls.lapq(loss, method="batched", maxiter=1, p_grid=np.linspace(2, 4, 3), bias_correction=False)
    assert res.loss < res.init_loss  # the joint step lowers the calibration loss from α_{p*}
    np.testing.assert_allclose(res.loss, float(loss(res.alpha)), rtol=1e-5)


def test_vit_quantizes_the_attention_operands_when_asked(tiny_vit, digits):
    """quantize_attention=True: q, k, v (signed) and the softmax probabilities (unsigned) are sites
    of the same parameters; FP32 they change nothing, quantized they reach the loss."""
    model = models.create("vit", num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32, quantize_attention=True)
    net = dataclasses.replace(tiny_vit, model=model)
    all_sites, _ = ls.sites_of(model, net.variables, digits.calib.x[:2])
    plain = [s.name for s in ls.sites_of(tiny_vit.model, tiny_vit.variables, digits.calib.x[:2])[0]]
    attention = ["block0/q", "block0/k", "block0/v", "block0/attn_probs"]
    names = [s.name for s in all_sites]
    assert names == plain[:3] + attention + plain[3:]  # after qkv, in call order
    grids = {s.name: s.grid for s in all_sites}
    assert [grids[n] for n in attention] == ["midtread"] * 3 + ["unsigned"]
    assert all(s.macs is None for s in all_sites if s.name in attention)
    assert all(s.shape == (16, 2, 8) for s in all_sites if s.name in attention[:3])
    assert _site_shape(all_sites, "block0/attn_probs") == (2, 16, 16)  # (heads, queries, keys)
    x = digits.test.x[:64]
    np.testing.assert_array_equal(np.asarray(net.apply(x)), np.asarray(tiny_vit.apply(x)))

    full = ls.ClipLoss(net, digits.calib, w_bits=None, a_bits=3)
    assert [s.name for s in full.sites] == names[1:2] + attention + [
        n for n in names[3:-2] if n.endswith("_out")]
    alpha = np.asarray(full.init("max"))
    probs = alpha[[s.name for s in full.sites].index("block0/attn_probs")]
    assert 0 < probs <= 1  # the largest softmax probability
    # Only the probabilities quantized: the 8-bit loss is close to FP32, the 2-bit one is not.
    fp32 = float(ls.ClipLoss(net, digits.calib, w_bits=None, a_bits=None)(jnp.zeros(0)))
    gaps = []
    for bits in (8, 2):
        only = ls.ClipLoss(net, digits.calib, w_bits=None, a_bits=bits, sites=["block0/attn_probs"])
        gaps.append(abs(float(only(only.init("max"))) - fp32))
    assert gaps[0] < 0.01 * fp32 < gaps[1]
    # The exported network quantizes them too, to the last bit of the loss's logits.
    qnet = ls.export.quantize_network(full, alpha)
    np.testing.assert_array_equal(np.asarray(qnet.apply(x)), np.asarray(full.logits(alpha, x)))
    assert qnet.sites["block0/attn_probs"].grid == "unsigned"


def _site_shape(all_sites, name):
    return next(s.shape for s in all_sites if s.name == name)


def test_vit_exports_and_rounds(tiny_vit, digits, tmp_path):
    """The exported ViT runs its signed activation sites on the mid-tread grid (saved and loaded
    without pickle), and GPTQ rounds its dense layers, whose inputs are (batch, tokens, features)."""
    loss = ls.ClipLoss(tiny_vit, digits.calib, w_bits=3, a_bits=4)
    alpha = np.asarray(loss.init("mse"))
    qnet = ls.export.quantize_network(loss, alpha)
    x = digits.test.x[:200]
    np.testing.assert_array_equal(np.asarray(qnet.apply(x)), np.asarray(loss.logits(alpha, x)))
    assert {s.grid for s in qnet.sites.values() if s.kind == "activation"} == {"midtread"}
    ls.export.save(qnet, str(tmp_path / "q"))
    back = ls.export.load(tiny_vit.model, str(tmp_path / "q"))
    assert {n: s.grid for n, s in back.sites.items()} == {n: s.grid for n, s in qnet.sites.items()}
    np.testing.assert_array_equal(np.asarray(back.apply(x)), np.asarray(qnet.apply(x)))

    res = ls.gptq(loss, alpha, num_images=64)
    assert list(res.layers) == ["block0/qkv", "block0/proj", "block0/fc1", "block0/fc2"]
    assert all(fit.mse < fit.mse_nearest for fit in res.layers.values())


def test_vit_trains_with_the_luq_and_nm_recipes(digits):
    """The training recipes hook every dense product of the ViT, whose inputs are 3-D: LUQ trains
    to a finite loss above chance, and the N:M recipe keeps every sparse kernel transposable 2:4."""
    from landscape import luq, sparsity

    model = models.create("vit", num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32)
    net = ls.train.fit(model, digits, epochs=2, lr=0.1, recipe=luq.Recipe(finetune_epochs=0))
    assert np.isfinite(net.history[-1]["train_loss"]) and net.accuracy(digits.test) > 0.2
    net = ls.train.fit(model, digits, epochs=2, lr=0.1, recipe=sparsity.Recipe(keep=2, block=4))
    masks = flax.traverse_util.flatten_dict(net.variables["masks"], sep="/")
    assert sorted(masks) == ["block0/fc1/kernel", "block0/fc2/kernel", "block0/proj/kernel", "block0/qkv/kernel"]
    for name, mask in masks.items():
        assert sparsity.is_transposable(np.asarray(mask), keep=2, block=4), name
        assert 0.4 < sparsity.density(mask) <= 0.5  # updates use the greedy solver: at most 2 of 4
    # The sparse network computes with kernel · mask: plain apply on those weights gives its logits.
    x = digits.test.x[:32]
    plain = model.apply({"params": sparsity.effective_params(net.variables)}, x)
    np.testing.assert_allclose(np.asarray(net.apply(x)), np.asarray(plain), rtol=1e-5, atol=1e-5)
