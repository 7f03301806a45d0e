"""landscape.layers.QuantConv in flax.linen.Conv's argument forms: the same outputs as flax.linen.Conv
with the same kernel, the same MACs as the geometry gives, and clear errors for anything else."""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
from landscape.layers import QuantConv

# (QuantConv's keyword arguments, flax.linen.Conv's for the same convolution). flax.linen.Conv reads
# an int kernel_size as a 1-D kernel, so the flax side of kernel_size=k is (k, k).
FORMS = [
    ({"kernel_size": (3, 2), "padding": "SAME"}, {"kernel_size": (3, 2), "padding": "SAME"}),
    ({"kernel_size": (2, 2), "padding": "SAME"}, {"kernel_size": (2, 2), "padding": "SAME"}),  # even kernel
    ({"kernel_size": (4, 3), "padding": "same"}, {"kernel_size": (4, 3), "padding": "SAME"}),
    ({"kernel_size": (3, 2), "padding": "VALID"}, {"kernel_size": (3, 2), "padding": "VALID"}),
    ({"kernel_size": 3, "padding": 1}, {"kernel_size": (3, 3), "padding": 1}),
    ({"kernel_size": (3, 2), "padding": (1, 2)}, {"kernel_size": (3, 2), "padding": (1, 2)}),
    ({"kernel_size": (3, 2), "padding": ((0, 2), (1, 0))}, {"kernel_size": (3, 2), "padding": ((0, 2), (1, 0))}),
    ({"kernel_size": [2, 3], "padding": [1, (0, 2)]}, {"kernel_size": (2, 3), "padding": (1, (0, 2))}),
    ({"kernel_size": 2, "padding": "SAME"}, {"kernel_size": (2, 2), "padding": "SAME"}),
]
# the default padding (k // 2 each side) and the zoo's explicit forms, as flax spells them
OLD_FORMS = [
    ({"kernel_size": (3, 3)}, {"kernel_size": (3, 3), "padding": 1}),
    ({"kernel_size": (1, 1)}, {"kernel_size": (1, 1), "padding": 0}),
    ({"kernel_size": (7, 7), "padding": 3}, {"kernel_size": (7, 7), "padding": 3}),
]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _expected_out(n, k, s, padding):
    """Output size along one dimension, by the textbook rules (not by the layer's code)."""
    if padding == "SAME":
        return -(-n // s)
    lo, hi = padding
    return (n + lo + hi - k) // s + 1


@pytest.mark.parametrize("strides", [1, 2, (2, 1)])
@pytest.mark.parametrize("hw", [(8, 8), (9, 9), (9, 8)])
def test_quantconv_matches_flax_conv_in_every_form(hw, strides):
    """Unquantized (no site context), QuantConv and flax.linen.Conv with one kernel give the same
    output: odd and even inputs, strides 1 and 2, odd and even kernels, every padding form."""
    x = jax.random.normal(jax.random.key(1), (2, *hw, 3))
    for ours, theirs in FORMS + OLD_FORMS:
        for use_bias in (False, True):
            layer = QuantConv(5, strides=strides, use_bias=use_bias, **ours)
            variables = layer.init(jax.random.key(0), x)
            if use_bias:  # a non-zero bias, so that adding it is checked too
                variables = {"params": {**variables["params"], "bias": jnp.arange(5.0)}}
            got = layer.apply(variables, x)
            want = nn.Conv(5, strides=strides, use_bias=use_bias, **theirs).apply(variables, x)
            assert got.shape == want.shape, (ours, strides, hw)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"{ours} strides={strides} {hw}")


def test_same_padding_splits_as_xla_does():
    """SAME with a stride and an even kernel pads the odd pixel after: on an 8-wide input with a
    2-wide kernel and stride 2 no padding at all, with stride 1 one pixel after; on 9 with a 4-wide
    kernel and stride 2, (1, 2). Checked on a ramp input with an all-ones kernel."""
    def run(n, k, s):
        x = jnp.arange(n, dtype=jnp.float32).reshape(1, 1, n, 1)
        layer = QuantConv(1, kernel_size=(1, k), strides=s, padding="SAME")
        return np.asarray(layer.apply({"params": {"kernel": jnp.ones((1, k, 1, 1))}}, x)).ravel()

    np.testing.assert_array_equal(run(8, 2, 2), [1, 5, 9, 13])  # 0+1, 2+3, ...
    np.testing.assert_array_equal(run(8, 2, 1), [1, 3, 5, 7, 9, 11, 13, 7])  # (0, 1): 7 + pad
    np.testing.assert_array_equal(run(9, 4, 2), [3, 10, 18, 26, 15])  # (1, 2): 0+0+1+2, 1+2+3+4, ..., 7+8


DILATED = [{"kernel_dilation": 2}, {"kernel_dilation": (2, 3), "padding": "SAME"},
           {"kernel_dilation": (1, 2), "padding": "VALID", "kernel_size": (2, 3)}]


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("groups", [1, 3])
def test_dilated_conv_matches_flax_conv(strides, groups):
    """kernel_dilation as flax.linen.Conv's, alone and with groups, in every padding form; the
    default padding is half the dilated span on each side (d for a 3x3 kernel, torchvision's
    dilated ResNets), which keeps an odd span's size at stride 1."""
    x = jax.random.normal(jax.random.key(2), (2, 11, 10, 6))
    cases = [
        ({"kernel_size": (3, 3), "kernel_dilation": 2}, {"kernel_size": (3, 3), "kernel_dilation": 2, "padding": 2}),
        ({"kernel_size": (3, 2), "kernel_dilation": (2, 3)},
         {"kernel_size": (3, 2), "kernel_dilation": (2, 3), "padding": (2, 2)}),  # spans 5 and 4: 5//2, 4//2
        ({"kernel_size": 3, "kernel_dilation": 3, "padding": "SAME"},
         {"kernel_size": (3, 3), "kernel_dilation": 3, "padding": "SAME"}),
        ({"kernel_size": (2, 3), "kernel_dilation": (3, 2), "padding": "VALID"},
         {"kernel_size": (2, 3), "kernel_dilation": (3, 2), "padding": "VALID"}),
        ({"kernel_size": (3, 3), "kernel_dilation": (1, 2), "padding": ((0, 2), 1)},
         {"kernel_size": (3, 3), "kernel_dilation": (1, 2), "padding": ((0, 2), (1, 1))}),
    ]
    for ours, theirs in cases:
        layer = QuantConv(6, strides=strides, feature_group_count=groups, **ours)
        variables = layer.init(jax.random.key(0), x)
        got = layer.apply(variables, x)
        want = nn.Conv(6, strides=strides, feature_group_count=groups, use_bias=False, **theirs).apply(variables, x)
        assert got.shape == want.shape, (ours, strides, groups)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{ours} strides={strides} g={groups}")
        if strides == 1 and ours["kernel_size"] == (3, 3) and "padding" not in ours:  # an odd span
            assert got.shape[1:3] == x.shape[1:3]


@pytest.mark.parametrize("ours", [f for f, _ in FORMS] + [{"strides": 2, "padding": "SAME"}] + DILATED, ids=repr)
def test_macs_follow_the_output_geometry(ours):
    """Site tracing counts out_h · out_w · kh · kw · c_in · c_out MACs for every new form (the zoo's
    explicit forms: tests/test_models.py); a dilated kernel spans (k − 1)·d + 1 pixels but still
    takes kh · kw products per output."""
    ours = {"strides": (2, 1), **ours}
    layer = QuantConv(6, **ours)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return QuantConv(6, name="conv", **ours)(x)

    x = jnp.zeros((1, 9, 8, 3))
    variables = Net().init(jax.random.key(0), x)
    (site,), _ = ls.sites_of(Net(), variables, x)
    kh, kw = _pair(layer.kernel_size)
    sh, sw = _pair(layer.strides)
    dh, dw = _pair(layer.kernel_dilation)
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    pad = layer.padding
    if pad is None:
        pads = ((eh // 2,) * 2, (ew // 2,) * 2)
    elif isinstance(pad, str):
        pads = ("SAME", "SAME") if pad.upper() == "SAME" else ((0, 0), (0, 0))
    elif isinstance(pad, int):
        pads = ((pad, pad), (pad, pad))
    else:
        pads = tuple(_pair(p) for p in pad)
    out_h, out_w = _expected_out(9, eh, sh, pads[0]), _expected_out(8, ew, sw, pads[1])
    assert Net().apply(variables, x).shape == (1, out_h, out_w, 6)
    assert site.shape == (kh, kw, 3, 6)
    assert site.macs == out_h * out_w * kh * kw * 3 * 6


@pytest.mark.parametrize("argument,value", [
    ("padding", "CIRCULAR"), ("padding", "REFLECT"), ("padding", "FULL"), ("padding", -1), ("padding", 1.5),
    ("padding", True), ("padding", (1,)), ("padding", (1, 2, 3)), ("padding", ((1, 2, 3), 0)),
    ("padding", ((1, -1), 0)), ("padding", ("SAME", "SAME")), ("padding", {"h": 1}),
    ("kernel_size", 0), ("kernel_size", (3,)), ("kernel_size", (3, 3, 3)), ("kernel_size", 2.5),
    ("kernel_size", "3"), ("kernel_size", True), ("kernel_size", (3, 0)), ("kernel_size", None),
    ("strides", 0), ("strides", (2,)), ("strides", (1, 2, 3)), ("strides", 1.5), ("strides", (2, -1)),
    ("strides", "2"), ("kernel_dilation", 0), ("kernel_dilation", (2,)), ("kernel_dilation", 1.5),
    ("kernel_dilation", (2, 0)), ("kernel_dilation", "2"), ("kernel_dilation", True), ("kernel_dilation", None),
])
def test_bad_arguments_are_named_with_their_allowed_forms(argument, value):
    """Refused when the layer is built, naming the argument, its value and the allowed forms."""
    with pytest.raises(ValueError, match=re.escape(f"QuantConv {argument}={value!r} is not allowed; allowed: ")) as err:
        QuantConv(4, **{argument: value})
    allowed = {"padding": ['"SAME"', '"VALID"', "int p >= 0", "(lo, hi)"],
               "kernel_size": ["positive int", "(kh, kw)"], "strides": ["positive int", "(sh, sw)", "None"],
               "kernel_dilation": ["positive int", "(dh, dw)"]}
    assert all(form in str(err.value) for form in allowed[argument])


def test_bad_inputs_name_the_layer():
    layer = QuantConv(4, kernel_size=(3, 3), padding="VALID", name="stem")
    with pytest.raises(ValueError, match=r"QuantConv 'stem': a 3x3 kernel with padding \(\(0, 0\), \(0, 0\)\) "
                                         r"leaves no output position on an input of height x width 2x5"):
        layer.init(jax.random.key(0), jnp.zeros((1, 2, 5, 1)))
    dilated = QuantConv(4, kernel_size=(3, 3), padding="VALID", kernel_dilation=(1, 2), name="atrous")
    with pytest.raises(ValueError, match=r"QuantConv 'atrous': a 3x3 kernel dilated \(1, 2\) \(spanning 3x5\) with "
                                         r"padding \(\(0, 0\), \(0, 0\)\) leaves no output position on an input of "
                                         r"height x width 3x4"):
        dilated.init(jax.random.key(0), jnp.zeros((1, 3, 4, 1)))
    with pytest.raises(ValueError, match=r"the input must be NHWC .* got shape \(8, 8, 1\)"):
        QuantConv(4, padding="SAME").init(jax.random.key(0), jnp.zeros((8, 8, 1)))
    # strides=None is flax's sentinel for 1
    x = jnp.ones((1, 5, 5, 2))
    variables = QuantConv(3, strides=None, padding="SAME").init(jax.random.key(0), x)
    assert QuantConv(3, strides=None, padding="SAME").apply(variables, x).shape == (1, 5, 5, 3)


def test_clip_loss_quantizes_a_flax_style_conv_net():
    """A network written with flax's forms (int kernel and strides, SAME padding) works end to end:
    its conv kernels are weight sites with the right MACs, and ClipLoss's float clip loss matches
    the network's own float loss."""
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = ls.layers.QuantReLU(name="r1")(QuantConv(4, kernel_size=3, strides=2, padding="SAME", name="c1")(x))
            x = ls.layers.QuantReLU(name="r2")(QuantConv(4, kernel_size=2, padding="VALID", name="c2")(x))
            return ls.layers.QuantDense(3, name="head")(x.mean(axis=(1, 2)))

    x = jax.random.normal(jax.random.key(0), (16, 9, 9, 1))
    y = np.arange(16) % 3
    model = Net()
    variables = model.init(jax.random.key(1), x)
    found, _ = ls.sites_of(model, variables, x)
    macs = {s.name: s.macs for s in found if s.kind == "weight"}
    assert macs == {"c1": 5 * 5 * 3 * 3 * 1 * 4, "c2": 4 * 4 * 2 * 2 * 4 * 4, "head": 4 * 3}
    net = ls.train.Network(model, variables, {}, [])
    loss = ls.ClipLoss(net, (np.asarray(x), y), w_bits=8, a_bits=8, sites=["c2", "r1"])
    alpha = loss.init("max")
    logits = model.apply(variables, x)
    float_ce = float(jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(16), y]))
    assert math.isfinite(float(loss(alpha)))
    assert float(loss(alpha)) == pytest.approx(float_ce, rel=0.05)


class AtrousNet(nn.Module):
    """stem → dilated conv → dilated depthwise conv → pointwise → dense (untrained is enough)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ls.layers.QuantReLU(name="r1")(QuantConv(6, name="stem")(x))
        x = ls.layers.QuantReLU(name="r2")(QuantConv(6, kernel_dilation=2, name="atrous")(x))
        x = ls.layers.QuantReLU(name="r3")(QuantConv(6, kernel_dilation=(2, 1), feature_group_count=6, name="dw")(x))
        x = ls.layers.QuantReLU(name="r4")(QuantConv(8, (1, 1), name="pw")(x))
        return ls.layers.QuantDense(10, name="fc")(x.mean(axis=(1, 2)))


def test_rounding_through_dilated_convs(digits):
    """GPTQ sees a dilated layer's own product (its input patches are the product with an identity
    kernel; a depthwise one is fitted group by group with the layer's dilation): the output MSE it
    reports is the one its codes give on the recorded inputs, and at most nearest rounding's."""
    from landscape.layerwise import layer_mse, record_layers

    model = AtrousNet()
    variables = model.init(jax.random.key(0), digits.calib.x[:1])
    net = ls.train.Network(model, variables, {}, [])
    loss = ls.ClipLoss(net, digits.calib, w_bits=3, a_bits=None, per_channel=True)
    assert [s.macs for s in loss.sites if s.name in ("atrous", "dw")] == [8 * 8 * 9 * 6 * 6, 8 * 8 * 9 * 6]
    alpha = loss.init("mse")
    result = ls.gptq(loss, alpha, num_images=32, inputs="float")
    recorded = digits.calib.x[ls.data.spread_rows(len(digits.calib.x), 32)]  # the images GPTQ records
    io = record_layers(loss.model, loss.variables, jnp.asarray(recorded), ["atrous", "dw"])
    for name in ("atrous", "dw"):
        fit, site = result.layers[name], result.network.sites[name]
        X, Y, gemm = io[name]
        assert gemm.dilation == ((2, 2) if name == "atrous" else (2, 1))
        w = np.asarray(fit.codes, np.float64) * site.scale + site.offset
        with jax.default_matmul_precision("highest"):
            mse = layer_mse(gemm, X, Y, jnp.asarray(w, jnp.float32))
        assert mse == pytest.approx(fit.mse, rel=1e-4), name
        assert fit.mse <= fit.mse_nearest * (1 + 1e-6)
