"""LSTMLM: word embedding -> stacked LSTM -> features, with the state carried across BPTT windows.

The backbone of Zaremba et al. 2014 ("Recurrent Neural Network Regularization"): the "small"
setting is 2 layers of 200 units unrolled 20 steps, every weight drawn from uniform(-0.1, 0.1),
no dropout (test perplexity 114.5 on PTB); "medium" is 2 x 650, uniform(-0.05, 0.05), dropout 0.5.
Dropout, when on, is applied to the non-recurrent connections only (the embedding output, between
layers and the top layer's output), as in the paper.

Truncated backpropagation through time: `__call__` takes the `carry` left by the previous window
of the same rows and returns the new one, so a stream cut into consecutive windows is read as one
sequence (the training step stops the gradient between windows).
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from softmax_jax.models import _dtype

# One (c, h) pair of [B, hidden] float32 arrays per layer.
Carry = Tuple[Tuple[jnp.ndarray, jnp.ndarray], ...]


def symmetric_uniform(scale: float):
  """Initializer drawing from uniform(-scale, scale) (Zaremba et al. 2014)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


class LSTMLM(nn.Module):
  """Token ids `[B, T]` -> LSTM features `[B, T, hidden]`, carrying the state between calls.

  Attributes:
    vocab_size: V, the number of token ids (the embedding table is `[V, embed_dim]`).
    embed_dim: width of the word embedding.
    hidden: units per LSTM layer (the feature width d the head sees).
    num_layers: stacked LSTM layers.
    dropout: rate on the non-recurrent connections in training (0: none).
    init_scale: > 0: every backbone weight (embedding, kernels, biases) from
      uniform(-init_scale, init_scale), Zaremba's init (0.1 for "small"); 0: Flax's defaults
      (LeCun-normal input kernels, orthogonal recurrent kernels, zero biases).
    dtype: compute dtype of the embedding lookup and the gate matmuls ('float32' or
      'bfloat16'); parameters, the cell state and the carry stay float32 (the gates are added to
      the float32 cell state), and the features are float32 (`models/_dtype.py`).
  """
  vocab_size: int
  embed_dim: int = 200
  hidden: int = 200
  num_layers: int = 2
  dropout: float = 0.0
  init_scale: float = 0.1
  dtype: Any = jnp.float32

  def _check(self) -> jnp.dtype:
    for name in ('vocab_size', 'embed_dim', 'hidden', 'num_layers'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'LSTMLM: {name} must be an integer >= 1, got {value!r}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'LSTMLM: dropout must be in [0, 1), got {self.dropout!r}.')
    if not self.init_scale >= 0.0:
      raise ValueError(f'LSTMLM: init_scale must be >= 0 (0: Flax defaults), got {self.init_scale!r}.')
    return _dtype.compute_dtype('LSTMLM', self.dtype)

  def initial_carry(self, batch_size: int) -> Carry:
    """Zero state: a `(c, h)` pair of `[batch_size, hidden]` float32 zeros per layer."""
    zeros = jnp.zeros((batch_size, self.hidden), jnp.float32)
    return tuple((zeros, zeros) for _ in range(self.num_layers))

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, carry: Optional[Carry] = None, *,
               train: bool = False) -> Tuple[jnp.ndarray, Carry]:
    """Features and the carry after the last step.

    Args:
      tokens: `[B, T]` int token ids.
      carry: the state left by the previous window of the same B rows (`initial_carry(B)` or
        None for a fresh start).
      train: applies dropout (rng stream 'dropout') when `dropout > 0`.

    Returns:
      `(features [B, T, hidden] float32, carry)`.
    """
    dtype = self._check()
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'LSTMLM: tokens must be [B, T] int, got shape {tokens.shape} dtype {tokens.dtype}.')
    if carry is None:
      carry = self.initial_carry(tokens.shape[0])
    if len(carry) != self.num_layers:
      raise ValueError(f'LSTMLM: carry must hold one (c, h) pair per layer ({self.num_layers}), '
                       f'got {len(carry)}.')
    if self.init_scale > 0:
      init = symmetric_uniform(self.init_scale)
      embed_kw = dict(embedding_init=init)
      cell_kw = dict(kernel_init=init, recurrent_kernel_init=init, bias_init=init)
    else:
      embed_kw, cell_kw = {}, {}
    x = nn.Embed(self.vocab_size, self.embed_dim, name='embed', dtype=dtype, **embed_kw)(tokens)
    drop = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)
    x = drop(x)
    new_carry = []
    for i, layer_carry in enumerate(carry):
      cell = nn.OptimizedLSTMCell(self.hidden, name=f'lstm_{i}', dtype=dtype, **cell_kw)
      layer_carry, x = nn.RNN(cell, return_carry=True, name=f'rnn_{i}')(
          x, initial_carry=tuple(c.astype(jnp.float32) for c in layer_carry))
      new_carry.append(tuple(c.astype(jnp.float32) for c in layer_carry))
      x = drop(x)
    return x.astype(jnp.float32), tuple(new_carry)
