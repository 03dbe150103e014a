"""Softmaxes restricted to a few candidates: the top k of the logits, or a shortlist of classes.

At inference every token pays O(K) for a full softmax. Two restrictions:

- `topk_log_softmax`: normalizes over the k largest logits only, and returns the probability mass
  the full softmax puts outside them (`dropped`), so the approximation error is visible;
- `shortlist_log_softmax`: scores only the classes of a candidate table (shared `[S]`, or one per
  example `[..., S]`: an index table built from frequent classes, a per-context list, ...), without
  computing the other K - S logits: O(S d) per example instead of O(K d).

Numerics follow `softmax_jax.ops.softmax`: float32 statistics for 16-bit inputs, `where=False`
(and `-inf` logits) get log-probability `-inf`, and the NaN rule of the package docstring (a NaN
the op reads for an example makes that example's whole output NaN).
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.ops import _checks

Array = jax.Array


def _normalize(scores: Array) -> Array:
  """`log_softmax` over the last axis of float32 `scores` (may hold -inf); a row of only -inf
  gives all -inf (nothing to normalize), a row holding NaN all NaN."""
  top = jnp.max(scores, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)  # all -inf: no shift (and no -inf - -inf)
  lse = top + jnp.log(jnp.sum(jnp.exp(scores - top), axis=-1, keepdims=True))
  out = scores - jnp.where(lse == -jnp.inf, 0.0, lse)
  return jnp.where(jnp.isnan(lse), jnp.nan, out)


def topk_log_softmax(logits: Array, k: int, *, where: Optional[Array] = None
                     ) -> Tuple[Array, Array, Array]:
  """Log-softmax over the k largest logits of each row, their ids, and the mass dropped.

  `log_probs[..., j] = z_{i_j} - logsumexp_{j' < k} z_{i_j'}` for the ids `i_0, ..., i_{k-1}` of
  the k largest logits (`lax.top_k`: descending, ties broken by the lower id), and
  `dropped = 1 - sum_j softmax(z)_{i_j}`, the probability the full softmax gives to the other
  K - k classes (summed over them, so exact near 0, and exactly 0 when k = K).

  Classes with `where=False` (or a `-inf` logit) rank last and get log-probability `-inf` if
  chosen (a row with fewer than k allowed classes); a row with none gives all `-inf` and
  `dropped` 0. A NaN logit makes its row's `log_probs` and `dropped` NaN (ids unspecified).

  Args:
    logits: [..., K] float; 16-bit floats are computed in float32.
    k: a Python int in [1, K].
    where: optional [..., K] bool (broadcastable); False classes are excluded.

  Returns:
    `(log_probs [..., k] float32, ids [..., k] int32, dropped [...] float32)`.

  Raises:
    ValueError: `logits` is not a float array of rank >= 1; `k` is not an int in [1, K]; `where`
      is not a bool mask broadcastable to `logits`.

  Example:
    >>> import jax.numpy as jnp
    >>> from softmax_jax import ops
    >>> z = jnp.array([[1.0, 3.0, 2.0, 0.0]])
    >>> log_p, ids, dropped = ops.topk_log_softmax(z, 2)
    >>> ids.tolist()
    [[1, 2]]
    >>> round(float(ops.logsumexp(log_p)[0]), 4)
    0.0
    >>> round(float(dropped[0]), 4)  # the softmax mass of classes 0 and 3
    0.1192
  """
  _checks.last_dim_at_least(logits, 1, 'logits', '[..., num_classes]')
  _checks.dtype(logits, float, 'logits', 'be a float array [..., num_classes]')
  num_classes = jnp.shape(logits)[-1]
  k = _checks.static_int('k', k, 1, num_classes, 'num_classes')
  where = _checks.where_mask(where, logits)
  z = jnp.asarray(logits).astype(jnp.promote_types(jnp.result_type(logits), jnp.float32))
  if where is not None:
    z = jnp.where(where, z, -jnp.inf)
  values, ids = jax.lax.top_k(z, k)
  top = jnp.where(jnp.isfinite(values[..., :1]), values[..., :1], 0.0)  # the row's max (or 0)
  e = jnp.exp(z - top)
  total = jnp.sum(e, axis=-1)
  # The mass outside the top k, summed over those classes (not 1 - kept: exact near 0, and
  # exactly 0 when k = K).
  flat_ids = ids.reshape(-1, k)
  in_top = jax.vmap(lambda i: jnp.zeros((num_classes,), bool).at[i].set(True))(flat_ids)
  rest = jnp.sum(jnp.where(in_top.reshape(z.shape), 0.0, e), axis=-1)
  row_nan = jnp.isnan(total)  # NaN rows are caught here, whichever ids top_k picks for them
  log_probs = jnp.where(row_nan[..., None], jnp.nan, _normalize(values))
  dropped = jnp.where(row_nan, jnp.nan, jnp.where(total > 0, rest / jnp.where(total > 0, total, 1.0), 0.0))
  return log_probs, ids.astype(jnp.int32), dropped


def shortlist_log_softmax(features: Array, w: Array, shortlist_ids: Array, *,
                          bias: Optional[Array] = None, where: Optional[Array] = None,
                          sigsoftmax: bool = False) -> Array:
  """Log-softmax of `features @ w + bias` over a shortlist of classes, never forming `[..., K]`.

  `log_probs[..., s] = z_{c_s} - logsumexp_{s'} z_{c_s'}` with `z_c = features . w[:, c] + bias[c]`
  and `c = shortlist_ids[..., s]`: the model's distribution conditioned on the shortlist. Only
  the S shortlisted columns of `w` are read (a gather), so the cost is O(S d) per example.

  The ids of one row must be distinct (a repeated class would count twice: checked when they are
  concrete). `where=False` marks padding entries of a ragged table (or repeats to drop, as in a
  union of two tables): log-probability `-inf`, not read, and free to repeat. A NaN in an example's features (or in a shortlisted column or bias) makes its row NaN.

  Args:
    features: [..., d] float.
    w: [d, K] float, the output layer.
    shortlist_ids: [S] int (one table for every example) or [..., S] int (one per example, with
      the leading axes of `features`), ids in [0, K).
    bias: optional [K] float.
    where: optional bool, broadcastable to `[..., S]`: False entries are padding.
    sigsoftmax: normalize `z + log_sigmoid(z)` instead of `z` (the sigsoftmax of
      `ops.sigsoftmax`, restricted to the shortlist).

  Returns:
    [..., S] float32 log-probabilities over the shortlist (in the order of `shortlist_ids`).

  Raises:
    ValueError: a shape or dtype does not fit the above (always); concrete ids out of [0, K) or
      repeated within a row.

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> x = np.sin(np.arange(8.0)).reshape(2, 4)
    >>> w = np.cos(np.arange(24.0)).reshape(4, 6)
    >>> ids = jnp.array([5, 0, 2])
    >>> lp = ops.shortlist_log_softmax(x, w, ids)
    >>> bool(np.allclose(lp, ops.log_softmax((x @ w)[:, ids]), atol=1e-5))
    True
  """
  _checks.last_dim_at_least(features, 1, 'features', '[..., d]', dim='d')
  _checks.dtype(features, float, 'features', 'be a float array [..., d]')
  _checks.rank(w, 2, 'w', '[d, K]')
  _checks.dtype(w, float, 'w', 'be a float array [d, K]')
  lead, d = jnp.shape(features)[:-1], jnp.shape(features)[-1]
  _checks.shape(w, (d, None), 'w', '[d, K] with d = features.shape[-1]')
  num_classes = jnp.shape(w)[1]
  if not isinstance(shortlist_ids, jax.Array):
    shortlist_ids = np.asarray(shortlist_ids)
  _checks.dtype(shortlist_ids, int, 'shortlist_ids', 'be integer class ids [S] or [..., S]')
  ids_rank = np.ndim(shortlist_ids)
  if ids_rank != 1:
    _checks.shape(shortlist_ids, (*lead, None), 'shortlist_ids',
                  f'[S] or [..., S] with [...] = features.shape[:-1] = {tuple(lead)}')
  _checks.last_dim_at_least(shortlist_ids, 1, 'shortlist_ids', '[S] or [..., S]', dim='S')
  _checks.in_range('shortlist_ids', shortlist_ids, num_classes)
  s = jnp.shape(shortlist_ids)[-1]
  where = _checks.where_mask(where, jnp.empty((*lead, s)), target='shortlist_ids [..., S]')
  if not (_checks.is_traced(shortlist_ids) or _checks.is_traced(where)):
    ids_np = np.asarray(shortlist_ids)
    if where is not None:  # padding entries may repeat: give each a distinct negative id
      shape = np.broadcast_shapes(ids_np.shape, np.shape(where))
      ids_np = np.where(np.broadcast_to(np.asarray(where), shape), np.broadcast_to(ids_np, shape),
                        -1 - np.arange(s))
    ids_sorted = np.sort(ids_np, axis=-1)
    repeats = np.argwhere(ids_sorted[..., 1:] == ids_sorted[..., :-1])
    if repeats.size:
      row = tuple(int(i) for i in repeats[0][:-1])
      raise _checks.ArgumentError(
          f'`shortlist_ids` must hold distinct ids in each row (a repeated class would count '
          f'twice; padding marked by `where=False` may repeat); got '
          f'{int(ids_sorted[row][repeats[0][-1]])} repeated in row {row or 0}.')
  if bias is not None:
    _checks.shape(bias, (num_classes,), 'bias', '[K] = (w.shape[1],)')
    _checks.dtype(bias, float, 'bias', 'be a float array [K]')
  ids = jnp.asarray(shortlist_ids)
  if where is not None:
    ids = jnp.where(where, ids, 0)  # padding reads class 0, then is masked
  # S columns of the [d, K] kernel: O(S d) reads, but strided (on a CPU ~4x slower than gathering
  # rows of a [K, d] table; WORKSPACE, issue 18). A fixed table is best gathered once, outside a
  # decoding loop (XLA hoists a loop-invariant gather out of `lax.scan`).
  columns = jnp.take(jnp.asarray(w), ids, axis=1)  # [d, S] or [d, ..., S]
  if ids_rank == 1:
    z = jnp.einsum('...d,ds->...s', features, columns, preferred_element_type=jnp.float32)
  else:
    z = jnp.einsum('...d,d...s->...s', features, columns, preferred_element_type=jnp.float32)
  z = z.astype(jnp.float32)
  if bias is not None:
    z = z + jnp.take(jnp.asarray(bias), ids).astype(jnp.float32)
  if sigsoftmax:
    z = z + jax.nn.log_sigmoid(z)
  if where is not None:
    z = jnp.where(where, z, -jnp.inf)
  return _normalize(z)
