"""Vocabulary-parallel output layer: the softmax of `x @ W + b` with `W [d, K]` sharded on K.

On a mesh with a model axis of size M (default name 'model'), each device holds a shard
`kernel [d, K/M]` (and `bias [K/M]`), columns `[i K/M, (i+1) K/M)` on the device of axis index
`i`, and the features `[N, d]` replicated over that axis (sharded over 'data' as usual). The
functions `vocab_parallel_*` are called INSIDE `jax.shard_map` and reduce over the model axis
with collectives, so no device ever holds the `[N, K]` logits nor the `[d, K]` weights:

  `m = pmax_i max_k z_ik`, `lse = m + log psum_i sum_k exp(z_ik - m)`,
  `z_y = psum_i [y in shard i] z_iy`, `loss = lse - z_y`.

Each shard's logsumexp is either plain (its `[N, K/M]` logits, autodiff) or fused
(`fused=True`: an online logsumexp over `chunk_size` columns at a time, as in `ops/_stream.py`
but with loop carries typed for shard_map's varying axes; a `custom_vjp` keeps O(N) residuals
and recomputes each chunk's logits backward). Gradients come from `jax.grad` through the
`shard_map`: the feature gradient is summed over the model axis by shard_map's own transpose of
the replicated input, the kernel and bias gradients stay local to their shard.

`sharded_dense_loss`, `sharded_dense_log_softmax` and `sharded_dense_predict` wrap the
`shard_map` for a `('data', 'model')` mesh: features `P('data', None)`, kernel
`P(None, 'model')`, bias `P('model')`, labels `P('data')`.

Sampled losses (`vocab_parallel_sampled_softmax_loss`, `_nce_loss`, `_negative_sampling_loss`;
`sharded_sampled_loss` wraps them): the `[K, d]` table of class rows of `SampledSoftmax` sharded
on its rows (`P('model', None)`), the sample and the labels global ids replicated over the model
axis; each shard computes the logits of the candidates it owns and the collectives move `[N]`
statistics only (the label logit by a `psum` from its owner, the logsumexp over [label; sample]
by `pmax`/`psum`), so the table's gradient stays on the owning shard. The exact evaluation of
that head reuses the dense functions on the transposed shard `[d, K/M]`. Vocabulary-parallel
heads: `DenseSoftmax` and `SampledSoftmax`; the adaptive head is not (its clusters are
frequency bands of unequal size with their own projections: sharding them evenly is its own
design).

The NaN rule and `ignore_index` of the package docstring hold: a NaN feature row gives that
example a NaN loss (and a NaN log-probability row); an ignored example has loss 0, gradient 0,
and its features are not read. K must be divisible by M (a clear error otherwise; pad the
vocabulary, e.g. `DenseSoftmax(pad_classes_to=M * 128)`).

References:
  Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
  Parallelism", 2019 (vocabulary-parallel cross-entropy).
  Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024 (the chunked
  online logsumexp of the fused path).
"""

import functools
from typing import Dict, Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from softmax_jax.ops import _checks
from softmax_jax.ops import _stream
from softmax_jax.ops.softmax import logsumexp

DEFAULT_AXIS = 'model'


def _sampled_values_n(sampled_values, n, log_q):
  """`_checks.sampled_values` with the true counts broadcast to `[n]`."""
  sampled, name, true_count, sampled_count = _checks.sampled_values(sampled_values, (n,), log_q)
  return sampled, name, None if true_count is None else jnp.broadcast_to(true_count, (n,)), \
      sampled_count


def _check(features, kernel, bias, name='features'):
  _checks.rank(features, 2, name, '[N, d]')
  _checks.dtype(features, float, name, 'be floating')
  _checks.rank(kernel, 2, 'kernel', '[d, K/M]')
  _checks.dtype(kernel, float, 'kernel', 'be floating')
  _checks.shape(kernel, (features.shape[1], None), 'kernel', '[d, K/M] with d = features.shape[1]')
  if bias is not None:
    _checks.shape(bias, (kernel.shape[1],), 'bias', '[K/M] = kernel.shape[1:]')
    _checks.dtype(bias, float, 'bias', 'be floating')


def _shard(axis_name):
  """(index, size) of this device on the model axis (inside shard_map)."""
  return lax.axis_index(axis_name), lax.axis_size(axis_name)


def _vma(x):
  mat = getattr(jax.typeof(x), 'manual_axis_type', None)
  return frozenset() if mat is None else frozenset(mat.varying)


def _aligned(axis_name, *arrays):
  """`arrays` typed as varying over the same mesh axes (theirs and `axis_name`): the custom_vjp
  of `_fused_local` returns per-shard dx, dw, db, so its inputs must be per-shard; pcast's
  transpose then sums the feature gradient over the model axis (and the kernel's over 'data')."""
  axes = frozenset((axis_name,)).union(*(_vma(a) for a in arrays if a is not None))
  out = []
  for a in arrays:
    missing = None if a is None else tuple(sorted(axes - _vma(a)))
    out.append(a if not missing else lax.pcast(a, missing, to='varying'))
  return out


def _local_logits(features, kernel, bias):
  """`[N, K/M]` float32 (float64 for float64) logits of this shard."""
  acc = _stream.acc_dtype(features, kernel)
  dt = jnp.result_type(features, kernel)
  z = jnp.dot(features.astype(dt), kernel.astype(dt), preferred_element_type=acc)
  return z if bias is None else z + bias.astype(acc)


def _shard_lse(z):
  """Logsumexp `[N]` of this shard's logits `[N, K/M]`; -inf with a zero gradient (not NaN) for
  a row of all -inf, a shard that holds only padded classes (`pad_classes_to`). NaN propagates."""
  m = lax.stop_gradient(z.max(axis=-1))
  m = jnp.where(jnp.isneginf(m), 0.0, m)
  s = jnp.exp(z - m[:, None]).sum(axis=-1)
  return jnp.where(s > 0, m + jnp.log(jnp.where(s > 0, s, 1.0)), -jnp.inf)


def _global_lse(local_lse, axis_name):
  """Stable logsumexp across shards of per-shard logsumexps `[N]` (NaN propagates)."""
  m = lax.pmax(lax.stop_gradient(local_lse), axis_name)
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # all -inf (or +inf): keep exp finite; NaN stays NaN
  return m + jnp.log(lax.psum(jnp.exp(local_lse - m), axis_name))


def _chunk_logits(x, w, b, start, size):
  z = jnp.dot(x, _stream.cols(w, start, size), preferred_element_type=_stream.acc_dtype(x, w))
  return z if b is None else z + _stream.cols(b, start, size).astype(z.dtype)


def _hit(z, local, start):
  return lax.broadcasted_iota(local.dtype, z.shape, 1) + start == local[:, None]


def _fused_forward(chunk, x, w, b, local):
  def body(start, size, carry):
    m, s, z_y = carry
    z = _chunk_logits(x, w, b, start, size)
    m_new = jnp.maximum(m, z.max(1))
    m_ref = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # all -inf so far: keep exp finite
    s = s * jnp.exp(m - m_ref) + jnp.exp(z - m_ref[:, None]).sum(1)
    return m_new, s, z_y + jnp.where(_hit(z, local, start), z, 0.0).sum(1)

  # zeros_like (not zeros): the carries then vary over the mesh axes x, w vary over (scan-vma).
  zero = jnp.zeros_like(x[:, 0] * w[0, 0], dtype=_stream.acc_dtype(x, w))
  m, s, z_y = _stream.chunks(w.shape[1], chunk, body, (zero - jnp.inf, zero, zero))
  return m + jnp.log(s), z_y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_local(chunk, x, w, b, local):
  """`(lse [N], z_y [N])` of this shard's logits `x @ w + b`, streamed over `chunk` columns;
  `z_y` is the logit of column `local` (0 where `local` is outside [0, K/M)). O(N) residuals;
  backward recomputes each chunk: `dz = g_lse softmax_local(z) + g_zy onehot(local)`."""
  return _fused_forward(chunk, x, w, b, local)


def _fused_fwd(chunk, x, w, b, local):
  lse, z_y = _fused_forward(chunk, x, w, b, local)
  return (lse, z_y), (x, w, b, local, lse)


def _fused_bwd(chunk, res, cts):
  x, w, b, local, lse = res
  g_lse, g_zy = (g.astype(lse.dtype) for g in cts)
  lse = jnp.where(jnp.isneginf(lse), 0.0, lse)  # a shard of padded classes only: p = 0, not NaN
  mm, acc = jnp.result_type(x, w), lse.dtype

  def put(total, start, part):
    return lax.dynamic_update_slice_in_dim(total, part.astype(total.dtype), start, total.ndim - 1)

  def body(start, size, carry):
    dx, dw, db = carry
    z = _chunk_logits(x, w, b, start, size)
    dz = g_lse[:, None] * jnp.exp(z - lse[:, None]) + g_zy[:, None] * _hit(z, local, start)
    g = dz.astype(mm)
    dx = dx + jnp.dot(g, _stream.cols(w, start, size).T, preferred_element_type=acc)
    dw = put(dw, start, jnp.dot(x.T, g, preferred_element_type=acc))
    db = db if db is None else put(db, start, dz.sum(0))
    return dx, dw, db

  zeros = lambda v: None if v is None else jnp.zeros_like(v)
  dx, dw, db = _stream.chunks(w.shape[1], chunk, body,
                              (jnp.zeros_like(x, dtype=acc), zeros(w), zeros(b)))
  return dx.astype(x.dtype), dw, db, None


_fused_local.defvjp(_fused_fwd, _fused_bwd)


def vocab_parallel_cross_entropy(features: jax.typing.ArrayLike, kernel: jax.typing.ArrayLike,
                                 labels: jax.typing.ArrayLike, *,
                                 bias: Optional[jax.typing.ArrayLike] = None,
                                 axis_name: str = DEFAULT_AXIS, ignore_index: Optional[int] = None,
                                 fused: bool = False, chunk_size: Optional[int] = None) -> jax.Array:
  """Per-example cross-entropy of `features @ W + b`, W sharded on K over `axis_name`.

  Call inside `jax.shard_map`: `loss = lse_K(z) - z_label` with the logsumexp combined across
  shards by `pmax`/`psum` and the label logit taken from the shard that owns it (a `psum` of a
  masked gather). Statistics in float32 (float64 for float64 inputs), also for bfloat16.

  Args:
    features: [N, d] float, replicated over `axis_name`.
    kernel: [d, K/M] float, this shard's columns `[i K/M, (i+1) K/M)`, i = axis index.
    labels: [N] int global class ids in [0, K) (or `ignore_index`), replicated over `axis_name`.
    bias: [K/M] float or None, this shard's bias.
    axis_name: the mesh axis over which the classes are sharded.
    ignore_index: None or an int: examples with this label get loss 0 and gradient 0, their
      features are not read.
    fused: stream the shard's columns in chunks (never the `[N, K/M]` logits at once).
    chunk_size: columns per chunk of the fused path (None: 1024).

  Returns:
    [N] float32 (float64 for float64 inputs) loss, replicated over `axis_name`.

  Raises:
    ValueError: naming the argument, for a bad rank, shape or dtype, or a concrete label out
      of [0, K); a traced one gives NaN.
  """
  _check(features, kernel, bias)
  i, m = _shard(axis_name)
  kl = kernel.shape[1]
  k = kl * m
  labels, ignored = _checks.labels_or_ignored(labels, k, features.shape[:1], ignore_index,
                                              'features')
  if ignored is not None:
    features = jnp.where(ignored[:, None], jnp.zeros((), features.dtype), features)
  local = labels - i * kl
  owner = (local >= 0) & (local < kl)
  if fused:
    size = _checks.static_int('chunk_size', chunk_size or _stream.DEFAULT_CHUNK_SIZE, 1)
    dt = jnp.result_type(features, kernel)
    x, w, b = _aligned(axis_name, features.astype(dt), kernel.astype(dt), bias)
    lse, z_y = _fused_local(min(size, kl), x, w, b, jnp.where(owner, local, -1))
  else:
    z = _local_logits(features, kernel, bias)
    lse = _shard_lse(z)
    z_y = jnp.take_along_axis(z, jnp.clip(local, 0, kl - 1)[:, None], axis=-1)[:, 0]
    z_y = jnp.where(owner, z_y, 0.0)
  loss = _global_lse(lse, axis_name) - lax.psum(z_y, axis_name)
  valid = (labels >= 0) & (labels < k)
  loss = jnp.where(valid, loss, jnp.nan)  # traced out-of-range label: NaN, never a clip
  if ignored is not None:
    loss = jnp.where(ignored, jnp.zeros_like(loss), loss)
  return loss


def _lse(features, kernel, bias, axis_name):
  z = _local_logits(features, kernel, bias)
  return z, _global_lse(_shard_lse(z), axis_name)


def vocab_parallel_log_softmax(features: jax.typing.ArrayLike, kernel: jax.typing.ArrayLike, *,
                               bias: Optional[jax.typing.ArrayLike] = None,
                               axis_name: str = DEFAULT_AXIS) -> jax.Array:
  """This shard's exact, globally normalized log-probabilities `z - lse_K(z)`, inside shard_map.

  Args:
    features: [N, d] float, replicated over `axis_name`.
    kernel: [d, K/M] float, this shard's columns.
    bias: [K/M] float or None.
    axis_name: the mesh axis over which the classes are sharded.

  Returns:
    [N, K/M] float32 log-probabilities of this shard's classes (out_specs `P(..., axis_name)`
    assembles `[N, K]`, whose logsumexp over K is 0). A NaN feature row gives a NaN row.
  """
  _check(features, kernel, bias)
  z, lse = _lse(features, kernel, bias, axis_name)
  return z - lse[:, None]


def _global_argmax(z, axis_name):
  """(max [N], argmax [N] int32) over the sharded classes: lowest global id on ties."""
  i, _ = _shard(axis_name)
  kl = z.shape[-1]
  local_max = z.max(-1)
  local_arg = jnp.argmax(z, axis=-1).astype(jnp.int32) + (i * kl).astype(jnp.int32)
  gmax = lax.pmax(local_max, axis_name)
  big = jnp.iinfo(jnp.int32).max
  cand = jnp.where(local_max == gmax, local_arg, big)
  ids = lax.pmin(cand, axis_name)
  return gmax, jnp.where(ids == big, 0, ids)  # NaN row: no candidate; the id is unspecified (0)


def vocab_parallel_predict(features: jax.typing.ArrayLike, kernel: jax.typing.ArrayLike, *,
                           bias: Optional[jax.typing.ArrayLike] = None,
                           axis_name: str = DEFAULT_AXIS) -> jax.Array:
  """Global argmax of `features @ W + b` over the sharded classes, inside shard_map.

  `pmax` of the shards' maxima, then `pmin` of the global ids of the shards that reach it: the
  lowest id on ties, as `jnp.argmax` of the full row.

  Args:
    features: [N, d] float, replicated over `axis_name`.
    kernel: [d, K/M] float, this shard's columns.
    bias: [K/M] float or None.
    axis_name: the mesh axis over which the classes are sharded.

  Returns:
    [N] int32 class ids in [0, K), replicated over `axis_name` (a NaN row: unspecified).
  """
  _check(features, kernel, bias)
  _, ids = _global_argmax(_local_logits(features, kernel, bias), axis_name)
  return ids


def _temperatures(temperatures) -> tuple:
  try:
    ts = tuple(float(t) for t in temperatures)
  except TypeError:
    ts = ()
  if not ts or not all(0 < t < float('inf') for t in ts):
    raise _checks.ArgumentError(f'`temperatures` must be a non-empty sequence of finite numbers > 0 '
                                f'(concrete); got {temperatures!r}.')
  return ts


def _shard_stats(z, labels, local, owner, ts, axis_name):
  """The statistics of `vocab_parallel_eval_stats` from this shard's scores `z [N, K/M]`."""
  kl = z.shape[1]
  z_y = jnp.take_along_axis(z, jnp.clip(local, 0, kl - 1)[:, None], axis=-1)[:, 0]
  z_y = lax.psum(jnp.where(owner, z_y, 0.0), axis_name)
  gmax, ids = _global_argmax(z, axis_name)
  own_col = owner[:, None] & (lax.broadcasted_iota(local.dtype, z.shape, 1) == local[:, None])
  above = (z > z_y[:, None]) & ~own_col  # the label's own column never counts
  rank = lax.psum(jnp.sum(above, axis=-1, dtype=jnp.int32), axis_name)
  log_p, conf = [], []
  for t in ts:  # one [N, K/M] block at a time
    lse = _global_lse(_shard_lse(z / t), axis_name)
    log_p.append(z_y / t - lse)
    conf.append(jnp.exp(gmax / t - lse))
  valid = (labels >= 0) & (labels < kl * lax.axis_size(axis_name))
  label_log_prob = jnp.where(valid[:, None], jnp.stack(log_p, -1), jnp.nan)
  return {'prediction': ids, 'label_rank': rank, 'label_log_prob': label_log_prob,
          'confidence': jnp.stack(conf, -1)}


def vocab_parallel_eval_stats(features: jax.typing.ArrayLike, kernel: jax.typing.ArrayLike,
                              labels: jax.typing.ArrayLike, *,
                              bias: Optional[jax.typing.ArrayLike] = None,
                              axis_name: str = DEFAULT_AXIS, temperatures=(1.0,),
                              log_prior: Optional[jax.typing.ArrayLike] = None
                              ) -> Dict[str, jax.Array]:
  """Per-example evaluation statistics over the sharded classes, inside shard_map.

  The statistics of the heads' `eval_stats` (`softmax_jax/heads/_eval.py`) with `lp` the
  log-softmax of `z = features @ W + b` over all K classes, each reduced across the shards by
  collectives (`pmax`/`psum` of the per-shard logsumexp per temperature, `pmax`/`pmin` for the
  argmax, `psum` of the per-shard counts for the rank): no device forms `[N, K]`.

  Args:
    features: [N, d] float, replicated over `axis_name`.
    kernel: [d, K/M] float, this shard's columns.
    labels: [N] int global class ids in [0, K).
    bias: [K/M] float or None.
    axis_name: the mesh axis over which the classes are sharded.
    temperatures: G finite temperatures > 0 (static).
    log_prior: None or [K/M] float, this shard's log class prior: adds the same statistics
      prefixed 'adjusted_' for the scores `z - log_prior` (post-hoc logit adjustment).

  Returns:
    {'prediction': [N] int32 (lowest id on ties), 'label_rank': [N] int32 (classes other than
     the label with a larger logit), 'label_log_prob': [N, G] float32 `log_softmax(z / t)[label]`
     (NaN for a traced label outside [0, K)), 'confidence': [N, G] float32 `max softmax(z / t)`},
    and the 'adjusted_' ones with `log_prior`; replicated over `axis_name`. A NaN row gets NaN
    log-probabilities and confidences (and an unspecified prediction).
  """
  _check(features, kernel, bias)
  ts = _temperatures(temperatures)
  i, m = _shard(axis_name)
  kl = kernel.shape[1]
  labels = _checks.labels(labels, kl * m, features.shape[:1], 'features')
  if log_prior is not None:
    _checks.shape(log_prior, (kl,), 'log_prior', "[K/M] = kernel.shape[1:], this shard's prior")
  z = _local_logits(features, kernel, bias)
  local = labels - i * kl
  owner = (local >= 0) & (local < kl)
  out = _shard_stats(z, labels, local, owner, ts, axis_name)
  if log_prior is not None:
    adjusted = _shard_stats(z - jnp.asarray(log_prior).astype(z.dtype), labels, local, owner, ts,
                            axis_name)
    out |= {f'adjusted_{k}': v for k, v in adjusted.items()}
  return out


# ---- sampled losses over a [K, d] table of class rows sharded on its rows --------------------


def _check_table(features, table, bias):
  _checks.rank(features, 2, 'features', '[N, d]')
  _checks.dtype(features, float, 'features', 'be floating')
  _checks.rank(table, 2, 'table', '[K/M, d]')
  _checks.dtype(table, float, 'table', 'be floating')
  _checks.shape(table, (None, features.shape[1]), 'table', '[K/M, d] with d = features.shape[1]')
  if bias is not None:
    _checks.shape(bias, (table.shape[0],), 'bias', '[K/M] = table.shape[:1]')
    _checks.dtype(bias, float, 'bias', 'be floating')


def _sampled_local(features, table, labels, sampled_values, bias, remove_hits, log_q,
                   ignore_index, axis_name):
  """Checks; returns `z_true [N]` (the label logits, whole: a psum from their owning shards),
  `z_s [N, S]` (the samples' logits as this shard sees them), `keep [N, S]` (the samples this
  shard owns, accidental hits removed) and `finish` ([N] loss -> NaN for an out-of-range label or
  a traced out-of-range sampled id, 0 for an ignored example)."""
  _check_table(features, table, bias)
  i, m = _shard(axis_name)
  n, kl = features.shape[0], table.shape[0]
  k = kl * m
  labels, ignored = _checks.labels_or_ignored(labels, k, (n,), ignore_index, 'features')
  sampled, ids_name, true_count, sampled_count = _sampled_values_n(sampled_values, n, log_q)
  _checks.in_range(ids_name, sampled, k)
  acc, dt = _stream.acc_dtype(features, table), jnp.result_type(features, table)
  x, in_range = features.astype(dt), (labels >= 0) & (labels < k)
  if ignored is not None:  # ignored rows are not read: zero features, count 1
    x, in_range = jnp.where(ignored[:, None], jnp.zeros((), dt), x), in_range | ignored
    true_count = None if true_count is None else jnp.where(ignored, 1, true_count)

  def rows(ids):  # this shard's rows (and bias) of global `ids`, whether it owns them
    local = ids - i * kl
    own = (local >= 0) & (local < kl)
    local = jnp.clip(local, 0, kl - 1)
    b = None if bias is None else jnp.take(bias, local).astype(acc)
    return jnp.take(table, local, axis=0).astype(dt), b, own

  w_y, b_y, own_y = rows(labels)
  z_t = jnp.einsum('nd,nd->n', x, w_y, preferred_element_type=acc).astype(acc)
  z_t = z_t if b_y is None else z_t + b_y
  z_t = lax.psum(jnp.where(own_y, z_t, 0.0), axis_name)  # the gradient reaches the owner only
  w_s, b_s, own_s = rows(sampled)
  z_s = jnp.einsum('nd,sd->ns', x, w_s, preferred_element_type=acc).astype(acc)
  z_s = z_s if b_s is None else z_s + b_s
  if log_q:
    z_t = z_t - jnp.log(true_count.astype(acc))
    z_s = z_s - jnp.log(sampled_count.astype(acc))
  keep = jnp.broadcast_to(own_s, z_s.shape)
  if remove_hits:
    keep = keep & (sampled[None, :] != labels[:, None])
  s_ok = jnp.all((sampled >= 0) & (sampled < k))  # a traced id out of range: NaN, never dropped

  def finish(loss):
    loss = jnp.where(in_range & s_ok, loss, jnp.nan)
    return loss if ignored is None else jnp.where(ignored, jnp.zeros_like(loss), loss)
  return z_t, z_s, keep, finish


def vocab_parallel_sampled_softmax_loss(
    features: jax.typing.ArrayLike, table: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
    sampled_values, *, bias: Optional[jax.typing.ArrayLike] = None, axis_name: str = DEFAULT_AXIS,
    remove_accidental_hits: bool = True, subtract_log_q: bool = True,
    ignore_index: Optional[int] = None) -> jax.Array:
  """`ops.sampled_softmax_loss` with the `[K, d]` table of class rows sharded on K, inside shard_map.

  The sample and the labels are global class ids, the same on every shard (drawn once,
  replicated over `axis_name`). Each shard computes the logits of the candidates it owns (the
  others masked), `z_0 = psum_i [y in shard i] (<x, w_y> + b_y) - log Q_y`, and its masked
  logsumexp `l_i` over its own samples `z_j = <x, w_{s_j}> + b_{s_j} - log Q_{s_j}` (accidental
  hits removed); `loss = log(exp(z_0) + psum_i exp(l_i)) - z_0` (stabilized by the `pmax`),
  exactly the unsharded loss. The table and bias gradients reach the owning shard's rows only;
  collectives move `[N]` vectors, never rows of the table nor `[N, S]` logits.

  Args:
    features: [N, d] float, replicated over `axis_name`.
    table: [K/M, d] float, this shard's class rows `[i K/M, (i+1) K/M)`, i = axis index.
    labels: [N] int global class ids in [0, K) (or `ignore_index`), replicated over `axis_name`.
    sampled_values: (sampled [S] int, true_expected_count [N] float (or broadcastable),
      sampled_expected_count [S] float), a sampler's output for these labels, replicated over
      `axis_name`; the ids `[S]` alone if not `subtract_log_q`.
    bias: [K/M] float or None, this shard's bias.
    axis_name: the mesh axis over which the classes are sharded.
    remove_accidental_hits, subtract_log_q, ignore_index: see `ops.sampled_softmax_loss`.

  Returns:
    [N] float32 (float64 for float64 inputs) loss, replicated over `axis_name`.

  Raises:
    ValueError: naming the argument, as `ops.sampled_softmax_loss` (ranks, shapes, dtypes;
      concrete labels and sampled ids outside [0, K)); traced ones give NaN.
  """
  z_t, z_s, keep, finish = _sampled_local(features, table, labels, sampled_values, bias,
                                          remove_accidental_hits, subtract_log_q, ignore_index,
                                          axis_name)
  local = logsumexp(z_s, where=keep)  # -inf (zero gradient) where this shard keeps no sample
  m = jnp.maximum(lax.pmax(lax.stop_gradient(local), axis_name), lax.stop_gradient(z_t))
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # NaN stays NaN through z_t
  lse = m + jnp.log(jnp.exp(z_t - m) + lax.psum(jnp.exp(local - m), axis_name))
  return finish(lse - z_t)


def _logistic(features, table, labels, sampled_values, bias, remove_hits, log_q, ignore_index,
              axis_name):
  z_t, z_s, keep, finish = _sampled_local(features, table, labels, sampled_values, bias,
                                          remove_hits, log_q, ignore_index, axis_name)
  negatives = jnp.where(keep, -jax.nn.log_sigmoid(-z_s), 0.0).sum(-1)
  return finish(-jax.nn.log_sigmoid(z_t) + lax.psum(negatives, axis_name))


def vocab_parallel_nce_loss(features: jax.typing.ArrayLike, table: jax.typing.ArrayLike,
                            labels: jax.typing.ArrayLike, sampled_values, *,
                            bias: Optional[jax.typing.ArrayLike] = None,
                            axis_name: str = DEFAULT_AXIS, remove_accidental_hits: bool = False,
                            subtract_log_q: bool = True,
                            ignore_index: Optional[int] = None) -> jax.Array:
  """`ops.nce_loss` with the table sharded on its rows, inside shard_map: `-log sigmoid(z_0)`
  (the label logit from its owner) plus the `psum` of each shard's `-log sigmoid(-z_j)` over the
  samples it owns. Arguments, returns and raises as `vocab_parallel_sampled_softmax_loss`."""
  return _logistic(features, table, labels, sampled_values, bias, remove_accidental_hits,
                   subtract_log_q, ignore_index, axis_name)


def vocab_parallel_negative_sampling_loss(features: jax.typing.ArrayLike,
                                          table: jax.typing.ArrayLike,
                                          labels: jax.typing.ArrayLike, sampled_values, *,
                                          bias: Optional[jax.typing.ArrayLike] = None,
                                          axis_name: str = DEFAULT_AXIS,
                                          remove_accidental_hits: bool = True,
                                          ignore_index: Optional[int] = None) -> jax.Array:
  """`ops.negative_sampling_loss` (word2vec, no log-Q correction) with the table sharded on its
  rows, inside shard_map; as `vocab_parallel_nce_loss` with `subtract_log_q=False`."""
  return _logistic(features, table, labels, sampled_values, bias, remove_accidental_hits, False,
                   ignore_index, axis_name)


# ---- shard_map wrappers for a ('data', 'model') mesh ----------------------------------------


def check_mesh(mesh: Mesh, kernel, *, data_axis: str = 'data', model_axis: str = DEFAULT_AXIS,
               class_axis: int = -1, name: str = 'kernel') -> int:
  """Checks `mesh` has the two axes and that K = kernel.shape[class_axis] divides by the model axis.

  `class_axis=-1` for a `[d, K]` kernel (the dense layer), `class_axis=0, name='table'` for a
  `[K, d]` table of class rows (the sampled losses).

  Returns:
    M, the size of the model axis.

  Raises:
    ValueError: naming the missing axis, or K and the model axis size when K % M != 0.
  """
  for ax in (data_axis, model_axis):
    if ax not in mesh.axis_names:
      raise _checks.ArgumentError(f'`mesh` must have an axis {ax!r}; got axes {mesh.axis_names}.')
  m = mesh.shape[model_axis]
  k = kernel.shape[class_axis]
  if k % m:
    hint = (f'DenseSoftmax(pad_classes_to={m * 128}), whose padded columns get logit -inf'
            if name == 'kernel' else 'rows that are never labels nor sampled')
    raise _checks.ArgumentError(
        f'`{name}` must have K divisible by the size of mesh axis {model_axis!r} = {m}; got '
        f'K = {k} (pad the vocabulary to a multiple of {m}, e.g. {hint}).')
  return m


def _specs(bias, data_axis, model_axis):
  return (P(data_axis, None), P(None, model_axis), None if bias is None else P(model_axis))


def _placed(mesh, specs, *arrays):
  """Concrete arrays placed with their specs (shard_map called eagerly needs them so); tracers
  (under jit, the usual case) pass as they are: jit reshards its inputs."""
  return tuple(a if a is None or _checks.is_traced(a) else
               jax.device_put(a, jax.sharding.NamedSharding(mesh, s))
               for a, s in zip(arrays, specs))


def sharded_dense_loss(mesh: Mesh, features: jax.typing.ArrayLike, kernel: jax.typing.ArrayLike,
                       labels: jax.typing.ArrayLike, *, bias: Optional[jax.typing.ArrayLike] = None,
                       data_axis: str = 'data', model_axis: str = DEFAULT_AXIS,
                       ignore_index: Optional[int] = None, fused: bool = False,
                       chunk_size: Optional[int] = None) -> jax.Array:
  """`vocab_parallel_cross_entropy` under `jax.shard_map` on `mesh`: per-example loss `[N]`.

  Specs: features `P(data_axis, None)`, kernel `P(None, model_axis)`, bias `P(model_axis)`,
  labels and loss `P(data_axis)`. Differentiable w.r.t. features, kernel and bias (jit it with
  the same shardings, so the kernel never gathers).

  Args:
    mesh: a mesh with axes `data_axis` and `model_axis`.
    features: [N, d] float, N divisible by the data axis size.
    kernel: [d, K] float, K divisible by the model axis size.
    labels: [N] int in [0, K) (or `ignore_index`).
    bias, data_axis, model_axis, ignore_index, fused, chunk_size: see
      `vocab_parallel_cross_entropy`.

  Returns:
    [N] float32 loss, sharded over `data_axis`.

  Raises:
    ValueError: a mesh without the axes, K not divisible by the model axis (naming K and M),
      or a bad argument (see `vocab_parallel_cross_entropy`).
  """
  _check(features, kernel, bias)
  check_mesh(mesh, kernel, data_axis=data_axis, model_axis=model_axis)
  if ignore_index is None:
    _checks.in_range('labels', labels, kernel.shape[-1])
  fs, ks, bs = _specs(bias, data_axis, model_axis)

  def f(x, w, b, y):
    return vocab_parallel_cross_entropy(x, w, y, bias=b, axis_name=model_axis,
                                        ignore_index=ignore_index, fused=fused,
                                        chunk_size=chunk_size)

  specs = (fs, ks, bs, P(data_axis))
  return jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=P(data_axis))(
      *_placed(mesh, specs, features, kernel, bias, jnp.asarray(labels)))


def sharded_dense_log_softmax(mesh: Mesh, features: jax.typing.ArrayLike,
                              kernel: jax.typing.ArrayLike, *,
                              bias: Optional[jax.typing.ArrayLike] = None, data_axis: str = 'data',
                              model_axis: str = DEFAULT_AXIS) -> jax.Array:
  """`vocab_parallel_log_softmax` under `jax.shard_map`: `[N, K]` sharded `P(data, model)`."""
  return _sharded_map(vocab_parallel_log_softmax, P(data_axis, model_axis), mesh, features, kernel,
                      bias, data_axis, model_axis)


def sharded_dense_predict(mesh: Mesh, features: jax.typing.ArrayLike,
                          kernel: jax.typing.ArrayLike, *,
                          bias: Optional[jax.typing.ArrayLike] = None, data_axis: str = 'data',
                          model_axis: str = DEFAULT_AXIS) -> jax.Array:
  """`vocab_parallel_predict` under `jax.shard_map`: `[N]` int32 sharded `P(data)`."""
  return _sharded_map(vocab_parallel_predict, P(data_axis), mesh, features, kernel, bias, data_axis,
                      model_axis)


def _sharded_map(op, out_spec, mesh, features, kernel, bias, data_axis, model_axis):
  """`op(x, w, bias=b, axis_name=model_axis)` under `jax.shard_map` with the layer's specs."""
  _check(features, kernel, bias)
  check_mesh(mesh, kernel, data_axis=data_axis, model_axis=model_axis)
  specs = _specs(bias, data_axis, model_axis)
  f = lambda x, w, b: op(x, w, bias=b, axis_name=model_axis)
  return jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=out_spec)(
      *_placed(mesh, specs, features, kernel, bias))


SAMPLED_LOSSES = {'sampled_softmax': vocab_parallel_sampled_softmax_loss,
                  'nce': vocab_parallel_nce_loss,
                  'negative_sampling': vocab_parallel_negative_sampling_loss}


def sharded_sampled_loss(mesh: Mesh, features: jax.typing.ArrayLike, table: jax.typing.ArrayLike,
                         labels: jax.typing.ArrayLike, sampled_values, *,
                         loss: str = 'sampled_softmax',
                         bias: Optional[jax.typing.ArrayLike] = None, data_axis: str = 'data',
                         model_axis: str = DEFAULT_AXIS,
                         remove_accidental_hits: Optional[bool] = None,
                         subtract_log_q: bool = True,
                         ignore_index: Optional[int] = None) -> jax.Array:
  """A vocab-parallel sampled loss under `jax.shard_map` on `mesh`: per-example loss `[N]`.

  Specs: features `P(data_axis, None)`, table `P(model_axis, None)`, bias `P(model_axis)`,
  labels, the true expected counts and the loss `P(data_axis)`, the sample and its expected
  counts replicated `P()`. Differentiable w.r.t. features, table and bias.

  Args:
    mesh: a mesh with axes `data_axis` and `model_axis`.
    features: [N, d] float, N divisible by the data axis size.
    table: [K, d] float class rows, K divisible by the model axis size.
    labels: [N] int in [0, K) (or `ignore_index`).
    sampled_values: as `vocab_parallel_sampled_softmax_loss` (`true_expected_count` `[N]`).
    loss: 'sampled_softmax', 'nce' or 'negative_sampling' (a key of `SAMPLED_LOSSES`).
    bias, data_axis, model_axis: see above.
    remove_accidental_hits: None (the loss's default: True, False for 'nce') or a bool.
    subtract_log_q: the log-Q correction ('sampled_softmax', 'nce'; 'negative_sampling' has none).
    ignore_index: None or an int, see `vocab_parallel_sampled_softmax_loss`.

  Returns:
    [N] float32 loss, sharded over `data_axis`.

  Raises:
    ValueError: an unknown `loss`, a mesh without the axes, K not divisible by the model axis
      (naming K and M), or a bad argument (see `vocab_parallel_sampled_softmax_loss`).
  """
  if loss not in SAMPLED_LOSSES:
    raise _checks.ArgumentError(f'`loss` must be one of {tuple(SAMPLED_LOSSES)}; got {loss!r}.')
  _check_table(features, table, bias)
  check_mesh(mesh, table, data_axis=data_axis, model_axis=model_axis, class_axis=0, name='table')
  n, k = features.shape[0], table.shape[0]
  log_q = subtract_log_q and loss != 'negative_sampling'
  sampled, ids_name, true_count, sampled_count = _sampled_values_n(sampled_values, n, log_q)
  _checks.in_range(ids_name, sampled, k)
  if ignore_index is None:
    _checks.in_range('labels', labels, k)
  op = SAMPLED_LOSSES[loss]
  kwargs = dict(ignore_index=ignore_index)
  if remove_accidental_hits is not None:
    kwargs['remove_accidental_hits'] = remove_accidental_hits
  if loss != 'negative_sampling':
    kwargs['subtract_log_q'] = subtract_log_q

  def f(x, w, b, y, values):
    return op(x, w, y, values, bias=b, axis_name=model_axis, **kwargs)

  values = (sampled,) if true_count is None else (sampled, true_count, sampled_count)
  value_specs = (P(),) if true_count is None else (P(), P(data_axis), P())
  specs = (P(data_axis, None), P(model_axis, None), None if bias is None else P(model_axis),
           P(data_axis), value_specs)
  placed = _placed(mesh, specs[:4] + value_specs, features, table, bias, jnp.asarray(labels),
                   *values)
  return jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=P(data_axis))(
      *placed[:4], tuple(placed[4:]))
