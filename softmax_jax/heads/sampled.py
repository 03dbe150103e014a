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
"""

from typing import Any, ClassVar, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.heads import _checks
from softmax_jax.heads import _eval
from softmax_jax.ops import sampled as sampled_ops
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
    init = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)  # fan-in d, as DenseSoftmax.
    embedding = self.param('embedding', init, (self.num_classes, d), jnp.float32)
    bias = (self.param('bias', nn.initializers.zeros, (self.num_classes,), jnp.float32)
            if self.use_bias else None)
    return embedding, bias

  def logits(self, features: jnp.ndarray) -> jnp.ndarray:
    """Full unnormalized logits `[..., K]` (float32 accumulation)."""
    self._config()
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
      return cross_entropy(self.logits(features), labels)
    embedding, bias = self._weights(features.shape[-1])
    values = self._sample(labels, s, counts)
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
    """
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
    """Exact normalized log-probabilities `[..., K]` of the full softmax."""
    return log_softmax(self.logits(features))

  def predict(self, features: jnp.ndarray) -> jnp.ndarray:
    """Most probable class `[...] int32`, `argmax(log_prob(features), -1)`."""
    return jnp.argmax(self.log_prob(features), axis=-1).astype(jnp.int32)

  def eval_stats(self, features: jnp.ndarray, labels: jnp.ndarray, *, temperatures=(1.0,),
                 log_prior=None, chunk_size: Optional[int] = None) -> Dict[str, jnp.ndarray]:
    """Per-example statistics of the exact full softmax, `chunk_size` classes at a time.

    `features: [..., d]`, `labels: [...] int`; keys as `DenseSoftmax.eval_stats` ('prediction',
    'label_rank' `[...]` int32, 'label_log_prob', 'confidence' `[..., G]`, 'adjusted_*' with
    `log_prior: [K]`). The logits `x @ embedding[chunk].T + bias[chunk]` are formed one chunk
    (None: 2048 classes) at a time: memory does not grow with K.
    """
    self._config()
    features, labels = _checks.features_and_labels(type(self).__name__, features, labels,
                                                   num_classes=self.num_classes)
    embedding, bias = self._weights(features.shape[-1])
    x = features.astype(self.dtype or features.dtype)
    return _eval.linear_eval_stats(x, embedding, bias, labels, class_axis=0,
                                   num_classes=self.num_classes, chunk_size=chunk_size,
                                   temperatures=temperatures, log_prior=log_prior)
