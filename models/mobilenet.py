"""A small MobileNetV2 (Sandler et al., CVPR 2018) for 8×8 to 32×32 images.

Layout: a 3×3 stem conv (BN, ReLU), inverted residual blocks, a 1×1 conv (BN, ReLU), global
average pooling and a dense classifier. Each block is

    1×1 expand conv (C → t·C) + BN + ReLU   (absent when the expansion t is 1)
    3×3 depthwise conv (feature_group_count = t·C, the block's stride) + BN + ReLU
    1×1 linear projection conv (→ C') + BN
    + the input, when the stride is 1 and C = C' (the residual)

The ReLUs are :class:`~landscape.layers.QuantReLU` (unsigned activation sites), the reference's
ReLU rather than MobileNetV2's ReLU6: a clipping value α is what this library calibrates, and a
fixed clip at 6 would be one more α. The projection is linear, so a block's output can be
negative: it passes a signed :class:`~landscape.layers.QuantIdentity` site (``blockN/out``) before
the next product reads it, and every conv/dense layer but the stem reads a quantized activation.

``stages`` lists (expansion t, channels C', blocks n, stride s) as in the paper's Table 2; the
default (stem 8 → 8 → 16 → 24 channels, strides 1, 2, 2; 1×1 conv to 32) keeps 2×2 maps at 8×8
inputs (digits) and 7×7 / 8×8 at 28×28 / 32×32 (MNIST, CIFAR-10); it is narrow so that it
trains on digits in seconds (``stem``, ``stages`` and ``last`` widen it). Module names: ``stem``/``stem_bn``/
``stem_relu``, per block ``blockN/expand``, ``expand_bn``, ``expand_relu``, ``dw``, ``dw_bn``,
``dw_relu``, ``project``, ``project_bn``, ``out``; then ``last``/``last_bn``/``last_relu`` and
``fc``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from landscape.layers import BatchNorm, QuantConv, QuantDense, QuantIdentity, QuantReLU


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand (1×1), depthwise (3×3, strided), linear projection (1×1)."""

    features: int
    expansion: int = 4
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = x.shape[-1] * self.expansion
        y = x
        if self.expansion != 1:
            y = QuantConv(hidden, (1, 1), name="expand")(y)
            y = QuantReLU(name="expand_relu")(BatchNorm(name="expand_bn")(y, train))
        y = QuantConv(hidden, (3, 3), strides=self.strides, feature_group_count=hidden, name="dw")(y)
        y = QuantReLU(name="dw_relu")(BatchNorm(name="dw_bn")(y, train))
        y = QuantConv(self.features, (1, 1), name="project")(y)
        y = BatchNorm(name="project_bn")(y, train)
        if self.strides == 1 and x.shape[-1] == self.features:
            y = x + y
        return QuantIdentity(name="out")(y)


class MobileNetV2(nn.Module):
    """A small MobileNetV2 (module docstring): stem, ``stages`` of inverted residual blocks,
    1×1 conv to ``last`` channels, global average pooling, dense classifier."""

    num_classes: int
    stem: int = 8
    stages: tuple[tuple[int, int, int, int], ...] = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2))
    last: int = 32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = QuantConv(self.stem, (3, 3), name="stem")(x)
        x = QuantReLU(name="stem_relu")(BatchNorm(name="stem_bn")(x, train))
        index = 0
        for expansion, features, n, strides in self.stages:
            for i in range(n):
                x = InvertedResidual(features, expansion, strides if i == 0 else 1, name=f"block{index}")(x, train)
                index += 1
        x = QuantConv(self.last, (1, 1), name="last")(x)
        x = QuantReLU(name="last_relu")(BatchNorm(name="last_bn")(x, train))
        x = jnp.mean(x, axis=(1, 2))
        return QuantDense(self.num_classes, name="fc")(x)
