"""A small convolutional backbone: blocks of [conv3x3 -> gelu] x n -> maxpool, then a dense layer."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from softmax_jax.models import _dtype


class CNN(nn.Module):
  """Maps images `[B, H, W, C]` to features `[B, dense]` (or `[B, embedding]`) float32.

  Each entry of `channels` is one block of `convs_per_block` 3x3 convolutions and a 2x2
  max-pool (the VGG pattern at toy scale), followed by one dense layer with dropout.

  Attributes:
    channels: output channels of each block.
    convs_per_block: 3x3 convolutions in each block.
    dense: width of the final dense layer (the feature dimension).
    dropout: dropout rate before and after the dense layer (train only; rng stream 'dropout').
    embedding: if > 0, a final linear layer (no activation) to this many features, e.g. 2 to
      draw the learned features, as in the SphereFace and center-loss papers.
    dtype: compute dtype of the activations, convolutions and matmuls ('float32' or
      'bfloat16'; parameters stay float32, see `models/_dtype.py`).
  """
  channels: Sequence[int] = (32, 64)
  convs_per_block: int = 2
  dense: int = 256
  dropout: float = 0.0
  embedding: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    if x.ndim != 4:
      raise ValueError(f'CNN: images must be [B, H, W, C] (rank 4), got shape {x.shape}.')
    dtype = _dtype.compute_dtype('CNN', self.dtype)
    x = x.astype(dtype)
    for c in self.channels:
      for _ in range(self.convs_per_block):
        x = nn.gelu(nn.Conv(c, (3, 3), dtype=dtype)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.gelu(nn.Dense(self.dense, dtype=dtype)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if self.embedding > 0:
      x = nn.Dense(self.embedding, dtype=dtype)(x)
    return x.astype(jnp.float32)
