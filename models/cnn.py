"""A small VGG-style CNN: [conv-BN-ReLU × 2 → max-pool] per stage → global average → dense."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from landscape.layers import BatchNorm, QuantConv, QuantDense, QuantReLU


class CNN(nn.Module):
    """Stage s has two 3×3 convs of ``widths[s]`` channels; pooling halves the resolution
    between stages (never below 1×1). Sites: every conv/dense kernel and every ReLU."""

    num_classes: int
    widths: tuple[int, ...] = (32, 64)

    @nn.compact
    def __call__(self, x, train: bool = False):
        for s, width in enumerate(self.widths):
            for j in range(2):
                x = QuantConv(width, name=f"conv{s}_{j}")(x)
                x = BatchNorm(name=f"bn{s}_{j}")(x, train)
                x = QuantReLU(name=f"relu{s}_{j}")(x)
            if s + 1 < len(self.widths) and min(x.shape[1:3]) >= 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return QuantDense(self.num_classes, name="fc")(x)
