"""SampledSoftmax: sampled softmax / NCE / negative sampling in training, the full softmax in eval.

Training (`train=True`) draws one shared sample of `num_sampled` classes per call from the rng
stream `'sample'` (as TF does per batch) and returns the sampled loss of
`softmax_jax.ops.sampled`; evaluation, `log_prob` and `predict` use the exact full softmax over
all K classes, so the eval loss is `-log_prob[label]`. Under `jax.vmap` over examples each mapped
call draws its own sample from its own `'sample'` key: with per-example keys, row i is the call on
example i alone with key i; with one key shared by the map, every row uses the batched call's one
shared sample, so `vmap` equals the batched call. The class weights are one `[K, d]`
`'embedding'` matrix of class rows (the layout `ops.sampled` gathers fastest, and `nn.Embed`'s,
for weight tying) plus an optional `[K]` `'bias'`.

Checks: the ranks, shapes and dtypes of `features` and `labels` as every head (chex, eagerly and
under `jit`, see dense.py); `num_classes`, `num_sampled`, `sampler`, `loss`, `class_counts` and
`dtype` on every call (Python values, so under `jit` too); labels in [0, K) when concrete, at the
head, so the error names `labels` (not the sampler's `true_classes`); traced out-of-range ones
give a NaN loss.

Vocabulary parallel (`vocab_parallel_axis='model'`, issue 21), as `DenseSoftmax`: (1) called
INSIDE `jax.shard_map` with the table sharded on its rows over that mesh axis (`embedding`
`P('model', None)`, `bias` `P('model')`, features replicated over it), the head holds its rows
`[K/M, d]`; (2) under a context mesh with the axis (`jax.set_mesh`, the trainer's `config.mesh`)
and outside a shard_map, it holds the full `[K, d]` table (placed `P('model', None)` by the
caller) and wraps itself in a `jax.shard_map` over that mesh. The sample is drawn once from
'sample' outside the sharded op and is the same on every shard (inside a shard_map, give every
model shard the same 'sample' key); training runs `ops.vocab_parallel.SAMPLED_LOSSES` (each shard
the candidates it owns, `[N]` statistics combined by collectives); evaluation, `log_prob`,
`predict` and `eval_stats` the dense vocab-parallel ops on the transposed shard (`[d, K/M]`):
no device forms `[N, K]` nor holds the full table. K must divide by M (no class padding: padded
rows would change the samplers). `logits` is not vocab-parallel (it raises inside a shard_map),
nor `row_loss` (row-sparse updates of a sharded table: it raises whenever the axis is set).
"""

from typing import Any, ClassVar, Dict, Optional, Tuple

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from softmax_jax.heads import _checks
from softmax_jax.heads import _eval
from softmax_jax.ops import sampled as sampled_ops
from softmax_jax.ops import vocab_parallel as vp_ops
from softmax_jax.ops.softmax import cross_entropy
from softmax_jax.ops.softmax import log_softmax

SAMPLERS = ('uniform', 'log_uniform', 'unigram')
LOSSES = {'sampled_softmax': sampled_ops.sampled_softmax_loss, 'nce': sampled_ops.nce_loss,
          'negative_sampling': sampled_ops.negative_sampling_loss}


class SampledSoftmax(nn.Module):
  """Sampled-loss head over class rows `embedding: [K, d]` (+ `bias: [K]`).

  Attributes:
    num_classes: K >= 2.
    num_sampled: S shared samples per call; None: `min(1024, max(1, K // 4))`. Must be < K
      with `unique` (else use `DenseSoftmax`).
    sampler: 'log_uniform' (Zipf; assumes ids sorted by decreasing frequency), 'uniform', or
      'unigram' (`class_counts ** distortion`).
    unique: sample without replacement (TF's default).
    remove_accidental_hits: mask samples equal to the label (for every loss).
    loss: 'sampled_softmax' (log-Q corrected), 'nce' (log-Q corrected) or 'negative_sampling'
      (word2vec, uncorrected).
    distortion: unigram exponent (0.75: word2vec).
    class_counts: [K] training counts, needed by 'unigram' (filled by the builders); zero
      counts are raised to the smallest positive count so every class can be sampled and
      its log-Q correction stays finite. Unused by the other samplers.
    use_bias: learn a `[K]` bias.
    dtype: computation dtype of the matrix products, None or floating (None: the features'); losses and
      log-probabilities accumulate in float32.
    vocab_parallel_axis: None, or the mesh axis over which the table's rows (the classes) are
      sharded (see the module docstring).
  """
  num_classes: int
  num_sampled: Optional[int] = None
  sampler: str = 'log_uniform'
  unique: bool = True
  remove_accidental_hits: bool = True
  loss: str = 'sampled_softmax'
  distortion: float = 0.75
  class_counts: Optional[Tuple[int, ...]] = None
  use_bias: bool = True
  dtype: Any = None
  vocab_parallel_axis: Optional[str] = None
  sparse_param: ClassVar[str] = 'embedding'  # the table `row_loss` reads rows of

  def _config(self):
    """Validates the attributes; returns (num_sampled, counts or None)."""
    name = type(self).__name__
    k = _checks.num_classes(name, self.num_classes)
    _checks.compute_dtype(name, self.dtype)
    s = min(1024, max(1, k // 4)) if self.num_sampled is None else self.num_sampled
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
      raise ValueError(f'{name}: `num_sampled` must be None or an int >= 1; got {s!r}.')
    if self.unique and s >= k:
      raise ValueError(f'{name}: `num_sampled` must be < num_classes = {k} with unique=True; '
                       f'got {s} (sampling every class is DenseSoftmax).')
    if self.sampler not in SAMPLERS:
      raise ValueError(f'{name}: `sampler` must be one of {SAMPLERS}; got {self.sampler!r}.')
    if self.loss not in LOSSES:
      raise ValueError(f'{name}: `loss` must be one of {tuple(LOSSES)}; got {self.loss!r}.')
    counts = None
    if self.sampler == 'unigram':
      if self.class_counts is None:
        raise ValueError(f"{name}: sampler='unigram' needs `class_counts` ([K] training counts, "
                         "filled by build_classifier / the LM builder); got None. Use "
                         "sampler='log_uniform' for a frequency-sorted vocabulary without counts.")
      counts = np.asarray(self.class_counts, np.float64)
      if counts.shape != (k,):
        raise ValueError(f'{name}: `class_counts` must have num_classes = {k} entries; got '
                         f'shape {counts.shape}.')
      if not np.all(np.isfinite(counts) & (counts >= 0)) or not np.any(counts > 0):
        raise ValueError(f'{name}: `class_counts` must be finite, >= 0, with a positive sum.')
      counts = np.where(counts > 0, counts, counts[counts > 0].min())
    return int(s), counts

  @nn.compact
  def _weights(self, d: int):
    m = self._model_shards()
    k = self.num_classes if m is None else self.num_classes // m  # this shard's rows
    init = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)  # fan-in d, as DenseSoftmax.
    embedding = self.param('embedding', init, (k, d), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (k,), jnp.float32) if self.use_bias else None
    return embedding, bias

  def _model_shards(self) -> Optional[int]:
    """M, the size of `vocab_parallel_axis` inside a shard_map over it; else None (plain head)."""
    m = _checks.axis_size_or_none(self.vocab_parallel_axis)
    return None if m is None else self._check_shards(m)

  def _check_shards(self, m: int) -> int:
    if self.num_classes % m:
      raise ValueError(f'{type(self).__name__}: num_classes K = {self.num_classes} must divide by '
                       f'the size {m} of mesh axis {self.vocab_parallel_axis!r} '
                       '(vocab_parallel_axis); the sampled head has no class padding (padded rows '
                       'would change the samplers): choose a model axis that divides K.')
    return m

  def _vocab_parallel(self, features, op, *, labels=None, per_row=None, shared=None,
                      per_class=None, columns: bool = False):
    """`op(x [N, d], table [K/M, d], b [K/M] or None, y [N] or None, per_row, shared, per_class)`
    on this shard's rows, or None when the head is not vocabulary-parallel here (the plain path).

    Inside a shard_map over the axis the params are this shard's rows and `op` runs as it is
    (a full `[K]` `per_class` is sliced to the shard's). Under a context mesh `op` runs in a
    `jax.shard_map` over it: table `P(axis, None)`, bias and `per_class` `P(axis)`, `shared`
    (arrays) replicated, the rows of `x`, `y` and `per_row` (`[N]` arrays) split over the
    mesh's other axes (replicated when N does not divide by them); the output is split like
    the rows (`columns=True`: `[N, K]`, `P(rows, axis)`).
    """
    inside = self._model_shards() is not None
    mesh = None if inside else _checks.context_mesh(self.vocab_parallel_axis)
    if not inside and mesh is None:
      return None
    axis = self.vocab_parallel_axis
    table, bias = self._weights(features.shape[-1])
    dtype = self.dtype or features.dtype
    x = features.reshape(-1, features.shape[-1]).astype(dtype)
    y = None if labels is None else labels.reshape(-1)

    def run(x, t, b, y, per_row, shared, per_class):
      kl = t.shape[0]
      if per_class is not None and per_class.shape[0] != kl:  # inside a shard_map: the full [K]
        per_class = lax.dynamic_slice_in_dim(per_class, lax.axis_index(axis) * kl, kl)
      return op(x, t.astype(dtype), b, y, per_row, shared, per_class)

    args = (x, table, bias, y, per_row, shared, per_class)
    if inside:
      return run(*args)
    self._check_shards(mesh.shape[axis])
    rows = _checks.row_axes(mesh, axis, x.shape[0])
    like = lambda tree, spec: jax.tree.map(lambda _: spec, tree)
    specs = (P(rows, None), P(axis, None), None if bias is None else P(axis),
             None if y is None else P(rows), like(per_row, P(rows)), like(shared, P()),
             like(per_class, P(axis)))
    out = P(rows, axis) if columns else P(rows)
    return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=out)(*args)

  def logits(self, features: jnp.ndarray) -> jnp.ndarray:
    """Full unnormalized logits `[..., K]` (float32 accumulation)."""
    self._config()
    if self._model_shards() is not None:
      raise ValueError(f'{type(self).__name__}.logits is not vocabulary-parallel: call it outside '
                       f'the shard_map over {self.vocab_parallel_axis!r} (with gathered params), or '
                       'use the loss / log_prob / predict / eval_stats inside it.')
    features, _ = _checks.features_and_labels(type(self).__name__, features)
    embedding, bias = self._weights(features.shape[-1])
    dtype = self.dtype or features.dtype
    z = jnp.einsum('...d,kd->...k', features.astype(dtype), embedding.astype(dtype),
                   preferred_element_type=jnp.float32)
    return z if bias is None else z + bias

  def __call__(self, features: jnp.ndarray, labels: jnp.ndarray, *, train: bool = False):
    """Per-example loss `[...]`: sampled in training, full cross-entropy in evaluation."""
    s, counts = self._config()
    # The label range is checked here, naming `labels`, before a sampler sees `true_classes`.
    features, labels = _checks.features_and_labels(type(self).__name__, features, labels,
                                                   num_classes=self.num_classes)
    if not train:
      loss = self._vocab_parallel(
          features, lambda x, t, b, y, *_: vp_ops.vocab_parallel_cross_entropy(
              x, t.T, y, bias=b, axis_name=self.vocab_parallel_axis), labels=labels)
      if loss is not None:
        return loss.reshape(labels.shape)
      return cross_entropy(self.logits(features), labels)
    values = self._sample(labels, s, counts)
    if self.vocab_parallel_axis is not None:
      true_count = jnp.broadcast_to(values.true_expected_count, labels.shape).reshape(-1)
      op = vp_ops.SAMPLED_LOSSES[self.loss]
      loss = self._vocab_parallel(
          features, lambda x, t, b, y, tc, sv, _: op(
              x, t, y, (sv[0], tc, sv[1]), bias=b, axis_name=self.vocab_parallel_axis,
              remove_accidental_hits=self.remove_accidental_hits),
          labels=labels, per_row=true_count,
          shared=(values.sampled, values.sampled_expected_count))
      if loss is not None:
        return loss.reshape(labels.shape)
    embedding, bias = self._weights(features.shape[-1])
    dtype = self.dtype or features.dtype
    return LOSSES[self.loss](features.astype(dtype), embedding.astype(dtype), labels, values,
                             bias=bias, remove_accidental_hits=self.remove_accidental_hits)

  def _sample(self, labels, s, counts):
    """One shared sample of `s` classes from the rng stream 'sample' (one draw per call)."""
    key = self.make_rng('sample')
    kw = dict(unique=self.unique, true_classes=labels)
    if self.sampler == 'uniform':
      return sampled_ops.uniform_sampler(key, s, self.num_classes, **kw)
    if self.sampler == 'log_uniform':
      return sampled_ops.log_uniform_sampler(key, s, self.num_classes, **kw)
    return sampled_ops.unigram_sampler(key, s, counts, distortion=self.distortion, **kw)

  def row_loss(self, features: jnp.ndarray, labels: jnp.ndarray,
               row_delta: Optional[jnp.ndarray] = None) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """The training loss `__call__(features, labels, train=True)` read from the touched rows only.

    The loss reads R = N + S rows of `embedding` (N = labels.size, S = num_sampled): the labels'
    (in `labels.reshape(-1)` order), then the sample's, TF's lookup of `concat(labels,
    sampled)`; `row_ids [R]` are their ids, repeated where a class is read twice (an
    out-of-range label's id is K, the padding). The loss reads
    `rows = stop_gradient(embedding[row_ids]) + row_delta` and slices them
    (`sampled_softmax_loss(..., gathered_from=K)`), so `grad(loss, row_delta)` is one gradient
    row per read, duplicates not summed (TF's `IndexedSlices`; the training step sums them,
    `train.sparse.sum_duplicates`), with no scatter in the backward pass and no `[K, d]`
    gradient. Same sample (one draw from 'sample'), same values and, up to float summation
    order, the same gradients as `__call__(..., train=True)`; the training step uses it for
    `config.optimizer.sparse_output` (`softmax_jax.train.sparse`).

    Args:
      features: [..., d] float.
      labels: [...] int in [0, K).
      row_delta: [R, d] float32, or None (zeros).

    Returns:
      `(loss [...], row_ids [R] int32)`.

    Raises:
      ValueError: with `vocab_parallel_axis` (row-sparse updates of a sharded table are not
        implemented).
    """
    if self.vocab_parallel_axis is not None:
      raise ValueError(f'{type(self).__name__}.row_loss is not vocabulary-parallel: got '
                       f'vocab_parallel_axis={self.vocab_parallel_axis!r}; use the dense update '
                       '(config.optimizer.sparse_output=False) with a sharded table.')
    s, counts = self._config()
    features, labels = _checks.features_and_labels(type(self).__name__, features, labels,
                                                   num_classes=self.num_classes)
    embedding, bias = self._weights(features.shape[-1])
    values = self._sample(labels, s, counts)
    k = self.num_classes
    ids = jnp.concatenate([labels.reshape(-1), values.sampled]).astype(jnp.int32)
    ids = jnp.where((ids >= 0) & (ids < k), ids, k)  # a traced out-of-range label: padding
    rows = jax.lax.stop_gradient(jnp.take(embedding, ids, axis=0, mode='fill', fill_value=0))
    if row_delta is not None:
      rows = rows + row_delta
    local_bias = None if bias is None else jnp.take(bias, ids, mode='fill', fill_value=0)
    dtype = self.dtype or features.dtype
    loss = LOSSES[self.loss](features.astype(dtype), rows.astype(dtype), labels, values,
                             bias=local_bias, remove_accidental_hits=self.remove_accidental_hits,
                             gathered_from=k)
    return loss, ids

  def log_prob(self, features: jnp.ndarray) -> jnp.ndarray:
    """Exact normalized log-probabilities `[..., K]` of the full softmax (inside a shard_map over
    `vocab_parallel_axis`: this shard's `[..., K/M]` columns, globally normalized)."""
    if self.vocab_parallel_axis is not None:
      self._config()
      features, _ = _checks.features_and_labels(type(self).__name__, features)
      log_p = self._vocab_parallel(
          features, lambda x, t, b, *_: vp_ops.vocab_parallel_log_softmax(
              x, t.T, bias=b, axis_name=self.vocab_parallel_axis), columns=True)
      if log_p is not None:
        return log_p.reshape(*features.shape[:-1], log_p.shape[-1])
    return log_softmax(self.logits(features))

  def predict(self, features: jnp.ndarray) -> jnp.ndarray:
    """Most probable class `[...] int32`, `argmax(log_prob(features), -1)`."""
    if self.vocab_parallel_axis is not None:
      self._config()
      features, _ = _checks.features_and_labels(type(self).__name__, features)
      ids = self._vocab_parallel(
          features, lambda x, t, b, *_: vp_ops.vocab_parallel_predict(
              x, t.T, bias=b, axis_name=self.vocab_parallel_axis))
      if ids is not None:
        return ids.reshape(features.shape[:-1])
    return jnp.argmax(self.log_prob(features), axis=-1).astype(jnp.int32)

  def eval_stats(self, features: jnp.ndarray, labels: jnp.ndarray, *, temperatures=(1.0,),
                 log_prior=None, chunk_size: Optional[int] = None) -> Dict[str, jnp.ndarray]:
    """Per-example statistics of the exact full softmax, `chunk_size` classes at a time.

    `features: [..., d]`, `labels: [...] int`; keys as `DenseSoftmax.eval_stats` ('prediction',
    'label_rank' `[...]` int32, 'label_log_prob', 'confidence' `[..., G]`, 'adjusted_*' with
    `log_prior: [K]`). The logits `x @ embedding[chunk].T + bias[chunk]` are formed one chunk
    (None: 2048 classes) at a time: memory does not grow with K. Vocabulary-parallel: the
    statistics of `ops.vocab_parallel.vocab_parallel_eval_stats` (this shard's `[N, K/M]`
    logits; `chunk_size` unused).
    """
    self._config()
    features, labels = _checks.features_and_labels(type(self).__name__, features, labels,
                                                   num_classes=self.num_classes)
    if self.vocab_parallel_axis is not None:
      ts = _eval.check_temperatures(temperatures)
      prior = _eval.check_prior(log_prior, self.num_classes)
      stats = self._vocab_parallel(
          features, lambda x, t, b, y, _, __, p: vp_ops.vocab_parallel_eval_stats(
              x, t.T, y, bias=b, axis_name=self.vocab_parallel_axis, temperatures=ts,
              log_prior=p), labels=labels, per_class=prior)
      if stats is not None:
        return {k: v.reshape(*labels.shape, *v.shape[1:]) for k, v in stats.items()}
    embedding, bias = self._weights(features.shape[-1])
    x = features.astype(self.dtype or features.dtype)
    return _eval.linear_eval_stats(x, embedding, bias, labels, class_axis=0,
                                   num_classes=self.num_classes, chunk_size=chunk_size,
                                   temperatures=temperatures, log_prior=log_prior)
