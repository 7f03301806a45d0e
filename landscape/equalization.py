"""Cross-layer equalization (Nagel et al., ICCV 2019, "Data-free quantization").

Per-tensor weight quantization suffers when one output channel of a kernel spans a much wider
range than the others. For two layers a → (BN →) ReLU → b, with nothing else reading the ReLU's
output, ReLU(x / s) = ReLU(x) / s for s > 0 lets channel c move between them:

    W_a[..., c] ← W_a[..., c] / s_c,   bias_a[c] ← bias_a[c] / s_c,   W_b[..., c, :] ← W_b[..., c, :] · s_c

leaves the network's function unchanged. With r_a,c = max |W_a[..., c]| and r_b,c =
max |W_b[..., c, :]|, the choice s_c = √(r_a,c / r_b,c) gives both channels the range
√(r_a,c · r_b,c), which equalizes the per-channel ranges of both kernels as far as one scale can.

:func:`cross_layer_equalization` folds BatchNorm first (the BN's scale must be in the kernel),
finds candidate pairs by tracing (b reads an unsigned activation site's output — a ReLU —
directly or through max-pooling, which a positive per-channel scale passes as it passes ReLU; a
is the last weight layer before that site, with or without a BN after it; signed sites, the
LayerNorm and GELU outputs of a transformer, are not positively homogeneous and give no
candidates), keeps only the pairs whose rescaling
leaves the logits on the given batch unchanged (a skip connection reading the same activation
would not), and rescales until the scales stop moving (a RuntimeWarning when ``max_rounds`` ends
it first). An unsigned site is taken for a ReLU: a clipped activation such as ReLU6 is not
positively homogeneous either, and its pair is rejected only when the batch reaches the clip (a
conv → BN → ReLU6 pair whose batch stayed below 6 was kept, and inputs twice as large then moved
the logits by 4 %): give it a batch that reaches the clip, so that the logit check sees it.

Grouped convolutions (``QuantConv(feature_group_count=g)``) take part on either side. As layer a,
its output channel c scales like any conv's. As layer b, its input channel i = j·C_in/g + r
(group j) is row r of the output channels of group j, so s_i multiplies exactly those entries and
r_b,i is their range; for a depthwise b (g = C_in) that is its channel i, so in DFQ's
conv → depthwise → pointwise both pairs are equalized, the depthwise kernel sharing the scales of
its two neighbours (the rounds alternate until they stop moving).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from landscape import checks, folding, runtime, sites, sparsity
from landscape import data as data_lib

__all__ = ["Equalization", "cross_layer_equalization"]


@dataclasses.dataclass(frozen=True)
class Equalization:
    """The result of :func:`cross_layer_equalization`.

    Attributes:
        variables: the BN-folded, equalized variables (use with ``fold_bn=False``).
        pairs: (layer a, layer b) pairs that were equalized, network order.
        rejected: candidate pairs whose rescaling changed the logits (another reader of the
            activation between them, e.g. a skip connection).
        scales: pair → (C,) the product of the scales applied to its channels.
        rounds: rescaling rounds run.
        max_logit_change: the largest |Δ logit| of the final variables against the folded ones
            on the batch given.
    """

    variables: dict
    pairs: tuple[tuple[str, str], ...]
    rejected: tuple[tuple[str, str], ...]
    scales: dict[tuple[str, str], np.ndarray]
    rounds: int
    max_logit_change: float

    def __repr__(self) -> str:
        return (f"Equalization({len(self.pairs)} pairs in {self.rounds} rounds, {len(self.rejected)} rejected; "
                f"max |Δ logit| {self.max_logit_change:.2g})")


def _channel_ranges(kernel, axis):
    axes = tuple(i for i in range(kernel.ndim) if i != axis % kernel.ndim)
    return np.max(np.abs(kernel), axis=axes)


def _input_channels(kernel, groups):
    """kernel (..., C_in / g, C_out) of a conv with g groups as (..., C_in, C_out / g): input
    channel i = j·C_in/g + r (group j) with the C_out/g output channels of group j. g = 1: the
    kernel itself. Every entry of the kernel appears once; :func:`_from_input_channels` inverts it."""
    if groups == 1:
        return kernel
    *spatial, k, c_out = kernel.shape
    grouped = kernel.reshape(*spatial, k, groups, c_out // groups)
    return np.moveaxis(grouped, -2, -3).reshape(*spatial, groups * k, c_out // groups)


def _from_input_channels(by_input, groups):
    if groups == 1:
        return by_input
    *spatial, c_in, co = by_input.shape
    grouped = by_input.reshape(*spatial, groups, c_in // groups, co)
    return np.moveaxis(grouped, -3, -2).reshape(*spatial, c_in // groups, groups * co)


def _rescale(flat, a, b, bn, s, groups=1):
    """flat (a "/"-keyed dict) with channel c of layer a divided by s_c and the matching input
    channel of layer b (a conv of ``groups`` groups: a depthwise one's input channel c is its
    channel c) multiplied by it."""
    out = dict(flat)
    out[f"params/{a}/kernel"] = flat[f"params/{a}/kernel"] / s
    for key in (f"params/{a}/bias", f"params/{bn}/bias" if bn else None):
        if key in flat:
            out[key] = flat[key] / s
    by_input = _input_channels(flat[f"params/{b}/kernel"], groups)
    shape = [1] * by_input.ndim
    shape[-2] = len(s)
    out[f"params/{b}/kernel"] = _from_input_channels(by_input * s.reshape(shape), groups)
    return out


def _scales(flat, a, b, groups=1):
    r_a = _channel_ranges(flat[f"params/{a}/kernel"], -1)
    r_b = _channel_ranges(_input_channels(flat[f"params/{b}/kernel"], groups), -2)
    ok = (r_a > 0) & (r_b > 0)
    return np.where(ok, np.sqrt(np.where(ok, r_a, 1.0) / np.where(ok, r_b, 1.0)), 1.0).astype(np.float32)


def cross_layer_equalization(model, variables, x, *, tol: float = 1e-4, max_rounds: int = 20,
                             precision: str = "highest") -> Equalization:
    """Fold BatchNorm, then equalize every a → (BN →) ReLU → b pair of ``model``.

    Args:
        model: a Flax module built from :mod:`landscape.layers`.
        variables: its variables (with BatchNorm statistics).
        x: a batch of inputs (batch axis first): traced to find the pairs, and run to check that
            each pair's rescaling leaves the logits unchanged.
        tol: a pair is kept when the logits move by at most ``tol`` · max |logit|.
        max_rounds: rescaling rounds at most (pairs sharing a layer need several).
        precision: matmul/convolution precision of the logits that check each pair (a
            ``jax.default_matmul_precision`` value). "highest" (true float32) by default: a GPU's
            default TF32 products (10-bit mantissa) move the logits by more than ``tol`` whatever
            the scales (on an H200 every pair of resnet20 was rejected).

    Returns:
        :class:`Equalization`; build the quantized loss from ``result.variables``, e.g.
        ``ClipLoss(dataclasses.replace(net, variables=result.variables), calib, ...)``.
    """
    checks.check_module(model, "cross_layer_equalization")
    # tol < 1: a bound as large as the logits themselves would keep the skip-connection pairs,
    # whose rescaling changes the network (resnet8 at tol=inf: logits moved by 19 %)
    if not (checks.is_positive_finite(tol) and tol < 1):
        raise ValueError(f"tol={tol!r} must be a number in (0, 1)")
    max_rounds = checks.check_int(max_rounds, "max_rounds")
    runtime.check_precision(precision, "cross_layer_equalization")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(f"variables must be the network's variables ({{'params': ..., 'batch_stats': ...}}, e.g. "
                         f"net.variables), got {type(variables).__name__}")
    if isinstance(x, data_lib.Dataset | data_lib.Split):
        raise ValueError(f"x must be a batch of images, e.g. data.calib.x[:64], got a {type(x).__name__}")
    x = np.asarray(x, np.float32)  # checked on the host: an eager jnp check compiles per shape
    if x.ndim < 2 or x.shape[0] == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"x must be a non-empty batch of finite images (N, ...), got shape {x.shape}")
    x = jnp.asarray(x)
    with checks.explained_input_shape(x.shape, "images x"):  # the first trace: Flax names only the kernel shapes
        folded = folding.fold_batchnorm(model, variables, x[:1], precision=precision)
    flat = {k: np.asarray(v, np.float32) for k, v in flax.traverse_util.flatten_dict(folded, sep="/").items()}

    def apply(v, xb):
        return model.apply(v, xb, train=False)

    all_sites, bn_pairs = sites.trace_sites(apply, folded, x[:1])
    # a per-channel positive scale passes ReLU and max-pooling unchanged (both positively
    # homogeneous per channel); reshapes and transposes would move the channel axis
    direct = sites.direct_inputs(apply, folded, x[:1], through=frozenset({"reduce_window_max"}))
    bn_of = {conv: bn for conv, bn, _ in bn_pairs}
    by_name = {s.name: s for s in all_sites}
    groups = {layer.name: layer.groups for layer in sparsity.gemm_layers(model, folded, x[:1])}
    weights = [s for s in all_sites if s.kind == "weight"]
    candidates = []
    for b in weights:
        if b.name not in direct or by_name[direct[b.name]].signed:
            continue
        before = [s for s in weights if s.index < by_name[direct[b.name]].index]
        if not before or len(b.shape) < 2:
            continue
        a = before[-1]
        if a.shape[-1] == b.shape[-2] * groups.get(b.name, 1):  # b's input channels: C_in / g per group
            candidates.append((a.name, b.name))

    forward = jax.jit(apply)
    unflatten = flax.traverse_util.unflatten_dict

    def logits(f):
        with jax.default_matmul_precision(precision):  # part of jit's cache key: set on every call
            return np.asarray(forward(unflatten({k: jnp.asarray(v) for k, v in f.items()}, sep="/"), x))

    reference = logits(flat)
    bound = tol * max(float(np.max(np.abs(reference))), 1e-12)
    pairs, rejected = [], []
    for a, b in candidates:
        g = groups.get(b, 1)
        trial = _rescale(flat, a, b, bn_of.get(a), _scales(flat, a, b, g), g)
        (pairs if np.max(np.abs(logits(trial) - reference)) <= bound else rejected).append((a, b))

    scales = {p: np.ones(flat[f"params/{p[0]}/kernel"].shape[-1], np.float32) for p in pairs}
    rounds = 0
    for rounds in range(1, max_rounds + 1):  # noqa: B007  (the count is reported)
        moved = 0.0
        for a, b in pairs:
            g = groups.get(b, 1)
            s = _scales(flat, a, b, g)
            flat = _rescale(flat, a, b, bn_of.get(a), s, g)
            scales[(a, b)] = scales[(a, b)] * s
            moved = max(moved, float(np.max(np.abs(np.log(s)))))
        if moved < 1e-6:
            break
    else:  # max_rounds ran out: equalized if a further round would move nothing
        left = max((float(np.max(np.abs(np.log(_scales(flat, a, b, groups.get(b, 1)))))) for a, b in pairs),
                   default=0.0)
        if left >= 1e-6:
            # the function is still unchanged; only the equalization is incomplete (an MLP of eight
            # chained pairs with very unequal ranges needed 97 rounds)
            warnings.warn(f"cross_layer_equalization: after max_rounds={max_rounds} rounds the paired ranges still "
                          f"differ (a further round would scale a channel by up to exp({left:.2g})); raise "
                          "max_rounds", RuntimeWarning, stacklevel=2)
    change = float(np.max(np.abs(logits(flat) - reference)))
    if change > bound:  # every kept pair is exact on its own; together they must be too
        raise RuntimeError(f"cross_layer_equalization: the kept pairs together move the logits by {change:.3g}, "
                           f"more than tol · max|logit| = {bound:.3g}; this should not happen, please report it")
    result = unflatten({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    return Equalization(result, tuple(pairs), tuple(rejected), scales, rounds, change)
