"""Site contexts (landscape.sites) on a two-layer network, against numpy references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import sites
from landscape.layers import QuantDense, QuantIdentity, QuantReLU


class _Net(nn.Module):
    """fc1 → relu (applied twice: after fc1 and after fc2, one shared α) → fc3, and a signed site."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = QuantIdentity(name="inp")(x)
        relu = QuantReLU(name="relu")
        h = relu(QuantDense(4, name="fc1")(x))
        h = relu(QuantDense(4, name="fc2")(h) + 1.0)
        return QuantDense(3, name="fc3")(h)


def _net():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    model = _Net()
    variables = model.init(jax.random.key(0), jnp.asarray(x))
    params = jax.tree.map(np.asarray, variables["params"])
    return model, variables, params, x


def _apply(model):
    return lambda v, x: model.apply(v, x)


def _relu(z):
    return np.maximum(z, 0.0)


def _q_unsigned(x, alpha, bits):
    delta = alpha / (2**bits - 1)
    return np.round(np.clip(x / delta, 0, 2**bits - 1)) * delta


def _q_midtread(x, alpha, bits):
    top = 2 ** (bits - 1) - 1
    delta = alpha / top
    return np.round(np.clip(x / delta, -top, top)) * delta


def _forward(params, x, w=lambda name, k: k, a=lambda name, v: v):
    """The network in numpy; ``w``/``a`` transform each weight / activation site's tensor."""
    p = {k: {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in params.items()}
    h = a("inp", x.astype(np.float64))
    h = a("relu", _relu(h @ w("fc1", p["fc1"]["kernel"]) + p["fc1"]["bias"]))
    h = a("relu", _relu(h @ w("fc2", p["fc2"]["kernel"]) + p["fc2"]["bias"] + 1.0))
    return h @ w("fc3", p["fc3"]["kernel"]) + p["fc3"]["bias"]


def test_trace_sites_records_each_module_once_in_call_order():
    model, variables, _, x = _net()
    found, pairs = sites.trace_sites(_apply(model), variables, x)
    assert [(s.name, s.kind) for s in found] == [("inp", "activation"), ("fc1", "weight"), ("relu", "activation"),
                                                ("fc2", "weight"), ("fc3", "weight")]
    assert [s.index for s in found] == list(range(5)) and pairs == []
    by_name = {s.name: s for s in found}
    assert by_name["inp"].signed and by_name["inp"].grid == "midtread" and by_name["inp"].shape == (5,)
    assert not by_name["relu"].signed and by_name["relu"].grid == "unsigned" and by_name["relu"].shape == (4,)
    assert by_name["fc1"].grid is None and by_name["fc1"].shape == (5, 4) and by_name["fc1"].channels == 4
    assert by_name["fc3"].channels == 3 and by_name["fc3"].macs == 4 * 3
    assert by_name["relu"].macs is None
    with sites.recording() as rec:
        model.apply(variables, x)
    assert [s.name for s in rec.sites] == [s.name for s in found]


def test_quantizing_with_traced_widths_overrides_the_specs_bits():
    model, variables, params, x = _net()
    specs = {"inp": sites.SiteSpec(8, "midtread"), "fc1": sites.SiteSpec(8, "midtread"),
             "relu": sites.SiteSpec(8, "unsigned")}
    alphas = {"inp": jnp.float32(1.5), "fc1": jnp.float32(0.6), "relu": jnp.float32(1.0)}
    widths = {"inp": jnp.float32(3.0), "fc1": jnp.float32(2.0), "relu": jnp.float32(2.0)}

    def run(alphas, widths, v, x):
        with sites.quantizing(specs, alphas, widths):
            return model.apply(v, x)

    got = np.asarray(jax.jit(run)(alphas, widths, variables, x))
    want = _forward(params, x,
                    w=lambda name, k: _q_midtread(k, 0.6, 2) if name == "fc1" else k,
                    a=lambda name, v: _q_midtread(v, 1.5, 3) if name == "inp" else _q_unsigned(v, 1.0, 2))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_quantized_weights_give_the_grid_values_the_shift_and_the_weight_used():
    model, variables, params, x = _net()
    specs = {"fc1": sites.SiteSpec(3, "midtread", bias_correction=True), "fc2": sites.SiteSpec(3, "midtread")}
    alphas = {"fc1": jnp.float32(0.5), "fc2": jnp.float32(0.7)}
    got = sites.quantized_weights(_apply(model), specs, alphas, variables, x)
    assert set(got) == {"fc1", "fc2"}
    for name, alpha in (("fc1", 0.5), ("fc2", 0.7)):
        w = params[name]["kernel"]
        grid, shift, used = (np.asarray(t) for t in got[name])
        np.testing.assert_allclose(grid, _q_midtread(w, alpha, 3), rtol=1e-5, atol=1e-7)
        assert shift.shape == (1, 4)  # W's rank, size 1 but on the output-channel axis
        want_shift = grid.mean(0, keepdims=True) - w.mean(0, keepdims=True) if name == "fc1" else np.zeros((1, 4))
        np.testing.assert_allclose(shift, want_shift, atol=1e-7)
        np.testing.assert_allclose(used, grid - shift, atol=1e-7)
    assert np.abs(np.asarray(got["fc1"][1])).max() > 1e-3  # the correction is not trivially zero
    # traced corrections override spec.bias_correction both ways
    on_off = {"fc1": jnp.float32(0.0), "fc2": jnp.float32(1.0)}
    flipped = sites.quantized_weights(_apply(model), specs, alphas, variables, x, corrections=on_off)
    assert not np.any(np.asarray(flipped["fc1"][1]))
    g2 = np.asarray(flipped["fc2"][0])
    w2 = params["fc2"]["kernel"]
    np.testing.assert_allclose(np.asarray(flipped["fc2"][1]), g2.mean(0, keepdims=True) - w2.mean(0, keepdims=True),
                               atol=1e-7)


def _mean_abs_times_bits(t, spec, kind):
    """A calibration rule that sees every value and whose α shows the width it was given: mean |t| · bits."""
    return jnp.mean(jnp.abs(t)) * spec.bits


def test_calibrating_sees_upstream_quantization_shared_sites_and_per_channel_weights():
    model, variables, params, x = _net()
    specs = {"fc1": sites.SiteSpec(2, "midtread", per_channel=True), "relu": sites.SiteSpec(2, "unsigned")}
    widths = {"fc1": jnp.float32(3.0)}  # fc1's traced width: 3 bits, not the spec's 2

    def run(v, x, upstream):
        with sites.calibrating(specs, _mean_abs_times_bits, quantize_upstream=upstream, bits=widths) as ctx:
            model.apply(v, x)
        return ctx.alphas

    w1 = params["fc1"]["kernel"]
    alpha_w = np.abs(w1).mean(axis=0) * 3  # one α per output channel (column), with the traced width
    relu_alpha = {}
    for upstream in (False, True):
        alphas = jax.jit(lambda v, x, u=upstream: run(v, x, u))(variables, x)
        np.testing.assert_allclose(np.asarray(alphas["fc1"]), alpha_w, rtol=1e-6)
        # the ReLU, applied twice, gets the rule over both applications' values; with upstream
        # quantization each application is quantized with the α of the values seen up to it
        seen = []

        def act(name, v, seen=seen, upstream=upstream):
            if name != "relu":
                return v
            seen.append(v)
            alpha = np.abs(np.concatenate([s.ravel() for s in seen])).mean() * 2
            return _q_unsigned(v, alpha, 2) if upstream else v

        def weight(name, k, upstream=upstream):
            return _q_midtread(k, alpha_w, 3) if upstream and name == "fc1" else k

        _forward(params, x, w=weight, a=act)
        assert len(seen) == 2
        relu_alpha[upstream] = float(alphas["relu"])
        assert relu_alpha[upstream] == pytest.approx(np.abs(np.concatenate([s.ravel() for s in seen])).mean() * 2,
                                                     rel=1e-5)
    assert relu_alpha[True] != pytest.approx(relu_alpha[False], rel=1e-4)  # the two modes differ here


class _TwoSources(nn.Module):
    """A dense layer applied to two different activation sites: it has no single direct input."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = QuantReLU(name="a")(x)
        b = QuantReLU(name="b")(x - 1.0)
        shared = QuantDense(2, name="shared")
        return shared(a) + shared(b) + QuantDense(2, name="only_a")(a)


def test_capture_returns_the_float_tensors_of_the_named_sites():
    model = _TwoSources()
    x = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), x)
    got = sites.capture(_apply(model), ["b", "only_a", "a"], variables, x)
    assert set(got) == {"a", "b", "only_a"}
    np.testing.assert_array_equal(np.asarray(got["a"]), _relu(x))
    np.testing.assert_allclose(np.asarray(got["b"]), _relu(x - 1.0), atol=1e-7)
    np.testing.assert_array_equal(np.asarray(got["only_a"]), np.asarray(variables["params"]["only_a"]["kernel"]))
    with pytest.raises(ValueError, match=r"sites \['nope'\] were not reached"):
        sites.capture(_apply(model), ["a", "nope"], variables, x)


def test_direct_inputs_leave_out_a_layer_fed_by_two_sites():
    model = _TwoSources()
    x = np.ones((2, 3), np.float32)
    variables = model.init(jax.random.key(0), x)
    assert sites.direct_inputs(_apply(model), variables, x) == {"only_a": "a"}
    found, _ = sites.trace_sites(_apply(model), variables, x)
    assert {s.name: s.macs for s in found if s.kind == "weight"} == {"shared": 2 * 3 * 2, "only_a": 3 * 2}
