"""A small Vision Transformer (Dosovitskiy et al. 2021) with signed activation sites.

patches → dense embedding + learned positions → [pre-LN attention block, pre-LN MLP block] ×
depth → LayerNorm → mean over tokens → dense classifier. No class token: the mean over tokens
keeps the classifier's input a plain activation site.

Sites, in call order (block ``i``):

* weights: ``embed`` (the first layer), ``block{i}/qkv``, ``block{i}/proj``, ``block{i}/fc1``,
  ``block{i}/fc2``, ``head`` (the last layer);
* signed activations (:class:`~landscape.layers.QuantIdentity`), each the input of one dense
  layer: ``block{i}/ln1_out`` (→ qkv), ``block{i}/attn_out`` (→ proj), ``block{i}/ln2_out``
  (→ fc1), ``block{i}/gelu_out`` (→ fc2), ``head_in`` (→ head).

By default, as in the CNNs, the products of two activations (QKᵀ and the attention-weighted
sum of V) are not quantization sites: the sites are the inputs of the weight GEMMs, which is
what W·A post-training quantization of a transformer's linear layers quantizes. With
``quantize_attention=True`` their operands are sites too, so every product of the network is
low-precision (the setting of fully quantized ViTs, e.g. FQ-ViT, PTQ4ViT): per block, after
``ln1_out``, the signed ``block{i}/q``, ``block{i}/k``, ``block{i}/v`` (the three slices of the
qkv output, before the 1/√d scaling) and the unsigned ``block{i}/attn_probs`` (the softmax
output, in [0, 1]), in that call order. These four feed no weight layer, so they carry no
MACs of their own (:attr:`landscape.sites.Site.macs` counts weight products only).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from landscape import checks
from landscape.layers import QuantDense, QuantIdentity


class EncoderBlock(nn.Module):
    """x + proj(attention(LN(x))), then x + fc2(GELU(fc1(LN(x)))), on (batch, tokens, dim)."""

    dim: int
    heads: int
    mlp_dim: int
    quantize_attention: bool = False

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        head_dim = self.dim // self.heads
        y = QuantIdentity(name="ln1_out")(nn.LayerNorm(name="ln1")(x))
        qkv = QuantDense(3 * self.dim, name="qkv")(y).reshape(b, t, 3, self.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, t, heads, head_dim)
        if self.quantize_attention:
            q, k, v = (QuantIdentity(name=n)(a) for n, a in (("q", q), ("k", k), ("v", v)))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(head_dim))
        probs = jax.nn.softmax(scores, axis=-1)
        if self.quantize_attention:
            probs = QuantIdentity(signed=False, name="attn_probs")(probs)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.dim)
        x = x + QuantDense(self.dim, name="proj")(QuantIdentity(name="attn_out")(attn))
        y = QuantIdentity(name="ln2_out")(nn.LayerNorm(name="ln2")(x))
        y = QuantIdentity(name="gelu_out")(nn.gelu(QuantDense(self.mlp_dim, name="fc1")(y)))
        return x + QuantDense(self.dim, name="fc2")(y)


class ViT(nn.Module):
    """Vision Transformer on NHWC images; ``patch`` (default H // 4: a 4 × 4 grid of tokens on a
    square image) must divide the height and width; ``quantize_attention`` makes the operands of the two
    attention products sites too (see the module docstring)."""

    num_classes: int
    patch: int | None = None
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 128
    quantize_attention: bool = False

    def __post_init__(self):
        # at construction, where they were written: heads=0 or patch=0 had failed in the first call
        # with "integer modulo by zero", naming neither
        for key in ("dim", "depth", "heads", "mlp_dim") + (() if self.patch is None else ("patch",)):
            checks.check_int(getattr(self, key), f"ViT {key}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no batch statistics, no dropout
        if jnp.ndim(x) != 4:
            raise ValueError(f"ViT: the input must be NHWC (batch, height, width, channels), got shape {jnp.shape(x)}")
        b, h, w, c = x.shape
        p = self.patch if self.patch is not None else max(h // 4, 1)
        if h % p or w % p:
            raise ValueError(f"patch={p} must divide the image height and width, got {h}×{w}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        tokens = (h // p) * (w // p)
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, tokens, p * p * c)
        x = QuantDense(self.dim, name="embed")(x)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, tokens, self.dim), jnp.float32)
        for i in range(self.depth):
            x = EncoderBlock(self.dim, self.heads, self.mlp_dim, self.quantize_attention, name=f"block{i}")(x)
        x = jnp.mean(nn.LayerNorm(name="ln")(x), axis=1)
        return QuantDense(self.num_classes, name="head")(QuantIdentity(name="head_in")(x))
