"""Knowledge distillation: the temperature-scaled KL divergence from a teacher to a student.

`kd_loss = T^2 * KL(softmax(t / T) || softmax(s / T))` per example (Hinton et al. 2015), in log
space: `sum_k p_k (log p_k - log q_k)` with both log-softmaxes from the shared row normalizer
(`_normalize.normalize`: max subtracted, float32 for 16-bit inputs, `-inf` and masked classes
exactly 0). A class the teacher gives probability 0 (a `-inf` teacher logit, a masked class, or
an underflow) contributes exactly 0 (`0 log 0 = 0`), with a finite gradient: the terms are
selected by a double `jnp.where`, so neither the value nor the derivative of an unselected term
(`0 * (-inf - -inf)`) is ever formed. Plain autodiff, no custom derivative.
"""

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.ops import _checks
from softmax_jax.ops import _normalize as _norm

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def _check_temperature(temperature, batch_shape) -> None:
  """`temperature` broadcasts to the batch shape (always); a concrete one is finite and > 0.

  A scalar NaN is an error; a NaN entry of an array is per-example data like a logit: it passes
  and makes its examples NaN (the NaN rule). Traced values are not checked.
  """
  _checks.broadcastable(temperature, batch_shape, 'temperature', 'student_logits.shape[:-1]')
  if _checks.is_traced(temperature):
    return
  a = np.asarray(temperature, np.float64)
  if a.ndim == 0:
    _checks.positive('temperature', temperature)
    return
  bad = ~np.isnan(a) & ~(np.isfinite(a) & (a > 0))
  if bad.any():
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    raise _checks.ArgumentError(f'`temperature` must be finite and > 0; got {a[pos]} at position '
                                f'{pos} ({int(bad.sum())} bad in all).')


def _log_softmax(x, temperature, where):
  """`(log_softmax(x / T), lse [..., 1])` over the classes kept by `where` and not `-inf`.

  Excluded classes are set to `-inf` before the division, so no `-inf / T` (whose derivative in
  T is infinite) is formed, and a NaN in an excluded class is never read.
  """
  keep = x != -jnp.inf
  if where is not None:
    keep = keep & where
  z = jnp.where(keep, jnp.where(keep, x, 0) / temperature, -jnp.inf)
  _, log_p, lse = _norm.normalize(z, None)
  return log_p, lse


def kd_loss(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
            temperature: Union[float, ArrayLike] = 1.0,
            where: Optional[ArrayLike] = None) -> Array:
  """Per-example distillation loss `T^2 * KL(softmax(t / T) || softmax(s / T))`.

  `loss = T^2 sum_k p_k (log p_k - log q_k)`, `p = softmax(t / T)` (the teacher, under
  `jax.lax.stop_gradient`), `q = softmax(s / T)`, both over the classes `where` keeps. The `T^2`
  keeps gradient magnitudes comparable across temperatures: `d loss / d s = T (q - p)`. As
  `T -> inf` the loss tends to `||(s - mean s) - (t - mean t)||^2 / (2K)` (logit matching).

  Edge cases: a class with teacher probability 0 (teacher logit `-inf`, `where=False`, or an
  underflow) contributes exactly 0, with a finite gradient; a student logit `-inf` on a class
  where the teacher has mass gives `+inf` (the true KL; the gradient in `student_logits` stays
  finite). `where=False` classes count for neither distribution (equal to dropping them) and are
  not read; a fully masked row (or a teacher row of `-inf`) gives 0. The NaN rule (`softmax_jax.ops`): a NaN logit of either
  row on a class `where` keeps, or a NaN temperature, makes that example's loss NaN. Precision:
  the KL's absolute error is ~`eps * log K`, so when it is small (high T) its relative error
  grows: ~1e-4 in float32 at T = 10 with logits of scale 2; use float64 near the T -> inf limit.

  Args:
    student_logits: [..., K] float; 16-bit floats are computed in float32.
    teacher_logits: [..., K] float, the shape of `student_logits`; no gradient flows into it.
    temperature: T > 0, a Python float or an array broadcastable to the batch shape `[...]`
      (per-example temperatures; vmap-able). Both logits are divided by it.
    where: optional [..., K] bool mask of classes (broadcastable to `student_logits`); False
      classes are excluded from both distributions.

  Returns:
    [...] per-example loss >= 0, float32 (float64 for float64 inputs).

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if either
      logits array is not a float `[..., K]` with K >= 1, the teacher's shape differs from the
      student's, `where` is not a bool mask that broadcasts to `student_logits`, or
      `temperature` does not broadcast to `student_logits.shape[:-1]`; and, for a concrete
      `temperature` only, if it is not finite and > 0 (a NaN entry of an array passes: it is
      per-example data). A traced temperature (under `jit`/`vmap`) is not checked: an example
      whose temperature is not finite and > 0 gets a NaN loss.

  References:
    Hinton, Vinyals and Dean, "Distilling the knowledge in a neural network", NIPS 2014 Deep
    Learning Workshop, arXiv:1503.02531, 2015 (sec. 2: the T^2 factor; sec. 2.1: the high-T
    limit).

  Example:
    >>> import jax.numpy as jnp
    >>> from softmax_jax import ops
    >>> s = jnp.array([[2.0, 0.0, -1.0]])
    >>> float(ops.kd_loss(s, s, temperature=4.0)[0])
    0.0
    >>> round(float(ops.kd_loss(s, jnp.array([[0.0, 2.0, -1.0]]), temperature=2.0)[0]), 4)
    1.5892
  """
  s, t = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
  _checks.last_dim_at_least(s, 1, 'student_logits', '[..., K]', 'K')
  _checks.last_dim_at_least(t, 1, 'teacher_logits', '[..., K]', 'K')
  _checks.dtype(s, float, 'student_logits', 'be a float array [..., K]')
  _checks.dtype(t, float, 'teacher_logits', 'be a float array [..., K]')
  k = s.shape[-1]
  if t.shape[-1] != k:
    raise _checks.ArgumentError(f'`teacher_logits` must have shape [..., K] with K = '
                                f'student_logits.shape[-1] = {k}; got shape {t.shape}.')
  _checks.shape(t, s.shape, 'teacher_logits', 'student_logits.shape')
  where = _checks.where_mask(where, s, target='student_logits')
  _check_temperature(temperature, s.shape[:-1])
  dtype = jnp.promote_types(jnp.result_type(s, t), jnp.float32)
  return _kd(s.astype(dtype), t.astype(dtype), jnp.asarray(temperature, dtype), where)


@jax.jit
def _kd(s, t, temp, where):
  """The loss of checked, compute-dtype inputs. Jitted so that an eager call compiles once per
  shape (not once per primitive); under an outer `jit` it is inlined."""
  t = jax.lax.stop_gradient(t)
  log_q, lse_s = _log_softmax(s, temp[..., None], where)
  log_p, lse_t = _log_softmax(t, temp[..., None], where)
  mass = log_p != -jnp.inf  # p_k > 0 structurally, or NaN (propagates)
  # Double where: an unselected term (p_k = 0) is 0 * (-inf - log q_k) = NaN, and its derivative
  # in T too, even with a zero cotangent; the safe operands keep both out.
  lp, lq = jnp.where(mass, log_p, 0), jnp.where(mass, log_q, 0)
  kl = jnp.sum(jnp.where(mass, jnp.exp(lp) * (lp - lq), 0), axis=-1)
  # A traced T out of range, or NaN, gives NaN; so does a NaN student row whose teacher has no
  # mass at all (kl is an empty sum there).
  ok = ((temp > 0) & (temp < jnp.inf)
        & ~jnp.isnan(lse_s[..., 0]) & ~jnp.isnan(lse_t[..., 0]))
  return jnp.where(ok, jnp.square(temp) * kl, jnp.nan)
