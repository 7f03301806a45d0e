"""A multilayer perceptron: flatten → [dense → ReLU] × depth → dense."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from landscape.layers import QuantDense, QuantReLU


class MLP(nn.Module):
    """Sites: every dense kernel ("fc0" … "fc{depth}") and every ReLU ("relu0" …)."""

    num_classes: int
    hidden: tuple[int, ...] = (256, 256, 256)

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no batch statistics
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = QuantDense(width, name=f"fc{i}")(x)
            x = QuantReLU(name=f"relu{i}")(x)
        return QuantDense(self.num_classes, name=f"fc{len(self.hidden)}")(x)
