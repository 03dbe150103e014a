"""Multi-layer perceptron backbone: flatten, then Dense -> activation -> dropout blocks."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Maps inputs `[B, ...]` to features `[B, hidden[-1]]`.

  Attributes:
    hidden: widths of the hidden layers; the last is the feature dimension.
    dropout: dropout rate after each hidden layer (train only; rng stream 'dropout').
  """
  hidden: Sequence[int] = (256, 256)
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.gelu(nn.Dense(width)(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x
