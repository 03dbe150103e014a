"""AdaptiveSoftmax: Grave et al.'s adaptive softmax head, PyTorch `AdaptiveLogSoftmaxWithLoss` semantics.

Parameters (ours are `[in, out]`; PyTorch's `Linear.weight` is the transpose):
  head_kernel  [d, c_0 + n]   shortlist logits, then one logit per tail cluster (PyTorch `head.weight.T`)
  head_bias    [c_0 + n]      only with `head_bias=True` (PyTorch `head.bias`)
  tail_proj_i  [d, h_i]       `h_i = d // div_value**(i+1)` (PyTorch `tail[i][0].weight.T`)
  tail_out_i   [h_i, c_{i+1} - c_i]                        (PyTorch `tail[i][1].weight.T`)

The loss (training and evaluation) is `ops.adaptive_softmax_loss`, which runs each tail only on the
rows whose label falls in its cluster (static-capacity routing, see `softmax_jax/ops/adaptive.py`);
`log_prob` is the exact full distribution and `predict` evaluates the tails only for rows whose head
argmax is a cluster. Class ids must be sorted by decreasing frequency (the vocabulary builders do).

Checks: the ranks, shapes and dtypes of `features` and `labels` as every head (chex, eagerly and
under `jit`, see dense.py); `num_classes`, `cutoffs`, `div_value`, `class_counts` and `dtype` on
every call (Python values, so under `jit` too); labels in [0, K) only when concrete (traced
out-of-range ones give a NaN loss).
"""

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from softmax_jax.heads import _checks
from softmax_jax.heads import _eval
from softmax_jax.ops import adaptive as adaptive_ops


class AdaptiveSoftmax(nn.Module):
  """Adaptive softmax head (Grave et al., "Efficient softmax approximation for GPUs", ICML 2017).

  Attributes:
    num_classes: K >= 2, ids sorted by decreasing frequency.
    cutoffs: strictly increasing ints in [1, K - 1], the first id of each tail cluster (K itself
      excluded, as in PyTorch). None: `ops.adaptive_cutoffs(class_counts)`, or without counts
      `ops.adaptive_cutoffs(log_uniform_probs(K))` (a Zipf vocabulary in id order).
    div_value: tail i projects to `d // div_value**(i+1)` units (must stay >= 1).
    head_bias: a learned bias on the head logits.
    class_counts: training counts per class `[K]` in id order (filled by the builders); used only
      to pick `cutoffs` when they are None.
    dtype: computation dtype of the matmuls, None or floating (None: the features'); log-probabilities and
      losses are accumulated in float32.
    capacity_fractions: the routing's capacity rungs (`ops.adaptive_softmax_loss`); None runs
      every tail on every row. The routing also holds under `vmap` over blocks of rows.
  """
  num_classes: int
  cutoffs: Optional[Tuple[int, ...]] = None
  div_value: float = 4.0
  head_bias: bool = False
  class_counts: Optional[Tuple[int, ...]] = None
  dtype: Any = None
  capacity_fractions: Optional[Tuple[float, ...]] = adaptive_ops.DEFAULT_CAPACITY_FRACTIONS

  def resolved_cutoffs(self) -> Tuple[int, ...]:
    """The cutoffs in use (validated; chosen from counts or the Zipf default when None)."""
    k = _checks.num_classes(type(self).__name__, self.num_classes)
    if self.cutoffs is not None:
      return adaptive_ops.check_cutoffs(self.cutoffs, k)
    if self.class_counts is None:
      return adaptive_ops.adaptive_cutoffs(adaptive_ops.log_uniform_probs(k))
    if len(self.class_counts) != k:
      raise ValueError(f'AdaptiveSoftmax: class_counts must have num_classes = {k} entries; got '
                       f'{len(self.class_counts)}.')
    return adaptive_ops.adaptive_cutoffs(self.class_counts)

  @nn.compact
  def _weights(self, d: int):
    cutoffs = self.resolved_cutoffs()
    n, bounds = len(cutoffs), cutoffs + (self.num_classes,)
    hidden = adaptive_ops.tail_hidden_sizes(d, n, self.div_value)
    init = nn.initializers.lecun_normal()
    head_kernel = self.param('head_kernel', init, (d, cutoffs[0] + n), jnp.float32)
    bias = (self.param('head_bias', nn.initializers.zeros, (cutoffs[0] + n,), jnp.float32)
            if self.head_bias else None)
    tails = tuple((self.param(f'tail_proj_{i}', init, (d, h), jnp.float32),
                   self.param(f'tail_out_{i}', init, (h, bounds[i + 1] - bounds[i]), jnp.float32))
                  for i, h in enumerate(hidden))
    return dict(head_kernel=head_kernel, tail_kernels=tails, cutoffs=cutoffs, head_bias=bias)

  def _prepare(self, features, labels=None):
    _checks.compute_dtype(type(self).__name__, self.dtype)
    self.resolved_cutoffs()  # Checks num_classes, cutoffs and class_counts before the labels' range.
    features, labels = _checks.features_and_labels(type(self).__name__, features, labels,
                                                   num_classes=self.num_classes)
    weights = self._weights(features.shape[-1])
    return features.astype(self.dtype or features.dtype), labels, weights

  def __call__(self, features: jnp.ndarray, labels: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Per-example `-log p(label)` `[...]` for `features: [..., d]`, `labels: [...] int` (exact;
    the same in training and evaluation)."""
    del train  # No train-only behaviour: the routed loss is exact.
    features, labels, weights = self._prepare(features, labels)
    return adaptive_ops.adaptive_softmax_loss(features, labels, **weights,
                                              capacity_fractions=self.capacity_fractions)

  def log_prob(self, features: jnp.ndarray) -> jnp.ndarray:
    """Exact normalized log-probabilities `[..., K]` (every tail on every row)."""
    features, _, weights = self._prepare(features)
    return adaptive_ops.adaptive_log_softmax(features, **weights)

  def predict(self, features: jnp.ndarray) -> jnp.ndarray:
    """`argmax(log_prob(features), -1)` `[...] int32`, tails only where the head argmax is a cluster."""
    features, _, weights = self._prepare(features)
    return adaptive_ops.adaptive_predict(features, **weights,
                                         capacity_fractions=self.capacity_fractions)

  def eval_stats(self, features: jnp.ndarray, labels: jnp.ndarray, *, temperatures=(1.0,),
                 log_prior=None, chunk_size: Optional[int] = None) -> Dict[str, jnp.ndarray]:
    """Per-example statistics of `log_prob` (keys as `DenseSoftmax.eval_stats`), from its rows."""
    return _eval.from_log_prob(self, features, labels, temperatures=temperatures,
                               log_prior=log_prior, chunk_size=chunk_size)
