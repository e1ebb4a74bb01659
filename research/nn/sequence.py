"""Attention models for the zoo: a small ViT for images and an attention + GRU model for signals.

Both are built from stock Flax NNX layers (``nnx.Conv`` patch embedding, ``nnx.MultiHeadAttention``
whose projections are ``nnx.LinearGeneral`` layers with a separate head axis, ``nnx.LayerNorm``,
``nnx.Linear`` MLPs, ``nnx.GRUCell``), so every compression method meets the layer types a user's
transformer or RNN is made of: heads and MLP units are structured-pruning groups, the projections
are quantized and factorized, the attention maps are what attention-map distillation compares.

The GRU is stepped in Python over the (few) tokens instead of through ``nnx.RNN``'s scan: the
traced program then shows every gate, which is what lets structured pruning remove hidden units
and what TFLite/ONNX export converts without a while loop.

References:
  Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
  Scale", https://arxiv.org/abs/2010.11929
  Cho et al., "Learning Phrase Representations using RNN Encoder-Decoder for Statistical Machine
  Translation" (the GRU), https://arxiv.org/abs/1406.1078
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from research.nn.registry import register_model


class EncoderBlock(nnx.Module):
    """Pre-norm transformer encoder block: ``x + MHA(LN(x))`` then ``x + MLP(LN(x))``.

    Args:
      dim: width of the residual stream.
      heads: attention heads (``dim`` must be a multiple of it).
      mlp_dim: hidden units of the MLP (``fc1 -> gelu -> fc2``).
      rngs: parameter initialisation streams.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"dim={dim} is not a multiple of heads={heads}; pick dim = heads * head_dim")
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if int(v) < 1:
            raise ValueError(f"{name}={v} must be a positive integer")


class ViT(nnx.Module):
    """Vision transformer: ``patch x patch`` embedding, learned positions, encoder blocks, mean-pooled head.

    Args:
      input_shape: ``(H, W)`` or ``(H, W, C)``.
      num_classes: classes of the head.
      dim, depth, heads, mlp_dim: transformer sizes.
      patch: patch side (``None``: ``max(1, H // 4)``, 16 patches on square images).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 64,
        patch: int | None = None,
        rngs: nnx.Rngs,
    ):
        if len(input_shape) not in (2, 3):
            raise ValueError(f"ViT needs image input_shape (H, W) or (H, W, C), got {tuple(input_shape)}")
        self.input_shape = tuple(input_shape)
        h, w = input_shape[:2]
        c = input_shape[2] if len(input_shape) == 3 else 1
        patch = max(1, h // 4) if patch is None else int(patch)
        _check_positive(dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, patch=patch)
        if patch > min(h, w):
            raise ValueError(f"patch={patch} is larger than the image {h}x{w}; pass a smaller patch")
        self.patch = nnx.Conv(c, dim, (patch, patch), strides=(patch, patch), padding="VALID", rngs=rngs)
        tokens = (h // patch) * (w // patch)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, dim)))
        self.blocks = nnx.List([EncoderBlock(dim, heads, mlp_dim, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if len(self.input_shape) == 2:
            x = x[..., None]
        x = self.patch(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(self.norm(x), axis=1))


@register_model("vit")
def vit(input_shape, num_classes, *, dim=32, depth=2, heads=4, mlp_dim=64, patch=None, rngs):
    """A small ViT (about 18k parameters at the defaults) for digits/MNIST-size images."""
    return ViT(input_shape, num_classes, dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, patch=patch, rngs=rngs)


class AttentionGRU(nnx.Module):
    """Sequence classifier: patch embedding, one encoder block, a GRU over the tokens, linear head.

    The signal is cut into ``patch``-long tokens by a strided 1-D conv, mixed by self-attention
    (``EncoderBlock``), then read in order by a GRU cell whose last hidden state feeds the head.

    Args:
      input_shape: ``(L,)``, ``(L, C)`` or ``(H, W, C)`` (rows become tokens).
      num_classes: classes of the head.
      dim, heads, mlp_dim: sizes of the embedding and the encoder block.
      hidden: GRU hidden units.
      patch: token length (``None``: ``max(1, L // 10)``, 10 tokens on MNIST-1D's 40 samples).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        dim: int = 32,
        heads: int = 4,
        mlp_dim: int = 64,
        hidden: int = 32,
        patch: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.input_shape = tuple(input_shape)
        length = int(input_shape[0])
        channels = 1 if len(input_shape) == 1 else math.prod(int(n) for n in input_shape[1:])
        patch = max(1, length // 10) if patch is None else int(patch)
        _check_positive(dim=dim, heads=heads, mlp_dim=mlp_dim, hidden=hidden, patch=patch)
        if patch > length:
            raise ValueError(f"patch={patch} is longer than the signal ({length}); pass a smaller patch")
        self.embed = nnx.Conv(channels, dim, (patch,), strides=(patch,), padding="VALID", rngs=rngs)
        self.tokens = length // patch
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, self.tokens, dim)))
        self.block = EncoderBlock(dim, heads, mlp_dim, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.gru = nnx.GRUCell(dim, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], x.shape[1], -1)  # (B, L, C)
        x = self.embed(x) + self.pos[...]
        x = self.norm(self.block(x))
        h = jnp.zeros((x.shape[0], self.gru.hidden_features), x.dtype)
        for t in range(self.tokens):
            h, _ = self.gru(h, x[:, t])
        return self.head(h)


@register_model("attn_gru")
def attn_gru(input_shape, num_classes, *, dim=32, heads=4, mlp_dim=64, hidden=32, patch=None, rngs):
    """Attention + GRU sequence model for MNIST-1D (about 15k parameters at the defaults)."""
    return AttentionGRU(
        input_shape, num_classes, dim=dim, heads=heads, mlp_dim=mlp_dim, hidden=hidden, patch=patch, rngs=rngs
    )
