"""Losses and priors for long-tailed (class-imbalanced) classification and calibration.

Class-count based quantities (`class_balanced_weights`, `ldam_margins`, `log_prior`) are computed
once on the host in float64 from concrete counts and returned as float32 `[C]` arrays; the losses
reuse the numerics of `ops.softmax` (float32 compute for 16-bit logits, max subtraction, `-inf`
masks) and return a per-example `[...]` loss (float64 for float64 logits) that the caller reduces.
A NaN logit gives its example a NaN loss, and `ignore_index` works as in `cross_entropy`: the NaN
rule and `ignore_index` of the package docstring.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.ops import _checks
from softmax_jax.ops import _normalize as _norm
from softmax_jax.ops.softmax import cross_entropy


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _is_static_zero(x) -> bool:
  return _is_concrete(x) and np.ndim(x) == 0 and float(x) == 0


def _check_at_least(name, value, lo, strict=False):
  """`value` is a scalar (always), finite and >= lo (> lo if strict) when concrete; traced ones
  pass."""
  _checks.rank(value, 0, name, '[]')
  if _is_concrete(value):
    v = float(value)
    if not (math.isfinite(v) and (v > lo if strict else v >= lo)):
      raise ValueError(f'`{name}` must be finite and {">" if strict else ">="} {lo}; got {value}.')


def _counts(class_counts, num_classes=None):
  """Concrete `[C]` float64 counts, all finite and > 0 (and C == num_classes if given)."""
  if not _is_concrete(class_counts):
    raise ValueError('`class_counts` must be concrete (a NumPy array, list or tuple of counts), '
                     'not traced: class statistics are computed on the host.')
  counts = np.asarray(class_counts, np.float64)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(f'`class_counts` must be a non-empty 1-D [num_classes] array; '
                     f'got shape {counts.shape}.')
  bad = np.flatnonzero(~(np.isfinite(counts) & (counts > 0)))
  if bad.size:
    raise ValueError(f'`class_counts` must be finite and > 0 for every class; got '
                     f'{counts[bad[0]]} at class {bad[0]} ({bad.size} bad in all).')
  if num_classes is not None and counts.size != num_classes:
    raise ValueError(f'`class_counts` must have logits.shape[-1] = {num_classes} entries; '
                     f'got {counts.size}.')
  return counts


def _check_class_vector(name, v, num_classes, dtype):
  """`v` is `[num_classes]` (always) and finite when concrete; returns it in `dtype`."""
  v = jnp.asarray(v)
  _checks.shape(v, (num_classes,), name, '[num_classes]')
  if _is_concrete(v) and not np.all(np.isfinite(np.asarray(v, np.float64))):
    raise ValueError(f'`{name}` must be finite; got {v}.')
  return v.astype(dtype)


def class_balanced_weights(class_counts, beta=0.9999, *, normalize=True):
  """Class-balanced weights from the effective number of samples.

  `w_c = (1 - beta) / (1 - beta^n_c)`, rescaled to `sum_c w_c = C` when `normalize` (as in Cui's
  and Cao's code); beta = 0 gives all ones and beta -> 1 gives weights proportional to `1 / n_c`.
  Computed in float64 with `1 - beta^n = -expm1(n log1p(beta - 1))`. Reference: Cui et al.,
  "Class-balanced loss based on effective number of samples", CVPR 2019 (eq. 2-4).

  Args:
    class_counts: [C] concrete counts n_c > 0 (training examples per class).
    beta: in [0, 1), a concrete number.
    normalize: rescale so that the weights sum to C.

  Returns:
    [C] float32 weights.

  Raises:
    ValueError: if `class_counts` is traced, not a non-empty 1-D array, or has an entry that is
      not finite and > 0; if `beta` is traced or not in [0, 1). All of it is computed on the
      host from concrete values, so nothing here runs under `jit` (call it outside, or close
      over the counts).

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> w = ops.class_balanced_weights(np.array([100, 10, 1]), beta=0.99)
    >>> [round(float(v), 4) for v in w]
    [0.0422, 0.28, 2.6777]
  """
  counts = _counts(class_counts)
  if not _is_concrete(beta):
    raise ValueError('`beta` must be a concrete number, not traced; got a tracer.')
  _check_at_least('beta', beta, 0)
  beta = float(beta)
  if not beta < 1:
    raise ValueError(f'`beta` must be in [0, 1); got {beta}.')
  if beta == 0:
    w = np.ones_like(counts)
  else:
    w = (1 - beta) / -np.expm1(counts * np.log1p(beta - 1))
  if normalize:
    w = w * (counts.size / np.sum(w))
  return jnp.asarray(w, jnp.float32)


def focal_loss(logits, labels, *, gamma=2.0, alpha=None, where=None, ignore_index=None):
  """Per-example softmax focal loss with integer labels.

  `loss = -alpha_y (1 - p_y)^gamma log p_y` with `p = softmax(logits)`, computed in log space
  (`1 - p_y = -expm1(log p_y)`); gamma = 0 is `cross_entropy(logits, labels,
  class_weights=alpha)` exactly. Gradients are finite also where `p_y` is exactly 1 or 0 in
  float32. Class-balanced focal loss: `alpha = class_balanced_weights(counts, beta)`.
  Reference: Lin et al., "Focal loss for dense object detection", ICCV 2017 (eq. 5, softmax form).

  Args:
    logits: [..., C] float; 16-bit floats are computed in float32.
    labels: [...] int in [0, C), or `ignore_index`.
    gamma: focusing parameter >= 0, a scalar (traced values are not checked).
    alpha: optional [C] per-class weights, finite and >= 0.
    where: optional [..., C] bool (broadcastable); False classes are excluded.
    ignore_index: None or an int; examples with this label get loss 0 and gradient 0.

  Returns:
    [...] float32 per-example loss (float64 for float64 logits).

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `logits`
      is not `[..., C]` with C >= 1, `labels` is not an integer array of shape
      `logits.shape[:-1]`, `where` is not a bool mask that broadcasts to `logits`, `gamma` is
      not a scalar, `alpha` is not `[C]` or `ignore_index` is not None or an int; for concrete
      values only, if a label (other than `ignore_index`) is outside [0, C), `gamma` is not
      finite and >= 0 or `alpha` is not finite and >= 0. Traced labels are not range-checked:
      an out-of-range one gives a NaN loss.

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = jnp.array([[1.0, 2.0, 3.0], [2.0, 0.0, 0.0]])
    >>> y = jnp.array([2, 0])
    >>> bool(np.allclose(ops.focal_loss(z, y, gamma=0.0), ops.cross_entropy(z, y)))
    True
    >>> bool(np.all(ops.focal_loss(z, y, gamma=2.0) < ops.cross_entropy(z, y)))
    True
  """
  x, mask = _norm.prepare(logits, where, 'logits')
  num_classes = x.shape[-1]
  _check_at_least('gamma', gamma, 0)
  if alpha is not None:
    alpha = _check_class_vector('alpha', alpha, num_classes, x.dtype)
    _checks.finite_nonnegative('alpha', alpha)
  if _is_static_zero(gamma):
    return cross_entropy(logits, labels, where=where, class_weights=alpha,
                         ignore_index=ignore_index)
  labels, ignored = _checks.labels_or_ignored(labels, num_classes, x.shape[:-1], ignore_index)
  if ignored is not None:
    x = jnp.where(ignored[..., None], 0, x)  # Not read (see cross_entropy).
  _, log_p, _ = _norm.normalize(x, mask)
  in_range = (labels >= 0) & (labels < num_classes)
  safe = jnp.where(in_range, labels, 0)
  log_py = jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
  # (1 - p_y)^gamma with double wheres: at p_y = 1 (m = 0) the power's derivative m^(gamma - 1)
  # is kept out of the gradient, and at a masked label (log p_y = -inf) so is `-inf * 0`.
  gamma = jnp.asarray(gamma, x.dtype)
  finite = log_py > -jnp.inf
  m = -jnp.expm1(jnp.where(finite, log_py, -1))
  pos = m > 0
  factor = jnp.where(pos, jnp.where(pos, m, 1) ** gamma, (gamma == 0).astype(x.dtype))
  loss = -jnp.where(finite, factor, 1) * log_py
  if alpha is not None:
    loss = loss * jnp.take(alpha, safe)
  return _norm.ignore(ignored, jnp.where(in_range, loss, jnp.nan))


def ldam_margins(class_counts, max_margin=0.5):
  """LDAM per-class margins `m_c = max_margin * (n_c / min_k n_k)^(-1/4)`.

  `m_c ∝ n_c^(-1/4)`, largest (= max_margin) at the rarest class. Reference: Cao et al.,
  "Learning imbalanced datasets with label-distribution-aware margin loss", NeurIPS 2019 (eq. 13).

  Args:
    class_counts: [C] concrete counts n_c > 0.
    max_margin: the largest margin, > 0 (concrete).

  Returns:
    [C] float32 margins.

  Raises:
    ValueError: if `class_counts` is traced, not a non-empty 1-D array, or has an entry that is
      not finite and > 0; if `max_margin` is traced or not > 0. All of it is computed on the
      host from concrete values, so nothing here runs under `jit` (call it outside, or close
      over the counts).

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> [round(float(m), 4) for m in ops.ldam_margins(np.array([10000, 100, 1]))]
    [0.05, 0.1581, 0.5]
  """
  counts = _counts(class_counts)
  if not _is_concrete(max_margin):
    raise ValueError('`max_margin` must be a concrete number, not traced; got a tracer.')
  _check_at_least('max_margin', max_margin, 0, strict=True)
  m = counts ** -0.25
  return jnp.asarray(m * (float(max_margin) / np.max(m)), jnp.float32)


def ldam_loss(logits, labels, *, class_counts, max_margin=0.5, scale=30.0, class_weights=None,
              ignore_index=None):
  """Per-example LDAM loss: cross-entropy of scaled logits with a per-class margin on the label.

  `loss = w_y * CE(s * (z - m_y onehot_y), y)` with `m = ldam_margins(class_counts, max_margin)`
  (Cao's `LDAMLoss`; in the paper `z` are the cosine logits of a normalized linear layer, see
  `ops.cosine_logits`). `class_weights` from `drw_class_weights` gives LDAM-DRW. Reference:
  Cao et al., "Learning imbalanced datasets with label-distribution-aware margin loss", NeurIPS
  2019 (eq. 10-13).

  Args:
    logits: [..., C] float (usually cosines in [-1, 1]); 16-bit floats are computed in float32.
    labels: [...] int in [0, C), or `ignore_index`.
    class_counts: [C] concrete counts n_c > 0.
    max_margin: the rarest class's margin, > 0.
    scale: s > 0 and finite, a scalar multiplying the margin logits.
    class_weights: optional [C] float, finite and >= 0.
    ignore_index: None or an int; examples with this label get loss 0 and gradient 0.

  Returns:
    [...] float32 per-example loss (float64 for float64 logits).

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `logits`
      is not `[..., C]` with C >= 1, `labels` is not an integer array of shape
      `logits.shape[:-1]`, `scale` is not a scalar, `class_weights` is not `[C]` or
      `ignore_index` is not None or an int; if `class_counts` is not concrete, 1-D with C
      entries all finite and > 0 (it is used on the host); for concrete values only, if a label
      (other than `ignore_index`) is outside [0, C), `scale` or `max_margin` is not finite and
      > 0, or a class weight is not finite and >= 0. Traced labels are not range-checked: an
      out-of-range one gives a NaN loss.

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = jnp.array([[0.2, 0.5, 0.1]])
    >>> y = jnp.array([1])
    >>> m = ops.ldam_margins(jnp.array([100, 10, 1]))
    >>> loss = ops.ldam_loss(z, y, class_counts=jnp.array([100, 10, 1]), scale=30.0)
    >>> bool(np.allclose(loss, ops.cross_entropy(30.0 * (z - m[1] * jnp.eye(3)[1]), y)))
    True
  """
  x, _ = _norm.prepare(logits, None, 'logits')
  num_classes = x.shape[-1]
  margins = ldam_margins(_counts(class_counts, num_classes), max_margin).astype(x.dtype)
  _check_at_least('scale', scale, 0, strict=True)
  labels, _ = _checks.labels_or_ignored(labels, num_classes, x.shape[:-1], ignore_index)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=x.dtype)  # Zero row if out of range.
  z = jnp.asarray(scale, x.dtype) * (x - margins * onehot)
  return cross_entropy(z, labels, class_weights=class_weights, ignore_index=ignore_index)


def drw_class_weights(step, *, class_counts, start_step, beta=0.9999):
  """Deferred re-weighting: ones before `start_step`, class-balanced weights from it on.

  `w = 1` while `step < start_step`, else `class_balanced_weights(class_counts, beta)`
  (normalized to sum C, as in Cao's DRW schedule). Reference: Cao et al., NeurIPS 2019 (§3.3).

  Args:
    step: scalar int, concrete or traced (under jit).
    class_counts: [C] concrete counts n_c > 0.
    start_step: Python int >= 0, the first re-weighted step.
    beta: class-balanced beta in [0, 1).

  Returns:
    [C] float32 weights.

  Raises:
    ValueError: always (also under `jit`) if `step` is not a scalar or `start_step` is not a
      Python int >= 0; and as `class_balanced_weights` for `class_counts` and `beta`, which must
      be concrete. A traced `step` is fine: the switch is a `jnp.where`.

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> counts = np.array([100, 10, 1])
    >>> ops.drw_class_weights(5, class_counts=counts, start_step=10).tolist()
    [1.0, 1.0, 1.0]
    >>> w = ops.drw_class_weights(10, class_counts=counts, start_step=10, beta=0.99)
    >>> bool(np.allclose(w, ops.class_balanced_weights(counts, beta=0.99)))
    True
  """
  if (not isinstance(start_step, (int, np.integer)) or isinstance(start_step, bool)
      or start_step < 0):
    raise ValueError(f'`start_step` must be a Python int >= 0; got {start_step!r}.')
  _checks.rank(step, 0, 'step', '[]')
  w = class_balanced_weights(class_counts, beta)
  return jnp.where(jnp.asarray(step) >= start_step, w, jnp.ones_like(w))


def log_prior(class_counts):
  """Log class prior `log(n_c / sum_k n_k)` from training counts, computed in float64.

  Reference: Menon et al., "Long-tail learning via logit adjustment", ICLR 2021 (§4).

  Args:
    class_counts: [C] concrete counts n_c > 0.

  Returns:
    [C] float32 log-probabilities.

  Raises:
    ValueError: if `class_counts` is traced, not a non-empty 1-D array, or has an entry that is
      not finite and > 0. All of it is computed on the host from concrete values, so nothing
      here runs under `jit` (call it outside, or close over the counts).

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> [round(float(v), 4) for v in ops.log_prior(np.array([3, 1]))]
    [-0.2877, -1.3863]
  """
  counts = _counts(class_counts)
  return jnp.asarray(np.log(counts) - np.log(np.sum(counts)), jnp.float32)


def logit_adjusted_cross_entropy(logits, labels, *, log_prior, tau=1.0, where=None,
                                 ignore_index=None):
  """Per-example logit-adjusted cross-entropy.

  `loss = CE(z + tau * log_prior, y)`; tau = 0 is `cross_entropy(logits, labels)` exactly.
  Reference: Menon et al., "Long-tail learning via logit adjustment", ICLR 2021 (eq. 11).

  Args:
    logits: [..., C] float; 16-bit floats are computed in float32.
    labels: [...] int in [0, C), or `ignore_index`.
    log_prior: [C] finite log class prior, e.g. `ops.log_prior(class_counts)`.
    tau: adjustment strength >= 0, a scalar.
    where: optional [..., C] bool (broadcastable); False classes are excluded.
    ignore_index: None or an int; examples with this label get loss 0 and gradient 0.

  Returns:
    [...] float32 per-example loss (float64 for float64 logits).

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `logits`
      is not `[..., C]` with C >= 1, `labels` is not an integer array of shape
      `logits.shape[:-1]`, `where` is not a bool mask that broadcasts to `logits`, `log_prior`
      is not `[C]`, `tau` is not a scalar or `ignore_index` is not None or an int; for concrete
      values only, if a label (other than `ignore_index`) is outside [0, C), `log_prior` is not
      finite or `tau` is not finite and >= 0. Traced labels are not range-checked: an
      out-of-range one gives a NaN loss.

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = jnp.array([[1.0, 2.0, 3.0]])
    >>> y = jnp.array([0])
    >>> lp = ops.log_prior(jnp.array([10, 30, 60]))
    >>> loss = ops.logit_adjusted_cross_entropy(z, y, log_prior=lp, tau=1.0)
    >>> bool(np.allclose(loss, ops.cross_entropy(z + lp, y)))
    True
  """
  x, _ = _norm.prepare(logits, where, 'logits')
  lp = _check_class_vector('log_prior', log_prior, x.shape[-1], x.dtype)
  _check_at_least('tau', tau, 0)
  if _is_static_zero(tau):
    return cross_entropy(logits, labels, where=where, ignore_index=ignore_index)
  return cross_entropy(x + jnp.asarray(tau, x.dtype) * lp, labels, where=where,
                       ignore_index=ignore_index)


def posthoc_logit_adjustment(logits, *, log_prior, tau=1.0):
  """Post-hoc logit adjustment `z - tau * log_prior` for balanced-error prediction.

  With tau = 1 and calibrated logits, `argmax` of the result is the Bayes rule for the balanced
  error. Reference: Menon et al., "Long-tail learning via logit adjustment", ICLR 2021 (eq. 9).

  Args:
    logits: [..., C] float; 16-bit floats are computed in float32.
    log_prior: [C] finite log class prior, e.g. `ops.log_prior(class_counts)`.
    tau: adjustment strength >= 0, a scalar.

  Returns:
    [..., C] adjusted logits in the dtype of `logits` (float32 for integer logits).

  Raises:
    ValueError: always (from shapes, so also under `jit`/`vmap`/`grad`) if `logits` is not
      `[..., C]` with C >= 1, `log_prior` is not `[C]` or `tau` is not a scalar; for concrete
      values only, if `log_prior` is not finite or `tau` < 0.

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = np.array([[2.0, 1.0]])
    >>> lp = ops.log_prior(np.array([90, 10]))
    >>> adjusted = ops.posthoc_logit_adjustment(z, log_prior=lp)
    >>> bool(np.allclose(adjusted, z - lp))
    True
    >>> int(z.argmax()), int(adjusted.argmax())
    (0, 1)
  """
  x, _ = _norm.prepare(logits, None, 'logits')
  lp = _check_class_vector('log_prior', log_prior, x.shape[-1], x.dtype)
  _check_at_least('tau', tau, 0)
  return (x - jnp.asarray(tau, x.dtype) * lp).astype(_norm.out_dtype(logits, x))
