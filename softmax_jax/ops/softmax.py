"""The full-softmax family: logsumexp, (log-)softmax and cross-entropy over the last axis.

Shared numerics (house style 4): logits are computed in float32 when they are bfloat16/float16
(float64 stays float64); the row max is subtracted under `jax.lax.stop_gradient`; `where=False`
entries and `-inf` logits (the same thing) get probability exactly 0, log-probability `-inf` and
gradient exactly 0; a fully masked row has `logsumexp = -inf`, all-zero probabilities and zero
gradient. A NaN logit (one `where` keeps) makes its whole row NaN: the NaN rule and
`ignore_index` of the package docstring (`softmax_jax.ops`).
Nothing takes `log(p + eps)`.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.ops import _ce
from softmax_jax.ops import _checks
from softmax_jax.ops import _normalize as _norm


def _check_temperature(temperature, x, name):
  """`temperature` broadcasts to `x` (always); a concrete one is finite and >= 0 (> 0 per class).

  A NaN entry of an array is per-example data like a logit: it passes and makes its rows NaN.
  """
  _checks.broadcastable(temperature, jnp.shape(x), 'temperature', name)
  if np.ndim(temperature) and not _checks.is_traced(temperature):
    temperature = np.where(np.isnan(temperature), 1, temperature)
  if _per_class(temperature):
    _checks.positive('temperature', temperature)
  else:
    _checks.finite_nonnegative('temperature', temperature)


def _per_class(temperature):
  return np.ndim(temperature) > 0 and np.shape(temperature)[-1] > 1


def _scale(x, temperature):
  """`(x / T, cold)`; `cold` ([..., 1]-broadcastable bool or None) marks rows where T = 0.

  For T constant along the classes (a scalar or `[..., 1]`) a zero T is the limit T -> 0+ that
  `_norm.normalize` takes on the `cold` rows, whose `x` is left unscaled; a per-class T is divided.
  """
  if isinstance(temperature, (int, float)) and temperature == 1:
    return x, None
  t = jnp.asarray(temperature, x.dtype)
  if _per_class(temperature) or not (_checks.is_traced(temperature)
                                     or np.any(np.asarray(temperature) == 0)):
    return x / t, None
  cold = t == 0
  return x / jnp.where(cold, 1, t), cold


def _tempered(x, where, temperature):
  z, cold = _scale(x, temperature)
  return _norm.normalize(z, where, cold)


def logsumexp(x, *, where=None, temperature=1.0):
  """Log-sum-exp over the last axis, with an optional mask and temperature.

  `logsumexp(x) = m + log(sum_k [where_k] exp(x_k / T - m))`, `m = max_k x_k / T`; a fully masked
  row gives `-inf` and zero gradient. At T = 0 it is the limit of `logsumexp(x / T)`: +-inf by
  the sign of the max, `log(number of maxima)` when the max is 0. Reference: Blanchard et al.,
  "Accurately computing the log-sum-exp and softmax functions", IMA J. Numer. Anal. 2021.

  Args:
    x: [..., K] float logits; 16-bit floats are computed in float32.
    where: optional [..., K] bool (broadcastable); False entries are excluded.
    temperature: T >= 0, a scalar or array broadcastable to `x`; the logits are divided by it.
      T = 0 (a scalar or `[..., 1]`) is the limit T -> 0+: a one-hot of the argmax, ties split
      evenly. A per-class T (last axis K > 1) must be > 0. A NaN entry makes its rows NaN.

  Returns:
    [...] in the dtype of `x`.

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `x` is not
      `[..., K]` with K >= 1, `where` is not a bool mask that broadcasts to `x`, or
      `temperature` does not broadcast to `x`; and, for a concrete `temperature` only, if it is
      not finite and >= 0 (> 0 per class). A traced one is not checked: a traced per-class 0
      gives NaN, a traced negative T divides as written.

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> round(float(ops.logsumexp(jnp.array([0.0, 0.0]))), 4)
    0.6931
    >>> z = jnp.array([[1.0, 2.0, 3.0]])
    >>> bool(np.allclose(ops.log_softmax(z), z - ops.logsumexp(z)[..., None]))
    True
  """
  xc, where = _norm.prepare(x, where, 'x')
  _check_temperature(temperature, xc, 'x')
  return _tempered(xc, where, temperature)[2][..., 0].astype(_norm.out_dtype(x, xc))


def softmax(x, *, where=None, temperature=1.0):
  """Softmax over the last axis, with an optional mask and temperature.

  `softmax(x)_k = [where_k] exp(x_k / T - logsumexp(x))`; masked entries and `-inf` logits are
  exactly 0, a fully masked row is all zeros. Reference: Bridle, "Probabilistic interpretation of
  feedforward classification network outputs", 1990.

  Args:
    x: [..., K] float logits; 16-bit floats are computed in float32.
    where: optional [..., K] bool (broadcastable); False entries are excluded.
    temperature: T >= 0, a scalar or array broadcastable to `x`; the logits are divided by it.
      T = 0 (a scalar or `[..., 1]`) is the limit T -> 0+: a one-hot of the argmax, ties split
      evenly. A per-class T (last axis K > 1) must be > 0. A NaN entry makes its rows NaN.

  Returns:
    [..., K] probabilities in the dtype of `x`.

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `x` is not
      `[..., K]` with K >= 1, `where` is not a bool mask that broadcasts to `x`, or
      `temperature` does not broadcast to `x`; and, for a concrete `temperature` only, if it is
      not finite and >= 0 (> 0 per class). A traced one is not checked: a traced per-class 0
      gives NaN, a traced negative T divides as written.

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = jnp.array([[1.0, 2.0, 3.0]])
    >>> round(float(ops.softmax(z).sum()), 4)
    1.0
    >>> ops.softmax(z, where=jnp.array([True, True, False]))[0, 2].tolist()
    0.0
    >>> bool(np.allclose(ops.softmax(z, temperature=2.0), ops.softmax(z / 2.0)))
    True
  """
  xc, where = _norm.prepare(x, where, 'x')
  _check_temperature(temperature, xc, 'x')
  return _tempered(xc, where, temperature)[0].astype(_norm.out_dtype(x, xc))


def log_softmax(x, *, where=None, temperature=1.0):
  """Log-softmax over the last axis, with an optional mask and temperature.

  `log_softmax(x)_k = x_k / T - logsumexp(x)`, and `-inf` where `where` is False (a fully masked
  row is all `-inf`, never NaN). Reference: Blanchard et al., IMA J. Numer. Anal. 2021.

  Args:
    x: [..., K] float logits; 16-bit floats are computed in float32.
    where: optional [..., K] bool (broadcastable); False entries are excluded.
    temperature: T >= 0, a scalar or array broadcastable to `x`; the logits are divided by it.
      T = 0 (a scalar or `[..., 1]`) is the limit T -> 0+: a one-hot of the argmax, ties split
      evenly. A per-class T (last axis K > 1) must be > 0. A NaN entry makes its rows NaN.

  Returns:
    [..., K] log-probabilities in the dtype of `x`.

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `x` is not
      `[..., K]` with K >= 1, `where` is not a bool mask that broadcasts to `x`, or
      `temperature` does not broadcast to `x`; and, for a concrete `temperature` only, if it is
      not finite and >= 0 (> 0 per class). A traced one is not checked: a traced per-class 0
      gives NaN, a traced negative T divides as written.

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = jnp.array([[1.0, 2.0, 3.0]])
    >>> bool(np.allclose(ops.log_softmax(z), jnp.log(ops.softmax(z))))
    True
    >>> round(float(ops.log_softmax(z)[0, 2]), 4)
    -0.4076
  """
  xc, where = _norm.prepare(x, where, 'x')
  _check_temperature(temperature, xc, 'x')
  return _tempered(xc, where, temperature)[1].astype(_norm.out_dtype(x, xc))


def cross_entropy(logits, labels, *, where=None, label_smoothing=0.0, class_weights=None,
                  ignore_index=None):
  """Per-example softmax cross-entropy with integer labels.

  `loss = w[y] * -sum_k t_k log_softmax(logits)_k`, `t = (1 - eps) onehot(y) + eps / K_valid` on
  the K_valid classes that `where` keeps and whose logit is not `-inf` (without a mask and
  without `-inf` logits this is `optax.smooth_labels` + `optax.softmax_cross_entropy`).
  `class_weights` multiplies the whole per-example loss by `w[y]` (PyTorch's `weight=` without
  smoothing; dividing by `sum w[y]` is the caller's). A label on a masked class gives `+inf`.
  An example whose label is `ignore_index` gets loss 0 and gradient 0 (PyTorch's
  `ignore_index`; its logits are not read, see the package docstring). Concrete out-of-range
  labels raise; traced ones (under jit/vmap) give a NaN loss, never a clipped index.
  The derivative is written by hand (a `jax.custom_jvp` over the row statistics, ops/_ce.py):
  `value_and_grad` keeps no `[..., K]` buffer beside the logits and the gradient, like optax's
  `softmax_cross_entropy_with_integer_labels`; forward mode and higher orders work.
  Reference: Szegedy et al., "Rethinking the Inception architecture", 2016 (§7).

  Args:
    logits: [..., K] float; 16-bit floats are computed in float32.
    labels: [...] int in [0, K), or `ignore_index`.
    where: optional [..., K] bool (broadcastable); False classes are excluded.
    label_smoothing: eps in [0, 1).
    class_weights: optional [K] float, finite and >= 0.
    ignore_index: None or an int; examples with this label are ignored (loss exactly 0).

  Returns:
    [...] float32 per-example loss (float64 for float64 logits).

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `logits`
      is not `[..., K]` with K >= 1, `labels` is not an integer array of shape
      `logits.shape[:-1]`, `where` is not a bool mask that broadcasts to `logits`,
      `label_smoothing` is not a scalar, `class_weights` is not `[K]` or `ignore_index` is not
      None or a Python int; for concrete values only, if a label (other than `ignore_index`) is
      outside [0, K), `label_smoothing` outside [0, 1) or a class weight is not finite and
      >= 0. Traced values are not checked: an out-of-range label gives a NaN loss, a NaN class
      weight a NaN loss for the examples of that class, a negative one a negative loss.

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = jnp.array([[1.0, 2.0, 3.0], [2.0, 0.0, 0.0]])
    >>> labels = jnp.array([2, 0])
    >>> loss = ops.cross_entropy(z, labels)
    >>> bool(np.allclose(loss, -ops.log_softmax(z)[np.arange(2), labels]))
    True
    >>> [round(float(l), 4) for l in loss]
    [0.4076, 0.2395]
    >>> ops.cross_entropy(z, jnp.array([2, -1]), ignore_index=-1)[1].tolist()
    0.0
  """
  x, where = _norm.prepare(logits, where, 'logits')
  num_classes = x.shape[-1]
  labels, ignored = _checks.labels_or_ignored(labels, num_classes, x.shape[:-1], ignore_index)
  _checks.rank(label_smoothing, 0, 'label_smoothing', '[]')
  if not _checks.is_traced(label_smoothing) and not 0 <= label_smoothing < 1:
    raise _checks.ArgumentError(f'`label_smoothing` must be in [0, 1); got {label_smoothing}.')
  if class_weights is not None:
    class_weights = jnp.asarray(class_weights)
    _checks.shape(class_weights, (num_classes,), 'class_weights', '[num_classes]')
    _checks.finite_nonnegative('class_weights', class_weights)
  smoothing = not (isinstance(label_smoothing, (int, float)) and label_smoothing == 0)
  # Ignored rows are not read: their statistics are discarded below and their tangent is 0.
  stats = _ce.row_stats(x, where, None if ignored is None else ~ignored, smoothing)
  log_s, m = stats[0], stats[1]
  in_range = (labels >= 0) & (labels < num_classes)
  safe = jnp.where(in_range, labels, 0)[..., None]
  x_y = jnp.take_along_axis(x, safe, axis=-1)[..., 0]
  kept = x_y != -jnp.inf  # A label on a -inf or masked class: +inf loss, zero gradient.
  if where is not None:
    kept = kept & jnp.take_along_axis(jnp.broadcast_to(where, x.shape), safe, axis=-1)[..., 0]
  # -log_softmax(x)_y; ignored rows are 0 before any option multiplies them (no 0 * inf in a
  # derivative w.r.t. label_smoothing or class_weights).
  loss = _norm.ignore(ignored, log_s - (jnp.where(kept, x_y, -jnp.inf) - m))
  if smoothing:
    mean_nll = _norm.ignore(ignored, log_s - (stats[2] / jnp.maximum(stats[3], 1) - m))
    loss = (1 - label_smoothing) * loss + label_smoothing * mean_nll
  if class_weights is not None:
    loss = loss * jnp.take(class_weights.astype(x.dtype), safe[..., 0])
  return _norm.ignore(ignored, jnp.where(in_range, loss, jnp.nan))


def soft_cross_entropy(logits, targets, *, where=None):
  """Per-example softmax cross-entropy with a target distribution.

  `loss = -sum_k t_k log_softmax(logits)_k`, where entries with `t_k = 0` contribute exactly 0
  (also where the log-probability is `-inf`: no `0 * inf`); target mass on a masked class gives
  `+inf`; a NaN logit or target gives NaN (also for a row of zero targets). Reference: Hinton
  et al., "Distilling the knowledge in a neural network", 2015.

  Args:
    logits: [..., K] float; 16-bit floats are computed in float32.
    targets: [..., K] float, rows usually summing to 1 (not checked).
    where: optional [..., K] bool (broadcastable); False classes are excluded.

  Returns:
    [...] float32 per-example loss (float64 for float64 logits).

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `logits`
      is not `[..., K]` with K >= 1, `targets` does not have the shape of `logits`, or `where`
      is not a bool mask that broadcasts to `logits`. The values of `targets` are not checked.

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = jnp.array([[1.0, 2.0, 3.0]])
    >>> one_hot = jnp.array([[0.0, 0.0, 1.0]])
    >>> bool(np.allclose(ops.soft_cross_entropy(z, one_hot), ops.cross_entropy(z, jnp.array([2]))))
    True
    >>> round(float(ops.soft_cross_entropy(z, jnp.array([[0.5, 0.0, 0.5]]))[0]), 4)
    1.4076
  """
  x, where = _norm.prepare(logits, where, 'logits')
  targets = jnp.asarray(targets)
  _checks.chex_check(chex.assert_shape, targets, x.shape, name='targets',
                     need=f'have the shape of `logits` {x.shape}', got=f'shape {targets.shape}')
  targets = targets.astype(x.dtype)
  _, log_p, lse = _norm.normalize(x, where)
  loss = -jnp.sum(targets * jnp.where(targets != 0, log_p, 0), axis=-1)
  return jnp.where(jnp.isnan(lse[..., 0]), lse[..., 0], loss)  # A NaN row is NaN, even at t = 0.
