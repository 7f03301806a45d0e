"""Residual networks with a distinct activation site per ReLU.

* CIFAR-style (He et al. 2016, §4.2): ``resnet8`` (8×8 inputs, one block per stage) and
  ``resnet20`` (three blocks per stage, 28×28 or 32×32 inputs): a 3×3 stem, three stages of
  16/32/64 channels, projection (1×1 conv + BN) shortcuts when the shape changes (the
  paper's option B; its CIFAR results used option A, identity with zero padding, which has
  no parameters: resnet20 is 272,474 parameters here, 269,722 with option A).
* ImageNet-style ``resnet18`` / ``resnet50`` with torchvision's parameter layout: module
  names follow torchvision with "." → "_" (``layer1.0.conv1`` → ``layer1_0/conv1``,
  ``downsample.0`` → ``downsample_0``), so :func:`models.import_torchvision` is a renaming.

As in the LAPQ reference's custom ResNet, every block has its own ``relu1``/``relu2``
(/``relu3``) modules: torchvision reuses one ``relu`` per block, which would make two
activation sites share one α.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from landscape.layers import BatchNorm, QuantConv, QuantDense, QuantReLU


class BasicBlock(nn.Module):
    features: int
    strides: int = 1
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = (self.strides, self.strides)
        y = QuantConv(self.features, strides=s, name="conv1")(x)
        y = BatchNorm(name="bn1")(y, train)
        y = QuantReLU(name="relu1")(y)
        y = QuantConv(self.features, name="conv2")(y)
        y = BatchNorm(name="bn2")(y, train)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = QuantConv(self.features, (1, 1), strides=s, name="downsample_0")(x)
            x = BatchNorm(name="downsample_1")(x, train)
        return QuantReLU(name="relu2")(x + y)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3×3 conv."""

    features: int
    strides: int = 1
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = self.features * self.expansion
        y = QuantConv(self.features, (1, 1), name="conv1")(x)
        y = BatchNorm(name="bn1")(y, train)
        y = QuantReLU(name="relu1")(y)
        y = QuantConv(self.features, strides=(self.strides, self.strides), name="conv2")(y)
        y = BatchNorm(name="bn2")(y, train)
        y = QuantReLU(name="relu2")(y)
        y = QuantConv(out, (1, 1), name="conv3")(y)
        y = BatchNorm(name="bn3")(y, train)
        if self.strides != 1 or x.shape[-1] != out:
            x = QuantConv(out, (1, 1), strides=(self.strides, self.strides), name="downsample_0")(x)
            x = BatchNorm(name="downsample_1")(x, train)
        return QuantReLU(name="relu3")(x + y)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 3×3 stem (16 ch), stages of 16/32/64 channels."""

    num_classes: int
    blocks_per_stage: int = 3
    widths: tuple[int, int, int] = (16, 32, 64)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = QuantConv(self.widths[0], name="conv1")(x)
        x = BatchNorm(name="bn1")(x, train)
        x = QuantReLU(name="relu")(x)
        for stage, width in enumerate(self.widths):
            for b in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and b == 0 else 1
                x = BasicBlock(width, strides, name=f"layer{stage + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return QuantDense(self.num_classes, name="fc")(x)


class ImageNetResNet(nn.Module):
    """torchvision's ResNet-18/34/50/101 topology (7×7 stride-2 stem, 3×3 max-pool)."""

    num_classes: int
    block: str = "basic"
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block={self.block!r} must be 'basic' or 'bottleneck'")
        block = BasicBlock if self.block == "basic" else Bottleneck
        x = QuantConv(64, (7, 7), strides=(2, 2), padding=3, name="conv1")(x)
        x = BatchNorm(name="bn1")(x, train)
        x = QuantReLU(name="relu")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, n in enumerate(self.stage_sizes):
            for b in range(n):
                strides = 2 if stage > 0 and b == 0 else 1
                x = block(64 * 2**stage, strides, name=f"layer{stage + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return QuantDense(self.num_classes, name="fc")(x)
