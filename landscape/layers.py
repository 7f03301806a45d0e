"""Quantizable Flax Linen layers.

Build a network from these and it works with :class:`landscape.ClipLoss`, the training
recipes (LUQ, N:M sparsity) and every analyzer, exactly like a zoo model:

* :class:`QuantDense`, :class:`QuantConv` — their kernel is a weight site;
* :class:`QuantReLU` — its output is an activation site (place one wherever a ReLU output
  feeds a conv/dense layer);
* :class:`QuantIdentity` — its input, passed through unchanged, is an activation site, signed
  by default (place one before a product whose input can be negative: a LayerNorm or GELU
  output, an attention output, a query/key/value) or unsigned (softmax probabilities);
* :class:`BatchNorm` — running statistics in evaluation (``train=False``), batch statistics
  and a running-average update in training; foldable into the preceding conv
  (:func:`landscape.folding.fold_batchnorm`).

Two extension points, both read at trace time:

* the site context (:mod:`landscape.sites`) decides what a site does (nothing, record,
  quantize with α, calibrate α);
* a *GEMM hook* (:func:`gemm_hook`) wraps every conv/dense product: ``hook(module, x,
  kernel, gemm) -> y`` where ``gemm(x, kernel)`` is the layer's bilinear op. Training
  recipes use it to quantize both operands and the backward pass (LUQ) or to apply a
  sparsity mask (N:M), with no per-model code.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from landscape import checks, sites

GemmHook = Callable[[nn.Module, jax.Array, jax.Array, Callable], jax.Array]
_GEMM_HOOK: contextvars.ContextVar = contextvars.ContextVar("landscape_gemm_hook", default=None)


@contextlib.contextmanager
def gemm_hook(hook: GemmHook | None):
    """Route every QuantDense/QuantConv product through ``hook`` while tracing inside."""
    token = _GEMM_HOOK.set(hook)
    try:
        yield hook
    finally:
        _GEMM_HOOK.reset(token)


def _product(module, x, kernel, gemm):
    hook = _GEMM_HOOK.get()
    return gemm(x, kernel) if hook is None else hook(module, x, kernel, gemm)


# Convolutions default to He-normal (fan_out), torchvision's ResNet init; dense layers to
# LeCun-normal (Flax's default). PyTorch's own default for both (kaiming_uniform with a=√5,
# U(±1/√fan_in)) is not used; ``kernel_init`` on the layers takes any Flax initializer.
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class QuantDense(nn.Module):
    """y = x @ Q(W) + b, with W (in, out) a weight site."""

    features: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        kernel = sites.weight_site(self, kernel)
        y = _product(self, x, kernel, dense_gemm)
        sites.note_output(self, y, x)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y


def dense_gemm(x, w):
    """x @ w: the product of :class:`QuantDense`, as a bilinear callable."""
    return jnp.dot(x, w)


def conv_general(strides: Sequence[int], padding: Sequence[tuple[int, int]], feature_group_count: int = 1,
                 dilation: Sequence[int] = (1, 1)):
    """The NHWC × HWIO convolution used by :class:`QuantConv`, as a bilinear callable.

    One callable per (strides, padding, feature_group_count, dilation): the layer-wise rules pass
    it to ``jax.jit`` as a static argument, so layers of one configuration and shape share their
    compiled programs. A grouped product (``feature_group_count`` g > 1, kernel (kh, kw, C_in / g,
    C_out)) carries g as its attribute ``feature_group_count`` (:func:`feature_groups`), so a
    method that needs each output channel to read every input channel can tell and refuse it.
    ``dilation`` (dh, dw) spaces the kernel's taps (``rhs_dilation``, atrous convolution)."""
    groups = _check_groups(feature_group_count)
    return _conv_gemm(tuple(int(s) for s in strides), tuple((int(lo), int(hi)) for lo, hi in padding), groups,
                      tuple(int(d) for d in dilation))


def feature_groups(gemm) -> int:
    """The group count g of a layer's product (:func:`conv_general`); 1 for dense and ungrouped
    products and for any other bilinear callable."""
    return int(getattr(gemm, "feature_group_count", 1))


@functools.cache
def _conv_gemm(strides: tuple[int, ...], padding: tuple[tuple[int, int], ...], groups: int = 1,
               dilation: tuple[int, ...] = (1, 1)):
    def gemm(x, w):
        return jax.lax.conv_general_dilated(
            x, w, window_strides=strides, padding=padding, rhs_dilation=dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        )

    gemm.feature_group_count = groups
    gemm.strides, gemm.padding, gemm.dilation = strides, padding, dilation
    return gemm


def _check_groups(feature_group_count) -> int:
    if not _is_int(feature_group_count) or feature_group_count < 1:
        raise ValueError(f"QuantConv feature_group_count={feature_group_count!r} is not allowed; allowed: a positive "
                         "int g (1: an ordinary convolution; the input and output channels both divisible by g)")
    return int(feature_group_count)


class QuantConv(nn.Module):
    """2-D convolution (NHWC, HWIO kernel) whose kernel is a weight site.

    ``padding`` defaults to symmetric and explicit, k // 2 on each side (PyTorch semantics), so
    weights imported from torchvision give the same outputs. The arguments also take the forms of
    ``flax.linen.Conv``, with its meaning:

    * ``kernel_size``: ``(kh, kw)``, or one int k for ``(k, k)`` (``flax.linen.Conv`` would read
      an int as a 1-D kernel; this layer is 2-D);
    * ``strides``: ``(sh, sw)``, one int s for ``(s, s)``, or None for ``(1, 1)``;
    * ``padding``: None (the default above); ``"SAME"`` (output size ⌈input / stride⌉, the total
      padding split as XLA does, the odd pixel after: strided and even kernels included);
      ``"VALID"`` (none); one int p ≥ 0 (p on both sides of both dimensions); or a sequence of two
      entries, one per spatial dimension (H, W), each an int p (p on both sides) or a
      ``(lo, hi)`` pair.

    * ``feature_group_count``: g ≥ 1, as in ``flax.linen.Conv``: the input channels split into g
      groups, each convolved with its own C_out / g output channels; the kernel is
      (kh, kw, C_in / g, C_out), and C_in and C_out must both be divisible by g. g = C_in is a
      depthwise convolution (MobileNet's), g = 1 (the default) the ordinary one.
    * ``kernel_dilation``: ``(dh, dw)`` or one int d, as in ``flax.linen.Conv`` (an atrous
      convolution: the taps d apart, so a k-tap kernel spans k_e = (k − 1)·d + 1 pixels). The
      default padding is then k_e // 2 on both sides (d for a 3×3 kernel: torchvision's dilated
      convolutions), and "SAME" pads for the span k_e. The kernel is still (kh, kw, C_in / g,
      C_out), and the MACs per output position kh·kw·C_in / g·C_out.

    Anything else raises a ValueError naming the argument and these forms. Input (transposed)
    dilation and circular/reflect-padded convolutions are not supported.
    """

    features: int
    kernel_size: int | Sequence[int] = (3, 3)
    strides: int | Sequence[int] | None = (1, 1)
    padding: str | int | Sequence[int | Sequence[int]] | None = None
    use_bias: bool = False
    kernel_init: Callable = he_normal_fan_out
    feature_group_count: int = 1
    kernel_dilation: int | Sequence[int] = 1

    def __post_init__(self):
        # the arguments' errors at construction, where they were written; __call__ reads them again
        kernel = _conv_kernel_size(self.kernel_size)
        _conv_strides(self.strides)
        _conv_padding(self.padding, kernel, dilation=_conv_dilation(self.kernel_dilation))
        groups = _check_groups(self.feature_group_count)
        if _is_int(self.features) and self.features % groups:
            raise ValueError(f"QuantConv feature_group_count={groups} does not divide features={self.features}; "
                             "the output channels must be divisible by the group count")
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        kh, kw = _conv_kernel_size(self.kernel_size)
        strides = _conv_strides(self.strides)
        dilation = _conv_dilation(self.kernel_dilation)
        layer = f"QuantConv {self.name!r}" if self.name else "QuantConv"
        groups = _check_groups(self.feature_group_count)
        divisible = x.shape[-1] % groups == 0 and self.features % groups == 0
        # (kh, kw, C_in / g, C_out); channels that g does not divide are refused below, after the rank
        shape = (kh, kw, x.shape[-1] // groups if divisible else x.shape[-1], self.features)
        # the kernel first: images of another layout meet a trained kernel's shape here, in the
        # ScopeParamShapeError that checks.explained_input_shape turns into an error about images
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        if jnp.ndim(x) != 4:
            raise ValueError(f"{layer}: the input must be NHWC (batch, height, width, channels), got shape "
                             f"{jnp.shape(x)}")
        pads = _conv_padding(self.padding, (kh, kw), strides, x.shape[1:3], dilation)
        spans = [n + lo + hi for n, (lo, hi) in zip(x.shape[1:3], pads, strict=True)]
        eh, ew = _dilated_size((kh, kw), dilation)
        if spans[0] < eh or spans[1] < ew:
            dilated = "" if dilation == (1, 1) else f" dilated {dilation} (spanning {eh}x{ew})"
            raise ValueError(f"{layer}: a {kh}x{kw} kernel{dilated} with padding {pads} leaves no output "
                             f"position on an input of height x width {x.shape[1]}x{x.shape[2]}")
        if not divisible:
            raise ValueError(f"{layer}: feature_group_count={groups} must divide both the input channels "
                             f"(C_in={x.shape[-1]}) and features (C_out={self.features})")
        kernel = sites.weight_site(self, kernel)
        y = _product(self, x, kernel, conv_general(strides, pads, groups, dilation))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        sites.note_output(self, y, x)
        sites.note_conv_output(self, y)
        return y


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_pair(value, minimum: int) -> tuple[int, int] | None:
    """(v, v) for one int, (a, b) for a sequence of two; None if not such ints >= minimum."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(map(_is_int, value)):
        pair = (int(value[0]), int(value[1]))
    else:
        return None
    return pair if min(pair) >= minimum else None


def _positive_pair(value, argument: str, forms: str) -> tuple[int, int]:
    """(v, v) or (a, b) for a QuantConv size argument of positive ints, else a ValueError naming it."""
    pair = _int_pair(value, 1)
    if pair is None:
        raise ValueError(f"QuantConv {argument}={value!r} is not allowed; allowed: {forms}")
    return pair


def _conv_kernel_size(kernel_size) -> tuple[int, int]:
    return _positive_pair(kernel_size, "kernel_size",
                          "a positive int k (a k x k kernel) or a sequence of two positive ints (kh, kw)")


def _conv_strides(strides) -> tuple[int, int]:
    return (1, 1) if strides is None else _positive_pair(
        strides, "strides", "a positive int s (s in both dimensions), a sequence of two positive ints (sh, sw), "
        "or None (1)")


def _conv_dilation(kernel_dilation) -> tuple[int, int]:
    return _positive_pair(kernel_dilation, "kernel_dilation", "a positive int d (d in both dimensions; 1: no "
                          "dilation) or a sequence of two positive ints (dh, dw)")


def _dilated_size(kernel_size, dilation) -> tuple[int, ...]:
    """The span k_e = (k − 1)·d + 1 of each dimension of a dilated kernel."""
    return tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True))


_PADDING_FORMS = ('None (k // 2 on both sides, k the span of the dilated kernel), "SAME", "VALID", an int p >= 0 '
                  "(p on both sides of both dimensions), or a sequence of two entries (H, W), each an int p >= 0 or "
                  "a pair (lo, hi) of ints >= 0")


def _conv_padding(padding, kernel_size, strides=None, spatial=None, dilation=(1, 1)):
    """((lo, hi), (lo, hi)) for QuantConv's ``padding``: "SAME" needs the input's ``spatial``
    (H, W) and ``strides``; without them (checking the argument only) it returns None. A dilated
    kernel pads for its span (:func:`_dilated_size`)."""
    kernel_size = _dilated_size(kernel_size, dilation)
    if padding is None:
        return tuple((k // 2, k // 2) for k in kernel_size)
    if isinstance(padding, str):
        kind = padding.upper()
        if kind == "VALID":
            return ((0, 0), (0, 0))
        if kind == "SAME":
            if spatial is None:
                return None
            # XLA's own rule (what flax.linen.Conv's "SAME" runs): output ⌈n / s⌉, the odd pixel after
            pads = jax.lax.padtype_to_pads(tuple(spatial), kernel_size, strides, "SAME")
            return tuple((int(lo), int(hi)) for lo, hi in pads)
    elif _is_int(padding):
        if padding >= 0:
            return ((int(padding),) * 2,) * 2
    elif isinstance(padding, Sequence) and len(padding) == 2:
        pairs = [_int_pair(p, 0) for p in padding]
        if None not in pairs:
            return tuple(pairs)
    raise ValueError(f"QuantConv padding={padding!r} is not allowed; allowed: {_PADDING_FORMS}")


class QuantReLU(nn.Module):
    """ReLU whose output is an (unsigned) activation site."""

    @nn.compact
    def __call__(self, x):
        return sites.activation_site(self, nn.relu(x))


class QuantIdentity(nn.Module):
    """Identity whose output is an activation site: signed (default), on the symmetric grid with
    a zero level ("midtread": levels kΔ, |k| ≤ 2^(M−1) − 1, Δ = α/(2^(M−1) − 1)), or with
    ``signed=False`` on the unsigned grid of a ReLU output (levels kΔ, 0 ≤ k ≤ 2^M − 1) for a
    tensor that cannot be negative (softmax probabilities; ``ClipLoss.init`` warns when such a
    site sees negative calibration values, which its grid clips to 0).

    The name follows Brevitas; place one wherever a tensor feeds a product (transformers: after
    each LayerNorm, GELU and attention; the operands of QKᵀ and of the attention-weighted sum).
    """

    signed: bool = True

    def __post_init__(self):
        # at construction: a truthy string ("false" from a config file) had made the site signed,
        # and None or 0 unsigned, silently
        checks.check_flag(self.signed, "QuantIdentity signed")
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        return sites.activation_site(self, x, signed=self.signed)


class BatchNorm(nn.Module):
    """Batch normalisation over all axes but the last (PyTorch's momentum 0.1 = 0.9 here).

    The running variance averages the biased batch variance, as Flax's BatchNorm does;
    PyTorch's averages the unbiased one, n/(n − 1) larger for n = N·H·W values per channel
    (1.0005 at a 128-image batch of 4×4 maps, 1.06 at n = 18). Evaluation from imported
    torchvision statistics is unaffected; networks trained here and in PyTorch differ by that.

    Variables: params ``scale``, ``bias``; batch_stats ``mean``, ``var``.
    ``train=True`` normalises with batch statistics and updates the running averages
    (requires ``mutable=["batch_stats"]``); ``train=False`` uses the running statistics.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool = False):
        sites.note_norm_input(self, x)
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * var
        else:
            mean, var = ra_mean.value, ra_var.value
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
