import dataclasses
import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import landscape as ls
import models
from landscape import luq
from landscape.layers import BatchNorm, QuantDense, QuantReLU


def _params_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_default_resnet8_reaches_97_percent(digits_net, digits):
    assert digits_net.accuracy(digits.test) >= 0.97
    assert digits_net.history[-1]["test_acc"] >= 0.97


def test_training_is_deterministic_for_a_seed(digits):
    model = models.create("mlp", num_classes=10, hidden=(32,))
    a = ls.train.fit(model, digits, epochs=2, seed=3, cache=False)
    b = ls.train.fit(model, digits, epochs=2, seed=3, cache=False)
    c = ls.train.fit(model, digits, epochs=2, seed=4, cache=False)
    assert _params_equal(a.variables, b.variables)
    assert not _params_equal(a.variables, c.variables)


def test_vit_trains_at_its_own_default_lr_unless_told(digits):
    # The ViT's lr default (0.1) replaces the dataset's (0.05) for it alone; an explicit lr wins.
    vit = models.create("vit", num_classes=10, dim=8, depth=1, heads=2, mlp_dim=8)
    assert ls.train.fit(vit, digits, epochs=1, cache=False, progress=False).config["lr"] == 0.1
    assert ls.train.fit(vit, digits, epochs=1, lr=0.02, cache=False, progress=False).config["lr"] == 0.02
    mlp = models.create("mlp", num_classes=10, hidden=(8,))
    assert ls.train.fit(mlp, digits, epochs=1, cache=False, progress=False).config["lr"] == 0.05


def test_checkpoint_roundtrip_and_cache(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path))
    model = models.create("cnn", num_classes=10, widths=(4,))
    first = ls.train.fit(model, digits, epochs=1, seed=0)
    assert first.path and os.path.exists(first.path + ".msgpack") and os.path.exists(first.path + ".json")
    with open(first.path + ".msgpack", "rb") as f:
        assert not f.read(2).startswith(b"\x80"), "checkpoints are msgpack, never pickle"
    # an epoch file left by a fit killed after its save, before removing it, goes when the network loads
    leftover = first.path + ".train-epoch.msgpack"
    open(leftover, "wb").write(b"state")
    second = ls.train.fit(model, digits, epochs=1, seed=0)  # loaded, not retrained
    assert second.path == first.path and second.config == first.config
    assert not os.path.exists(leftover)
    assert _params_equal(first.variables, second.variables)
    assert second.accuracy(digits.test) == pytest.approx(first.accuracy(digits.test))
    loaded = ls.train.load_network(model, first.path)
    assert _params_equal(loaded.variables, first.variables)
    other = ls.train.fit(model, digits, epochs=1, seed=1)
    assert other.path != first.path
    # A pair from two saves (a save killed between its files) is not loaded: fit trains again.
    with open(other.path + ".msgpack", "rb") as f:
        foreign = f.read()
    with open(first.path + ".msgpack", "wb") as f:
        f.write(foreign)
    with pytest.raises(ls.train.MismatchedCheckpoint, match="msgpack is not the file .* was saved with"):
        ls.train.load_network(model, first.path)
    again = ls.train.fit(model, digits, epochs=1, seed=0)  # trained again, the pair written anew
    assert _params_equal(again.variables, first.variables)
    assert _params_equal(ls.train.load_network(model, first.path).variables, first.variables)
    os.remove(first.path + ".json")  # the msgpack alone is no checkpoint either
    assert _params_equal(ls.train.fit(model, digits, epochs=1, seed=0).variables, first.variables)
    # A damaged record (a truncated .json) is named by load_network and trained again by fit; it was
    # json's bare "Expecting ',' delimiter", naming no file, and stopped fit.
    with open(first.path + ".json") as f:
        record = f.read()
    with open(first.path + ".json", "w") as f:
        f.write(record[: len(record) // 2])
    with pytest.raises(ls.train.MismatchedCheckpoint, match=r"\.json is not valid JSON"):
        ls.train.load_network(model, first.path)
    assert _params_equal(ls.train.fit(model, digits, epochs=1, seed=0).variables, first.variables)


@pytest.mark.parametrize("recipe", [None, "sparse", "luq", "luq-fnt", "damaged"])
def test_an_interrupted_fit_resumes_after_its_last_epoch(digits, tmp_path, monkeypatch, recipe):
    """Killed in epoch 3 of 3, fit kept the state after epochs 1 and 2; the rerun trains epoch 3
    only and gives the network of an uninterrupted run to the last bit (data order and step keys
    replayed, optimizer state restored), for a plain, a sparse and a LUQ recipe with and without
    fine-tuning; a damaged epoch file (its SHA-256 differs) is not resumed from. The LUQ main phase
    draws its gradient samples from the step keys: a resume that restarted the key chain instead of
    restoring it trained another network."""
    from landscape import luq, sparsity

    make = {None: lambda: None, "damaged": lambda: None,
            "sparse": lambda: sparsity.Recipe(keep=2, block=4, update_every=5),
            "luq": lambda: luq.Recipe(finetune_epochs=0), "luq-fnt": lambda: luq.Recipe(finetune_epochs=2)}[recipe]
    model = models.create("cnn", num_classes=10, widths=(4, 8))
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path / "whole"))
    whole = ls.train.fit(model, digits, epochs=3, seed=0, recipe=make())
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path / "cut"))
    real, calls = ls.train.Network.accuracy, []
    last = 3 + (2 if recipe == "luq-fnt" else 0)  # the end-of-epoch evaluations: cut in the last epoch

    def accuracy(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == last:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ls.train.Network, "accuracy", accuracy)
    with pytest.raises(KeyboardInterrupt):
        ls.train.fit(model, digits, epochs=3, seed=0, recipe=make())
    monkeypatch.setattr(ls.train.Network, "accuracy", real)
    kept = [f for f in os.listdir(tmp_path / "cut" / "networks") if f.endswith("-epoch.msgpack")]
    assert len(kept) == 1
    if recipe == "damaged":  # one flipped byte of the stored weights: not resumed, the phase starts over
        path = os.path.join(tmp_path / "cut" / "networks", kept[0])
        good = open(path, "rb").read()
        open(path, "wb").write(good[:-100] + bytes([good[-100] ^ 1]) + good[-99:])
    steps = []
    real_step = ls.train.train_step

    def counting(*args, **kwargs):
        step = real_step(*args, **kwargs)
        return lambda *a: steps.append(1) or step(*a)

    monkeypatch.setattr(ls.train, "train_step", counting)
    resumed = ls.train.fit(model, digits, epochs=3, seed=0, recipe=make())
    per_epoch = len(digits.train) // whole.config["batch_size"]
    assert len(steps) == per_epoch * (3 if recipe == "damaged" else 1)  # one epoch trained, not three (or five)
    assert _params_equal(resumed.variables, whole.variables)
    assert [{k: v for k, v in h.items()} for h in resumed.history] == whole.history
    assert not [f for f in os.listdir(tmp_path / "cut" / "networks") if f.endswith("-epoch.msgpack")]


def test_a_single_training_step_is_refused_by_name(digits):
    model = models.create("mlp", num_classes=10, hidden=(8,))
    with pytest.raises(ValueError, match="training has 1 step .*needs at least 2: raise epochs or lower batch_size"):
        ls.train.fit(model, digits, epochs=1, batch_size=5000, cache=False)


class _BatchMean:
    """Logits that depend on the whole batch (as LUQ's SAWB activation scales do)."""

    def apply(self, x):
        x0 = jnp.asarray(x).reshape(len(x), -1)[:, 0]
        return jnp.stack([x0, 2.0 * (1.0 - x0.mean()) * jnp.ones_like(x0)], axis=-1)


def test_accuracy_runs_the_remainder_unpadded():
    # 10 images in batches of 7: the last 3 alone give class 0; padded with 4 zero images, class 1.
    x, y = np.ones((10, 2, 2, 1), np.float32), np.zeros(10, np.int32)
    assert ls.train.accuracy(_BatchMean(), (x, y), batch_size=7) == 1.0


class _Revised(ls.train.Recipe):
    revision = 1


class _Finetuned(ls.train.Recipe):
    """FP32 training, then one FP32 fine-tuning epoch under ``ft`` (whose revision is what differs)."""

    def __init__(self, ft):
        self.finetune = (ft, 1, 0.01)

    def main_phase(self):
        return ls.train.Recipe()

    def __repr__(self):
        return "Finetuned()"


def test_recipe_revision_separates_cached_networks(digits, tmp_path, monkeypatch):
    """A bumped revision (the recipe's code changed) is another cache entry even where the repr is
    the same; a revised fine-tuning recipe still reuses the cached main phase."""
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path))
    model = models.create("mlp", num_classes=10, hidden=(8,))
    assert ls.train.Recipe().key() == "FP32()" and _Revised().key() == "FP32()@r1"
    assert _Finetuned(ls.train.Recipe()).key() == "Finetuned()"
    assert _Finetuned(_Revised()).key() == "Finetuned()+finetune@r1"
    base = ls.train.fit(model, digits, epochs=1, seed=0, progress=False)
    revised = ls.train.fit(model, digits, epochs=1, seed=0, recipe=_Revised(), progress=False)
    assert revised.path != base.path and revised.config["recipe"] == "FP32()@r1"
    assert _params_equal(revised.variables, base.variables)  # same computation, other identity
    ft0 = ls.train.fit(model, digits, epochs=1, seed=0, recipe=_Finetuned(ls.train.Recipe()), progress=False)
    ft1 = ls.train.fit(model, digits, epochs=1, seed=0, recipe=_Finetuned(_Revised()), progress=False)
    assert len({base.path, revised.path, ft0.path, ft1.path}) == 4
    assert _params_equal(ft0.variables, ft1.variables)
    assert not _params_equal(ft0.variables, base.variables)
    # four networks on disk: the two fine-tuned runs trained no main phase of their own
    assert len([f for f in os.listdir(os.path.join(str(tmp_path), "networks")) if f.endswith(".msgpack")]) == 4


def test_numerics_key_ignores_flags_that_cannot_change_the_floats(monkeypatch):
    """Virtual devices, dumps and the other backend's flags do not retrain a cached network; flag
    order does not either; a flag that changes the arithmetic does."""
    on_cpu = jax.default_backend() == "cpu"
    # a flag of this backend that can change the floats (which convolution algorithm runs, on a GPU)
    guard = "--xla_cpu_experimental_ynn_fusion_type=-reduce" if on_cpu else "--xla_gpu_autotune_level=0"
    monkeypatch.setenv("XLA_FLAGS", guard)
    base = ls.train.numerics()
    assert guard in base and jax.default_backend() in base
    foreign = "--xla_gpu_deterministic_ops=true" if on_cpu else "--xla_cpu_enable_fast_math=true"
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {foreign} "
                                    f"--xla_dump_to=/tmp/dump {guard}")
    assert ls.train.numerics() == base
    own = "--xla_cpu_enable_fast_math=true" if on_cpu else "--xla_gpu_deterministic_ops=true"
    monkeypatch.setenv("XLA_FLAGS", f"{own} {guard}")
    changed = ls.train.numerics()
    assert changed != base
    monkeypatch.setenv("XLA_FLAGS", f"{guard} {own}")
    assert ls.train.numerics() == changed


@pytest.mark.parametrize("kw,match", [({"epochs": 0}, "epochs=0 must be a positive integer"),
                                      ({"epochs": 2.0}, "epochs=2.0 must be a positive integer"),
                                      ({"lr": -1.0}, "lr=-1.0 must be a positive finite number"),
                                      ({"lr": "0.1"}, "lr='0.1' must be a positive finite number"),
                                      ({"lr": float("inf")}, "lr=inf must be a positive finite number"),
                                      ({"batch_size": 2.5}, "batch_size=2.5 must be a positive integer"),
                                      ({"batch_size": True}, "batch_size=True must be a positive integer"),
                                      ({"weight_decay": -1}, "weight_decay=-1 must be a finite number >= 0"),
                                      ({"weight_decay": float("nan")}, "weight_decay=nan must be a finite number"),
                                      ({"seed": "a"}, "seed='a' must be an integer >= 0"),
                                      ({"seed": 2**32 + 5}, r"seed=4294967301 must be an integer in \[0, 2\^32\)"),
                                      ({"cache": "no"}, "cache='no' must be True or False"),
                                      ({"progress": 0}, "progress=0 must be True or False")])
def test_bad_training_arguments(digits, kw, match):
    with pytest.raises(ValueError, match=match):
        ls.train.fit(models.create("mlp", num_classes=10), digits, **kw)


def test_training_takes_numpy_scalars(digits):
    """Values from a numpy sweep grid train as the equal Python numbers do, and the configuration
    (hashed as JSON for the cache key) holds Python numbers."""
    model = models.create("mlp", num_classes=10, hidden=(8,))
    net = ls.train.fit(model, digits, epochs=np.int64(1), lr=np.float32(0.05), batch_size=np.int64(64),
                       weight_decay=np.float32(0.0), seed=np.int64(0), cache=False)
    assert all(type(net.config[k]) is int for k in ("epochs", "batch_size", "seed"))
    assert all(type(net.config[k]) is float for k in ("lr", "weight_decay"))


def test_training_names_bad_data_recipe_seed_and_labels(digits):
    mlp = models.create("mlp", num_classes=10, hidden=(8,))
    with pytest.raises(ValueError, match="data must be a landscape.data.Dataset .* got Split"):
        ls.train.fit(mlp, digits.train, epochs=1)
    with pytest.raises(ValueError, match="recipe='luq' must be a landscape.train.Recipe"):
        ls.train.fit(mlp, digits, epochs=1, recipe="luq")
    with pytest.raises(ValueError, match="seed=-1 must be an integer >= 0"):
        ls.train.fit(mlp, digits, epochs=1, seed=-1)
    # 10 digit classes for a 5-way head: named before any training step, not as a NaN loss later
    with pytest.raises(ValueError, match=r"data.train: labels y must be in \[0, 5\) for a model with 5 outputs"):
        ls.train.fit(models.create("mlp", num_classes=5, hidden=(8,)), digits, epochs=1, cache=False)
    net = ls.train.fit(mlp, digits, epochs=1, cache=False)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"batch_size={bad!r} must be a positive integer"):
            net.accuracy(digits.test, batch_size=bad)


def test_accuracy_names_labels_beyond_the_outputs(digits):
    """Label 12 for a 10-way head never equals an argmax: it counted as a silent miss. The width
    comes from the logits accuracy computes anyway (an untrained network is enough to see it)."""
    model = models.create("mlp", num_classes=10, hidden=(8,))
    net = ls.train.Network(model, model.init(jax.random.key(0), digits.test.x[:1], train=False), {}, [])
    x = digits.test.x[:4]
    for y, low, high in (([0, 1, 2, 12], 0, 12), ([-1, 1, 2, 3], -1, 3)):
        with pytest.raises(ValueError, match=rf"split: labels y must be in \[0, 10\) for a model with 10 "
                                             rf"outputs; got labels from {low} to {high}"):
            net.accuracy((x, np.array(y)), batch_size=3)
    assert 0.0 <= net.accuracy((x, np.array([0, 1, 2, 9])), batch_size=3) <= 1.0
    with pytest.raises(ValueError, match="x is empty"):  # it was range()'s "arg 3 must not be zero"
        ls.train.predict(net, x[:0])
    with pytest.raises(ValueError, match="same N >= 1"):
        net.accuracy((x[:0], np.array([], int)))


def test_triangular_schedule():
    s = ls.train.triangular_schedule(0.01, 0.1, 100)
    assert float(s(0)) == pytest.approx(0.01)
    assert float(s(50)) == pytest.approx(0.1)
    assert float(s(100)) == pytest.approx(0.0, abs=1e-8)
    assert float(s(25)) == pytest.approx(0.055)


def test_evaluation_programs_are_kept_for_recent_networks_only():
    """Each network object gets one jitted evaluation; only the most recent few stay cached, so a
    run that trains many networks does not keep every compiled evaluation alive."""
    from landscape import train

    recipe = train.Recipe()
    nets = [models.create("cnn", num_classes=10, widths=(2, 4)) for _ in range(train._EVAL_CACHE_SIZE + 4)]
    fns = [train._eval_fn(model, recipe, None) for model in nets]
    assert len(train._EVAL_CACHE) <= train._EVAL_CACHE_SIZE
    assert train._eval_fn(nets[-1], recipe, None) is fns[-1]  # recent: the same function
    assert train._eval_fn(nets[0], recipe, None) is not fns[0]  # dropped: built again
    assert len(set(map(id, fns))) == len(fns)


def test_fit_names_a_model_that_is_not_a_flax_module(digits, tiny_net):
    """fit("cnn", data) failed with an AttributeError inside the configuration."""
    with pytest.raises(ValueError, match=r"fit needs a flax module, got a str 'cnn'; build one, e.g. "
                                         r"models.create\('cnn', num_classes=10\)"):
        ls.train.fit("cnn", digits)
    with pytest.raises(ValueError, match=r"fit needs a flax module, got a trained Network; pass its module"):
        ls.train.fit(tiny_net, digits)


def test_fit_refuses_more_outputs_than_classes(digits):
    """A 100-way head on the 10 digit classes trained silently (only too few outputs were refused)."""
    with pytest.raises(ValueError, match=r"the model has 12 outputs but 'digits' has 10 classes; build it with "
                                         r"num_classes=10"):
        ls.train.fit(models.create("mlp", num_classes=12, hidden=(8,)), digits, epochs=1, cache=False)


def test_network_records_its_input_shape_and_names_other_images(digits, tiny_net, tmp_path):
    """Flat, channel-less or NCHW images failed inside Flax, naming only kernel shapes; fit
    records the images' shape, and a checkpoint keeps it."""
    assert tiny_net.input_shape == (8, 8, 1)
    x = digits.test.x[:8]
    for bad in (x.reshape(8, -1), x[..., 0], x.transpose(0, 3, 1, 2)):
        shape = re.escape(str(bad.shape))
        with pytest.raises(ValueError, match=rf"images x have shape {shape}; this network takes \(N, 8, 8, 1\) "
                                             r"\(NHWC\)"):
            tiny_net.apply(bad)
    with pytest.raises(ValueError, match=r"images x have shape \(8, 8, 8\)"):
        tiny_net.accuracy((x[..., 0], digits.test.y[:8]))
    path = ls.train.save_network(tiny_net, str(tmp_path / "net"))
    assert ls.train.load_network(tiny_net.model, path).input_shape == (8, 8, 1)
    with open(path + ".json") as f:
        meta = json.load(f)
    del meta["input_shape"]  # a checkpoint saved before the shape was recorded: unchecked
    with open(path + ".json", "w") as f:
        json.dump(meta, f)
    assert ls.train.load_network(tiny_net.model, path).input_shape is None


def test_learning_rate_warms_up_over_5_percent_of_the_steps_then_decays_to_zero_by_a_cosine():
    """fit's main-phase schedule, step by step: linear from 0 to the peak over the first 5% of the
    steps (at least one), then a cosine to exactly 0 at the last step. Guards against another warm-up
    length (10%) and a cosine that ends above 0."""
    peak, total, warm = 0.1, 200, 10
    s = ls.train._schedule(peak, total)
    for t in (0, 3, 5, 10):
        assert float(s(t)) == pytest.approx(peak * t / warm, abs=1e-8)
    for t in (10, 57, 105, 150, 199, 200):
        want = 0.5 * peak * (1.0 + math.cos(math.pi * (t - warm) / (total - warm)))
        assert float(s(t)) == pytest.approx(want, abs=1e-7)
    assert float(s(105)) == pytest.approx(peak / 2)  # halfway through the cosine
    assert float(s(total)) == pytest.approx(0.0, abs=1e-9)
    assert float(ls.train._schedule(peak, 10)(1)) == pytest.approx(peak)  # 10 steps: a one-step warm-up


def test_sgd_is_nesterov_momentum_with_weight_decay_coupled_on_the_kernels_only():
    """Three updates of ``sgd`` against PyTorch's SGD(momentum=0.9, nesterov=True) written out: the
    kernel's gradient gets + wd·W before the momentum (coupled L2), the bias none. Guards against
    plain momentum, decay on the biases instead of the kernels, and decay of the wrong sign."""
    lr, wd, m = 0.1, 0.05, 0.9
    params = {"fc": {"kernel": jnp.array([[1.0, -2.0], [0.5, 4.0]]), "bias": jnp.array([0.5, -3.0])}}
    grads = {"fc": {"kernel": jnp.array([[0.3, 0.1], [-0.2, 0.0]]), "bias": jnp.array([-0.2, 0.4])}}
    tx = ls.train.sgd(lambda step: lr, wd)
    state = tx.init(params)
    want = {k: np.asarray(v, np.float64) for k, v in params["fc"].items()}
    buf = dict.fromkeys(want, 0.0)
    p = params
    for _ in range(3):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        for k in want:
            g = np.asarray(grads["fc"][k], np.float64) + (wd * want[k] if k == "kernel" else 0.0)
            buf[k] = m * buf[k] + g
            want[k] = want[k] - lr * (g + m * buf[k])
    for k in want:
        np.testing.assert_allclose(np.asarray(p["fc"][k]), want[k], rtol=1e-6, err_msg=k)


def _indexed_dataset(n=64):
    """A small dataset whose rows are told apart by their first pixel (distinct random values)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4, 4, 1)).astype(np.float32)
    y = (np.arange(n) % 10).astype(np.int32)
    train = ls.data.Split(x, y)
    return ls.data.Dataset("digits", train, train.take(np.arange(8)), ls.data.Split(x[:16], y[:16]), 10,
                           np.arange(8))


def test_each_epoch_trains_on_a_new_permutation_drawn_from_the_seed(monkeypatch):
    """The rows of every training step, recorded: each epoch visits every training row once, in an
    order (and batches) of its own, and the order follows the seed. Guards against one order for every
    epoch and an order that ignores the seed (different seeds then differ only in initialisation)."""
    data = _indexed_dataset()
    row_of = {float(v): i for i, v in enumerate(data.train.x[:, 0, 0, 0])}
    model = models.create("mlp", num_classes=10, hidden=(4,))
    real_step = ls.train.train_step

    def batches(seed):
        seen = []

        def recording(*args, **kwargs):
            step = real_step(*args, **kwargs)

            def run(params, state, opt_state, x, y, key):
                seen.append(tuple(row_of[float(v)] for v in np.asarray(x)[:, 0, 0, 0]))
                return step(params, state, opt_state, x, y, key)

            return run

        monkeypatch.setattr(ls.train, "train_step", recording)
        ls.train.fit(model, data, epochs=3, batch_size=16, seed=seed, cache=False, progress=False)
        return [seen[e * 4:(e + 1) * 4] for e in range(3)]  # 64 rows / 16: four steps per epoch

    epochs = batches(seed=0)
    assert len(epochs) == 3 and all(len(e) == 4 for e in epochs)
    for epoch in epochs:
        assert sorted(i for batch in epoch for i in batch) == list(range(64))
    assert len({frozenset(map(frozenset, e)) for e in epochs}) == 3  # three different partitions
    assert batches(seed=0) == epochs
    other = batches(seed=1)
    assert all(a != b for a, b in zip(other, epochs, strict=True))


def test_digits_training_defaults():
    """The documented digits recipe (DEFAULTS): 30 epochs of batches of 64 at peak lr 0.05 with weight
    decay 5e-4. The cached networks, the README's accuracies and the paper_repro presets are trained
    under these; another default silently trains (and caches) other networks."""
    digits = ls.data.load("digits", calib_size=16, seed=0)
    config = ls.train.training_config(models.create("mlp", num_classes=10, hidden=(8,)), digits)
    assert {k: config[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "seed")} == dict(
        epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4, seed=0)


class _DropoutNet(nn.Module):
    """flax.linen.Dropout between two quantized dense layers, a BatchNorm after it (so that the
    BatchNorm statistics LUQ re-estimates see the dropout's output)."""

    rate: float = 0.5
    stream: str = "dropout"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = QuantReLU(name="r1")(QuantDense(32, name="d1")(x.reshape((x.shape[0], -1))))
        x = nn.Dropout(self.rate, deterministic=not train, rng_collection=self.stream)(x)
        x = QuantReLU(name="r2")(BatchNorm(name="bn")(QuantDense(32, name="d2")(x), train))
        return QuantDense(10, name="head")(x)


def test_fit_trains_dropout_models_from_its_seed_and_evaluates_them_without_dropout(digits):
    """fit passed no "dropout" key: Flax raised InvalidRngError for any nn.Dropout model. Every
    training step now supplies the stream, from fit's seed: a seed gives one network, another
    seed another, and the masks change what is trained (rate 0.5 against rate 0)."""
    a = ls.train.fit(_DropoutNet(), digits, epochs=2, seed=3, cache=False, progress=False)
    b = ls.train.fit(_DropoutNet(), digits, epochs=2, seed=3, cache=False, progress=False)
    c = ls.train.fit(_DropoutNet(), digits, epochs=2, seed=4, cache=False, progress=False)
    plain = ls.train.fit(_DropoutNet(rate=0.0), digits, epochs=2, seed=3, cache=False, progress=False)
    assert _params_equal(a.variables, b.variables)
    assert not _params_equal(a.variables, c.variables)
    assert not _params_equal(a.variables, plain.variables)
    assert a.history[-1]["test_acc"] > 0.8
    # evaluation (train=False) drops nothing: repeatable, and the model's deterministic forward
    x = digits.test.x[:32]
    first, again = np.asarray(a.apply(x)), np.asarray(a.apply(x))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, np.asarray(a.model.apply(a.variables, x, train=False)), rtol=1e-6, atol=1e-6)
    loss = ls.ClipLoss(a, digits.calib, w_bits=4, a_bits=4)
    alpha = loss.init("max")
    assert loss(alpha) == loss(alpha) and np.isfinite(loss(alpha))


def test_training_step_draws_a_fresh_dropout_mask_from_each_step_key(digits):
    """The step's "dropout" key comes from its key: the same key gives the same update, another key
    another; a recipe's own streams (LUQ's "luq") do not take its place."""
    model = _DropoutNet()
    x, y = jnp.asarray(digits.train.x[:16]), jnp.asarray(digits.train.y[:16])
    variables = model.init(jax.random.key(0), x, train=False)
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    tx = ls.train.sgd(0.1, 0.0)
    for streams in ((), ("luq",)):
        step = ls.train.train_step(model, tx, None, streams)
        losses = [float(step(params, state, tx.init(params), x, y, jax.random.key(k))[3]) for k in (0, 0, 1)]
        assert losses[0] == losses[1] and losses[0] != losses[2], (streams, losses)


def test_dropout_models_train_under_luq_with_fine_tuning_and_batchnorm_reestimation(digits):
    """LUQ's recipe replaces the base recipe's streams with its own ("luq"; none in the fine-tuning
    phase) and its finish re-estimates BatchNorm statistics in a training-mode pass: with a dropout
    model both failed for want of a "dropout" key."""
    recipe = luq.Recipe(bits=4, finetune_epochs=1, finetune_bn_images=128)
    net = ls.train.fit(_DropoutNet(), digits, epochs=1, recipe=recipe, seed=0, cache=False, progress=False)
    again = ls.train.fit(_DropoutNet(), digits, epochs=1, recipe=recipe, seed=0, cache=False, progress=False)
    assert [h["phase"] for h in net.history] == ["train", "finetune"]
    assert "test_acc_before_finish" in net.history[-1]  # the BatchNorm statistics were re-estimated
    assert _params_equal(net.variables, again.variables)
    assert net.history[-1]["test_acc"] > 0.5


def test_batchnorm_reestimation_passes_dropout_through(digits):
    """recalibrate_batchnorm runs the model in training mode; its Dropout layers pass their input
    through, so the statistics are the evaluation forward's (the same as without dropout) and no
    key is needed."""
    x = digits.train.x[:200]
    variables = _DropoutNet(rate=0.0).init(jax.random.key(0), jnp.asarray(x[:1]), train=False)
    dropped = ls.train.recalibrate_batchnorm(_DropoutNet(rate=0.9), variables, x)
    kept = ls.train.recalibrate_batchnorm(_DropoutNet(rate=0.0), variables, x)
    for k in ("mean", "var"):
        np.testing.assert_array_equal(np.asarray(dropped["batch_stats"]["bn"][k]),
                                      np.asarray(kept["batch_stats"]["bn"][k]))
    assert not np.allclose(np.asarray(kept["batch_stats"]["bn"]["var"]), 1.0)  # re-estimated, not the init


def test_a_model_drawing_from_a_stream_fit_does_not_supply_is_named(digits):
    with pytest.raises(ValueError, match=r"fit's training steps supply the PRNG streams 'dropout'; a model that "
                                         r"draws from another stream .* rng_streams"):
        ls.train.fit(_DropoutNet(stream="noise"), digits, epochs=1, cache=False, progress=False)


def test_fit_checks_each_split_of_a_user_built_dataset_by_name(digits):
    """A Dataset built from a user's arrays goes through the checks ClipLoss runs on its calibration
    split; one-hot labels failed inside the first step with "indices and arr must have the same
    number of dimensions", float labels with optax's dtype TypeError, uint8 images trained."""
    mlp = models.create("mlp", num_classes=10, hidden=(8,))
    onehot = lambda s: ls.data.Split(s.x, np.eye(10, dtype=np.int32)[s.y])  # noqa: E731
    nan = digits.calib.x.copy()
    nan[3, 2, 1, 0] = np.nan
    cases = [
        (dict(train=onehot(digits.train), calib=onehot(digits.calib), test=onehot(digits.test)),
         r"data.train: labels y must be class indices of shape \(N,\), got shape \(1438, 10\) "
         r"\(one-hot labels\?: pass y.argmax\(axis=1\)\)"),
        (dict(test=ls.data.Split(digits.test.x, digits.test.y.astype(np.float32))),
         r"data.test: labels y must be integers, got dtype float32"),
        (dict(train=ls.data.Split((digits.train.x * 50 + 100).clip(0, 255).astype(np.uint8), digits.train.y)),
         r"data.train: images x must be floating point, normalised as the network was trained .* got dtype uint8 "
         r"with values in \[\d+, \d+\]"),
        (dict(calib=ls.data.Split(nan, digits.calib.y)), r"data.calib images must be finite: 1 of 256"),
        (dict(test=ls.data.Split(digits.test.x[..., 0], digits.test.y)),
         r"data.test images have shape \(359, 8, 8\); data.train's are \(N, 8, 8, 1\)"),
    ]
    for change, match in cases:
        bad = dataclasses.replace(digits, **change)
        with pytest.raises(ValueError, match=match):
            ls.train.fit(mlp, bad, epochs=1, cache=False, progress=False)
        with pytest.raises(ValueError, match=match):
            ls.train.training_config(mlp, bad, epochs=1)
    # float64 images and int64 labels are numbers of the right kind: trained as given
    wide = dataclasses.replace(digits, train=ls.data.Split(digits.train.x.astype(np.float64),
                                                           digits.train.y.astype(np.int64)))
    assert ls.train.fit(mlp, wide, epochs=1, cache=False, progress=False).history[-1]["test_acc"] > 0.3


def test_jax_settings_that_change_the_weights_change_the_key(digits):
    """x64 and another PRNG implementation trained other weights under one cache key, so a shared
    cache served one setting's network to the other; they are now in the numerics, named only when
    not the default, so that the default keys (and the networks cached under them) stay."""
    model = models.create("mlp", num_classes=10)
    default = ls.train.config_key(ls.train.training_config(model, digits, epochs=1))
    assert "x64" not in ls.train.numerics() and "prng" not in ls.train.numerics()
    with jax.enable_x64(True):
        assert ls.train.config_key(ls.train.training_config(model, digits, epochs=1)) != default
    previous = jax.config.jax_default_prng_impl
    try:
        jax.config.update("jax_default_prng_impl", "rbg")
        assert "prng=rbg" in ls.train.numerics()
        assert ls.train.config_key(ls.train.training_config(model, digits, epochs=1)) != default
    finally:
        jax.config.update("jax_default_prng_impl", previous)
    assert ls.train.config_key(ls.train.training_config(model, digits, epochs=1)) == default
