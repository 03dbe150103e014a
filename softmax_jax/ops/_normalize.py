"""Shared numerics of the softmax family (ops/softmax.py) and the losses built on it.

Private to `softmax_jax.ops`: `prepare` (checks, compute dtype), `out_dtype`, `normalize`
(probabilities, log-probabilities and logsumexp of a row with masks, -inf and NaN handled as the
`softmax_jax.ops` docstring says) and `ignore` (zero the ignored examples' losses).
"""

import jax
import jax.numpy as jnp

from softmax_jax.ops import _checks


def prepare(x, where, name):
  """Checks `x` ([..., K], K >= 1) and `where`; returns x in the compute dtype and `where`.

  The compute dtype is float32 for 16-bit floats and integers; float64 stays float64.
  """
  x = jnp.asarray(x)
  _checks.last_dim_at_least(x, 1, name, '[..., num_classes]')
  where = _checks.where_mask(where, x, target=name)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32)), where


def out_dtype(x, xc):
  x = jnp.asarray(x)
  return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else xc.dtype


def normalize(x, where, cold=None):
  """Returns `(probs, log_probs, lse)` of compute-dtype logits `x`; lse is `[..., 1]`.

  A NaN (kept by `where`) makes its row NaN: the max and the sum are NaN and neither guard
  (fully masked row, empty sum) catches a NaN. Rows where `cold` is True take the limit
  T -> 0+ of `x / T`: `(x - max) / T` is 0 at the maxima and -inf elsewhere, so the
  probabilities are a one-hot of the argmax with ties split evenly; `lse` is `m / T + log(ties)`
  (+-inf, or `log(ties)` when the max is 0). No gradient flows through the limit.
  """
  keep = x != -jnp.inf  # A -inf logit is a mask too (and NaN still propagates).
  if where is not None:
    keep = keep & where
  x = jnp.where(keep, x, -jnp.inf)  # Gradient to masked entries is exactly 0.
  m = jnp.max(x, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isinf(m), 0, m))  # Fully masked row: shift by 0.
  shifted, top = x - m, m
  if cold is not None:
    limit = jax.lax.stop_gradient(jnp.where(shifted == 0, 0, shifted * jnp.inf))  # NaN stays
    shifted = jnp.where(cold, limit, shifted)
    top = jnp.where(cold, jnp.where(m == 0, 0, m * jnp.inf), m)
  e = jnp.exp(shifted)  # exp(-inf) = 0 with zero gradient.
  s = jnp.sum(e, axis=-1, keepdims=True)
  empty = s == 0  # A NaN sum is not empty: it propagates.
  s_safe = jnp.where(empty, 1, s)  # Keeps log(0) and 1/0 out of the gradient.
  log_s = jnp.log(s_safe)
  lse = jnp.where(empty, -jnp.inf, log_s + top)
  return e / s_safe, shifted - log_s, lse


def ignore(ignored, loss):
  """`loss` with 0 where `ignored` (None: no example is ignored)."""
  return loss if ignored is None else jnp.where(ignored, jnp.zeros_like(loss), loss)
