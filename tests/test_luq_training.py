"""LUQ 4-bit training (landscape.luq.Recipe): layer selection, forward parity, whole-network
gradient bias, and training through landscape.train.fit.

Networks are tiny zoo CNNs on digits; statistical checks use fixed seeds.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
import models
from landscape import layers, luq

# quantized layers of a (4, 8) cnn: all but the stem conv0_0 and the classifier fc
MIDDLE = ("conv0_1", "conv1_0", "conv1_1")


def tiny_cnn():
    return models.create("cnn", num_classes=10, widths=(4, 8))


@pytest.fixture(scope="module")
def batch(digits):
    return jnp.asarray(digits.train.x[:32]), jnp.asarray(digits.train.y[:32])


@pytest.fixture(scope="module")
def cnn_variables(batch):
    return tiny_cnn().init(jax.random.key(0), batch[0][:1], train=False)


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ---------------------------------------------------------------------------------------------
# configuration


def test_recipe_fields_repr_and_cache_key():
    r = luq.Recipe()
    assert (r.bits, r.samples, r.finetune_epochs, r.quantize_first_last, r.mode) == (4, 2, 1, False, "luq")
    assert r.rng_streams == ("luq",) and r == luq.Recipe(samples=2)
    ft, epochs, lr = r.finetune
    assert isinstance(ft, luq.FinetuneRecipe) and (epochs, lr) == (1, r.finetune_lr)
    assert ft.key() == r.key() + ".finetune" and ft.rng_streams == ()
    # SMP is LUQ-only: the other modes default to one sample and have no random stream
    for mode in ("rdn", "none", "fp32"):
        other = luq.Recipe(mode=mode, finetune_epochs=0)
        assert other.samples == 1 and other.rng_streams == () and other.finetune is None
    assert luq.Recipe(mode="fp32").gemm_hook("train") is None
    variants = [r, luq.Recipe(samples=1), luq.Recipe(finetune_epochs=0), luq.Recipe(mode="rdn"),
                luq.Recipe(mode="none"), luq.Recipe(mode="fp32"), luq.Recipe(quantize_first_last=True),
                luq.Recipe(prng="jax"), luq.Recipe(max_mode="signed"), luq.Recipe(finetune_lr=0.02),
                luq.Recipe(bits=3), luq.Recipe(finetune_bn_images=0), luq.Recipe(forward_levels="reference")]
    keys = {v.key() for v in variants}
    assert len(keys) == len(variants) and all(k.startswith("luq.Recipe(mode=") for k in keys)
    # the default level sets leave the repr (and every cached network's key) as it was
    assert "forward_levels" not in r.key() and "forward_levels='reference'" in variants[-1].key()
    assert variants[-1].main_phase().forward_levels == "reference"
    for v in (r, luq.Recipe(finetune_bn_images=0), luq.Recipe(mode="rdn", finetune_epochs=0),
              luq.Recipe(finetune_epochs=0, finetune_bn_images=0), variants[-1]):
        assert eval(repr(v), {"luq": luq}) == v  # noqa: S307  (the repr is the constructor call)
    # the BN re-estimation belongs to the FNT phase: the main phase's identity (cache key) omits it
    assert "finetune_bn_images" not in r.main_phase().key()
    assert r.main_phase().key() == luq.Recipe(finetune_bn_images=0).main_phase().key()


@pytest.mark.parametrize("kw,match", [
    ({"mode": "int4"}, "mode"), ({"mode": "rdn", "samples": 2}, "samples"), ({"samples": 0}, "samples"),
    ({"bits": 9}, "bits"), ({"finetune_epochs": -1}, "finetune_epochs"),
    ({"finetune_epochs": 1.5}, "finetune_epochs"), ({"finetune_lr": 0.0}, "finetune_lr"),
    ({"finetune_lr": float("nan")}, "finetune_lr"), ({"quantize_first_last": 1}, "quantize_first_last"),
    ({"prng": "threefry"}, "prng"), ({"max_mode": "max"}, "max_mode"),
    ({"forward_bits": 3}, "forward_bits=4, got forward_bits=3"),
    ({"finetune_bn_images": -1}, "finetune_bn_images"), ({"finetune_bn_images": 2.0}, "finetune_bn_images"),
    ({"forward_levels": "code"}, "forward_levels"),
    ({"forward_bits": 0}, r"^forward_bits must be an integer in \[2, 8\]"),
])
def test_recipe_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        luq.Recipe(**kw)


def test_recipe_bad_phase_and_empty_selection(batch):
    with pytest.raises(ValueError, match="phase"):
        luq.Recipe().gemm_hook("test")
    two = models.create("mlp", num_classes=10, hidden=(8,))  # two dense layers: first and last
    v = two.init(jax.random.key(0), batch[0][:1])
    with pytest.raises(ValueError, match="quantize_first_last"):
        luq.Recipe().init_variables(two, v, batch[0])
    every = luq.Recipe(quantize_first_last=True).init_variables(two, v, batch[0])
    assert luq.Recipe.quantized_layers(every) == ("fc0", "fc1")
    with pytest.raises(ValueError, match="luq.Recipe"):
        luq.gradient_error(two, v, *batch, recipe=ls.train.Recipe())
    # a model of flax.linen layers only: no layer the recipe sees, whatever quantize_first_last says
    import flax.linen as nn

    class PlainFlax(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(10)(nn.relu(nn.Dense(8)(x.reshape((x.shape[0], -1)))))

    plain = PlainFlax()
    pv = plain.init(jax.random.key(0), batch[0][:1])
    with pytest.raises(ValueError, match=r"has 0 landscape.layers conv/dense layer\(s\) \(flax.linen's own layers "
                                         r"are not seen: build them from landscape.layers\)"):
        luq.Recipe(quantize_first_last=True).init_variables(plain, pv, batch[0])


# ---------------------------------------------------------------------------------------------
# which layers, and what they compute


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet8"])
def test_first_and_last_layers_found_by_tracing(name):
    model = models.create(name, num_classes=10)
    x = jnp.zeros((1, 8, 8, 1), jnp.float32)
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    every = [layer.name for layer in ls.sparsity.gemm_layers(model, v, x)]
    default = luq.Recipe().init_variables(model, dict(v), x)
    assert luq.Recipe.quantized_layers(default) == tuple(every[1:-1])
    all_layers = luq.Recipe(quantize_first_last=True).init_variables(model, dict(v), x)
    assert luq.Recipe.quantized_layers(all_layers) == tuple(every)
    assert luq.LAYERS_COLLECTION not in luq.Recipe(mode="fp32").init_variables(model, default, x)


def _spy(hook, log):
    """``hook`` that records, per layer, its output and the FP32, INT4 and INT4-weight products."""
    def spy(module, x, kernel, gemm):
        y = hook(module, x, kernel, gemm)
        log["/".join(module.path)] = {
            "out": np.asarray(y), "fp32": np.asarray(gemm(x, kernel)),
            "int4": np.asarray(luq.luq_gemm(x, kernel, None, gemm, mode="none")),
            "weights": np.asarray(gemm(x, luq.sawb(kernel, signed=True))),
        }
        return y
    return spy


def test_first_last_fp32_and_middle_int4_in_every_phase(batch, cnn_variables):
    model, (x, _) = tiny_cnn(), batch
    recipe = luq.Recipe()
    v = recipe.init_variables(model, dict(cnn_variables), x)
    assert luq.Recipe.quantized_layers(v) == MIDDLE
    ft = recipe.finetune[0]
    # (hook, what the middle layers compute); fine-tuning keeps only the weights INT4
    for hook, middle in ((recipe.gemm_hook("train"), "int4"), (recipe.gemm_hook("eval"), "int4"),
                         (ft.gemm_hook("eval"), "int4"), (ft.gemm_hook("train"), "weights")):
        log = {}
        with layers.gemm_hook(_spy(hook, log)):  # eager: every product is concrete
            model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"luq": jax.random.key(1)})
        assert list(log) == ["conv0_0", *MIDDLE, "fc"]
        for name, out in log.items():
            if name in MIDDLE:
                assert np.array_equal(out["out"], out[middle])
                assert not np.allclose(out["out"], out["fp32"], rtol=1e-3)
            else:
                assert np.array_equal(out["out"], out["fp32"])


@jax.jit
def _train_outputs(v, x, y, key):
    """Logits and parameter gradients of the tiny cnn (batch statistics) per backward mode."""
    out = {}
    model = tiny_cnn()
    for mode in ("luq", "rdn", "none"):
        hook = luq.Recipe(mode=mode).gemm_hook("train")

        def loss(p, hook=hook):
            with layers.gemm_hook(hook):
                logits, _ = model.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"],
                                        rngs={"luq": key})
            return ls.train._cross_entropy(logits, y), logits

        out[mode] = jax.grad(loss, has_aux=True)(v["params"])
    return out


def test_backward_quantizer_leaves_the_forward_unchanged(batch, cnn_variables):
    x, y = batch
    v = luq.Recipe().init_variables(tiny_cnn(), dict(cnn_variables), x)
    out = _train_outputs(v, x, y, jax.random.key(2))
    (g_luq, z_luq), (g_rdn, z_rdn), (g_none, z_none) = out["luq"], out["rdn"], out["none"]
    # bit-identical logits: the backward op is an identity in the forward pass
    assert np.array_equal(z_luq, z_none) and np.array_equal(z_rdn, z_none)
    # ... while the backward passes differ, except for the classifier, which is FP32 and reads
    # only the forward's activations and the (unquantized) logit gradient
    assert not np.allclose(g_luq["conv1_0"]["kernel"], g_none["conv1_0"]["kernel"], rtol=1e-3)
    assert not np.allclose(g_rdn["conv1_0"]["kernel"], g_none["conv1_0"]["kernel"], rtol=1e-3)
    for g in (g_luq, g_rdn):
        np.testing.assert_allclose(g["fc"]["kernel"], g_none["fc"]["kernel"], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# whole-network gradient bias (luq_nm.md §3.1 #12, through BN, ReLU, pooling and convs)


def test_network_gradient_unbiased_under_luq_biased_under_rdn(batch, cnn_variables):
    model, (x, y) = tiny_cnn(), batch
    kw = dict(samples=(1, 16, 256), draws=512, seed=3)
    lq = luq.gradient_error(model, cnn_variables, x, y, recipe=luq.Recipe(samples=1), **kw)
    smp = luq.gradient_error(model, cnn_variables, x, y, recipe=luq.Recipe(samples=2),
                             samples=(1,), draws=256, seed=4)
    rdn = luq.gradient_error(model, cnn_variables, x, y, recipe=luq.Recipe(mode="rdn"), **kw)
    print(lq, smp, rdn, sep="\n")
    e1, e16, e256 = lq.rel_error
    assert 0.02 < e1 < 1.0
    # unbiased: pure variance, the error of an S-draw mean falls as 1/√S
    assert 0.9 < e16 * 4 / e1 < 1.1
    assert 0.85 < e256 * 16 / e1 < 1.15
    assert -0.55 < lq.slope < -0.45
    # SMP(2) is the mean of two draws: the one-sample error falls by √2
    assert 0.9 < smp.rel_error[0] * np.sqrt(2) / e1 < 1.1
    # round to nearest: deterministic and biased, a floor that averaging cannot remove
    assert rdn.draws == 1 and np.all(rdn.rel_error == rdn.rel_error[0])
    assert rdn.rel_error[0] > 0.05 and rdn.rel_error[0] > 5 * e256
    # the reference against itself: zero up to float rounding (batched vs unbatched program)
    none = luq.gradient_error(model, cnn_variables, x, y, recipe=luq.Recipe(mode="none"), samples=(1,))
    assert none.rel_error[0] < 1e-5


def test_gradient_error_of_a_dropout_model_holds_its_mask_fixed(batch):
    """A dropout model drew from a stream gradient_error did not supply (InvalidRngError). One mask
    serves the reference and every draw, so the error is the backward quantizer's alone: the
    mode-"none" reference against itself is 0, and LUQ's error still falls as 1/√S."""
    import flax.linen as nn

    from landscape.layers import QuantDense, QuantReLU

    class DropoutMLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = QuantReLU(name="r1")(QuantDense(32, name="d1")(x.reshape((x.shape[0], -1))))
            x = nn.Dropout(0.3, deterministic=not train)(x)
            x = QuantReLU(name="r2")(QuantDense(32, name="d2")(x))
            return QuantDense(10, name="head")(x)

    model, (x, y) = DropoutMLP(), batch
    variables = model.init(jax.random.key(0), x[:2])
    none = luq.gradient_error(model, variables, x, y, recipe=luq.Recipe(mode="none"), samples=(1,))
    assert none.rel_error[0] < 1e-5
    lq = luq.gradient_error(model, variables, x, y, recipe=luq.Recipe(samples=1), samples=(1, 16), draws=64, seed=1)
    assert 0.75 < lq.rel_error[1] * 4 / lq.rel_error[0] < 1.25


# ---------------------------------------------------------------------------------------------
# training through fit


def test_fit_with_the_recipe_is_deterministic_and_cached(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path))
    model, recipe = tiny_cnn(), luq.Recipe(samples=2, finetune_epochs=1)
    kw = dict(epochs=1, batch_size=128, seed=5, recipe=recipe)
    a = ls.train.fit(model, digits, **kw)
    b = ls.train.fit(model, digits, cache=False, **kw)
    assert _leaves_equal(a.variables, b.variables)  # same seed, same LUQ draws, same network
    assert [h["phase"] for h in a.history] == ["train", "finetune"]
    assert all(np.isfinite(h["train_loss"]) for h in a.history)
    assert a.config["recipe"] == recipe.key() and a.recipe is recipe
    assert luq.Recipe.quantized_layers(a.variables) == MIDDLE
    # evaluation runs the INT4 forward of the quantized layers
    x = digits.test.x[:64]
    with layers.gemm_hook(recipe.gemm_hook("eval")):
        int4 = model.apply(a.variables, x, train=False)
    np.testing.assert_allclose(a.apply(x), int4, rtol=1e-5, atol=1e-6)  # jitted vs eager
    assert not np.allclose(a.apply(x), a.apply(x, hook_phase=None), rtol=1e-3)
    assert a.history[-1]["test_acc"] == pytest.approx(a.accuracy(digits.test))
    # the checkpoint keeps the layer marks; a second fit loads it
    c = ls.train.fit(model, digits, **kw)
    assert c.path == a.path and os.path.exists(c.path + ".msgpack")
    assert _leaves_equal(c.variables, a.variables)
    assert luq.Recipe.quantized_layers(c.variables) == MIDDLE
    assert c.accuracy(digits.test) == a.accuracy(digits.test)


def test_finetuned_fit_reuses_the_cached_main_phase(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path))
    model = tiny_cnn()
    kw = dict(epochs=1, batch_size=128, seed=3)
    fnt = luq.Recipe(samples=2, finetune_epochs=1)
    assert fnt.main_phase() == luq.Recipe(samples=2, finetune_epochs=0) and fnt.main_phase().finetune is None
    main = ls.train.fit(model, digits, recipe=fnt.main_phase(), **kw)
    # the fine-tuned fit starts from that checkpoint: its first phase is the cached network's
    calls = []
    original = ls.train.load_network
    monkeypatch.setattr(ls.train, "load_network", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    tuned = ls.train.fit(model, digits, recipe=fnt, **kw)
    assert calls == [main.path]
    assert tuned.history[0] == main.history[0] and [h["phase"] for h in tuned.history] == ["train", "finetune"]
    assert tuned.config["main_phase_seconds"] == main.config["seconds"]
    assert not _leaves_equal(tuned.variables["params"], main.variables["params"])
    # and equals a fine-tuned run trained from scratch without any cache
    fresh = ls.train.fit(model, digits, recipe=fnt, cache=False, **kw)
    assert _leaves_equal(fresh.variables, tuned.variables)


def test_fnt_re_estimates_batchnorm_statistics_under_the_int4_forward(digits, tmp_path, monkeypatch):
    """FNT trains with FP32 activations, so its running statistics are not those of the INT4
    forward that evaluation runs; after the phase they are re-estimated under that forward."""
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path))
    model = tiny_cnn()
    kw = dict(epochs=1, batch_size=128, seed=3)
    whole = 1 << 20  # more than the training set: every training image, no draw
    tuned = ls.train.fit(model, digits, recipe=luq.Recipe(finetune_bn_images=whole), **kw)
    kept = ls.train.fit(model, digits, recipe=luq.Recipe(finetune_bn_images=0), **kw)
    assert tuned.path != kept.path
    # the re-estimation touches the BN statistics only, and they are the INT4 forward's
    assert _leaves_equal(tuned.variables["params"], kept.variables["params"])
    assert not _leaves_equal(tuned.variables["batch_stats"], kept.variables["batch_stats"])
    eval_hook = tuned.recipe.gemm_hook("eval")
    again = ls.train.recalibrate_batchnorm(model, kept.variables, digits.train.x, hook=eval_hook)
    assert _leaves_equal(again, tuned.variables)
    x = jnp.asarray(digits.train.x)
    with layers.gemm_hook(eval_hook):
        batch_mode, _ = model.apply(tuned.variables, x, train=True, mutable=["batch_stats"])
        kept_mode = model.apply(kept.variables, x, train=False)
    np.testing.assert_allclose(tuned.apply(digits.train.x), batch_mode, rtol=1e-3, atol=1e-3)
    assert not np.allclose(kept_mode, batch_mode, rtol=1e-3, atol=1e-3)
    # the last record is of the returned network; the figure before the re-estimation is kept
    assert tuned.history[-1]["test_acc"] == pytest.approx(tuned.accuracy(digits.test))
    assert tuned.history[-1]["test_acc_before_finish"] == kept.history[-1]["test_acc"]
    assert "test_acc_before_finish" not in kept.history[-1]
    # a drawn subset is reproducible from the seed; FP32 FNT already evaluates its own forward
    ft = luq.Recipe(finetune_bn_images=64).finetune[0]
    a = ft.finish(model, kept.variables, digits.train, 7)
    assert _leaves_equal(a, ft.finish(model, kept.variables, digits.train, 7))
    assert not _leaves_equal(a, ft.finish(model, kept.variables, digits.train, 8))
    fp32 = luq.Recipe(mode="fp32").finetune[0]
    assert fp32.finish(model, kept.variables, digits.train, 7) is kept.variables
