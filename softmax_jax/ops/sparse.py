"""Sparse probability maps: sparsemax, 1.5-entmax, alpha-entmax, and their Fenchel-Young losses.

alpha-entmax is `argmax_{p in simplex} <p, z> + H_alpha(p)` with the Tsallis entropy
`H_alpha(p) = (1 - sum_k p_k^alpha) / (alpha (alpha - 1))`; its solution is
`p_k = [(alpha - 1) z_k - tau]_+^(1 / (alpha - 1))` with the threshold `tau` that makes `p` sum
to 1. alpha = 2 is sparsemax, alpha -> 1 softmax. `sparsemax` and `entmax15` find `tau` exactly
by sorting; `entmax_bisect` by bisection, for any alpha > 1 (also per example).

The maps have a `custom_jvp` on their support: with `g = p^(2 - alpha)` (0 off the support),
`dp = g * (dz - <g, dz> / sum g)`, plus an alpha term for `entmax_bisect`. The Fenchel-Young loss
`L(z, y) = <p, z - z_y> + H_alpha(p)` (>= 0, 0 iff `p` is the one-hot of `y`) has a `custom_jvp`
whose gradient is exactly `p - onehot(y)` (and, for alpha, `dH_alpha/dalpha` at `p`).

Numerics: 16-bit floats and integers are computed in float32 and returned in float32 (float64
stays float64); logits are shifted by the row max. `where=False` and `-inf` logits are excluded:
probability exactly 0, gradient 0; a fully masked row is all zeros. A NaN logit that is kept
makes its row NaN (values and gradients), other rows unaffected (the NaN rule of the package).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.ops import _checks
from softmax_jax.ops import _normalize as _norm

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

_SORT_ALPHA = {'sparsemax': 2.0, 'entmax15': 1.5}


def _power(p, e):
  """`p ** e` on `p > 0`, 0 elsewhere (also for e <= 0: no 0 ** 0 = 1, no inf)."""
  pos = p > 0
  return jnp.where(pos, jnp.where(pos, p, 1) ** e, 0)


def _plogp(p):
  pos = p > 0
  return jnp.where(pos, p * jnp.log(jnp.where(pos, p, 1)), 0)


def _shift(x):
  """`(x - row max, kept, row_nan)`: excluded (-inf) entries stay -inf, NaNs become 0."""
  row_nan = jnp.any(jnp.isnan(x), axis=-1, keepdims=True)
  x = jnp.where(jnp.isnan(x), 0, x)
  kept = x > -jnp.inf
  m = jnp.max(x, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0)  # a fully masked row (or +inf, left to propagate)
  return jnp.where(kept, x - m, -jnp.inf), kept, row_nan


# Rows longer than this find their threshold from the top `_TOP` entries (`lax.top_k`) when the
# support is shorter than `_TOP` (checked; else the whole row is sorted): on XLA:CPU sorting a
# [200, 10000] block costs ~640 ms and its top 256 ~40 ms (WORKSPACE, issue 18).
_TOP = 256


def _prefix_threshold(kind, srt):
  """`(tau [..., 1], support size [..., 1])` from the row's largest entries `srt`, descending.

  Exact when the support is shorter than `srt` (the support is a prefix of the sorted row)."""
  valid = srt > -jnp.inf
  s0 = jnp.where(valid, srt, 0)
  k = jnp.arange(1, srt.shape[-1] + 1, dtype=srt.dtype)
  cs = jnp.cumsum(s0, axis=-1)
  if kind == 'sparsemax':
    tau = (cs - 1) / k  # threshold if the support were the top k
    support = valid & (k * s0 > cs - 1)
  else:
    mean = cs / k
    ss = k * (jnp.cumsum(s0 * s0, axis=-1) / k - mean * mean)
    tau = mean - jnp.sqrt(jnp.maximum((1 - ss) / k, 0))
    support = valid & (tau <= s0)
  size = jnp.sum(support, axis=-1, keepdims=True)
  return jnp.take_along_axis(tau, jnp.maximum(size - 1, 0), axis=-1), size


def _sorted_threshold(kind, xs, kept):
  """Exact threshold of sparsemax (on `xs`) or 1.5-entmax (on `xs / 2`) by sorting the row.

  Long rows (K > 4 `_TOP`) sort only their top `_TOP` entries when every row's support fits in
  them, which the prefix itself tells (a support of `_TOP` entries may be longer: then, under
  `lax.cond`, every row is sorted whole). Both paths give the same values bit for bit."""
  x = xs / 2 if kind == 'entmax15' else xs
  full = lambda: _prefix_threshold(kind, -jnp.sort(-x, axis=-1))[0]  # excluded (-inf) entries last
  if x.shape[-1] <= 4 * _TOP:
    tau = full()
  else:
    tau, size = _prefix_threshold(kind, jax.lax.top_k(x, _TOP)[0])
    tau = jax.lax.cond(jnp.any(size >= _TOP), full, lambda: tau)
  p = jnp.where(kept, jnp.maximum(x - tau, 0), 0)
  return p * p if kind == 'entmax15' else p


def _bisect(xs, kept, alpha, n_iter):
  """alpha-entmax of shifted logits (row max 0) by `n_iter` bisections on the threshold."""
  am1 = alpha - 1
  x = jnp.where(kept, xs * am1, -jnp.inf)  # max 0 on non-empty rows
  n = jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), 1).astype(x.dtype)
  prob = lambda tau: _power(jnp.maximum(x - tau, 0), 1 / am1)
  lo = jnp.full_like(am1 * n, -1.0)  # sum prob(lo) >= 1: the max alone gives 1
  width = -(1 / n) ** am1 - lo  # sum prob(hi) <= 1 at hi = -(1/n)^(alpha-1)

  def step(_, carry):
    lo, width = carry
    width = width / 2
    mid = lo + width
    return jnp.where(jnp.sum(prob(mid), -1, keepdims=True) >= 1, mid, lo), width

  lo, _ = jax.lax.fori_loop(0, n_iter, step, (lo, width))
  p = prob(lo)
  s = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(s > 0, s, 1)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _map(kind, n_iter, x, alpha):
  """The map on compute-dtype `x` ([..., K], -inf excluded) with `alpha` [..., 1]."""
  xs, kept, row_nan = _shift(x)
  if kind == 'bisect':
    p = _bisect(xs, kept, alpha, n_iter)
    p = jnp.where(alpha > 1, p, jnp.nan)  # a traced alpha <= 1
  else:
    p = _sorted_threshold(kind, xs, kept)
  return jnp.where(row_nan, jnp.nan, p)


@_map.defjvp
def _map_jvp(kind, n_iter, primals, tangents):
  x, alpha = primals
  dx, dalpha = tangents
  p = _map(kind, n_iter, x, alpha)
  a = alpha if kind == 'bisect' else _SORT_ALPHA[kind]
  row_nan = jnp.any(jnp.isnan(p), axis=-1, keepdims=True)
  g = jnp.where(row_nan, jnp.nan, _power(p, 2 - a))  # NaN rows: NaN gradients
  sg = jnp.sum(g, axis=-1, keepdims=True)
  gh = g / jnp.where(sg == 0, 1, sg)  # a fully masked row: g = 0
  dp = g * dx - gh * jnp.sum(g * dx, axis=-1, keepdims=True)  # g = 0 off the support
  if kind == 'bisect':  # d p / d alpha, from differentiating sum p = 1 (Peters et al. 2019)
    b = 1 / (alpha - 1)
    ent = jnp.sum(_plogp(p), axis=-1, keepdims=True)
    dp = dp + dalpha * b * ((p - gh) * b - _plogp(p) + gh * ent)
  return p, dp


def _prepare(logits, where):
  x, where = _norm.prepare(logits, where, 'logits')
  keep = x != -jnp.inf
  if where is not None:
    keep = keep & where
  return jnp.where(keep, x, -jnp.inf)  # excluded entries are not read (gradient 0)


def _alpha(alpha, x):
  """`alpha` as `[..., 1]` in the compute dtype; concrete values must be finite and > 1."""
  if not isinstance(alpha, jax.Array):
    alpha = np.asarray(alpha)
  _checks.broadcastable(alpha, x.shape[:-1], 'alpha', 'logits.shape[:-1]')
  if not _checks.is_traced(alpha):
    a = np.asarray(alpha, np.float64)
    if not (np.all(np.isfinite(a)) and np.all(a > 1)):
      raise _checks.ArgumentError(f'`alpha` must be finite and > 1; got {alpha}.')
  return jnp.broadcast_to(jnp.asarray(alpha, x.dtype), x.shape[:-1])[..., None]


def _n_iter(n_iter) -> int:
  return _checks.static_int('n_iter', n_iter, 1)


def sparsemax(logits: ArrayLike, *, where: Optional[ArrayLike] = None) -> Array:
  """Sparsemax over the last axis: the Euclidean projection of the logits onto the simplex.

  `p = argmin_{p in simplex} ||p - z||^2 = [z - tau]_+`, with `tau` found exactly by sorting;
  entries below the threshold are exactly 0. Gradient: `dp = dz - mean_S(dz)` on the support S.

  Args:
    logits: [..., K] float; 16-bit floats (and integers) are computed in float32.
    where: optional [..., K] bool (broadcastable); False entries are excluded (probability 0).

  Returns:
    [..., K] probabilities, float32 (float64 for float64 logits); a fully masked row all zeros,
    a row with a kept NaN all NaN.

  Raises:
    ValueError: always (static checks, also under `jit`/`vmap`/`grad`) if `logits` is not
      `[..., K]` with K >= 1 or `where` is not a bool mask that broadcasts to it.

  References:
    Martins & Astudillo, "From softmax to sparsemax: a sparse model of attention and multi-label
    classification", ICML 2016.

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> p = ops.sparsemax(np.array([[1.0, 0.5, -1.0]]))
    >>> [round(float(v), 4) for v in p[0]]
    [0.75, 0.25, 0.0]
    >>> (p == 0).tolist()
    [[False, False, True]]
  """
  x = _prepare(logits, where)
  return _map('sparsemax', 0, x, jnp.full(x.shape[:-1] + (1,), 2.0, x.dtype))


def entmax15(logits: ArrayLike, *, where: Optional[ArrayLike] = None) -> Array:
  """1.5-entmax over the last axis, exact: `p = [z / 2 - tau]_+^2`, `tau` found by sorting.

  Between softmax and sparsemax: sparse, but smoother than sparsemax. Gradient:
  `dp = g * (dz - <g, dz> / sum g)` with `g = sqrt(p)`.

  Args:
    logits: [..., K] float; 16-bit floats (and integers) are computed in float32.
    where: optional [..., K] bool (broadcastable); False entries are excluded (probability 0).

  Returns:
    [..., K] probabilities, float32 (float64 for float64 logits); as `sparsemax` for masked and
    NaN rows.

  Raises:
    ValueError: as `sparsemax`.

  References:
    Peters, Niculae & Martins, "Sparse sequence-to-sequence models", ACL 2019.

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> p = ops.entmax15(np.array([[2.0, 1.0, -2.0]]))
    >>> [round(float(v), 4) for v in p[0]]
    [0.8307, 0.1693, 0.0]
    >>> (p == 0).tolist()
    [[False, False, True]]
  """
  x = _prepare(logits, where)
  return _map('entmax15', 0, x, jnp.full(x.shape[:-1] + (1,), 1.5, x.dtype))


def entmax_bisect(logits: ArrayLike, *, alpha: ArrayLike = 1.5, n_iter: int = 50,
                  where: Optional[ArrayLike] = None) -> Array:
  """alpha-entmax over the last axis by bisection: `p = [(alpha - 1) z - tau]_+^(1/(alpha-1))`.

  `tau` is bisected `n_iter` times in `[max - 1, max - K^(1 - alpha)]` (of `(alpha - 1) z`) and
  `p` renormalized. alpha = 2 is sparsemax, 1.5 is `entmax15`, alpha -> 1 softmax. Differentiable
  in the logits and in `alpha` (Peters et al. 2019, Sec. 3.3).

  Args:
    logits: [..., K] float; 16-bit floats (and integers) are computed in float32.
    alpha: scalar or array broadcastable to `logits.shape[:-1]` (per-example alphas), > 1. A
      traced alpha <= 1 gives that row NaN.
    n_iter: Python int >= 1, bisection steps (50 reaches float64 precision).
    where: optional [..., K] bool (broadcastable); False entries are excluded (probability 0).

  Returns:
    [..., K] probabilities, float32 (float64 for float64 logits); as `sparsemax` for masked and
    NaN rows.

  Raises:
    ValueError: as `sparsemax`; if `alpha` does not broadcast to `logits.shape[:-1]`, or is
      concrete and not finite and > 1; if `n_iter` is not a Python int >= 1.

  References:
    Peters, Niculae & Martins, "Sparse sequence-to-sequence models", ACL 2019.
    Blondel, Martins & Niculae, "Learning with Fenchel-Young losses", JMLR 2020.

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = np.array([[2.0, 1.0, -2.0]])
    >>> bool(np.allclose(ops.entmax_bisect(z, alpha=1.5), ops.entmax15(z), atol=1e-5))
    True
    >>> bool(np.allclose(ops.entmax_bisect(z, alpha=2.0), ops.sparsemax(z), atol=1e-5))
    True
  """
  x = _prepare(logits, where)
  return _map('bisect', _n_iter(n_iter), x, _alpha(alpha, x))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _fy(kind, n_iter, x, y, alpha):
  """Fenchel-Young loss [...] of `x` ([..., K], -inf excluded), labels `y` [...] in [0, K)."""
  p = _map(kind, n_iter, x, alpha)
  a = alpha[..., 0] if kind == 'bisect' else _SORT_ALPHA[kind]
  zy = jnp.take_along_axis(x, y[..., None], axis=-1)
  pz = jnp.sum(jnp.where(p > 0, p * (x - zy), 0), axis=-1)
  ent = (1 - jnp.sum(_power(p, a[..., None] if kind == 'bisect' else a), axis=-1)) / (a * (a - 1))
  loss = jnp.where(zy[..., 0] > -jnp.inf, jnp.maximum(pz + ent, 0), jnp.inf)
  return jnp.where(jnp.any(jnp.isnan(p), axis=-1), jnp.nan, loss)


@_fy.defjvp
def _fy_jvp(kind, n_iter, primals, tangents):
  x, y, alpha = primals
  dx, _, dalpha = tangents
  loss = _fy(kind, n_iter, x, y, alpha)
  p = _map(kind, n_iter, x, alpha)
  onehot = jax.nn.one_hot(y, x.shape[-1], dtype=x.dtype)
  valid = jnp.take_along_axis(x, y[..., None], axis=-1)[..., 0] > -jnp.inf
  dloss = jnp.sum((p - onehot) * dx, axis=-1)
  if kind == 'bisect':  # envelope theorem: dL/dalpha = dH_alpha/dalpha at the optimal p
    a = alpha[..., 0]
    s = jnp.sum(_power(p, alpha), axis=-1)
    ds = jnp.sum(_power(p, alpha) * jnp.log(jnp.where(p > 0, p, 1)), axis=-1)
    c = a * (a - 1)
    dloss = dloss + dalpha[..., 0] * (-ds * c - (1 - s) * (2 * a - 1)) / (c * c)
  nan_row = jnp.isnan(loss)
  return loss, jnp.where(valid | nan_row, dloss, 0)


def _loss(kind, n_iter, logits, labels, alpha, where, ignore_index):
  x = _prepare(logits, where)
  labels, ignored = _checks.labels_or_ignored(labels, x.shape[-1], x.shape[:-1], ignore_index)
  if alpha is None:
    alpha = jnp.full(x.shape[:-1] + (1,), _SORT_ALPHA[kind], x.dtype)
  else:
    alpha = _alpha(alpha, x)
  if ignored is not None:  # not read: no NaN of theirs leaks into a value or a gradient
    x = jnp.where(ignored[..., None], jnp.zeros((), x.dtype), x)
    if kind == 'bisect':
      alpha = jnp.where(ignored[..., None], jnp.full((), 2, x.dtype), alpha)
  k = x.shape[-1]
  in_range = (labels >= 0) & (labels < k)
  loss = _fy(kind, n_iter, x, jnp.where(in_range, labels, 0).astype(jnp.int32), alpha)
  return _norm.ignore(ignored, jnp.where(in_range, loss, jnp.nan))


_LOSS_DOC = """Per-example Fenchel-Young loss of {name}: `<p, z - z_y> + H(p)`, `p = {name}(z)`.

  `H` is the Tsallis entropy with alpha = {alpha}; the loss is >= 0 and 0 iff `p` is the one-hot
  of the label, and its gradient is exactly `{name}(z) - onehot(y)` (a `custom_jvp`). A label
  on an excluded class gives `+inf` and gradient 0; an example whose label is `ignore_index`
  gets loss 0 and gradient 0 and is not read; a traced out-of-range label gives NaN; a kept NaN
  logit makes its example NaN.

  Args:
    logits: [..., K] float; 16-bit floats (and integers) are computed in float32.
    labels: [...] int in [0, K), or `ignore_index`.{extra}
    where: optional [..., K] bool (broadcastable); False classes are excluded.
    ignore_index: None or an int; examples with this label are ignored (loss exactly 0).

  Returns:
    [...] float32 per-example loss (float64 for float64 logits).

  Raises:
    ValueError: always (static checks) if `logits` is not `[..., K]` (K >= 1), `labels` not an
      integer array of shape `logits.shape[:-1]`, `where` not a bool mask broadcasting to
      `logits`, or `ignore_index` not None or an int{raises}; and for concrete `labels`, if a
      label other than `ignore_index` lies outside [0, K).

  References:
    Blondel, Martins & Niculae, "Learning with Fenchel-Young losses", JMLR 2020.
    {ref}

  Example:
{example}
  """

_SPARSEMAX_REF = 'Martins & Astudillo, "From softmax to sparsemax", ICML 2016.'
_ENTMAX_REF = 'Peters, Niculae & Martins, "Sparse sequence-to-sequence models", ACL 2019.'

_SPARSEMAX_LOSS_EXAMPLE = '''\
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = np.array([[2.0, 1.0, -1.0], [2.0, 1.0, -1.0]])
    >>> [round(float(l), 4) for l in ops.sparsemax_loss(z, np.array([0, 1]))]
    [0.0, 1.0]'''

_ENTMAX15_LOSS_EXAMPLE = '''\
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = np.array([[2.0, 1.0, -2.0]])
    >>> y = np.array([1])
    >>> round(float(ops.entmax15_loss(z, y)[0]), 4)
    1.0617
    >>> bisect = ops.entmax_bisect_loss(z, y, alpha=1.5)
    >>> bool(np.allclose(ops.entmax15_loss(z, y), bisect, atol=1e-5))
    True'''

_ENTMAX_BISECT_LOSS_EXAMPLE = '''\
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = np.array([[2.0, 1.0, -2.0]])
    >>> y = np.array([1])
    >>> loss = ops.entmax_bisect_loss(z, y, alpha=2.0)
    >>> bool(np.allclose(loss, ops.sparsemax_loss(z, y), atol=1e-5))
    True'''


def sparsemax_loss(logits: ArrayLike, labels: ArrayLike, *, where: Optional[ArrayLike] = None,
                   ignore_index: Optional[int] = None) -> Array:
  return _loss('sparsemax', 0, logits, labels, None, where, ignore_index)


def entmax15_loss(logits: ArrayLike, labels: ArrayLike, *, where: Optional[ArrayLike] = None,
                  ignore_index: Optional[int] = None) -> Array:
  return _loss('entmax15', 0, logits, labels, None, where, ignore_index)


def entmax_bisect_loss(logits: ArrayLike, labels: ArrayLike, *, alpha: ArrayLike = 1.5,
                       n_iter: int = 50, where: Optional[ArrayLike] = None,
                       ignore_index: Optional[int] = None) -> Array:
  return _loss('bisect', _n_iter(n_iter), logits, labels, alpha, where, ignore_index)


sparsemax_loss.__doc__ = _LOSS_DOC.format(name='sparsemax', alpha=2, extra='', raises='',
                                          ref=_SPARSEMAX_REF,
                                          example=_SPARSEMAX_LOSS_EXAMPLE)
entmax15_loss.__doc__ = _LOSS_DOC.format(name='entmax15', alpha=1.5, extra='', raises='',
                                         ref=_ENTMAX_REF, example=_ENTMAX15_LOSS_EXAMPLE)
entmax_bisect_loss.__doc__ = _LOSS_DOC.format(
    name='entmax_bisect', alpha='`alpha`', ref=_ENTMAX_REF, example=_ENTMAX_BISECT_LOSS_EXAMPLE,
    extra=('\n    alpha: scalar or array broadcastable to `logits.shape[:-1]`, > 1 (a traced'
           ' alpha <= 1: NaN).\n    n_iter: Python int >= 1, bisection steps.'),
    raises=', `alpha` not broadcastable or (concrete) not finite and > 1, `n_iter` not an int >= 1')
