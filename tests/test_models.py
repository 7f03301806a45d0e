import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
import models


@pytest.mark.parametrize("name,shape,weights,acts", [
    ("mlp", (2, 8, 8, 1), 4, 3),
    ("cnn", (2, 8, 8, 1), 5, 4),
    ("resnet8", (2, 8, 8, 1), 10, 7),
    ("resnet20", (2, 28, 28, 1), 22, 19),
    ("resnet20", (2, 32, 32, 3), 22, 19),
    ("resnet18", (1, 64, 64, 3), 21, 17),
    ("resnet50", (1, 64, 64, 3), 54, 49),
    ("vit", (2, 8, 8, 1), 18, 17),
    ("vit", (2, 28, 28, 1), 18, 17),
    ("mobilenet", (2, 8, 8, 1), 17, 16),
    ("mobilenet", (2, 28, 28, 1), 17, 16),
    ("mobilenet", (2, 32, 32, 3), 17, 16),
])
def test_zoo_shapes_and_sites(name, shape, weights, acts):
    model = models.create(name, num_classes=7)
    x = jnp.zeros(shape)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert out.shape == (shape[0], 7)
    all_sites, _ = ls.sites_of(model, variables, x)
    kinds = [s.kind for s in all_sites]
    assert kinds.count("weight") == weights and kinds.count("activation") == acts
    assert len({s.name for s in all_sites}) == len(all_sites)
    # Default FP32 layers: the stem, the classifier and the classifier's input.
    default = ls.default_sites(all_sites, quantize_first_last=False)
    assert len(default) == weights + acts - 3
    assert all_sites[0].name not in {s.name for s in default}
    assert ls.default_sites(all_sites, quantize_first_last=True) == all_sites


def test_resnet20_matches_reference_layout():
    model = models.create("resnet20", num_classes=10)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    all_sites, pairs = ls.sites_of(model, variables, x)
    names = [s.name for s in all_sites]
    # Network order interleaves weights and activations; every block has its own ReLUs.
    assert names[:5] == ["conv1", "relu", "layer1_0/conv1", "layer1_0/relu1", "layer1_0/conv2"]
    assert "layer2_0/downsample_0" in names and names[-1] == "fc"
    assert len(pairs) == 21  # every conv is followed by a BN
    # MACs per example, by hand: stem 3·3·3·16·32², stage 1 six 3·3·16·16·32², stage 2
    # 3·3·16·32·16² + five 3·3·32·32·16² + a 1×1 16·32·16² shortcut, stage 3 likewise at 8², and
    # fc 64·10: 40.8 M, the figure usually quoted for resnet20 with 1×1 shortcuts.
    macs = {s.name: s.macs for s in all_sites if s.kind == "weight"}
    assert macs["conv1"] == 3 * 3 * 3 * 16 * 32 * 32 and macs["fc"] == 64 * 10
    assert macs["layer2_0/downsample_0"] == 16 * 32 * 16 * 16
    assert sum(macs.values()) == 40_813_184
    assert all(s.macs is None for s in all_sites if s.kind == "activation")


def test_macs_count_every_application_of_a_shared_layer():
    class Twice(flax.linen.Module):
        @flax.linen.compact
        def __call__(self, x, train=False):
            conv = ls.layers.QuantConv(4, kernel_size=(3, 3), strides=(2, 2))
            dense = ls.layers.QuantDense(4)
            y = conv(x)  # (B, 5, 5, 4) from 9×9
            return dense(dense(y.reshape(y.shape[0], 25, 4))).sum((1, 2))

    model = Twice()
    x = jnp.zeros((2, 9, 9, 3))
    variables = model.init(jax.random.key(0), x)
    macs = {s.name: s.macs for s in ls.sites_of(model, variables, x)[0]}
    assert macs["QuantConv_0"] == 3 * 3 * 3 * 4 * 5 * 5
    assert macs["QuantDense_0"] == 2 * 25 * 4 * 4  # applied twice to (B, 25, 4)


def test_direct_inputs_follow_value_preserving_paths():
    relu = ls.layers.QuantReLU

    class Paths(flax.linen.Module):
        @flax.linen.compact
        def __call__(self, x, train=False):
            a = relu(name="a")(ls.layers.QuantConv(4, name="c0")(x))          # (B, 8, 8, 4)
            pooled = jax.jit(lambda t: flax.linen.max_pool(t, (2, 2), strides=(2, 2)))(a)
            y = relu(name="b")(ls.layers.QuantConv(4, name="c1")(pooled))     # through a nested jit
            flat = ls.layers.QuantDense(8, name="d0")(y.reshape(y.shape[0], -1))  # through a reshape
            avg = flax.linen.avg_pool(relu(name="c")(flat)[:, None, :, None], (1, 2), strides=(1, 2))
            z = ls.layers.QuantDense(3, name="d1")(avg.reshape(avg.shape[0], -1))  # averaged: no grid
            s = ls.layers.QuantDense(3, name="d2")(y.reshape(y.shape[0], -1) + 1.0)  # arithmetic
            return z + s + ls.layers.QuantDense(3, name="d3")(jnp.mean(a, (1, 2)))

    model = Paths()
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)

    def apply(v, x):
        return model.apply(v, x, train=False)

    assert ls.sites.direct_inputs(apply, variables, x) == {"c1": "a", "d0": "b"}
    assert ls.sites.direct_inputs(apply, variables, x, through=frozenset({"reshape"})) == {"d0": "b"}
    assert ls.sites.direct_inputs(apply, variables, x, through=frozenset()) == {}
    # The zoo: the cnn's second stage reads the first through max-pooling, resnet18's first
    # block reads the stem's ReLU through its max-pool.
    for name, layer, source in (("cnn", "conv1_0", "relu0_1"), ("resnet18", "layer1_0/conv1", "relu")):
        m = models.create(name, num_classes=10)
        xz = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)  # abstract: tracing needs no values
        found = ls.sites.direct_inputs(lambda v, x, m=m: m.apply(v, x, train=False),
                                       jax.eval_shape(m.init, jax.random.key(0), xz), xz)
        assert found[layer] == source


def test_direct_inputs_keep_two_sites_on_one_tensor_apart():
    """Two signed sites read one tensor, a third layer reads it with no site: each layer maps to
    its own site, the third to none (they had all mapped to the last site recorded)."""
    import flax.linen as nn

    from landscape.layers import QuantDense, QuantIdentity

    class TwoSites(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.LayerNorm()(x)
            a = QuantDense(4, name="dq")(QuantIdentity(name="site_q")(h))
            b = QuantDense(4, name="dk")(QuantIdentity(name="site_k")(h))
            return a + b + QuantDense(4, name="dfp")(h)

    m, x = TwoSites(), jax.ShapeDtypeStruct((2, 8), jnp.float32)
    found = ls.sites.direct_inputs(lambda v, x: m.apply(v, x), jax.eval_shape(m.init, jax.random.key(0), x), x)
    assert found == {"dq": "site_q", "dk": "site_k"}


def test_create_refuses_what_would_build_another_model():
    for name, kw, match in (
            ("resnet20", {"blocks_per_stage": 2}, "'resnet20' sets blocks_per_stage itself"),
            ("resnet18", {"block": "Basic"}, "'resnet18' sets block itself"),
            ("resnet20", {"widths": (16, 32)}, r"resnet20: widths=\(16, 32\) must hold 3 widths"),
            ("cnn", {"widths": ()}, r"cnn: widths=\(\) must hold at least one width"),
            ("vit", {"patch": 0}, "vit: patch=0 must be a positive integer"),
            ("vit", {"heads": 0}, "vit: heads=0 must be a positive integer"),
            ("vit", {"depth": -1}, "vit: depth=-1 must be a positive integer"),
            ("vit", {"dim": 64.0}, "vit: dim=64.0 must be a positive integer"),
            ("vit", {"quantize_attention": "no"}, "vit: quantize_attention='no' must be True or False")):
        with pytest.raises(ValueError, match=match):
            models.create(name, num_classes=10, **kw)
    with pytest.raises(ValueError, match="block='Basic' must be 'basic' or 'bottleneck'"):
        x = jnp.zeros((1, 32, 32, 3))
        models.ImageNetResNet(10, block="Basic").init(jax.random.key(0), x)
    # numpy integers are integers, and become Python ints (the model's repr keys caches)
    assert repr(models.create("mlp", num_classes=np.int64(10))) == repr(models.create("mlp", num_classes=10))


def test_unknown_model_and_bad_classes():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*resnet20"):
        models.create("vgg", num_classes=10)
    with pytest.raises(ValueError, match="num_classes=1"):
        models.create("mlp", num_classes=1)
    for kw in ({"widths": (0,)}, {"widths": (4, 2.5)}, {"hidden": (-4,)}, {"hidden": 16}):
        key, value = next(iter(kw.items()))
        with pytest.raises(ValueError, match=re.escape(f"{key}={value!r} must be a tuple of positive integers")):
            models.create("cnn" if key == "widths" else "mlp", num_classes=10, **kw)


def test_torchvision_import_roundtrip():
    model = models.create("resnet18", num_classes=10)
    x = jnp.ones((1, 32, 32, 3))
    variables = model.init(jax.random.key(1), x)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
    # Build a torchvision-style state dict from our variables ...
    state = {}
    for key, v in flat.items():
        coll, *mods, leaf = key.split("/")
        tv = ".".join(m.replace("layer", "layer").replace("_", ".") for m in mods)
        v = np.asarray(v)
        if leaf == "kernel":
            state[f"{tv}.weight"] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        elif coll == "params":
            state[f"{tv}.{'weight' if leaf == 'scale' else 'bias'}"] = v
        else:
            state[f"{tv}.running_{leaf}"] = v
        state.setdefault("bn1.num_batches_tracked", np.array(0))
    assert "layer1.0.downsample.0.weight" not in state and "layer2.0.downsample.0.weight" in state
    # ... and import it back: identical outputs.
    imported = models.import_torchvision(variables, state)
    np.testing.assert_allclose(model.apply(imported, x), model.apply(variables, x), rtol=1e-6)
    bad = dict(state)
    bad["fc.weight"] = bad["fc.weight"][:, :5]
    with pytest.raises(ValueError, match="fc.weight"):
        models.import_torchvision(variables, bad)
    with pytest.raises(ValueError, match="lacks"):
        models.import_torchvision(variables, {k: v for k, v in state.items() if k != "fc.bias"})


def test_fold_batchnorm_is_exact(tiny_net, digits):
    x = jnp.asarray(digits.test.x[:32])
    folded = ls.folding.fold_batchnorm(tiny_net.model, tiny_net.variables, x[:1])
    ref = tiny_net.model.apply(tiny_net.variables, x)
    np.testing.assert_allclose(tiny_net.model.apply(folded, x), ref, rtol=1e-4, atol=1e-4)
    k0 = np.asarray(tiny_net.variables["params"]["conv0_0"]["kernel"])
    assert not np.allclose(np.asarray(folded["params"]["conv0_0"]["kernel"]), k0)


@pytest.mark.parametrize("name,macs,params", [("resnet18", 1_814_073_344, 11_689_512),
                                              ("resnet50", 4_089_184_256, 25_557_032)])
def test_imagenet_resnets_match_torchvisions_compute_and_size(name, macs, params):
    """At 224×224 the ImageNet ResNets have torchvision's parameter counts and MACs (1.81 G for
    resnet18, 4.09 G for resnet50: v1.5, the stride on the bottleneck's 3×3 conv). Imported
    torchvision weights only reproduce torchvision's outputs on this exact topology: guards against
    another stem padding, max-pool padding, or the stride on the bottleneck's first 1×1 conv (v1,
    3.86 G MACs)."""
    model = models.create(name, num_classes=1000)
    x = jnp.zeros((1, 224, 224, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == params
    weight_sites = [s for s in ls.sites_of(model, variables, x)[0] if s.kind == "weight"]
    by_name = {s.name: s.macs for s in weight_sites}
    assert by_name["conv1"] == 7 * 7 * 3 * 64 * 112 * 112  # stem: 224 → 112 (padding 3)
    assert by_name["layer1_0/conv1"] == (3 * 3 * 64 * 64 if name == "resnet18" else 64 * 64) * 56 * 56  # pool: → 56
    assert sum(by_name.values()) == macs


def test_cnn_pools_between_stages_down_to_1x1():
    """Pooling halves the resolution after every stage but the last while the maps are at least 2×2:
    four stages on 8×8 images run at 8, 4, 2 and 1 pixels (a 2×2 map was left unpooled)."""
    model = models.create("cnn", num_classes=10, widths=(2, 3, 4, 5))
    x = jnp.zeros((1, 8, 8, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    macs = {s.name: s.macs for s in ls.sites_of(model, variables, x)[0] if s.kind == "weight"}
    assert macs["conv0_0"] == 9 * 1 * 2 * 8 * 8
    assert macs["conv1_1"] == 9 * 3 * 3 * 4 * 4
    assert macs["conv2_1"] == 9 * 4 * 4 * 2 * 2
    assert macs["conv3_0"] == 9 * 4 * 5 * 1 * 1 and macs["conv3_1"] == 9 * 5 * 5
    assert macs["fc"] == 5 * 10


def test_mobilenet_layout_macs_and_short_fit(digits):
    model = models.create("mobilenet", num_classes=10)
    x = jnp.asarray(digits.calib.x[:2])
    variables = model.init(jax.random.key(0), x)
    all_sites, pairs = ls.sites_of(model, variables, x)
    by_name = {s.name: s for s in all_sites}
    names = [s.name for s in all_sites]
    assert names[:6] == ["stem", "stem_relu", "block0/dw", "block0/dw_relu", "block0/project", "block0/out"]
    assert names[-3:] == ["last", "last_relu", "fc"]
    assert "block0/expand" not in by_name and "block1/expand" in by_name  # expansion 1: no expand conv
    # depthwise kernels (3, 3, 1, C): one input channel per group
    assert by_name["block1/dw"].shape == (3, 3, 1, 32) and by_name["block4/dw"].shape == (3, 3, 1, 96)
    assert by_name["block1/out"].signed and not by_name["block1/dw_relu"].signed
    assert len(pairs) == 16  # every conv is followed by its BatchNorm
    # MACs: out_h · out_w · kh · kw · (C_in / g) · C_out; the depthwise convs of blocks 1 and 3 stride
    macs = {s.name: s.macs for s in all_sites if s.kind == "weight"}
    assert macs["block1/dw"] == 4 * 4 * 3 * 3 * 1 * 32 and macs["block2/dw"] == 4 * 4 * 3 * 3 * 1 * 64
    assert macs["block3/dw"] == 2 * 2 * 3 * 3 * 1 * 64
    assert macs["block1/expand"] == 8 * 8 * 8 * 32 and macs["block1/project"] == 4 * 4 * 32 * 16
    assert macs["stem"] == 8 * 8 * 3 * 3 * 1 * 8 and macs["fc"] == 32 * 10
    out = model.apply(variables, x)
    assert out.shape == (2, 10) and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ValueError, match=r"mobilenet: stages=.* must be a non-empty tuple"):
        models.create("mobilenet", num_classes=10, stages=((4, 16, 2),))
    net = ls.train.fit(model, digits, epochs=3)
    assert net.accuracy(digits.test) > 0.5
