"""Training: ``fit(model, data)`` → a trained :class:`Network`, cached by configuration.

The loop reads top to bottom: build the optimizer (SGD + Nesterov momentum, cosine
schedule with a linear warm-up, weight decay on kernels), initialise, then for each epoch
shuffle with the seed, run the jitted step over mini-batches, evaluate, update the
progress bar. A *recipe* (:class:`Recipe`) changes how the forward/backward products are
computed (LUQ 4-bit training, N:M sparse training) without any per-model code.

Checkpoints are msgpack (``flax.serialization``; never pickle) plus a JSON sidecar,
written atomically under ``$LANDSCAPE_CACHE/networks`` and keyed by a hash of the
configuration, so a second ``fit`` with the same configuration loads instead of training.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape import atomic, checks, layers, runtime
from landscape import data as data_lib

FORMAT_VERSION = 1

# Defaults per dataset: (epochs, batch_size, peak learning rate, weight decay).
DEFAULTS = {
    "digits": dict(epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4),
    "mnist": dict(epochs=3, batch_size=128, lr=0.05, weight_decay=5e-4),
    "cifar10": dict(epochs=60, batch_size=128, lr=0.1, weight_decay=5e-4),
    "cifar100": dict(epochs=60, batch_size=128, lr=0.1, weight_decay=5e-4),
    "imagenet": dict(epochs=90, batch_size=256, lr=0.1, weight_decay=1e-4),
}

# Per-model changes to DEFAULTS, by the model's class name, for every dataset. The ViT (pre-LN,
# no BatchNorm) trains worse on digits at the CNNs' 0.05; at 0.1 the zoo ViT reaches 96.94 % test
# accuracy (100 % train; figures/vit).
MODEL_DEFAULTS = {
    "ViT": dict(lr=0.1),
}

#: The PRNG stream every training step supplies besides a recipe's own (Flax's name for it, read by
#: ``flax.linen.Dropout``): the step's key folded with :data:`DROPOUT_FOLD`, so that dropout masks
#: follow ``fit``'s seed, are new at every step and are the same under every recipe. A recipe that
#: names the stream in its ``rng_streams`` keeps its own derivation. Evaluation (``train=False``)
#: draws nothing. Neither is part of the cache key (models without dropout draw nothing from the
#: stream, and their keys stay those of earlier versions): a change to either trains other networks
#: of dropout models under the same key, so it must add an entry to training_config when made.
DROPOUT_STREAM = "dropout"
DROPOUT_FOLD = 0xD80


class Recipe:
    """How ``fit`` computes the training products. The base class is plain FP32 training.

    Subclasses override what they need:

    * ``rng_streams``: names of extra PRNG streams the forward needs (e.g. ``("luq",)``); the
      ``"dropout"`` stream (:data:`DROPOUT_STREAM`) is supplied by every training step whatever the
      recipe, so ``flax.linen.Dropout`` trains under any recipe without naming it here;
    * ``gemm_hook(phase)``: a :func:`landscape.layers.gemm_hook` for ``"train"`` / ``"eval"``;
    * ``init_variables(model, variables, x)``: add collections (e.g. sparsity masks);
    * ``transform(tx)``: wrap the optimizer (e.g. decay on pruned weights);
    * ``after_step(step, variables)``: host-side update between steps (e.g. mask refresh);
    * ``finish(model, variables, train, seed)``: host-side update after the phase's last step
      (e.g. BatchNorm statistics re-estimated under the evaluation forward);
    * ``finetune``: ``None`` or (recipe, epochs, lr_peak) for a second phase with a
      triangular learning rate (LUQ's high-precision fine-tuning);
    * ``main_phase()``: the same recipe without its fine-tuning phase (``fit`` trains, caches
      and reuses that network, so a fine-tuned run costs only its extra epochs).
    """

    rng_streams: tuple[str, ...] = ()
    finetune: tuple | None = None
    #: Revision of what the recipe's code computes. ``fit`` finds a cached network by its
    #: configuration, which names the recipe by its repr, not by its code: a subclass bumps
    #: ``revision`` when a change to its code trains (or finishes) other networks, so that the
    #: checkpoints of the earlier code are not found again. 0 adds nothing to the key.
    revision: int = 0

    def gemm_hook(self, phase: str):
        return None

    def init_variables(self, model, variables, x):
        return variables

    def transform(self, tx):
        return tx

    def after_step(self, step: int, variables):
        return variables

    def finish(self, model, variables, train: data_lib.Split, seed: int):
        return variables

    def main_phase(self) -> Recipe:
        return self

    def key(self) -> str:
        """Identity of the recipe in cache keys: its repr, with its ``revision`` and that of its
        fine-tuning recipe when nonzero."""
        key = repr(self) + (f"@r{self.revision}" if self.revision else "")
        if self.finetune is not None and self.finetune[0].revision:
            key += f"+finetune@r{self.finetune[0].revision}"
        return key

    def __repr__(self) -> str:
        return "FP32()"


@dataclasses.dataclass
class Network:
    """A trained network: a Linen ``model`` and its ``variables`` (params, batch_stats, …).

    ``input_shape``: the per-image shape (H, W, C) it was trained on (:func:`fit` records it;
    None: unknown). Where known, :meth:`apply` and :class:`~landscape.ClipLoss` refuse images of
    another shape by name, instead of Flax's error about kernel shapes.
    """

    model: nn.Module
    variables: dict
    config: dict
    history: list
    recipe: Recipe = dataclasses.field(default_factory=Recipe)
    path: str | None = None
    input_shape: tuple[int, ...] | None = None

    def apply(self, x, *, hook_phase: str | None = "eval"):
        """Logits of a batch ``x`` (N, H, W, C) in evaluation mode (running BN statistics)."""
        checks.check_image_shape(np.shape(x), self.input_shape, "images x")
        return _eval_fn(self.model, self.recipe, hook_phase)(self.variables, jnp.asarray(x))

    def accuracy(self, split: data_lib.Split, batch_size: int = 1000) -> float:
        """Top-1 accuracy on a split (or an (x, y) pair), in batches of ``batch_size`` and the
        remainder (at most two compilations). Labels outside the model's outputs are an error,
        not a silent miss."""
        return accuracy(self, split, batch_size)

    def __repr__(self) -> str:
        acc = self.history[-1].get("test_acc") if self.history else None
        tail = f", test_acc={acc:.4f}" if acc is not None else ""
        return f"Network({type(self.model).__name__}, recipe={self.recipe!r}{tail})"


_EVAL_CACHE: collections.OrderedDict = collections.OrderedDict()
_EVAL_CACHE_SIZE = 16  # evaluation programs kept (least recently used dropped): each holds compiled code


def _eval_fn(model, recipe, hook_phase):
    """One jitted evaluation function per (model object, recipe, phase), for the most recent
    ``_EVAL_CACHE_SIZE`` of them: a long run that trains many networks does not keep every
    network's compiled evaluation alive."""
    key = (id(model), recipe.key(), hook_phase)
    cached = _EVAL_CACHE.get(key)
    if cached is not None and cached[0] is model:
        _EVAL_CACHE.move_to_end(key)
    else:
        hook = recipe.gemm_hook(hook_phase) if hook_phase else None

        @jax.jit
        def f(variables, x):
            with layers.gemm_hook(hook):
                return model.apply(variables, x, train=False)

        cached = _EVAL_CACHE[key] = (model, f)
        _EVAL_CACHE.move_to_end(key)
        while len(_EVAL_CACHE) > _EVAL_CACHE_SIZE:
            _EVAL_CACHE.popitem(last=False)
    return cached[1]


def predict(net: Network, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Argmax predictions (N,) in padded batches of ``batch_size``."""
    return _predict(net, x, batch_size)[0]


def accuracy(net, split: data_lib.Split, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``net`` (anything with ``apply(x) → logits``: a :class:`Network`, an
    exported quantized network) on a split or an (x, y) pair. Labels outside the model's outputs
    are an error, not a silent miss."""
    x, y = data_lib.as_arrays(split)
    predictions, width = _predict(net, x, batch_size)
    data_lib.check_labels(y, width, "split")
    return float(np.mean(predictions == y))


def _predict(net, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
    """(argmax predictions (N,), the number of outputs): the width is read off the logits already
    computed, so that checking labels against it costs no forward pass or trace of its own.

    Chunks of ``batch_size`` and the remainder as it is, unpadded: padding rows would enter
    whatever a forward pass computes over its batch (LUQ's SAWB activation scales), and with it
    the real rows' logits."""
    checks.check_int(batch_size, "batch_size")
    n = len(x)
    if n == 0:
        raise ValueError("x is empty: no images to predict")
    bs = min(batch_size, n)
    out = []
    for start in range(0, n, bs):
        logits = net.apply(x[start:start + bs])
        out.append(np.asarray(jnp.argmax(logits, -1)))
    return np.concatenate(out), int(logits.shape[-1])


# --------------------------------------------------------------------------- caching


#: XLA flags that leave a training run's floats unchanged: virtual host devices (training runs on
#: one device), dumps and the like. Flags of another backend are dropped as well (see numerics()).
NUMERICS_NEUTRAL_FLAGS = ("xla_force_host_platform_device_count", "xla_dump_", "xla_cpu_enable_xprof_traceme")


def numerics() -> str:
    """The library build and XLA flags that a trained network's exact floats depend on.

    The flags are sorted, and those that cannot change them are left out: the ones in
    :data:`NUMERICS_NEUTRAL_FLAGS` and those of the other backend (``--xla_gpu_*`` when training runs
    on the CPU, ``--xla_cpu_*`` off it). A network trained with four virtual CPU devices or with
    ``--xla_gpu_deterministic_ops`` set on a CPU machine is therefore found in the cache again."""
    import jaxlib

    backend = jax.default_backend()
    foreign = "xla_gpu_" if backend == "cpu" else "xla_cpu_"
    flags = sorted(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                   if not flag.lstrip("-").startswith((*NUMERICS_NEUTRAL_FLAGS, foreign)))
    key = f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, {backend}, XLA_FLAGS={' '.join(flags)!r}"
    # JAX settings that change the floats, named only when not the default (so default keys stay):
    # x64 and another PRNG implementation trained other weights under one key; the ambient matmul
    # precision matters off the CPU (TF32), where XLA:CPU computes float32 products either way.
    settings = []
    if jax.config.jax_enable_x64:
        settings.append("x64")
    if jax.config.jax_default_prng_impl != "threefry2x32":
        settings.append(f"prng={jax.config.jax_default_prng_impl}")
    if backend != "cpu" and jax.config.jax_default_matmul_precision is not None:
        settings.append(f"matmul_precision={jax.config.jax_default_matmul_precision}")
    return key + (f", {', '.join(settings)}" if settings else "")


def weights_fingerprint(variables) -> str:
    """SHA-256 (16 hex digits) of a network's variables (leaf paths, dtypes, shapes, bytes): what
    stored results computed from a network are keyed by, since the same training key can give
    other weights on another CPU model (see the README)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode() + a.tobytes())
    return digest.hexdigest()[:16]


def config_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:20]


def save_network(net: Network, path: str) -> str:
    """Write ``path``.msgpack (variables) and then ``path``.json (config, history and the
    msgpack's SHA-256), each atomically: a run killed between the two leaves a pair that
    :func:`load_network` refuses and :func:`fit` trains again."""
    blob = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, net.variables))
    record = {"config": net.config, "history": net.history, "msgpack_sha256": hashlib.sha256(blob).hexdigest()}
    if net.input_shape is not None:  # outside the config: not part of the cache key
        record["input_shape"] = [int(d) for d in net.input_shape]
    meta = json.dumps(record, indent=1, sort_keys=True)
    atomic.write_atomic(path + ".msgpack", blob)
    atomic.write_atomic(path + ".json", meta)
    return path


class MismatchedCheckpoint(ValueError):
    """A ``.msgpack`` that is not the one its ``.json`` was saved with (a save killed between them),
    or a ``.json`` record that is not valid JSON (damaged)."""


def load_network(model: nn.Module, path: str, recipe: Recipe | None = None) -> Network:
    """Load a checkpoint written by :func:`save_network` (msgpack: no pickle involved); a pair from
    two saves raises :class:`MismatchedCheckpoint` (files written before the hash was recorded
    load unchecked)."""
    with open(path + ".msgpack", "rb") as f:
        blob = f.read()
    with open(path + ".json") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:  # a damaged record: as a mismatched pair, fit trains again
            raise MismatchedCheckpoint(f"{path}.json is not valid JSON ({e}): the record is damaged; delete "
                                       "the pair or train again") from e
    recorded = meta.get("msgpack_sha256")
    if recorded is not None and recorded != hashlib.sha256(blob).hexdigest():
        raise MismatchedCheckpoint(f"{path}.msgpack is not the file {path}.json was saved with (its SHA-256 "
                                   "differs): the two come from different saves; delete them or train again")
    variables = flax.serialization.msgpack_restore(blob)
    variables = jax.tree.map(jnp.asarray, variables)
    shape = meta.get("input_shape")  # absent from checkpoints saved before it was recorded
    return Network(model, variables, meta["config"], meta["history"], recipe or Recipe(), path,
                   None if shape is None else tuple(int(d) for d in shape))


# --------------------------------------------------------------------------- training


def _kernel_mask(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key == "kernel", params)


def _cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def training_config(model: nn.Module, data: data_lib.Dataset, *, epochs: int | None = None,
                    lr: float | None = None, batch_size: int | None = None, weight_decay: float | None = None,
                    seed: int = 0, recipe: Recipe | None = None) -> dict:
    """The configuration :func:`fit` trains, caches and records under (``net.config`` less its
    timings), with the defaults filled in and checked, computed without training: results
    stored from a network can be keyed by ``config_key(training_config(...))`` and recognised
    before the network is loaded or retrained."""
    checks.check_module(model, "fit")
    # each split as ClipLoss checks its calibration split (integer images, one-hot or float labels,
    # NaN images, mismatched shapes), named here rather than by optax or Flax inside the first step
    data_lib.check_dataset(data, "data")
    if recipe is not None and not isinstance(recipe, Recipe):
        raise ValueError(f"recipe={recipe!r} must be a landscape.train.Recipe or None (FP32 training)")
    recipe = recipe or Recipe()
    d = {**DEFAULTS.get(data.name, DEFAULTS["cifar10"]), **MODEL_DEFAULTS.get(type(model).__name__, {})}
    epochs = d["epochs"] if epochs is None else epochs
    lr = d["lr"] if lr is None else lr
    batch_size = d["batch_size"] if batch_size is None else batch_size
    weight_decay = d["weight_decay"] if weight_decay is None else weight_decay
    epochs = checks.check_int(epochs, "epochs")
    lr = checks.check_positive(lr, "lr")
    batch_size = checks.check_int(batch_size, "batch_size")
    weight_decay = checks.check_positive(weight_decay, "weight_decay", allow_zero=True)
    seed = checks.check_int(seed, "seed", minimum=0)
    if seed >= 2**32:  # jax.random.key keeps 32 bits: 2^32 + 5 drew seed 5's weights
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2^32)")
    batch_size = min(batch_size, len(data.train))
    return {
        "format": FORMAT_VERSION, "model": repr(model), "data": data.name,
        "data_fingerprint": data.fingerprint(), "epochs": epochs, "lr": lr,
        "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed,
        "recipe": recipe.key(),
        # initial weights and step keys drawn in threefry's classic layout (runtime.classic_threefry);
        # checkpoints from before that change were drawn otherwise and are not found again
        "rng": "threefry-classic",
        # Float results depend on the library build and XLA flags (the XLA:CPU guard changed
        # reduction order): a checkpoint trained under other numerics is not this run's network.
        "numerics": numerics(),
    }


def fit(model: nn.Module, data: data_lib.Dataset, *, epochs: int | None = None,
        lr: float | None = None, batch_size: int | None = None, weight_decay: float | None = None,
        seed: int = 0, recipe: Recipe | None = None, cache: bool = True, progress: bool | None = None,
        ) -> Network:
    """Train ``model`` on ``data.train`` and return a :class:`Network`.

    Every argument but ``model`` and ``data`` has a per-dataset default (``DEFAULTS``; a dataset of
    another name, your own, takes cifar10's: 60 epochs, batch 128, lr 0.1), which
    ``MODEL_DEFAULTS`` changes for some architectures (the ViT trains at lr 0.1).
    Same seed, same result on CPU. With ``cache`` the trained variables are stored under
    ``$LANDSCAPE_CACHE/networks/<hash of the configuration>`` and reused, and the training state
    after each epoch is kept beside them until then: an interrupted fit resumes after its last
    finished epoch, to the same network as an uninterrupted one (``config["seconds"]`` then counts
    the resumed run only).
    ``progress=None`` shows a bar unless ``$LANDSCAPE_PROGRESS=0``.
    """
    config = training_config(model, data, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                             seed=seed, recipe=recipe)
    recipe = recipe or Recipe()
    epochs, lr, batch_size, weight_decay, seed = (config[k] for k in ("epochs", "lr", "batch_size", "weight_decay",
                                                                      "seed"))
    cache = checks.check_flag(cache, "cache")
    if progress is None:
        progress = os.environ.get("LANDSCAPE_PROGRESS", "1") != "0"
    progress = checks.check_flag(progress, "progress")
    path = os.path.join(data_lib.cache_dir(), "networks",
                        f"{type(model).__name__.lower()}-{config_key(config)}")
    if cache and os.path.exists(path + ".msgpack") and os.path.exists(path + ".json"):
        try:
            net = dataclasses.replace(load_network(model, path, recipe), input_shape=data.input_shape)
        except MismatchedCheckpoint:  # a save killed between its two files: train again
            pass
        else:
            _remove_epoch_files(path)  # left by a fit killed after its save, before its cleanup
            return net

    if recipe.finetune is not None:
        # The main phase does not depend on the fine-tuning that follows it: train (or load)
        # it as its own cached network, then run only the extra epochs.
        main = fit(model, data, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                   seed=seed, recipe=recipe.main_phase(), cache=cache, progress=progress)
        t0 = time.time()
        history = [dict(h) for h in main.history]
        ft_recipe, ft_epochs, ft_lr = recipe.finetune
        steps_per_epoch = len(data.train) // batch_size
        ft_total = ft_epochs * steps_per_epoch
        main_end_lr = _schedule(lr, epochs * steps_per_epoch)(epochs * steps_per_epoch)
        tx_ft = ft_recipe.transform(sgd(triangular_schedule(main_end_lr, ft_lr, ft_total), weight_decay))
        ft_key = jax.random.fold_in(_phase_keys(seed)[1], 1)
        variables = _run_phase(model, data, main.variables, tx_ft, ft_recipe, ft_recipe.gemm_hook("train"),
                               ft_epochs, batch_size, seed + 1, ft_key, history, progress, "finetune",
                               resume=_epoch_file(path, "finetune") if cache else None)
        config["seconds"] = round(main.config["seconds"] + time.time() - t0, 2)
        config["main_phase_seconds"] = main.config["seconds"]
    else:
        t0 = time.time()
        init_key, key = _phase_keys(seed)
        x0 = jnp.asarray(data.train.x[:batch_size])
        with runtime.classic_threefry():  # one compiled program: op-by-op init compiled per shape
            variables = jax.jit(functools.partial(model.init, train=False))(init_key, x0)
        # Labels beyond the logits would make the loss NaN one epoch later, hiding the cause.
        out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x0[:1])
        width = checks.check_logits(out, model, "fit")
        for name, split in (("data.train", data.train), ("data.test", data.test)):
            data_lib.check_labels(split.y, width, name)
        if width != data.num_classes:  # too many outputs: trains, with logits no label ever uses
            raise ValueError(f"the model has {width} outputs but {data.name!r} has {data.num_classes} classes; "
                             f"build it with num_classes={data.num_classes} (num_classes=data.num_classes)")
        variables = recipe.init_variables(model, flax.core.unfreeze(variables), x0)
        steps_per_epoch = len(data.train) // batch_size
        tx = recipe.transform(sgd(_schedule(lr, epochs * steps_per_epoch), weight_decay))
        history: list[dict[str, Any]] = []
        variables = _run_phase(model, data, variables, tx, recipe, recipe.gemm_hook("train"),
                               epochs, batch_size, seed, key, history, progress, "train",
                               resume=_epoch_file(path, "train") if cache else None)
        config["seconds"] = round(time.time() - t0, 2)
    net = Network(model, variables, config, history, recipe, path if cache else None, data.input_shape)
    if cache:
        save_network(net, path)
        _remove_epoch_files(path)  # the network is saved: its epochs' states are not needed
    return net


def _remove_epoch_files(path: str) -> None:
    for phase in ("train", "finetune"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(_epoch_file(path, phase))


def _epoch_file(path: str, phase: str) -> str:
    """Where fit keeps a phase's state after each epoch until the network is saved: an interrupted
    fit resumes after its last finished epoch (to the same network as an uninterrupted one)."""
    return f"{path}.{phase}-epoch.msgpack"


def _phase_keys(seed: int):
    """(initialisation key, main-phase key) of a seed; the fine-tuning phase folds in 1."""
    with runtime.classic_threefry():
        return tuple(jax.random.split(jax.random.key(seed)))


def sgd(schedule, weight_decay: float):
    """SGD with Nesterov momentum 0.9 and L2 weight decay on the kernels, added to the gradient
    before momentum and the learning rate (coupled, as PyTorch's SGD ``weight_decay``)."""
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=_kernel_mask),
                       optax.sgd(schedule, momentum=0.9, nesterov=True))


def _schedule(lr: float, total: int):
    """The main phase's learning rate: linear warm-up over 5% of the steps, cosine to 0."""
    if total < 2:  # the warm-up starts at 0: a single step would change nothing
        raise ValueError(f"training has {total} step (epochs × steps per epoch); it needs at least 2: "
                         "raise epochs or lower batch_size")
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=max(1, total // 20),
                                              decay_steps=total, end_value=0.0)


def triangular_schedule(lr_start: float, lr_peak: float, steps: int, lr_end: float = 0.0) -> Callable:
    """LUQ's fine-tuning schedule (the one :func:`fit` runs; :func:`landscape.luq.finetune_schedule`
    is its checked public form): linear from ``lr_start`` to ``lr_peak`` over the first
    h = max(1, ⌊steps/2⌋) steps, then linear down to ``lr_end`` at ``steps`` and constant
    after (the intended form of the paper's eq. 17)."""
    half = max(1, steps // 2)

    def schedule(t):
        t = jnp.asarray(t, jnp.float32)
        up = lr_start + t * (lr_peak - lr_start) / half
        down = lr_end + (lr_peak - lr_end) * jnp.clip((steps - t) / max(1, steps - half), 0.0, 1.0)
        return jnp.where(t <= half, up, down)

    return schedule


def train_step(model, tx, hook=None, rng_streams=()):
    """``fit``'s jitted training step: one optimizer update on a batch, BatchNorm statistics
    updated, every conv/dense product under ``hook`` (a recipe's ``gemm_hook("train")``).

    ``step(params, state, opt_state, x, y, key) -> (params, state, opt_state, loss, acc)``, with
    state the non-parameter collections (batch_stats) and key split into one stream per name
    in ``rng_streams`` (the recipe's random-number streams) and the ``"dropout"`` stream
    (:data:`DROPOUT_STREAM`), drawn in threefry's classic layout (:func:`runtime.classic_threefry`)."""

    @jax.jit
    def step(params, state, opt_state, x, y, key):
        rngs = {name: jax.random.fold_in(key, i) for i, name in enumerate(rng_streams)}
        if DROPOUT_STREAM not in rngs:  # unused (and compiled away) by a model without dropout
            rngs[DROPOUT_STREAM] = jax.random.fold_in(key, DROPOUT_FOLD)

        def loss_fn(p):
            with layers.gemm_hook(hook), runtime.classic_threefry():
                logits, updates = model.apply({"params": p, **state}, x, train=True,
                                              mutable=["batch_stats"], rngs=rngs)
            return _cross_entropy(logits, y), (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, upd)
        state = {**state, **updates}
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return params, state, opt_state, loss, acc

    return step


def _save_epoch(path: str, epoch: int, key, params, state, opt_state, records: list, seconds: float) -> None:
    """The training state after ``epoch`` epochs of a phase, written atomically (msgpack, no
    pickle): what :func:`_load_epoch` resumes from."""
    tree = {"epoch": np.int64(epoch), "key": np.asarray(jax.random.key_data(key)),
            "params": params, "state": state, "opt_state": flax.serialization.to_state_dict(opt_state),
            "records": np.frombuffer(json.dumps(records).encode(), np.uint8), "seconds": np.float64(seconds)}
    blob = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, tree))
    atomic.write_atomic(path, blob + hashlib.sha256(blob).digest())  # the digest: a damaged file is not resumed


def _load_epoch(path: str, params, state, opt_state):
    """(epoch, key, params, state, opt_state, records, seconds) from :func:`_save_epoch`'s file, or
    None when there is none or it does not fit this phase's variables (then the phase starts over)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read()
        blob, digest = raw[:-32], raw[-32:]
        if hashlib.sha256(blob).digest() != digest:
            return None
        tree = flax.serialization.msgpack_restore(blob)
        restored = flax.serialization.from_state_dict({"params": params, "state": state, "opt_state": opt_state},
                                                      {k: tree[k] for k in ("params", "state", "opt_state")})
        same = jax.tree.map(lambda a, b: np.shape(a) == np.shape(b), restored["params"], params)
        if not all(jax.tree.leaves(same)):
            return None
        key = jax.random.wrap_key_data(jnp.asarray(tree["key"]))
        return (int(tree["epoch"]), key, restored["params"], restored["state"], restored["opt_state"],
                json.loads(bytes(np.asarray(tree["records"], np.uint8)).decode()), float(tree["seconds"]))
    except (ValueError, KeyError, TypeError):  # not a file this version wrote
        return None


def _run_phase(model, data, variables, tx, recipe, hook, epochs, batch_size, seed, key, history,
               progress, phase, resume: str | None = None):
    """Train ``epochs`` epochs. With ``resume`` (a file name), the state after each epoch is kept
    there (atomically) and a rerun continues after the last finished epoch, to the same result
    as an uninterrupted run: the data order and the step keys are replayed or restored."""
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    opt_state = tx.init(params)
    step = train_step(model, tx, hook, recipe.rng_streams)

    n = len(data.train)
    steps_per_epoch = n // batch_size
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A1]))
    bar = _progress(epochs * steps_per_epoch, progress, phase)
    global_step, start, earlier = 0, 0, 0.0
    t0 = time.time()
    saved = None if resume is None else _load_epoch(resume, params, state, opt_state)
    if saved is not None and saved[0] < epochs:
        start, key, params, state, opt_state, records, earlier = saved
        for _ in range(start):
            rng.permutation(n)  # the data order of the finished epochs, so the next one is as before
        global_step = start * steps_per_epoch
        history.extend(records)
        if bar is not None:
            bar.update(global_step)
            bar.write(f"{phase}: resuming after epoch {start} of {epochs} ({resume})")
    for epoch in range(start, epochs):
        order = rng.permutation(n)
        losses, accs = [], []
        for i in range(steps_per_epoch):
            idx = np.sort(order[i * batch_size:(i + 1) * batch_size])
            with runtime.classic_threefry():
                key, sub = jax.random.split(key)
            try:
                params, state, opt_state, loss, acc = step(
                    params, state, opt_state, data.train.x[idx], data.train.y[idx], sub)
            except flax.errors.InvalidRngError as e:  # a stream fit does not know of
                streams = ", ".join(repr(n) for n in dict.fromkeys((*recipe.rng_streams, DROPOUT_STREAM)))
                raise ValueError(f"{e}: fit's training steps supply the PRNG streams {streams}; a model that "
                                 "draws from another stream in training needs a landscape.train.Recipe subclass "
                                 "naming it in rng_streams") from e
            global_step += 1
            variables = recipe.after_step(global_step, {"params": params, **state})
            params = variables["params"]
            state = {k: v for k, v in variables.items() if k != "params"}
            losses.append(loss)
            accs.append(acc)
            if bar is not None:
                bar.update(1)
        net = Network(model, {"params": params, **state}, {}, [], recipe)
        record = {"phase": phase, "epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                  "train_acc": float(np.mean(accs)), "test_acc": net.accuracy(data.test)}
        history.append(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", test_acc=f"{record['test_acc']:.3f}")
        if not math.isfinite(record["train_loss"]):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss {record['train_loss']})")
        if resume is not None and epoch + 1 < epochs:
            _save_epoch(resume, epoch + 1, key, params, state, opt_state,
                        [h for h in history if h["phase"] == phase], earlier + time.time() - t0)
    if bar is not None:
        bar.close()
    variables = {"params": params, **state}
    finished = recipe.finish(model, variables, data.train, seed)
    if finished is not variables and history:
        # the last record describes the network this phase returns
        history[-1]["test_acc_before_finish"] = history[-1]["test_acc"]
        history[-1]["test_acc"] = Network(model, finished, {}, [], recipe).accuracy(data.test)
    return finished


def recalibrate_batchnorm(model, variables, x, *, hook=None, precision: str = "highest") -> dict:
    """``variables`` with every BatchNorm's running statistics re-estimated on the images ``x``.

    One training-mode forward pass over all of ``x`` (so each BN normalises with the statistics of
    the whole set and later BNs see consistently normalised inputs); each
    :class:`landscape.layers.BatchNorm` input h (N, ..., C) is intercepted and its running
    statistics become ``mean(h)`` and the biased ``var(h)`` over all axes but the last. ``hook``
    is a GEMM hook active during the pass (e.g. a sparsity recipe's ``gemm_hook("eval")``);
    ``precision`` the pass's matmul/convolution precision. ``flax.linen.Dropout`` layers pass their
    input through unchanged in this pass: the statistics are those of the evaluation forward, which
    drops nothing (and the pass needs no PRNG key).
    """
    runtime.check_precision(precision, "recalibrate_batchnorm")
    stats: dict[tuple[str, ...], tuple] = {}

    def intercept(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            return args[0] if args else kwargs["inputs"]
        if isinstance(context.module, layers.BatchNorm) and context.method_name == "__call__":
            h = args[0]
            axes = tuple(range(h.ndim - 1))
            mean = jnp.mean(h, axis=axes)
            stats.setdefault(tuple(context.module.path),
                             (mean, jnp.mean(jnp.square(h - mean), axis=axes)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept), layers.gemm_hook(hook), jax.default_matmul_precision(precision):
        model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    for path, (mean, var) in stats.items():
        flat[("batch_stats",) + path + ("mean",)] = mean
        flat[("batch_stats",) + path + ("var",)] = var
    return flax.traverse_util.unflatten_dict(flat)


def _progress(total, enabled, phase):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=phase, unit="step", leave=False)
