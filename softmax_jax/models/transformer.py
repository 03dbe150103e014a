"""TransformerLM: a small causal pre-LayerNorm decoder, token ids `[B, T]` -> features `[B, T, d_model]`.

Learned token and position embeddings, `num_layers` blocks of `x + attn(LN(x))` (causal
self-attention) and `x + mlp(LN(x))` (GELU), a final LayerNorm (GPT-2 layout; the Flax lm1b
example is the post-/pre-LN reference). Each window is read on its own: position t attends to
positions <= t of the same window, nothing is carried between windows (`carry` is None), so
consecutive windows of a stream see no earlier context; use longer windows (`seq_len`) instead.
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
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

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    deterministic = not train or self.dropout == 0.0
    y = nn.LayerNorm(name='ln_attn', dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dropout_rate=self.dropout,
                                        deterministic=deterministic, name='attn', dtype=self.dtype,
                                        force_fp32_for_softmax=True)(y, y, mask=mask)
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
  """
  vocab_size: int
  d_model: int = 256
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 1024
  dropout: float = 0.1
  max_len: int = 512
  dtype: Any = jnp.float32

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
    x = nn.Embed(self.vocab_size, self.d_model, embedding_init=init, name='embed', dtype=dtype)(tokens)
    x = x + self.param('pos_embed', init, (self.max_len, self.d_model), jnp.float32)[None, :length].astype(dtype)
    x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(x)
    mask = nn.make_causal_mask(tokens)  # [B, 1, T, T]: query t sees keys <= t
    for i in range(self.num_layers):
      x = TransformerBlock(self.num_heads, self.mlp_dim, self.dropout, dtype,
                           name=f'block_{i}')(x, mask, train=train)
    return nn.LayerNorm(name='ln_final', dtype=dtype)(x).astype(jnp.float32), None
