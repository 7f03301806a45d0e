"""Layer-wise reconstruction helpers: recording layer inputs/outputs and the output MSE."""

import jax.numpy as jnp
import numpy as np
import pytest

from landscape import layerwise, sites

LAYERS = ["conv0_0", "conv0_1", "conv1_0", "conv1_1", "fc"]


def _kernel(net, name):
    return net.variables["params"][name]["kernel"]


def test_record_layers_gives_inputs_outputs_and_the_layers_product(tiny_net, digits):
    x = np.asarray(digits.calib.x[:16], np.float32)
    io = layerwise.record_layers(tiny_net.model, tiny_net.variables, x, LAYERS)
    assert list(io) == LAYERS  # network order
    X0, _, _ = io["conv0_0"]
    np.testing.assert_array_equal(np.asarray(X0), x)  # the first layer reads the images
    for name, (X, Y, gemm) in io.items():
        assert X.shape[0] == Y.shape[0] == 16
        np.testing.assert_allclose(np.asarray(gemm(X, _kernel(tiny_net, name))), np.asarray(Y), rtol=1e-6)
    # the float inputs of the jitted recorder are the same tensors
    float_inputs = layerwise.layer_inputs(tiny_net.model, LAYERS)(tiny_net.variables, jnp.asarray(x))
    for name in LAYERS:
        np.testing.assert_allclose(np.asarray(float_inputs[name]), np.asarray(io[name][0]), rtol=1e-5, atol=1e-6)


def test_layer_inputs_quantize_the_activation_sites_on_the_way(tiny_net, digits):
    x = jnp.asarray(np.asarray(digits.calib.x[:16], np.float32))
    alpha = 0.9
    run = layerwise.layer_inputs(tiny_net.model, ["conv0_1"], {"relu0_0": sites.SiteSpec(2, "unsigned")},
                                 {"relu0_0": alpha})
    X = np.asarray(run(tiny_net.variables, x)["conv0_1"])
    levels = np.arange(4) * alpha / 3  # unsigned 2-bit grid: kΔ, Δ = α/3
    assert np.abs(X[..., None] - levels).min(-1).max() < 1e-6
    assert len(np.unique(np.round(X, 5))) > 1
    float_X = np.asarray(layerwise.layer_inputs(tiny_net.model, ["conv0_1"])(tiny_net.variables, x)["conv0_1"])
    assert np.abs(X - float_X).max() > 0.05  # not the float network's input


def test_layer_mse_is_the_mean_squared_output_error_in_any_chunking():
    rng = np.random.default_rng(0)
    x, w, y = rng.normal(size=(37, 5)), rng.normal(size=(5, 3)), rng.normal(size=(37, 3))
    b = rng.normal(size=3)
    gemm = lambda u, k: jnp.asarray(u) @ jnp.asarray(k)  # noqa: E731
    want = np.mean((x @ w + b - y) ** 2)
    for chunk in (1, 8, 37, 100):
        assert layerwise.layer_mse(gemm, x, y, w, b, chunk=chunk) == pytest.approx(want, rel=1e-5)
    assert layerwise.layer_mse(gemm, x, y, w, chunk=8) == pytest.approx(np.mean((x @ w - y) ** 2), rel=1e-5)
    for bad in (-1, 0, 2.5):  # chunk=-1 gave an MSE of 0 (an empty loop)
        with pytest.raises(ValueError, match=f"chunk={bad} must be a positive integer"):
            layerwise.layer_mse(gemm, x, y, w, chunk=bad)


def test_unknown_layers_are_named_in_the_error(tiny_net, digits):
    x = np.asarray(digits.calib.x[:2], np.float32)
    with pytest.raises(ValueError, match=r"\['nope'\] were not called"):
        layerwise.record_layers(tiny_net.model, tiny_net.variables, x, ["conv0_0", "nope"])
    with pytest.raises(ValueError, match=r"\['nope'\] were not called"):
        layerwise.layer_inputs(tiny_net.model, ["nope"])(tiny_net.variables, jnp.asarray(x))
    # one name as a string is that layer, not a set of letters
    assert list(layerwise.record_layers(tiny_net.model, tiny_net.variables, x, "conv0_0")) == ["conv0_0"]


def test_a_layer_applied_twice_is_named_in_a_warning():
    import flax.linen as nn
    import jax

    from landscape.layers import QuantDense

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            dense = QuantDense(4, name="shared")
            return QuantDense(2, name="head")(dense(jnp.tanh(dense(x))))

    model = Shared()
    x = np.ones((3, 4), np.float32)
    variables = model.init(jax.random.key(0), x)
    with pytest.warns(UserWarning, match=r"\{'shared': 2\}\) are recorded at their first application"):
        io = layerwise.record_layers(model, variables, x, ["shared", "head"])
    np.testing.assert_array_equal(np.asarray(io["shared"][0]), x)  # the first application's input
    with pytest.warns(UserWarning, match=r"\{'shared': 2\}"):
        layerwise.layer_inputs(model, ["shared"])(variables, jnp.asarray(x))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a layer applied once is no warning
        layerwise.record_layers(model, variables, x, ["head"])
