"""Angular-margin logits: SphereFace, CosFace, ArcFace, combined, sub-center (cosine_logits).

A margin op takes cosine similarities `cos: [..., C]` between unit features and unit class
weights, integer `labels: [...]`, and returns logits `[..., C]` (float32; float64 stays float64)
in which only the label column changes: `s * target(theta_y)` replaces `s * cos(theta_y)`. The
loss is then `ops.cross_entropy(logits, labels)`.

Numerics: all maths runs in float32 (bfloat16 inputs are upcast). The angle is
`theta = atan2(sqrt(max(1 - cos^2, tiny)), cos)` and the sine is that same square root, so forward
values are exact to float32 rounding except at `cos = +-1` exactly, where the sine is 1e-6 instead
of 0 (an absolute change below `s * 1e-6` of the target logit). Every gradient is finite: strictly
inside (-1, 1) float32 `1 - cos^2 >= 1.19e-7`, so the derivative is the exact one (at most about
`2900 s sin(m)` for ArcFace, where the true one diverges as cos -> 1); at exactly +-1 the floored
sine has derivative 0, so ArcFace's derivative there is `s cos(m)` and the combined margin's about
0. Nothing is clipped, so gradients are never silently zeroed or halved inside (-1, 1).
A NaN cosine (or feature, in `cosine_logits`) makes its example's logits NaN: the NaN rule of
the package docstring.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.ops import _checks

_TINY = 1e-12  # floor of 1 - cos^2; float32 1 - cos^2 is 0 or >= 1.19e-7, so only +-1 is touched.


def _float(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _scale_shape(scale, lead):
  if np.ndim(scale):
    chex.assert_shape(scale, lead)


def _check_scale(scale, lead):
  """`scale` is a scalar or `lead`-shaped (always); a concrete one is finite and > 0.

  A per-example scale is data (SphereFace's feature norm): a NaN entry is the NaN of its
  example's feature and passes, making that example's logits NaN (the package's NaN rule).
  """
  _checks.chex_check(_scale_shape, scale, tuple(lead), name='scale',
                     need=f'be a scalar or one value per example, shape {tuple(lead)}',
                     got=f'shape {np.shape(scale)}')
  if not _is_concrete(scale):
    return
  a = np.asarray(scale, np.float64)
  ok = (a > 0) & (a < np.inf)
  if a.ndim:
    ok |= np.isnan(a)  # Per-example data: the NaN propagates.
  if not np.all(ok):
    got = a[~ok][0] if a.ndim else a
    raise _checks.ArgumentError(f'`scale` must be finite and > 0; got {got}'
                                f'{f" ({np.sum(~ok)} bad entries)" if a.ndim else ""}.')


def _check_range(name, value, lo, hi, why, hi_open=True):
  """`value` is a scalar (always) in [lo, hi) (or [lo, hi]) when concrete; traced ones pass."""
  _checks.rank(value, 0, name, '[]')
  if not _is_concrete(value):
    return
  v = float(value)
  if not (lo <= v and (v < hi if hi_open else v <= hi)):
    raise ValueError(f'`{name}` must be in [{lo}, {hi}{")" if hi_open else "]"} ({why}); '
                     f'got {value}.')


def _prepare(cos, labels):
  """Checks `cos` ([..., C], C >= 1) and `labels` ([...] int in [0, C)); float32 cos, one-hot."""
  cos = _float(cos)
  _checks.last_dim_at_least(cos, 1, 'cos', '[..., num_classes]')
  labels = _checks.labels(labels, cos.shape[-1], cos.shape[:-1], 'cos')
  onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.bool_)
  return cos, onehot


def _sin_and_angle(c):
  """`(sin(theta), theta)` of `c = cos(theta)`, finite gradients everywhere (see module docstring)."""
  s = jnp.sqrt(jnp.maximum(1 - c * c, _TINY))
  return s, jnp.arctan2(s, c)


def _scaled(scale, x):
  """`scale * x` for a scalar or `x.shape[:-1]` scale (checked by `_check_scale`)."""
  scale = jnp.asarray(scale, x.dtype)
  return (scale[..., None] if scale.ndim else scale) * x


def l2_normalize(x, axis=-1):
  """`x / ||x||` along `axis` in float32; an all-zero vector stays zero, with zero gradient.

  A vector with a NaN entry becomes all NaN (never zeros), so margin logits of a NaN feature and
  their loss are NaN.

  Args:
    x: [..., d] float (or any array with the axis `axis`).
    axis: the axis normalized, an int in [-x.ndim, x.ndim).

  Returns:
    `x` normalized along `axis`, float32 (float64 stays float64).

  Raises:
    ValueError: always (from the shape, so also under `jit`/`vmap`/`grad`) if `x` is a scalar
      or has no axis `axis`. Nothing depends on the values.

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> u = ops.l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    >>> [round(float(v), 4) for v in u[0]], u[1].tolist()
    ([0.6, 0.8], [0.0, 0.0])
  """
  x = _float(x)
  _checks.rank_at_least(x, 1, 'x', '[..., d]')
  if not isinstance(axis, (int, np.integer)) or not -x.ndim <= axis < x.ndim:
    raise _checks.ArgumentError(f'`axis` must be an int in [-{x.ndim}, {x.ndim}) for `x` of shape '
                                f'{x.shape}; got {axis!r}.')
  n2 = jnp.sum(x * x, axis=axis, keepdims=True)
  nonzero = n2 != 0  # A NaN norm is not zero: the vector becomes NaN (the package's NaN rule).
  return jnp.where(nonzero, x * jax.lax.rsqrt(jnp.where(nonzero, n2, 1)), 0)


def cosine_logits(features, weights, *, scale=1.0):
  """Cosine similarity of L2-normalized features and class weights (NormFace; sub-center ArcFace).

  `cos_c = <x / |x|, w_c / |w_c|>`; with sub-centers `weights: [d, C, k]`,
  `cos_c = max_j <x / |x|, w_cj / |w_cj|>` (Deng et al., "Sub-center ArcFace", ECCV 2020).
  Reference: Wang et al., "NormFace", 2017.

  Args:
    features: [..., d] float.
    weights: [d, C] float, or [d, C, k] for k sub-centers per class.
    scale: s > 0 multiplying the cosines (1: the cosines themselves).

  Returns:
    [..., C] float32 `s * cos`.

  Raises:
    ValueError: always (from shapes, so also under `jit`/`vmap`/`grad`) if `features` is not
      `[..., d]`, `weights` is not `[d, C]` or `[d, C, k]` with the same d, or `scale` is
      neither a scalar nor `features.shape[:-1]`; for a concrete `scale` only, if it is not
      finite and > 0.

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> x = np.array([[3.0, 4.0]])
    >>> w = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    >>> [round(float(c), 4) for c in ops.cosine_logits(x, w)[0]]
    [0.6, 0.8, -0.6]
    >>> [round(float(c), 4) for c in ops.cosine_logits(x, w, scale=10.0)[0]]
    [6.0, 8.0, -6.0]
  """
  features, weights = jnp.asarray(features), jnp.asarray(weights)
  _checks.rank_at_least(features, 1, 'features', '[..., d]')
  d = features.shape[-1]
  need = f'be [d, C] or [d, C, k] with d = features.shape[-1] = {d}'
  _checks.chex_check(chex.assert_rank, weights, {2, 3}, name='weights', need=need,
                     got=f'shape {weights.shape}')
  _checks.chex_check(chex.assert_axis_dimension, weights, 0, d, name='weights', need=need,
                     got=f'shape {weights.shape}')
  _check_scale(scale, features.shape[:-1])
  cos = jnp.tensordot(l2_normalize(features), l2_normalize(weights, axis=0), axes=1)
  if weights.ndim == 3:
    cos = jnp.max(cos, axis=-1)
  return cos if isinstance(scale, (int, float)) and scale == 1 else _scaled(scale, cos)


def cosface_logits(cos, labels, *, scale=64.0, margin=0.35):
  """CosFace / AM-Softmax: `s * (cos - m)` on the label column, `s * cos` elsewhere.

  Reference: Wang et al., "CosFace: Large margin cosine loss", CVPR 2018 (s=64, m=0.35).

  Args:
    cos: [..., C] cosine similarities.
    labels: [...] int in [0, C).
    scale: s > 0 and finite, a float or [...] array (NaN entries give NaN rows).
    margin: m in [0, 2); at m >= 2 the target logit is below every other for any angle.

  Returns:
    [..., C] float32 logits.

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `cos` is
      not `[..., C]` with C >= 1, `labels` is not an integer array of shape `cos.shape[:-1]`,
      `scale` is neither a scalar nor `cos.shape[:-1]`, or `margin` is not a scalar; for concrete
      values only, if a label is outside [0, C), `scale` is not finite and > 0 or `margin` is
      outside [0, 2).
      Traced values are not checked: a traced out-of-range label leaves its row without a margin
      (and its cross-entropy is NaN).

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> cos = np.array([[0.6, 0.8]])
    >>> out = ops.cosface_logits(cos, np.array([1]), scale=10.0, margin=0.35)
    >>> [round(float(v), 4) for v in out[0]]
    [6.0, 4.5]
  """
  cos, onehot = _prepare(cos, labels)
  _check_scale(scale, cos.shape[:-1])
  _check_range('margin', margin, 0.0, 2.0, 'CosFace additive cosine margin')
  return _scaled(scale, cos - jnp.where(onehot, jnp.asarray(margin, cos.dtype), 0))


def arcface_logits(cos, labels, *, scale=64.0, margin=0.5, easy_margin=False):
  """ArcFace: `s * cos(theta + m)` on the label column, `s * cos(theta)` elsewhere.

  Where `theta + m > pi` the target would rise again; as in insightface, it becomes
  `cos(theta) - m sin(m)` there, so the target is non-increasing in theta on [0, pi] and never
  above `cos(theta)`. `easy_margin` instead keeps `cos(theta)` wherever `cos(theta) <= 0`.
  Reference: Deng et al., "ArcFace: Additive angular margin loss", CVPR 2019 (s=64, m=0.5).

  Args:
    cos: [..., C] cosine similarities.
    labels: [...] int in [0, C).
    scale: s > 0 and finite, a float or [...] array (NaN entries give NaN rows).
    margin: m in [0, pi/2).
    easy_margin: apply the margin only where `cos > 0`.

  Returns:
    [..., C] float32 logits.

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `cos` is
      not `[..., C]` with C >= 1, `labels` is not an integer array of shape `cos.shape[:-1]`,
      `scale` is neither a scalar nor `cos.shape[:-1]`, or `margin` is not a scalar; for concrete
      values only, if a label is outside [0, C), `scale` is not finite and > 0 or `margin` is
      outside [0, pi/2).
      Traced values are not checked: a traced out-of-range label leaves its row without a margin
      (and its cross-entropy is NaN).

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> cos = np.array([[0.6, 0.8]])
    >>> out = ops.arcface_logits(cos, np.array([1]), scale=1.0, margin=0.5)
    >>> round(float(out[0, 0]), 4), round(float(out[0, 1]), 4)
    (0.6, 0.4144)
    >>> round(float(np.cos(np.arccos(0.8) + 0.5)), 4)
    0.4144
  """
  cos, onehot = _prepare(cos, labels)
  _check_scale(scale, cos.shape[:-1])
  _check_range('margin', margin, 0.0, math.pi / 2, 'ArcFace additive angular margin, radians')
  sin, _ = _sin_and_angle(cos)
  cos_m, sin_m = jnp.cos(margin), jnp.sin(margin)
  target = cos * cos_m - sin * sin_m  # cos(theta + m)
  if easy_margin:
    target = jnp.where(cos > 0, target, cos)
  else:
    target = jnp.where(cos > jnp.cos(jnp.pi - margin), target, cos - margin * sin_m)
  return _scaled(scale, jnp.where(onehot, target.astype(cos.dtype), cos))


def combined_margin_logits(cos, labels, *, scale=64.0, m1=1.0, m2=0.5, m3=0.0):
  """insightface's combined margin: `s * (cos(m1 * theta + m2) - m3)` on the label column.

  (m1, m2, m3) = (m, 0, 0) is a multiplicative margin (SphereFace without its piecewise psi),
  (1, m, 0) ArcFace and (1, 0, m) CosFace. Where `m1 * theta + m2 > pi` the target becomes
  `cos(theta) - m3 - c0` with `c0 = max(m2 sin(m2), 1 + cos((pi - m2) / m1))`, which is
  ArcFace's fallback when m1 = 1 and keeps the target non-increasing and `<= cos(theta)`.
  Reference: Deng et al., "ArcFace", CVPR 2019, §3 (combined margin).

  Args:
    cos: [..., C] cosine similarities.
    labels: [...] int in [0, C).
    scale: s > 0 and finite, a float or [...] array (NaN entries give NaN rows).
    m1: multiplicative angular margin, >= 1.
    m2: additive angular margin in [0, pi/2).
    m3: additive cosine margin in [0, 2).

  Returns:
    [..., C] float32 logits.

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `cos` is
      not `[..., C]` with C >= 1, `labels` is not an integer array of shape `cos.shape[:-1]`,
      `scale` is neither a scalar nor `cos.shape[:-1]`, or `m1`, `m2` or `m3` is not a scalar;
      for concrete values only, if a label is outside [0, C), `scale` is not finite and > 0, or
      `m1`, `m2` or `m3` is out of its range.
      Traced values are not checked: a traced out-of-range label leaves its row without a margin
      (and its cross-entropy is NaN).

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> cos = np.array([[0.6, 0.8]])
    >>> y = np.array([1])
    >>> both = ops.combined_margin_logits(cos, y, scale=10.0, m1=1.0, m2=0.0, m3=0.35)
    >>> bool(np.allclose(both, ops.cosface_logits(cos, y, scale=10.0, margin=0.35)))
    True
    >>> arc = ops.combined_margin_logits(cos, y, scale=10.0, m1=1.0, m2=0.5, m3=0.0)
    >>> bool(np.allclose(arc, ops.arcface_logits(cos, y, scale=10.0, margin=0.5)))
    True
  """
  cos, onehot = _prepare(cos, labels)
  _check_scale(scale, cos.shape[:-1])
  _check_range('m1', m1, 1.0, math.inf, 'multiplicative angular margin')
  _check_range('m2', m2, 0.0, math.pi / 2, 'additive angular margin, radians')
  _check_range('m3', m3, 0.0, 2.0, 'additive cosine margin')
  _, theta = _sin_and_angle(cos)
  theta_max = (jnp.pi - m2) / m1
  c0 = jnp.maximum(m2 * jnp.sin(m2), 1 + jnp.cos(theta_max))
  # theta <= theta_max, written as ArcFace's test so that m1 = 1 switches at the same float.
  target = jnp.where(cos > jnp.cos(theta_max), jnp.cos(m1 * theta + m2) - m3, cos - m3 - c0)
  return _scaled(scale, jnp.where(onehot, target.astype(cos.dtype), cos))


def sphereface_psi(cos, *, margin=4):
  """SphereFace's `psi(theta) = (-1)^k cos(m theta) - 2k` for theta in [k pi/m, (k+1) pi/m].

  Monotone decreasing from 1 at theta = 0 to 1 - 2m at theta = pi. `cos(m theta)` is the
  Chebyshev polynomial `T_m(cos)`, exact with a finite gradient everywhere; k is piecewise
  constant (no gradient).

  Args:
    cos: [...] cosines.
    margin: integer m >= 1.

  Returns:
    [...] float32 psi.

  Raises:
    ValueError: always (also under `jit`) if `margin` is not a Python integer m >= 1. Any
      shape of `cos` is accepted.

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> [round(float(v), 4) for v in ops.sphereface_psi(np.array([1.0, 0.0, -1.0]), margin=4)]
    [1.0, -3.0, -7.0]
  """
  m = _check_integer_margin(margin)
  c = _float(cos)
  _, theta = _sin_and_angle(c)
  k = jax.lax.stop_gradient(jnp.clip(jnp.floor(m * theta / jnp.pi), 0, m - 1))
  t_prev, t = jnp.ones_like(c), c  # T_0, T_1
  for _ in range(m - 1):
    t_prev, t = t, 2 * c * t - t_prev
  return jnp.where(k % 2 == 0, 1.0, -1.0).astype(c.dtype) * t - 2 * k


def _check_integer_margin(margin) -> int:
  if not isinstance(margin, (int, float, np.integer, np.floating)) or isinstance(margin, bool) \
      or float(margin) != int(margin) or int(margin) < 1:
    raise ValueError(f'`margin` of SphereFace must be an integer m >= 1 (psi uses cos(m theta)); '
                     f'got {margin!r}.')
  return int(margin)


def sphereface_lambda(step, *, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0):
  """SphereFace's annealing `lambda = max(lambda_min, base * (1 + gamma * step)^-power)`.

  Training starts close to plain softmax (large lambda) and tightens toward the full margin.
  Defaults are those of the paper's released prototxt (Liu et al. 2017, §3.4 and code).

  Args:
    step: [] int or float training step (may be traced).
    base: lambda at step 0 (before the floor).
    gamma: the decay rate of the schedule.
    power: the decay exponent.
    lambda_min: the floor of lambda.

  Returns:
    [] float32 lambda.

  Raises:
    ValueError: always (from the shape, so also under `jit`) if `step` or an option is not a
      scalar (`jax.vmap` it for several steps); for concrete options only, if `base`, `gamma`,
      `power` or `lambda_min` is negative or not finite. The value of `step` is not checked.

  Example:
    >>> from softmax_jax import ops
    >>> float(ops.sphereface_lambda(0)), float(ops.sphereface_lambda(10**6))
    (1000.0, 5.0)
  """
  _checks.rank(step, 0, 'step', '[]')
  for name, value in (('base', base), ('gamma', gamma), ('power', power),
                      ('lambda_min', lambda_min)):
    _check_range(name, value, 0.0, math.inf, 'a finite number >= 0')
  step = jnp.asarray(step, jnp.float32)
  return jnp.maximum(lambda_min, base * (1 + gamma * step) ** (-power))


def sphereface_logits(cos, labels, *, scale=1.0, margin=4, lambda_=0.0):
  """SphereFace (A-Softmax): `s * (lambda cos + psi(theta)) / (1 + lambda)` on the label column.

  The original scales by the feature norm: pass `scale=||x||` ([...] array) with
  `cos = cosine_logits(x, w)`. `lambda_ = 0` is the full margin; `sphereface_lambda(step)`
  anneals it. Reference: Liu et al., "SphereFace: Deep hypersphere embedding", CVPR 2017, eq. 7.

  Args:
    cos: [..., C] cosine similarities.
    labels: [...] int in [0, C).
    scale: s > 0 and finite, a float or [...] array (NaN entries give NaN rows).
    margin: integer m >= 1.
    lambda_: annealing weight >= 0 (float or traced scalar).

  Returns:
    [..., C] float32 logits.

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `cos` is
      not `[..., C]` with C >= 1, `labels` is not an integer array of shape `cos.shape[:-1]`,
      `scale` is neither a scalar nor `cos.shape[:-1]`, `lambda_` is not a scalar, or `margin`
      is not a Python integer >= 1; for concrete values only, if a label is outside [0, C),
      `scale` is not finite and > 0 or `lambda_` < 0.
      Traced values are not checked: a traced out-of-range label leaves its row without a margin
      (and its cross-entropy is NaN).

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> cos = np.array([[0.6, 0.8]])
    >>> out = ops.sphereface_logits(cos, np.array([1]), margin=4, lambda_=0.0)
    >>> round(float(out[0, 0]), 4)
    0.6
    >>> bool(np.isclose(out[0, 1], ops.sphereface_psi(np.array(0.8), margin=4)))
    True
  """
  cos, onehot = _prepare(cos, labels)
  _check_scale(scale, cos.shape[:-1])
  _checks.rank(lambda_, 0, 'lambda_', '[]')
  if _is_concrete(lambda_) and not float(lambda_) >= 0:
    raise ValueError(f'`lambda_` must be >= 0; got {lambda_}.')
  psi = sphereface_psi(cos, margin=margin)
  lam = jnp.asarray(lambda_, cos.dtype)
  target = (lam * cos + psi.astype(cos.dtype)) / (1 + lam)
  return _scaled(scale, jnp.where(onehot, target, cos))
