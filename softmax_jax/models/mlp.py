"""Multi-layer perceptron backbone: flatten, then Dense -> activation -> dropout blocks."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from softmax_jax.models import _dtype


class MLP(nn.Module):
  """Maps inputs `[B, ...]` to features `[B, hidden[-1]]` float32.

  Attributes:
    hidden: widths of the hidden layers; the last is the feature dimension.
    dropout: dropout rate after each hidden layer (train only; rng stream 'dropout').
    dtype: compute dtype of the activations and matmuls ('float32' or 'bfloat16'; parameters
      stay float32, see `models/_dtype.py`).
  """
  hidden: Sequence[int] = (256, 256)
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    dtype = _dtype.compute_dtype('MLP', self.dtype)
    x = x.reshape(x.shape[0], -1).astype(dtype)
    for width in self.hidden:
      x = nn.gelu(nn.Dense(width, dtype=dtype)(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x.astype(jnp.float32)
