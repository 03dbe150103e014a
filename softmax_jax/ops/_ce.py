"""The row statistics of `cross_entropy`, with hand-written derivatives (private to the ops).

`row_stats(x, where, rows, smoothing)` returns, per row of logits `x: [..., K]`, the shift `m`
(the row max, a stop-gradient constant) and `log_s = log sum_k exp(x_k - m)` over the kept
classes, so that `logsumexp = m + log_s`; with `smoothing`, also `S = sum_valid x_k` and the
count `k_valid` of the classes that label smoothing spreads over. `jax.custom_jvp` rules give
`d log_s = sum_k e_k dx_k / s` (`e = exp(x - m)`, `s = sum_k e_k`), `dS = sum_valid dx_k`, and
zero for `m` and `k_valid`.

Why (issue 15): plain autodiff through `log_softmax` kept two `[..., K]` float32 buffers beside
the logits and the gradient, and on the XLA CPU backend any compare/select that feeds a
reduction is materialized as a `[..., K]` buffer first. Here:

- The forward alone (no derivative) reads `x` through `max(x)` and a fused `sum(exp(x - m))`, as
  `optax.softmax_cross_entropy_with_integer_labels` does: `-inf` logits need no select
  (`exp(-inf) = 0`), and ignored rows (`rows`) are dropped on `[...]` values by the caller.
- Under differentiation the rule forms `e` once, sums it, and keeps it for the tangent
  `sum(e * dx) / s`, so reverse mode is optax's program: one `[..., K]` exp pass whose buffer
  becomes the gradient (`ct / s * e - onehot`), nothing else of size `[..., K]`. Recomputing
  `e` in the backward instead (saving only the `[...]` statistics) keeps the same memory under
  jit but doubles the time on CPU, where the exponentials dominate.
- The smoothing statistics are one variadic reduction, whose selects XLA fuses.
- Forward mode and higher orders work: the rule's outputs and tangents are plain `jnp` of `x`
  (and `valid_sums`, itself a custom_jvp).
"""

import functools

import jax
import jax.numpy as jnp


def _valid(x, where):
  """[..., K] bool: the classes that count (kept by `where` and not a -inf logit; NaN counts)."""
  valid = x != -jnp.inf
  return valid if where is None else valid & where


def _add_pairs(a, b):
  return a[0] + b[0], a[1] + b[1]


@jax.custom_jvp
def valid_sums(x, where):
  """`(S, k_valid)`: [...] sums of `x` and of 1 over the valid classes, in the dtype of `x`."""
  valid = _valid(x, where)
  zero = jnp.zeros((), x.dtype)
  # One variadic reduction: XLA CPU fuses its selects (a plain sum of a select gets
  # materialized as a [..., K] buffer first).
  return jax.lax.reduce((jnp.where(valid, x, zero), valid.astype(x.dtype)), (zero, zero),
                        _add_pairs, (x.ndim - 1,))


@valid_sums.defjvp
def _valid_sums_jvp(primals, tangents):
  x, where = primals
  out = valid_sums(x, where)
  d_sum = jnp.sum(jnp.where(_valid(x, where), tangents[0], 0), axis=-1)
  return out, (d_sum, jnp.zeros_like(out[1]))


def _shift(x, where):
  """`(xm, m)`: `x` with -inf on masked classes, and its row max [..., 1] (0 if not finite)."""
  xm = x if where is None else jnp.where(where, x, -jnp.inf)
  m = jnp.max(xm, axis=-1, keepdims=True)  # NaN propagates.
  return xm, jax.lax.stop_gradient(jnp.where(jnp.isinf(m), 0, m))  # Empty / +inf row: 0.


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def row_stats(x, where, rows, smoothing):
  """`(log_s, m)` and, with `smoothing`, `(S, k_valid)`: each [...] in the dtype of `x`.

  Args:
    x: [..., K] float logits in the compute dtype.
    where: None or a [..., K]-broadcastable bool mask of classes.
    rows: None or [...] bool, False for ignored examples: their statistics are not used (and
      may be NaN) and their tangent is exactly 0 (no NaN of `x` reaches it).
    smoothing: static bool; also return `S` and `k_valid`.
  """
  del rows  # Only the tangent reads it; the caller discards the ignored rows' values.
  xm, m = _shift(x, where)
  s = jnp.sum(jnp.exp(xm - m), axis=-1)  # exp(-inf) = 0: -inf logits need no mask.
  out = (jnp.log(jnp.where(s == 0, 1, s)), m[..., 0])  # Empty row: log_s = 0, m = 0.
  return out + (valid_sums(x, where) if smoothing else ())


@row_stats.defjvp
def _row_stats_jvp(smoothing, primals, tangents):
  x, where, rows = primals
  dx = tangents[0]
  xm, m = _shift(x, where)
  e = jnp.exp(xm - m)  # The one [..., K] buffer: reverse mode keeps it for the gradient.
  s = jnp.sum(e, axis=-1)
  s = jnp.where(s == 0, 1, s)
  out = (jnp.log(s), m[..., 0])
  keep = where
  if rows is not None:  # Ignored rows: divide by 1, not by their (maybe NaN) sum.
    s = jnp.where(rows, s, 1)
    keep = rows[..., None] if keep is None else keep & rows[..., None]
  if keep is None:
    d_log_s = jnp.sum(e * dx, axis=-1) / s
  else:  # Masked classes and ignored rows: exactly 0, even in a NaN row (where ct / s is NaN).
    d_log_s = jnp.sum(jnp.where(keep, e / s[..., None], 0) * dx, axis=-1)
  zero = jnp.zeros_like(out[1])
  tangent = (d_log_s, zero)
  if smoothing:
    out += valid_sums(x, where)
    valid = _valid(x, where) if rows is None else _valid(x, where) & rows[..., None]
    tangent += (jnp.sum(jnp.where(valid, dx, 0), axis=-1), zero)
  return out, tangent
