"""TransformerLM: a small causal pre-LayerNorm decoder, token ids `[B, T]` -> features `[B, T, d_model]`.

Learned token and position embeddings, `num_layers` blocks of `x + attn(LN(x))` (causal
self-attention) and `x + mlp(LN(x))` (GELU), a final LayerNorm (GPT-2 layout; the Flax lm1b
example is the post-/pre-LN reference). Each window is read on its own: position t attends to
positions <= t of the same window, nothing is carried between windows (`carry` is None), so
consecutive windows of a stream see no earlier context; use longer windows (`seq_len`) instead.

Decoding with a key/value cache (`decode=True`, the Flax lm1b/wmt way): the attention layers keep
'cached_key', 'cached_value', 'cache_index' in the 'cache' collection and the model keeps the next
'position' there; each call on `tokens [B, 1]` appends one position and returns its features, equal
to those of the full causal pass at that position. The parameters are those of `decode=False`.
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from softmax_jax.models import _dtype


class TransformerBlock(nn.Module):
  """Pre-LN block: `x + Dropout(Attn(LN(x)))`, then `x + Dropout(MLP(LN(x)))`.

  `dtype` is the compute dtype; LayerNorm statistics and the attention softmax are float32.
  """
  num_heads: int
  mlp_dim: int
  dropout: float
  dtype: Any = jnp.float32
  decode: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: Optional[jnp.ndarray], *, train: bool) -> jnp.ndarray:
    deterministic = not train or self.dropout == 0.0
    y = nn.LayerNorm(name='ln_attn', dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dropout_rate=self.dropout,
                                        deterministic=deterministic, name='attn', dtype=self.dtype,
                                        force_fp32_for_softmax=True, decode=self.decode)(y, y, mask=mask)
    x = x + nn.Dropout(self.dropout, deterministic=deterministic)(y)
    y = nn.LayerNorm(name='ln_mlp', dtype=self.dtype)(x)
    y = nn.Dense(self.mlp_dim, name='mlp_in', dtype=self.dtype)(y)
    y = nn.Dense(x.shape[-1], name='mlp_out', dtype=self.dtype)(nn.gelu(y))
    return x + nn.Dropout(self.dropout, deterministic=deterministic)(y)


class TransformerLM(nn.Module):
  """Causal Transformer language-model backbone.

  Attributes:
    vocab_size: V, the number of token ids.
    d_model: width of the embeddings and of the features the head sees.
    num_layers: decoder blocks.
    num_heads: attention heads (must divide d_model).
    mlp_dim: hidden width of each block's MLP.
    dropout: rate on embeddings, attention weights and residual branches in training.
    max_len: the longest window (the position table is `[max_len, d_model]`).
    dtype: compute dtype of the activations and matmuls ('float32' or 'bfloat16'); parameters
      stay float32, LayerNorm statistics and the attention softmax are float32, and the
      features are float32 (`models/_dtype.py`).
    decode: one token a call through a key/value cache (evaluation only). `model.init(key,
      tokens [B, max_len])` (or `init_cache(model, B)`) makes an empty 'cache' for B rows and
      `max_len` positions; then `model.apply({'params': p, 'cache': c}, tokens [B, 1],
      mutable=['cache'])` returns `((features [B, 1, d_model], None), {'cache': next c})`.
      A position >= max_len raises a ValueError when the cache is concrete (eager apply); under
      `jax.jit` it cannot raise, so its features (and those of every later call) are NaN.
  """
  vocab_size: int
  d_model: int = 256
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 1024
  dropout: float = 0.1
  max_len: int = 512
  dtype: Any = jnp.float32
  decode: bool = False

  def initial_carry(self, batch_size: int) -> None:  # pylint: disable=unused-argument
    """None: a Transformer window carries nothing into the next one."""
    return None

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, carry: Optional[object] = None, *,
               train: bool = False) -> Tuple[jnp.ndarray, None]:
    """`(features [B, T, d_model] float32, None)` for `tokens: [B, T]` int (`carry` is ignored)."""
    del carry
    for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'mlp_dim', 'max_len'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'TransformerLM: {name} must be an integer >= 1, got {value!r}.')
    if self.d_model % self.num_heads:
      raise ValueError(f'TransformerLM: num_heads={self.num_heads} must divide d_model={self.d_model}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'TransformerLM: dropout must be in [0, 1), got {self.dropout!r}.')
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'TransformerLM: tokens must be [B, T] int, got shape {tokens.shape} dtype {tokens.dtype}.')
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f'TransformerLM: the window length T={length} exceeds max_len={self.max_len}; '
                       'raise config.model.max_len or lower config.data.seq_len.')
    dtype = _dtype.compute_dtype('TransformerLM', self.dtype)
    init = nn.initializers.normal(0.02)
    table = self.param('pos_embed', init, (self.max_len, self.d_model), jnp.float32)
    stepping = self.decode and self.has_variable('cache', 'position')  # else a full (or init) pass
    if self.decode:
      if train:
        raise ValueError('TransformerLM: decode=True is for evaluation; got train=True.')
      if not stepping and length != self.max_len:
        raise ValueError(f'TransformerLM(decode=True): initialize the cache on tokens [B, max_len='
                         f'{self.max_len}]; got T={length}.')
      position = self.variable('cache', 'position', lambda: jnp.zeros((), jnp.int32))
    if stepping:
      if length != 1:
        raise ValueError(f'TransformerLM(decode=True) reads one token a call: tokens must be [B, 1]; '
                         f'got shape {tokens.shape}.')
      index = position.value
      if not isinstance(index, jax.core.Tracer) and int(index) >= self.max_len:
        raise ValueError(f'TransformerLM(decode=True): position {int(index)} is past the cache of '
                         f'max_len={self.max_len} positions.')
      position.value = index + 1
      pos = jax.lax.dynamic_slice_in_dim(table, jnp.minimum(index, self.max_len - 1), 1)
      mask = None  # the cached attention sees the positions written so far
    else:
      pos = table[:length]
      mask = nn.make_causal_mask(tokens)  # [B, 1, T, T]: query t sees keys <= t
    x = nn.Embed(self.vocab_size, self.d_model, embedding_init=init, name='embed', dtype=dtype)(tokens)
    x = x + pos[None].astype(dtype)
    x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(x)
    for i in range(self.num_layers):
      x = TransformerBlock(self.num_heads, self.mlp_dim, self.dropout, dtype, decode=self.decode,
                           name=f'block_{i}')(x, mask, train=train)
    x = nn.LayerNorm(name='ln_final', dtype=dtype)(x).astype(jnp.float32)
    if stepping:  # under jit a position past the cache cannot raise: XLA clamps the writes
      x = jnp.where(index < self.max_len, x, jnp.nan)
    return x, None


def init_cache(model: TransformerLM, batch_size: int) -> Any:
  """The empty 'cache' collection of `model.clone(decode=True)` for `batch_size` rows.

  Zeros and position 0, of the shapes `model.init` on tokens `[batch_size, max_len]` gives,
  built from `jax.eval_shape` (no parameters are initialized).

  Args:
    model: a `TransformerLM` (its `decode` is ignored).
    batch_size: B, the rows decoded together.

  Returns:
    a pytree: per block 'attn' {'cached_key', 'cached_value' `[B, max_len, num_heads, d_model /
    num_heads]` (compute dtype), 'cache_index' [] int32}, and 'position' [] int32.
  """
  model = model.clone(decode=True)
  tokens = jax.ShapeDtypeStruct((batch_size, model.max_len), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
