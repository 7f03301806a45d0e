"""AdaPrune: convert a trained network to N:M or transposable N:M sparsity with a calibration set.

Hubara et al., "Accelerated Sparse Neural Training" (NeurIPS 2021), §AdaPrune. Each sparse layer is
re-fitted on its own: with the kernel W, the layer inputs X and outputs Y = X ⊛ W recorded from the
*original* network in one forward pass over the calibration images (⊛ is the layer's GEMM, the
bias excluded), the mask S is fixed by magnitude (:func:`landscape.sparsity.layer_mask`, exact
solver) and the kept weights — plus a bias correction Δb where the layer has a bias — minimise

    MSE(W', Δb) = mean over (examples, outputs) of  ( X ⊛ (S ⊙ W') + Δb − X ⊛ W )²

by Adam (lr 1e-3 on W', 1e-2 on Δb, mini-batches of 50 recorded examples, 1000 iterations in the
reference), re-applying the mask after every step so pruned weights stay exactly zero. The start is
S ⊙ W, or with ``absorb_mean`` S ⊙ (W + mean of the pruned weights of each group spread over its kept
weights). Layers are independent, so their errors are not compensated downstream; afterwards the
BatchNorm running statistics are re-estimated on the calibration images
(:func:`recalibrate_batchnorm`), which absorbs the mean and variance shifts the pruning left.

Choices (against the reference code): the reported "before" MSE is that of the magnitude mask
alone; the layer keeps whichever of {S ⊙ W, the absorb-mean start, the Adam result} has the lowest
MSE on the whole calibration cache, so AdaPrune never does worse than magnitude pruning on it. The
reference evaluates its "test" MSE on 100 samples drawn from the same cache; here it is the whole
cache. BatchNorm statistics are the exact mean and (biased) variance of each BN input over the
calibration set in one training-mode pass, rather than a momentum average over batches.
"""

from __future__ import annotations

import functools
import numbers
import time
import warnings
from dataclasses import dataclass

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape import checks, runtime, sparsity, train
from landscape import data as data_lib
from landscape.data import Dataset, Split
from landscape.layerwise import layer_mse, record_layers
from landscape.train import recalibrate_batchnorm

__all__ = [
    "Accuracy",
    "AdaPruneResult",
    "LayerFit",
    "LayerReport",
    "absorb_mean",
    "adaprune",
    "prune_layer",
    "recalibrate_batchnorm",
]


# --------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class LayerFit:
    """One re-fitted layer (:func:`prune_layer`).

    Attributes:
      kernel: S ⊙ W', the kernel's shape (pruned entries exactly 0).
      bias_delta: Δb (C,), zeros for a layer without bias.
      mse_before: calibration MSE of the magnitude mask S ⊙ W.
      mse_after: calibration MSE of ``kernel`` and ``bias_delta`` (<= mse_before).
      history: MSE of the Adam iterate on the whole cache, every ``iterations // 10`` steps.
    """

    kernel: np.ndarray
    bias_delta: np.ndarray
    mse_before: float
    mse_after: float
    history: tuple[float, ...]


@dataclass(frozen=True)
class LayerReport:
    """Per-layer summary: name, kernel shape, kept fraction, calibration MSE before and after."""

    name: str
    shape: tuple[int, ...]
    density: float
    mse_before: float
    mse_after: float


@dataclass(frozen=True)
class Accuracy:
    """Top-1 accuracies on the evaluation split.

    Attributes:
      dense: the original network.
      magnitude: magnitude masks only (S ⊙ W, original BN statistics).
      magnitude_bn: magnitude masks + re-estimated BN statistics (None without BatchNorm).
      adaprune: AdaPrune kernels, original BN statistics.
      adaprune_bn: AdaPrune kernels + re-estimated BN statistics (None without BatchNorm).
    """

    dense: float
    magnitude: float
    magnitude_bn: float | None
    adaprune: float
    adaprune_bn: float | None

    @property
    def final(self) -> float:
        """Accuracy of the returned network."""
        return self.adaprune if self.adaprune_bn is None else self.adaprune_bn


@dataclass(frozen=True)
class AdaPruneResult:
    """What :func:`adaprune` returns.

    Attributes:
      network: the sparse :class:`landscape.train.Network` (kernels S ⊙ W', a ``"masks"``
        collection, recipe :class:`landscape.sparsity.Recipe` of the structure, BN re-estimated).
      structure: e.g. "4:8" or "T-4:8".
      layers: one :class:`LayerReport` per sparse layer, call order.
      accuracy: :class:`Accuracy` on the evaluation split, or None when none was given.
      seconds: wall time.
    """

    network: train.Network
    structure: str
    layers: tuple[LayerReport, ...]
    accuracy: Accuracy | None
    seconds: float

    def __repr__(self) -> str:
        lines = [f"AdaPruneResult(structure={self.structure!r}, layers={len(self.layers)}, "
                 f"seconds={self.seconds:.1f})"]
        a = self.accuracy
        if a is not None:
            fmt = lambda v: "-" if v is None else f"{v:.4f}"
            lines.append(f"  accuracy: dense {fmt(a.dense)}  magnitude {fmt(a.magnitude)}  "
                         f"magnitude+BN {fmt(a.magnitude_bn)}  adaprune {fmt(a.adaprune)}  "
                         f"adaprune+BN {fmt(a.adaprune_bn)}")
        width = max([len(r.name) for r in self.layers] + [5])
        lines.append(f"  {'layer':<{width}}  {'shape':<16} density  mse_before  mse_after")
        for r in self.layers:
            lines.append(f"  {r.name:<{width}}  {str(r.shape):<16} {r.density:7.3f}  "
                         f"{r.mse_before:10.3e}  {r.mse_after:9.3e}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# validation


def _calibration_images(calib, input_shape=None) -> np.ndarray:
    """The calibration images of ``calib`` as float32 (N, ...), checked against the per-image shape
    ``input_shape`` the network takes where it is known (else Flax fails on a kernel shape)."""
    if isinstance(calib, Dataset):
        raise ValueError("calib is a whole Dataset; pass its calibration split, data.calib")
    if isinstance(calib, Split):
        x = calib.x
    elif isinstance(calib, tuple) and len(calib) == 2:
        x = calib[0]
    else:
        x = calib
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"calibration images must be a non-empty batch (N, ...), got shape {x.shape}")
    checks.check_image_shape(x.shape, input_shape, "calibration images")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"calibration images must be finite; {int(np.sum(~np.isfinite(x)))} of {x.size} "
                         "values are NaN or infinite")
    return x


def _test_split(test, image_shape, num_classes: int, calib_x):
    """``test`` as (x, y) arrays, checked before any pruning: the accuracies come last, minutes in.
    Calibration images found among the test images are refused: the layers would be refitted and
    the BN statistics re-estimated on the images the accuracy is then reported on."""
    if isinstance(test, Dataset):
        raise ValueError("test is a whole Dataset; pass its test split, data.test")
    x, y = data_lib.as_arrays(test, "test")
    if x.shape[1:] != tuple(image_shape):
        raise ValueError(f"test images have shape {x.shape}; the calibration images, and so the network, "
                         f"take (N, {', '.join(map(str, image_shape))})")
    data_lib.check_labels(y, num_classes, "test")
    in_test = {np.ascontiguousarray(image).tobytes() for image in x}
    calib_x = np.asarray(calib_x)
    shared = sum(np.ascontiguousarray(image).tobytes() in in_test for image in calib_x)
    message = (f"{shared} of the {len(calib_x)} calibration images are also test images; calibrate on a sample "
               "of the training split (data.calib), and keep the test split for the accuracy")
    if 2 * shared >= len(calib_x):  # drawn from the test split
        raise ValueError(message)
    if shared:  # a few: datasets hold exact duplicates across their splits
        warnings.warn(message, stacklevel=3)
    return x, y


# --------------------------------------------------------------------------------------------------
# pieces


def absorb_mean(kernel, mask, *, block: int) -> np.ndarray:
    """Spread each group's pruned weights over its kept ones, then mask.

    Groups are M = ``block`` consecutive entries along the reduction axis of the GEMM matrix
    (:func:`landscape.sparsity.gemm_matrix`). In a group g with kept set S_g (n_g = |S_g| > 0):

        w'_i = w_i + (sum_{j in g, j not in S_g} w_j) / n_g   (i in S_g),     w'_i = 0 otherwise

    so every group sum is preserved; a group with nothing kept becomes zero.
    """
    w = np.asarray(kernel, dtype=np.float32)
    m = np.asarray(mask)
    if m.dtype != bool or m.shape != w.shape:
        raise ValueError(f"mask must be a boolean array of the kernel's shape {w.shape}, got "
                         f"{m.dtype} {m.shape}")
    M = checks.check_int(block, "block")
    gw, gm = sparsity.gemm_matrix(w), sparsity.gemm_matrix(m)
    R = gw.shape[0]
    pad = (-R) % M
    gw = np.concatenate([gw, np.zeros((pad, gw.shape[1]), gw.dtype)]).reshape(-1, M, gw.shape[1])
    gm = np.concatenate([gm, np.zeros((pad, gm.shape[1]), bool)]).reshape(-1, M, gm.shape[1])
    pruned = np.where(gm, 0.0, gw).sum(1, keepdims=True)
    n_kept = gm.sum(1, keepdims=True)
    share = np.where(n_kept > 0, pruned / np.maximum(n_kept, 1), 0.0)
    out = np.where(gm, gw + share, 0.0).astype(np.float32)
    return out.reshape(-1, out.shape[-1])[:R].reshape(w.shape)


def prune_layer(x, y, kernel, mask, gemm, *, init=None, bias: bool = False, iterations: int = 1000,
                lr: float = 1e-3, bias_lr: float = 1e-2, batch_size: int = 50, key=None,
                precision: str = "highest") -> LayerFit:
    """Re-fit one layer's kept weights with the mask fixed (the AdaPrune step).

    Args:
      x: recorded inputs (N, ...) of the layer; y: recorded dense outputs ``gemm(x, kernel)``.
      kernel: the dense kernel W; mask: boolean S of its shape.
      gemm: the layer's product ``gemm(x, w)``.
      init: start (defaults to S ⊙ W), e.g. :func:`absorb_mean`; masked again here.
      bias: also fit a bias correction Δb (C,) (the layer has a bias).
      iterations, lr, bias_lr, batch_size: Adam on mini-batches of recorded examples drawn without
        replacement.
      key: PRNG key of the mini-batch draws (default ``jax.random.key(0)``).
      precision: matmul/convolution precision of ``gemm`` ("highest": true float32).

    Returns a :class:`LayerFit`; the kept result is the candidate (S ⊙ W, init, Adam result) with
    the lowest MSE on the whole of ``x``.
    """
    iterations = checks.check_int(iterations, "iterations")
    batch_size = checks.check_int(batch_size, "batch_size")
    lr = checks.check_positive(lr, "lr")
    bias_lr = checks.check_positive(bias_lr, "bias_lr")
    runtime.check_precision(precision, "prune_layer")
    w = jnp.asarray(kernel, jnp.float32)
    m = np.asarray(mask)
    if m.dtype != bool or m.shape != w.shape:
        raise ValueError(f"mask must be a boolean array of the kernel's shape {w.shape}, got {m.dtype} "
                         f"{m.shape}")
    maskf = jnp.asarray(m, jnp.float32)
    x, y = jnp.asarray(x), jnp.asarray(y)
    # a y or init of another shape would broadcast silently into a wrong MSE or kernel
    out_shape = jax.eval_shape(gemm, x, w).shape
    if y.shape != out_shape:
        raise ValueError(f"y has shape {y.shape}; gemm(x, kernel) has shape {out_shape}: y must be the "
                         "layer's recorded dense outputs for these inputs")
    if init is not None and np.shape(init) != w.shape:
        raise ValueError(f"init has shape {np.shape(init)}; it must have the kernel's shape {w.shape}")
    key = jax.random.key(0) if key is None else key
    n = x.shape[0]
    bs = min(batch_size, n)
    zero_b = jnp.zeros((w.shape[-1],), jnp.float32)
    w_mag = w * maskf
    w_init = w_mag if init is None else jnp.asarray(init, jnp.float32) * maskf

    with jax.default_matmul_precision(precision):  # read while tracing, and part of jit's key
        # the layer's data are arguments: layers of one shape and product share one program
        p, hist = _adam_prune({"w": w_init, "b": zero_b}, x, y, key, maskf, np.float32(lr), np.float32(bias_lr),
                              gemm=gemm, batch_size=bs, iterations=iterations, bias=bool(bias))
        candidates = [(w_mag, zero_b), (w_init, zero_b), (p["w"] * maskf, p["b"])]
        errors = [layer_mse(gemm, x, y, cw, cb) for cw, cb in candidates]
    # a diverged Adam run (NaN MSE) must not win: np.argmin takes the first NaN as the minimum
    best = int(np.argmin([e if np.isfinite(e) else np.inf for e in errors]))
    cw, cb = candidates[best]
    return LayerFit(np.asarray(cw), np.asarray(cb), errors[0], errors[best],
                    tuple(float(h) for h in np.asarray(hist)))


@functools.partial(jax.jit, static_argnames=("gemm", "batch_size", "iterations", "bias"))
def _adam_prune(p, x, y, key, maskf, lr, bias_lr, *, gemm, batch_size, iterations, bias):
    """``iterations`` Adam steps on mini-batches of ``batch_size`` rows of (x, y), the kernel
    masked by ``maskf`` after every step; returns (params, the full-set MSE every tenth)."""
    n = x.shape[0]
    report_every = max(1, iterations // 10)
    tx = optax.multi_transform(
        {"w": optax.adam(lr), "b": optax.adam(bias_lr) if bias else optax.set_to_zero()},
        {"w": "w", "b": "b"},
    )

    def mse(p, xb, yb):
        return jnp.mean(jnp.square(gemm(xb, p["w"] * maskf) + p["b"] - yb))

    def body(i, carry):
        p, s, key, hist = carry
        with runtime.classic_threefry():
            key, sub = jax.random.split(key)
            idx = jax.random.choice(sub, n, (batch_size,), replace=False)
        g = jax.grad(mse)(p, x[idx], y[idx])
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        p = {"w": p["w"] * maskf, "b": p["b"]}  # the mask is fixed: pruned weights stay 0
        hist = jax.lax.cond((i + 1) % report_every == 0,
                            lambda h: h.at[(i + 1) // report_every - 1].set(mse(p, x, y)),
                            lambda h: h, hist)
        return p, s, key, hist

    hist = jnp.zeros((iterations // report_every,), jnp.float32)
    p, _, _, hist = jax.lax.fori_loop(0, iterations, body, (p, tx.init(p), key, hist))
    return p, hist


# --------------------------------------------------------------------------------------------------
# the conversion


def adaprune(net: train.Network, calib, *, keep: int = 4, block: int = 8, transposable: bool = False,
             layers=None, dense_first_last: bool = True, iterations: int = 1000, lr: float = 1e-3,
             bias_lr: float = 1e-2, batch_size: int = 50, absorb_mean_init: bool = False,
             recalibrate_bn: bool = True, test: Split | None = None, seed: int = 0,
             precision: str = "highest") -> AdaPruneResult:
    """Convert a trained network to K:M (or transposable K:M) sparsity with a calibration set.

    Args:
      net: a trained :class:`landscape.train.Network`, dense or unstructured-sparse (a network
        with a ``"masks"`` collection is first reduced to its effective kernels).
      calib: calibration images: a :class:`landscape.data.Split` (labels unused), an ``(x, y)``
        pair or an array (N, H, W, C). Take them from the training split.
      keep, block: K kept out of every M (dense → 4:8 and unstructured → 2:4 in the reference).
      transposable: transposable masks (exact solver) instead of K:M along the reduction axis.
      layers: names of the layers to prune; default all conv/dense layers except, with
        ``dense_first_last``, the first and last (call order).
      iterations, lr, bias_lr, batch_size: Adam per layer (:func:`prune_layer`).
      absorb_mean_init: start from :func:`absorb_mean` instead of S ⊙ W.
      recalibrate_bn: re-estimate BatchNorm statistics on ``calib`` afterwards.
      test: optional evaluation split (a Split or an (x, y) pair) for :class:`Accuracy`, checked
        (with every other argument and the images' shape) before any pruning.
      seed: mini-batch draws.
      precision: matmul/convolution precision of every pass ("highest": true float32; a GPU's
        default TF32 products would record and fit 10-bit-mantissa activations).

    Returns an :class:`AdaPruneResult`.
    """
    t0 = time.time()
    # Every argument is checked here, before the pruning (minutes on a large network).
    checks.check_network(net, "adaprune")
    K, M = sparsity._check_keep_block(keep, block)
    for name, flag in (("transposable", transposable), ("absorb_mean_init", absorb_mean_init),
                       ("recalibrate_bn", recalibrate_bn), ("dense_first_last", dense_first_last)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    iterations = checks.check_int(iterations, "iterations")
    batch_size = checks.check_int(batch_size, "batch_size")
    lr = checks.check_positive(lr, "lr")
    bias_lr = checks.check_positive(bias_lr, "bias_lr")
    runtime.check_precision(precision, "adaprune")
    x = _calibration_images(calib, getattr(net, "input_shape", None))
    model = net.model
    base = {k: v for k, v in flax.core.unfreeze(net.variables).items() if k != "masks"}
    base["params"] = sparsity.effective_params(net.variables)
    with checks.explained_input_shape(x.shape, "calibration images"):  # a network without input_shape
        all_layers = sparsity.gemm_layers(model, base, x[:1])
    if test is not None:  # abstract evaluation: the output width without compiling a forward pass
        width = jax.eval_shape(lambda v, xb: model.apply(v, xb, train=False), base, x[:1]).shape[-1]
        test = _test_split(test, x.shape[1:], width, x)
    chosen = sparsity.select_layers(all_layers, dense_first_last=dense_first_last, names=layers)
    sparsity.refuse_grouped(chosen, "adaprune", "; leave it dense by naming the other layers in layers=[...]")
    if not chosen:
        raise ValueError("no layer to prune: the selection is empty (a model with two conv/dense layers "
                         "and dense_first_last=True, or layers=[])")
    io = record_layers(model, base, x, [layer.name for layer in chosen], precision=precision)

    params = flax.traverse_util.flatten_dict(base["params"])
    pruned, magnitude, masks = dict(params), dict(params), {}
    reports = []
    key = jax.random.key(seed)
    for layer in chosen:
        kpath, bpath = layer.path + ("kernel",), layer.path + ("bias",)
        w = np.asarray(params[kpath], np.float32)
        mask = sparsity.layer_mask(w, keep=K, block=M, transposable=transposable, method="exact")
        inputs, outputs, gemm = io[layer.name]
        fit = prune_layer(inputs, outputs, w, mask, gemm,
                          init=absorb_mean(w, mask, block=M) if absorb_mean_init else None,
                          bias=bpath in params, iterations=iterations, lr=lr, bias_lr=bias_lr,
                          batch_size=batch_size, key=jax.random.fold_in(key, layer.index), precision=precision)
        masks[kpath] = jnp.asarray(mask)
        magnitude[kpath] = jnp.asarray(w * mask)
        pruned[kpath] = jnp.asarray(fit.kernel)
        if bpath in params:
            pruned[bpath] = params[bpath] + jnp.asarray(fit.bias_delta)
        reports.append(LayerReport(layer.name, layer.shape, float(mask.mean()), fit.mse_before,
                                   fit.mse_after))

    recipe = sparsity.Recipe(keep=K, block=M, transposable=transposable,
                             dense_first_last=dense_first_last)
    unflat = flax.traverse_util.unflatten_dict
    mask_tree = unflat(masks)
    ada_vars = {**base, "params": unflat(pruned), "masks": mask_tree}
    mag_vars = {**base, "params": unflat(magnitude), "masks": mask_tree}
    has_bn = recalibrate_bn and "batch_stats" in base
    final_vars = recalibrate_batchnorm(model, ada_vars, x, precision=precision) if has_bn else ada_vars

    accuracy = None
    if test is not None:
        def acc(variables, rec):
            with jax.default_matmul_precision(precision):
                return train.Network(model, variables, {}, [], rec).accuracy(test)

        accuracy = Accuracy(
            dense=acc(base, train.Recipe()),
            magnitude=acc(mag_vars, recipe),
            magnitude_bn=acc(recalibrate_batchnorm(model, mag_vars, x, precision=precision), recipe)
            if has_bn else None,
            adaprune=acc(ada_vars, recipe),
            adaprune_bn=acc(final_vars, recipe) if has_bn else None,
        )
    config = {**net.config, "adaprune": {
        "keep": K, "block": M, "transposable": transposable, "layers": [r.name for r in reports],
        "iterations": iterations, "lr": lr, "bias_lr": bias_lr, "batch_size": batch_size,
        "absorb_mean_init": absorb_mean_init, "recalibrate_bn": recalibrate_bn, "calib_size": len(x),
        "seed": int(seed), "precision": precision}}
    network = train.Network(model, final_vars, config, list(net.history), recipe, None)
    return AdaPruneResult(network, recipe.structure, tuple(reports), accuracy, time.time() - t0)
