"""ImbalancedSoftmax: a softmax head trained with a loss for long-tailed data.

The training loss is one of the `ops` imbalance losses, all of which need the training class counts
(`build_classifier` passes `class_counts` from the dataset):

  'ce'              cross-entropy (the baseline; with `drw_start_step` it becomes CE-DRW)
  'cb'              class-balanced cross-entropy, weights `(1 - beta) / (1 - beta^n_c)` (Cui 2019)
  'focal'           softmax focal loss with `gamma` (Lin 2017)
  'cb_focal'        focal loss weighted by the class-balanced weights (Cui 2019)
  'ldam'            LDAM on cosine logits, `scale` and `max_margin` (Cao 2019); with
                    `drw_start_step` it is LDAM-DRW
  'logit_adjusted'  CE of `z + tau log prior` (Menon 2021)

Evaluation is the exact `log_softmax` of the logits (`s * cos` for 'ldam'), so `log_prob`,
`predict` and the evaluation loss keep the head contract; post-hoc logit adjustment is an
evaluation-time view (`ops.posthoc_logit_adjustment`) that the training loop reports separately.
Per-example losses carry their class weight `w_y`; the batch mean is `sum_i w_i l_i / B`
(PyTorch's weighted `mean` divides by `sum_i w_i` instead; with Adam the difference is a scale).

NaN: as every head (see dense.py); with 'ldam' a NaN feature gives NaN cosines, so NaN losses
(training and evaluation) and a NaN `log_prob` row, never the zero row of a zero feature.

Checks: the ranks, shapes and dtypes of `features` and `labels` as every head (chex, eagerly and
under `jit`, see dense.py); `num_classes`, `loss`, `class_counts` and every option the chosen loss
uses (`beta`, `gamma`, `tau`, `max_margin`, `scale`, `drw_start_step`) on every call, in
evaluation as in training (Python values, so under `jit` too); labels in [0, K) only when concrete
(traced out-of-range ones give a NaN loss).
"""

import math
from typing import Any, ClassVar, Dict, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from softmax_jax import ops
from softmax_jax.heads import _checks
from softmax_jax.heads import _eval
from softmax_jax.heads.margin import cosines_in

LOSSES = ('ce', 'cb', 'focal', 'cb_focal', 'ldam', 'logit_adjusted')


class ImbalancedSoftmax(nn.Module):
  """Softmax head with a long-tail loss (see the module docstring for `loss`).

  Attributes:
    num_classes: C >= 2.
    loss: one of `LOSSES`.
    class_counts: training examples per class, `[C]` ints (None: all equal, i.e. balanced).
    gamma: focal exponent (focal, cb_focal).
    beta: class-balanced weights' beta in [0, 1) (cb, cb_focal, and DRW).
    tau: logit-adjustment strength (logit_adjusted).
    max_margin: LDAM's largest margin (rarest class).
    scale: LDAM's scale of the cosine logits.
    drw_start_step: >= 0: deferred re-weighting, class-balanced weights from this step on
      (ce, ldam); -1: none.
    use_bias: a learned bias on the dense logits (not used by the cosine logits of 'ldam').
    dtype: computation dtype of the matmul, None or floating, e.g. 'bfloat16' (None: the
      features'); parameters stay float32, the logits, losses and log-probabilities are float32.
  """
  num_classes: int
  loss: str = 'ce'
  class_counts: Optional[Tuple[int, ...]] = None
  gamma: float = 1.0
  beta: float = 0.9999
  tau: float = 1.0
  max_margin: float = 0.5
  scale: float = 30.0
  drw_start_step: int = -1
  use_bias: bool = True
  dtype: Any = None

  uses_step: ClassVar[bool] = True

  def _counts(self) -> np.ndarray:
    """Validates every attribute the chosen `loss` uses (on every call, training or evaluation);
    returns the class counts `[C]` (ones when None)."""
    name = 'ImbalancedSoftmax'
    _checks.num_classes(name, self.num_classes)
    _checks.compute_dtype(name, self.dtype)
    if self.loss not in LOSSES:
      raise ValueError(f'ImbalancedSoftmax: loss={self.loss!r} is unknown; choose one of {LOSSES}.')
    drw = _checks.integer_at_least(name, 'drw_start_step', self.drw_start_step, -1,
                                   'the first re-weighted step, or -1 for none') >= 0
    drw = drw and self.loss in ('ce', 'ldam')  # DRW re-weights these two losses only
    uses_counts = drw or self.loss in ('cb', 'cb_focal', 'ldam', 'logit_adjusted')
    if drw or self.loss in ('cb', 'cb_focal'):
      _checks.in_range(name, 'beta', self.beta, 0.0, 1.0,
                       'class-balanced weights (1 - beta) / (1 - beta^n)')
    if self.loss in ('focal', 'cb_focal'):
      _checks.in_range(name, 'gamma', self.gamma, 0.0, math.inf, 'focal exponent')
    if self.loss == 'logit_adjusted':
      _checks.in_range(name, 'tau', self.tau, 0.0, math.inf, 'logit-adjustment strength')
    if self.loss == 'ldam':
      _checks.positive(name, 'max_margin', self.max_margin, "LDAM's largest margin")
      _checks.positive(name, 'scale', self.scale, "LDAM's scale of the cosine logits")
    if self.class_counts is None:
      return np.ones(self.num_classes, np.int64)
    counts = np.asarray(self.class_counts)
    if counts.shape != (self.num_classes,):
      raise ValueError(f'ImbalancedSoftmax: class_counts must have num_classes = {self.num_classes} '
                       f'entries; got shape {counts.shape}.')
    if not (np.issubdtype(counts.dtype, np.number) and np.all(np.isfinite(counts) & (counts >= 0))):
      raise ValueError(f'ImbalancedSoftmax: `class_counts` must be finite and >= 0; got {counts}.')
    if uses_counts and not np.all(counts > 0):
      raise ValueError(f"ImbalancedSoftmax: loss={self.loss!r}"
                       f"{' with drw_start_step' if drw else ''} needs `class_counts` > 0 for every "
                       f'class; got a count of 0 for class {int(np.argmin(counts))}.')
    return counts

  @nn.compact
  def logits(self, features: jnp.ndarray) -> jnp.ndarray:
    """Logits `[..., C]` float32: `features @ kernel + bias`, or `scale * cos` for 'ldam'."""
    self._counts()
    features, _ = _checks.features_and_labels('ImbalancedSoftmax', features)
    d = features.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (d, self.num_classes),
                        jnp.float32)
    if self.loss == 'ldam':
      return cosines_in(features, kernel, self.dtype)  # the cosines; the scale is applied below
    dtype = self.dtype or features.dtype
    z = jnp.matmul(features.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
    if self.use_bias:
      z = z + self.param('bias', nn.initializers.zeros, (self.num_classes,), jnp.float32)
    return z

  def _eval_logits(self, features):
    z = self.logits(features)
    return self.scale * z if self.loss == 'ldam' else z

  def __call__(self, features: jnp.ndarray, labels: jnp.ndarray, *, train: bool = False,
               step: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Per-example loss `[...]`: the training loss, or `-log_prob[label]` in evaluation."""
    self._counts()
    features, labels = _checks.features_and_labels('ImbalancedSoftmax', features, labels,
                                                   num_classes=self.num_classes)
    if not train:
      return ops.cross_entropy(self._eval_logits(features), labels)
    counts, z = self._counts(), self.logits(features)
    if self.drw_start_step >= 0 and self.loss in ('ce', 'ldam'):
      weights = ops.drw_class_weights(0 if step is None else step, class_counts=counts,
                                      start_step=self.drw_start_step, beta=self.beta)
    elif self.loss in ('cb', 'cb_focal'):
      weights = ops.class_balanced_weights(counts, self.beta)
    else:
      weights = None
    if self.loss in ('ce', 'cb'):
      return ops.cross_entropy(z, labels, class_weights=weights)
    if self.loss in ('focal', 'cb_focal'):
      return ops.focal_loss(z, labels, gamma=self.gamma, alpha=weights)
    if self.loss == 'ldam':
      return ops.ldam_loss(z, labels, class_counts=counts, max_margin=self.max_margin,
                           scale=self.scale, class_weights=weights)
    return ops.logit_adjusted_cross_entropy(z, labels, log_prior=ops.log_prior(counts), tau=self.tau)

  def log_prob(self, features: jnp.ndarray) -> jnp.ndarray:
    """Exact normalized log-probabilities `[..., C]` of the evaluation logits."""
    return ops.log_softmax(self._eval_logits(features))

  def predict(self, features: jnp.ndarray) -> jnp.ndarray:
    """`argmax(log_prob(features), -1)` `[...] int32`."""
    return jnp.argmax(self.log_prob(features), axis=-1).astype(jnp.int32)

  def eval_stats(self, features: jnp.ndarray, labels: jnp.ndarray, *, temperatures=(1.0,),
                 log_prior=None, chunk_size: Optional[int] = None) -> Dict[str, jnp.ndarray]:
    """Per-example statistics of `log_prob` (keys as `DenseSoftmax.eval_stats`), from its rows."""
    return _eval.from_log_prob(self, features, labels, temperatures=temperatures,
                               log_prior=log_prior, chunk_size=chunk_size)
