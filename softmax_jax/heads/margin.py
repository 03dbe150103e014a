"""MarginSoftmax: a cosine head with an angular margin on the label column in training.

Logits are `s * cos(theta_c)` between unit features and unit class weights (NormFace). In
training the label column gets the margin of `kind` (`ops.arcface_logits`, `cosface_logits`,
`sphereface_logits`, `combined_margin_logits`); in evaluation there is no margin, so
`log_prob = log_softmax(s * cos)` is exact and normalized and the evaluation loss is
`-log_prob[label]`. With `num_subcenters = k > 1` each class has k weight vectors and its cosine is
the largest of them (sub-center ArcFace). `embed(features)` gives the unit features the head scores,
for retrieval and verification by cosine.

NaN: as every head (see dense.py), a NaN feature gives its example NaN cosines, so NaN losses
(with and without margin), a NaN `log_prob` row and a NaN `embed` row; SphereFace's default scale,
the feature norm, is NaN there too and is not mistaken for a bad `scale`.

Checks: the ranks, shapes and dtypes of `features` and `labels` as every head (chex, eagerly and
under `jit`, see dense.py); `num_classes`, `kind`, `scale` (finite, > 0), the margins and
`num_subcenters` on every call (Python values, so under `jit` too); labels in [0, K) only when
concrete (traced out-of-range ones give a NaN loss).
"""

import math
from typing import Any, ClassVar, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp

from softmax_jax import ops
from softmax_jax.heads import _checks
from softmax_jax.heads import _eval

# kind -> (default scale, default margin). SphereFace's scale None means the feature norm ||x||,
# as in the paper (its weights are unit vectors, its features are not).
KINDS = {
    'arcface': (64.0, 0.5),    # Deng et al. 2019
    'cosface': (64.0, 0.35),   # Wang et al. 2018
    'sphereface': (None, 4),   # Liu et al. 2017
    'combined': (64.0, None),  # insightface; margins (m1, m2, m3)
    'normface': (16.0, None),  # no margin: the cosine softmax itself (Wang et al. 2017)
}


def cosines_in(features: jnp.ndarray, kernel: jnp.ndarray, dtype: Any) -> jnp.ndarray:
  """`ops.cosine_logits(features, kernel)` `[..., C]` float32 with the matmul in `dtype`.

  The unit vectors are formed in float32 (`ops.l2_normalize`), then cast to `dtype` (e.g.
  bfloat16) for the product, which accumulates in float32; with sub-centers (`kernel: [d, C, k]`)
  a class's cosine is the largest of its k. `dtype` None: `ops.cosine_logits` itself.
  """
  if dtype is None:
    return ops.cosine_logits(features, kernel)
  x = ops.l2_normalize(features.astype(jnp.float32)).astype(dtype)
  w = ops.l2_normalize(kernel.astype(jnp.float32), axis=0).astype(dtype)
  cos = jnp.tensordot(x, w, axes=1, preferred_element_type=jnp.float32)
  return jnp.max(cos, axis=-1) if kernel.ndim == 3 else cos


class MarginSoftmax(nn.Module):
  """Cosine softmax head with an ArcFace / CosFace / SphereFace / combined margin.

  Attributes:
    num_classes: C >= 2, the number of classes.
    kind: 'arcface' | 'cosface' | 'sphereface' | 'combined' | 'normface' (no margin).
    scale: s, finite and > 0 (None: 64 for arcface, cosface and combined, 16 for normface, and the feature
      norm ||x|| for sphereface, as in the paper).
    margin: m of arcface (radians, default 0.5), cosface (default 0.35) or sphereface (integer,
      default 4); unused by combined and normface.
    m1, m2, m3: the combined margin `cos(m1 theta + m2) - m3` (default (1.0, 0.3, 0.2), insightface's).
    easy_margin: ArcFace's variant that leaves `cos <= 0` untouched.
    num_subcenters: k weight vectors per class; a class's cosine is their maximum.
    lambda_base, lambda_gamma, lambda_power, lambda_min: SphereFace's annealing
      `lambda = max(lambda_min, base (1 + gamma step)^-power)` (`ops.sphereface_lambda`); without a
      step, `lambda_min`.
    dtype: computation dtype of the cosine matmul, None or floating, e.g. 'bfloat16' (None:
      `ops.cosine_logits` in the features' precision). The unit vectors are formed in float32
      and the cosines, margins, losses and log-probabilities are float32 (`cosines_in`).
  """
  num_classes: int
  kind: str = 'arcface'
  scale: Optional[float] = None
  margin: Optional[float] = None
  m1: float = 1.0
  m2: float = 0.3
  m3: float = 0.2
  easy_margin: bool = False
  num_subcenters: int = 1
  lambda_base: float = 1000.0
  lambda_gamma: float = 0.12
  lambda_power: float = 1.0
  lambda_min: float = 5.0
  dtype: Any = None

  uses_step: ClassVar[bool] = True  # `Classifier` passes the training step (SphereFace's lambda).

  def _check(self):
    name = 'MarginSoftmax'
    _checks.num_classes(name, self.num_classes)
    _checks.compute_dtype(name, self.dtype)
    if self.kind not in KINDS:
      raise ValueError(f'MarginSoftmax: kind={self.kind!r} is unknown; choose one of {sorted(KINDS)}.')
    if self.scale is not None:
      _checks.positive(name, 'scale', self.scale, 's of s * cos; or None for the default')
    if not isinstance(self.num_subcenters, int) or self.num_subcenters < 1:
      raise ValueError(f'MarginSoftmax: num_subcenters must be an integer >= 1; got {self.num_subcenters!r}.')
    m = self._margin()
    if self.kind == 'arcface':
      _checks.in_range(name, 'margin', m, 0.0, math.pi / 2, 'ArcFace additive angular margin, radians')
    elif self.kind == 'cosface':
      _checks.in_range(name, 'margin', m, 0.0, 2.0, 'CosFace additive cosine margin')
    elif self.kind == 'sphereface':
      _checks.integer_at_least(name, 'margin', m, 1, 'SphereFace psi uses cos(m theta)')
      for field in ('lambda_base', 'lambda_gamma', 'lambda_power', 'lambda_min'):
        _checks.in_range(name, field, getattr(self, field), 0.0, math.inf,
                         "SphereFace's annealing max(lambda_min, base (1 + gamma step)^-power)")
    elif self.kind == 'combined':
      _checks.in_range(name, 'm1', self.m1, 1.0, math.inf, 'multiplicative angular margin')
      _checks.in_range(name, 'm2', self.m2, 0.0, math.pi / 2, 'additive angular margin, radians')
      _checks.in_range(name, 'm3', self.m3, 0.0, 2.0, 'additive cosine margin')

  @nn.compact
  def cosines(self, features: jnp.ndarray) -> jnp.ndarray:
    """Cosines `[..., C]` float32 of `features: [..., d]` with the (closest sub-center) class weights."""
    self._check()
    features, _ = _checks.features_and_labels('MarginSoftmax', features)
    shape = (features.shape[-1], self.num_classes)
    if self.num_subcenters > 1:
      shape += (self.num_subcenters,)
    kernel = self.param('kernel', nn.initializers.lecun_normal(in_axis=0, out_axis=1), shape,
                        jnp.float32)
    return cosines_in(features, kernel, self.dtype)

  def _scale(self, features):
    default_scale, _ = KINDS[self.kind]
    scale = self.scale if self.scale is not None else default_scale
    if scale is None:  # SphereFace: the feature norm.
      f = features.astype(jnp.float32)
      return jnp.sqrt(jnp.maximum(jnp.sum(f * f, axis=-1), 1e-12))
    return scale

  def _margin(self):
    return self.margin if self.margin is not None else KINDS[self.kind][1]

  def logits(self, features: jnp.ndarray) -> jnp.ndarray:
    """Evaluation logits `s * cos` `[..., C]` float32 (no margin)."""
    features, _ = _checks.features_and_labels('MarginSoftmax', features)
    cos = self.cosines(features)
    scale = jnp.asarray(self._scale(features), cos.dtype)
    return (scale[..., None] if scale.ndim else scale) * cos

  def __call__(self, features: jnp.ndarray, labels: jnp.ndarray, *, train: bool = False,
               step: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Per-example loss `[...]`: cross-entropy of the margin logits (train) or of `logits` (eval)."""
    self._check()
    features, labels = _checks.features_and_labels('MarginSoftmax', features, labels,
                                                   num_classes=self.num_classes)
    if not train or self.kind == 'normface':
      return ops.cross_entropy(self.logits(features), labels)
    cos, scale = self.cosines(features), self._scale(features)
    if self.kind == 'arcface':
      z = ops.arcface_logits(cos, labels, scale=scale, margin=self._margin(), easy_margin=self.easy_margin)
    elif self.kind == 'cosface':
      z = ops.cosface_logits(cos, labels, scale=scale, margin=self._margin())
    elif self.kind == 'combined':
      z = ops.combined_margin_logits(cos, labels, scale=scale, m1=self.m1, m2=self.m2, m3=self.m3)
    else:
      lam = self.lambda_min if step is None else ops.sphereface_lambda(
          step, base=self.lambda_base, gamma=self.lambda_gamma, power=self.lambda_power,
          lambda_min=self.lambda_min)
      z = ops.sphereface_logits(cos, labels, scale=scale, margin=self._margin(), lambda_=lam)
    return ops.cross_entropy(z, labels)

  def log_prob(self, features: jnp.ndarray) -> jnp.ndarray:
    """Exact normalized log-probabilities `[..., C]` of the scaled cosines, without margin."""
    return ops.log_softmax(self.logits(features))

  def predict(self, features: jnp.ndarray) -> jnp.ndarray:
    """Most probable class `[...] int32`: the class with the largest cosine."""
    return jnp.argmax(self.log_prob(features), axis=-1).astype(jnp.int32)

  def eval_stats(self, features: jnp.ndarray, labels: jnp.ndarray, *, temperatures=(1.0,),
                 log_prior=None, chunk_size: Optional[int] = None) -> Dict[str, jnp.ndarray]:
    """Per-example statistics of `log_prob` (keys as `DenseSoftmax.eval_stats`), from its rows."""
    return _eval.from_log_prob(self, features, labels, temperatures=temperatures,
                               log_prior=log_prior, chunk_size=chunk_size)

  def embed(self, features: jnp.ndarray) -> jnp.ndarray:
    """Unit-norm embeddings `[..., d]` float32 (compare by cosine for retrieval/verification)."""
    features, _ = _checks.features_and_labels('MarginSoftmax', features)
    return ops.l2_normalize(features)
