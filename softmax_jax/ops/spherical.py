"""Softmax alternatives of the spherical family: spherical softmax and Taylor softmax.

Both map scores to a distribution without `exp`: `p_k = f(x_k) / sum_j f(x_j)` with
`f(z) = z^2 + eps` (spherical) or the even-order Taylor polynomial of `exp` (Taylor), which is
positive. Maths in float32 for 16-bit inputs; `where=False` entries get probability exactly 0.
A NaN score (one `where` keeps) makes its row NaN: the NaN rule of the package docstring.
"""

import jax.numpy as jnp
import numpy as np

from softmax_jax.ops import _checks
from softmax_jax.ops import _normalize as _norm


def _float(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_x(x):
  """`x` is `[..., K]` with K >= 1 (always: a static check); returns it as an array."""
  x = jnp.asarray(x)
  _checks.last_dim_at_least(x, 1, 'x', '[..., num_classes]')
  return x


def _masked(x, where):
  where = _checks.where_mask(where, x, target="x")
  return x if where is None else jnp.where(where, x, 0)


def _normalize_rows(f, where, x_dtype):
  """`f / sum(f)` over the last axis; an all-zero row becomes uniform over its kept entries.

  `f >= 0`, so the sum is 0 only for an all-zero row; a NaN sum is not 0 and stays NaN.
  """
  keep = jnp.ones_like(f, dtype=jnp.bool_) if where is None else jnp.broadcast_to(where, f.shape)
  total = jnp.sum(f, axis=-1, keepdims=True)
  ok = total != 0
  uniform = keep / jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
  p = jnp.where(ok, f / jnp.where(ok, total, 1), uniform)
  return p.astype(x_dtype)


def spherical_softmax(x, *, eps=0.0, where=None):
  """Spherical softmax `(x_k^2 + eps) / sum_j (x_j^2 + eps)` over the last axis.

  Reference: de Brébisson & Vincent, "An exploration of softmax alternatives belonging to the
  spherical loss family", ICLR 2016. A row of zeros with eps = 0 gives the uniform distribution.

  Args:
    x: [..., K] float.
    eps: a scalar >= 0 added to every square.
    where: optional [..., K] bool (broadcastable); False entries get probability 0.

  Returns:
    [..., K] probabilities in the dtype of `x`.

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `x` is not
      `[..., K]` with K >= 1, `where` is not a bool mask that broadcasts to `x`, or `eps` is not
      a scalar; for a concrete `eps` only, if it is < 0 (a traced one is not checked).

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> p = ops.spherical_softmax(np.array([[1.0, -1.0, 2.0]]))
    >>> [round(float(v), 4) for v in p[0]]
    [0.1667, 0.1667, 0.6667]
  """
  x = _check_x(x)
  _checks.rank(eps, 0, 'eps', '[]')
  if not _checks.is_traced(eps) and not float(eps) >= 0:
    raise ValueError(f'`eps` must be >= 0; got {eps}.')
  xf = _float(x)
  return _normalize_rows(_masked(xf * xf + eps, where), where, _norm.out_dtype(x, xf))


def taylor_softmax(x, *, order=2, where=None):
  """Taylor softmax `f(x_k) / sum_j f(x_j)`, `f(z) = sum_{i<=n} z^i / i!` (n even, so f > 0).

  n = 2 is `1 + z + z^2 / 2 >= 1/2`. Reference: Vincent et al., "Efficient exact gradient update
  for training deep networks with very large sparse targets", NeurIPS 2015; de Brébisson &
  Vincent 2016.

  Args:
    x: [..., K] float.
    order: even n >= 2.
    where: optional [..., K] bool (broadcastable); False entries get probability 0.

  Returns:
    [..., K] probabilities in the dtype of `x`.

  Raises:
    ValueError: always (from shapes, dtypes and the Python `order`, so also under `jit`/`vmap`/
      `grad`) if `x` is not `[..., K]` with K >= 1, `where` is not a bool mask that broadcasts
      to `x`, or `order` is not an even Python int >= 2. No value of `x` is checked.

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> p = ops.taylor_softmax(np.array([[1.0, 0.0, -1.0]]), order=2)
    >>> [round(float(v), 4) for v in p[0]]
    [0.625, 0.25, 0.125]
    >>> round(float(p.sum()), 4)
    1.0
  """
  if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or order < 2 or order % 2:
    raise ValueError(f'`order` must be an even integer >= 2 (odd orders can be negative); '
                     f'got {order!r}.')
  x = _check_x(x)
  xf = _float(x)
  f, term = jnp.ones_like(xf), jnp.ones_like(xf)
  for i in range(1, int(order) + 1):
    term = term * xf / i
    f = f + term
  return _normalize_rows(_masked(f, where), where, _norm.out_dtype(x, xf))
