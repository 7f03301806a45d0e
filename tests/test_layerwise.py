"""Layer-wise reconstruction helpers (recording layer inputs/outputs, the output MSE) and the quantizable layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import layers as qlayers
from landscape import layerwise, sites
from landscape.layers import BatchNorm, QuantConv, QuantDense

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
    with pytest.raises(ValueError, match="x has 37 rows and y 1"):  # y of one row broadcast: a wrong mean
        layerwise.layer_mse(gemm, x, y[:1], w)


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


# ------------------------------------------------------------------------------------------------ layers


def test_conv_pads_each_axis_by_its_own_kernel_size_and_takes_strides_and_explicit_padding():
    x = np.random.default_rng(0).normal(size=(2, 6, 7, 3)).astype(np.float32)
    for kernel_size, strides, padding, out_hw in (((3, 1), (1, 1), None, (6, 7)), ((1, 5), (1, 1), None, (6, 7)),
                                                  ((3, 3), (2, 2), None, (3, 4)), ((3, 3), (1, 1), 0, (4, 5))):
        conv = QuantConv(4, kernel_size=kernel_size, strides=strides, padding=padding)
        variables = conv.init(jax.random.key(0), x)
        y = np.asarray(conv.apply(variables, x))
        assert y.shape == (2, *out_hw, 4), (kernel_size, strides, padding)
        # one output pixel by hand: the window at (i, j) of the zero-padded input
        k = np.asarray(variables["params"]["kernel"], np.float64)
        kh, kw = kernel_size
        ph, pw = (kh // 2, kw // 2) if padding is None else (padding, padding)
        xp = np.pad(x.astype(np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
        i, j = out_hw[0] - 1, 1
        si, sj = i * strides[0], j * strides[1]
        want = np.einsum("hwc,hwco->o", xp[1, si:si + kh, sj:sj + kw], k)
        np.testing.assert_allclose(y[1, i, j], want, rtol=1e-4, atol=1e-5)


def test_batchnorm_trains_on_the_biased_batch_variance_and_updates_the_running_averages():
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.normal(size=(4, 2, 2, 3))).astype(np.float32)
    bn = BatchNorm(epsilon=0.1)
    variables = bn.init(jax.random.key(0), x, train=True)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))  # initialising updates nothing
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))
    params = {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, -1.0, 1.0])}
    y, updated = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                          mutable=["batch_stats"])
    x64 = x.astype(np.float64).reshape(-1, 3)
    mean, var = x64.mean(0), x64.var(0)  # biased (ddof=0), as Flax's BatchNorm
    scale, bias = np.asarray(params["scale"]), np.asarray(params["bias"])
    want = (x.astype(np.float64) - mean) / np.sqrt(var + 0.1) * scale + bias
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updated["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)  # 0.9 · 0 + 0.1 · mean
    np.testing.assert_allclose(updated["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)  # 0.9 · 1 + 0.1 · var
    y_eval = bn.apply({"params": params, "batch_stats": updated["batch_stats"]}, x)  # evaluation: running stats
    rm, rv = 0.1 * mean, 0.9 + 0.1 * var
    want_eval = (x.astype(np.float64) - rm) / np.sqrt(rv + 0.1) * scale + bias
    np.testing.assert_allclose(np.asarray(y_eval), want_eval, rtol=1e-5, atol=1e-5)


def test_kernel_initialisers_he_fan_out_for_convs_lecun_for_dense():
    conv = QuantConv(64).init(jax.random.key(0), jnp.zeros((1, 4, 4, 16)))["params"]["kernel"]
    assert float(jnp.std(conv)) == pytest.approx(np.sqrt(2.0 / (3 * 3 * 64)), rel=0.05)  # fan_out = kh·kw·C_out
    dense = QuantDense(32).init(jax.random.key(0), jnp.zeros((1, 256)))["params"]
    assert float(jnp.std(dense["kernel"])) == pytest.approx(np.sqrt(1.0 / 256), rel=0.05)  # fan_in
    assert not np.any(np.asarray(dense["bias"]))


def test_gemm_hook_routes_products_inside_its_block_only():
    x = np.ones((2, 3, 3, 2), np.float32)
    conv, dense = QuantConv(2), QuantDense(3)
    cv, dv = conv.init(jax.random.key(0), x), dense.init(jax.random.key(1), x[:, 0, 0])
    seen = []

    def hook(module, inputs, kernel, gemm):
        seen.append(type(module).__name__)
        return 2.0 * gemm(inputs, kernel)  # the hook's result is the product

    with qlayers.gemm_hook(hook):
        y_dense = dense.apply(dv, x[:, 0, 0])
        y_conv = conv.apply(cv, x)
    assert seen == ["QuantDense", "QuantConv"]
    plain_dense, plain_conv = dense.apply(dv, x[:, 0, 0]), conv.apply(cv, x)
    assert seen == ["QuantDense", "QuantConv"]  # the hook is gone after its block
    np.testing.assert_allclose(np.asarray(y_dense), 2.0 * np.asarray(plain_dense))  # bias 0 at init
    np.testing.assert_allclose(np.asarray(y_conv), 2.0 * np.asarray(plain_conv))


def test_layer_inputs_take_one_name_and_refuse_unknown_activation_sites(tiny_net, digits):
    """A str is one layer (as in record_layers; it was read as a set of letters), and act_specs naming
    something other than an activation site of the model (a typo, a weight site) is refused: those inputs
    came back unquantized. A site without an α is named (it was a bare KeyError)."""
    x = jnp.asarray(np.asarray(digits.calib.x[:4], np.float32))
    assert list(layerwise.layer_inputs(tiny_net.model, "conv0_1")(tiny_net.variables, x)) == ["conv0_1"]
    spec = sites.SiteSpec(2, "unsigned")
    for name in ("relu0_O", "conv0_1"):
        run = layerwise.layer_inputs(tiny_net.model, ["conv0_1"], {name: spec}, {name: 0.9})
        with pytest.raises(ValueError, match=rf"act_specs names \['{name}'\], which are not activation sites of the "
                                             r"model; its activation sites are \['relu0_0', "):
            run(tiny_net.variables, x)
    with pytest.raises(ValueError, match=r"act_specs names \['relu0_0'\], which act_alphas gives no α"):
        layerwise.layer_inputs(tiny_net.model, ["conv0_1"], {"relu0_0": spec}, {"relu0_1": 0.9})
