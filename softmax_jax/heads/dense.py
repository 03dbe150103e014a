"""DenseSoftmax: the full softmax over `features @ kernel + bias`, the reference head.

Every head in `softmax_jax.heads` shares this contract (see docs/architecture.md):

- `__call__(features [..., d], labels [...] int, *, train) -> loss [...]` per example;
- `log_prob(features [..., d]) -> [..., num_classes]`, exact and normalized;
- `predict(features [..., d]) -> [...] int`, equal to `argmax(log_prob(features), -1)`;
- `eval_stats(features [..., d], labels [...] int, *, temperatures=(1.0,), log_prior=None,
  chunk_size=None) -> dict` of per-example evaluation statistics of `log_prob`: 'prediction',
  'label_rank' `[...]` int32, 'label_log_prob', 'confidence' `[..., G]` float32 (one column per
  temperature), and with `log_prior [K]` the same prefixed 'adjusted_' (post-hoc logit
  adjustment); see `softmax_jax/heads/_eval.py`. Heads for large K (fused dense, sampled,
  hierarchical, adaptive) compute them chunk by chunk over the classes, never forming `[..., K]`.

NaN (every head, the NaN rule of `softmax_jax.ops`): a NaN in one example's features makes that
example's losses (training and evaluation) NaN and its `log_prob` row all NaN, never a finite
number, and leaves every other example's outputs unchanged; the training gradient has NaNs (in the
parameters and in that example's features). `predict` of a NaN row is some id in `[0, K)` (an
integer cannot be NaN; ours give 0, as `jnp.argmax` returns the first NaN): look for NaNs in the
loss, not in the predictions.

Checks (every head): the ranks, shapes and dtypes of `features` (floating, rank >= 1; int features
are rejected, not cast) and `labels` (integer, shape `features.shape[:-1]`) are chex assertions,
raised as a `ValueError` naming the argument, eagerly and under `jit`/`vmap`/`grad` alike. Labels
outside `[0, K)` raise, naming `labels`, only when they are concrete; traced ones (under `jit`)
give a NaN loss. The head's attributes (`num_classes >= 2`, a floating or None `dtype`, ...) are
checked on every call, in training and in evaluation alike.
`softmax_jax.testing.assert_head_contract` checks a head against this contract.
"""

from typing import Any, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp

from softmax_jax import ops
from softmax_jax.heads import _checks
from softmax_jax.heads import _eval


class DenseSoftmax(nn.Module):
  """Full softmax head: `logits = features @ kernel + bias`, loss = cross-entropy.

  Attributes:
    num_classes: K >= 2, the number of classes.
    use_bias: whether to add a learned `[K]` bias.
    label_smoothing: eps of the smoothed target `(1 - eps) * onehot + eps / K` in training.
    fused: train through `ops.linear_cross_entropy`, which never builds the `[N, K]`
      logits (for large K); `log_prob` stays the exact full softmax either way.
    chunk_size: vocabulary chunk of the fused op (None: the op's default).
    dtype: computation dtype of the matmul, None or floating (None: the features' dtype).
      Losses and log-probabilities are accumulated in float32.
  """
  num_classes: int
  use_bias: bool = True
  label_smoothing: float = 0.0
  fused: bool = False
  chunk_size: Optional[int] = None
  dtype: Any = None

  def _config(self) -> None:
    """Validates the attributes (on every call, so evaluation-only use is checked too)."""
    name = type(self).__name__
    _checks.num_classes(name, self.num_classes)
    _checks.compute_dtype(name, self.dtype)
    _checks.in_range(name, 'label_smoothing', self.label_smoothing, 0.0, 1.0,
                     'the smoothed target (1 - eps) onehot + eps / K')
    if self.chunk_size is not None:
      _checks.integer_at_least(name, 'chunk_size', self.chunk_size, 1, 'classes per fused chunk')

  @nn.compact
  def _weights(self, d: int):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (d, self.num_classes))
    bias = self.param('bias', nn.initializers.zeros, (self.num_classes,)) if self.use_bias else None
    return kernel, bias

  def logits(self, features: jnp.ndarray) -> jnp.ndarray:
    """Unnormalized logits `[..., K]`."""
    self._config()
    features, _ = _checks.features_and_labels(type(self).__name__, features)
    kernel, bias = self._weights(features.shape[-1])
    dtype = self.dtype or features.dtype
    z = jnp.matmul(features.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
    return z if bias is None else z + bias

  def __call__(self, features: jnp.ndarray, labels: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Per-example cross-entropy `[...]` for `features: [..., d]`, `labels: [...] int`."""
    self._config()
    features, labels = _checks.features_and_labels(type(self).__name__, features, labels,
                                                   num_classes=self.num_classes)
    smoothing = self.label_smoothing if train else 0.0
    if self.fused:
      kernel, bias = self._weights(features.shape[-1])
      dtype = self.dtype or features.dtype
      kwargs = {} if self.chunk_size is None else {'chunk_size': self.chunk_size}
      return ops.linear_cross_entropy(
          features.astype(dtype), kernel.astype(dtype), labels, bias=bias,
          label_smoothing=smoothing, **kwargs)
    return ops.cross_entropy(self.logits(features), labels, label_smoothing=smoothing)

  def log_prob(self, features: jnp.ndarray) -> jnp.ndarray:
    """Exact normalized log-probabilities `[..., K]` (logsumexp over the last axis is 0)."""
    return ops.log_softmax(self.logits(features))

  def predict(self, features: jnp.ndarray) -> jnp.ndarray:
    """Most probable class `[...] int32`, `argmax(log_prob(features), -1)`."""
    return jnp.argmax(self.log_prob(features), axis=-1).astype(jnp.int32)

  def eval_stats(self, features: jnp.ndarray, labels: jnp.ndarray, *, temperatures=(1.0,),
                 log_prior=None, chunk_size: Optional[int] = None) -> Dict[str, jnp.ndarray]:
    """Per-example statistics of `log_prob` for `features: [..., d]`, `labels: [...] int`.

    Keys 'prediction', 'label_rank' `[...]` int32, 'label_log_prob', 'confidence' `[..., G]`
    float32 for the G `temperatures`, and 'adjusted_*' with `log_prior: [K]` (see
    `softmax_jax/heads/_eval.py`). With `fused=True` the logits are formed `chunk_size` classes
    at a time (None: the head's `chunk_size`, else 2048), so memory does not grow with K.
    """
    opts = dict(temperatures=temperatures, log_prior=log_prior)
    if not self.fused:
      return _eval.from_log_prob(self, features, labels, chunk_size=chunk_size, **opts)
    self._config()
    features, labels = _checks.features_and_labels(type(self).__name__, features, labels,
                                                   num_classes=self.num_classes)
    kernel, bias = self._weights(features.shape[-1])
    x = features.astype(self.dtype or features.dtype)
    return _eval.linear_eval_stats(x, kernel, bias, labels, class_axis=1, num_classes=self.num_classes,
                                   chunk_size=chunk_size or self.chunk_size, **opts)
