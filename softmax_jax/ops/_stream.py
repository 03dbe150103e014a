"""Streamed per-row logsumexp and cross-entropy of linear scores (private to `softmax_jax.ops`).

`stream(cfg, x [R, d], w [d, K], b [K] | None, mask [K] bool | None, labels [R] int)` returns
`(ce [R], lse [R])` of the scores `u = z` or, with `cfg.sigsoftmax`, `u = z + log_sigmoid(z)`,
`z = x @ w + b` (masked classes and -inf logits: `u = -inf`): `lse = logsumexp_k u`,
`ce = lse - u_label` (+inf for a label on a masked class). The forward pass is one online
logsumexp over vocabulary chunks (an `[R, chunk]` block at a time); the `custom_vjp` keeps O(R)
residuals besides its inputs and recomputes each chunk backward:
`du_k = (g_lse + g_ce) softmax(u)_k - g_ce 1[k = label]`, times `du/dz = 1 + sigmoid(-z)`
for sigsoftmax, then `dx += dz @ w_c.T`, `dw_c = x.T @ dz`, `db_c = sum_rows dz`. Matrix
products accumulate in float32 (float64 for float64 inputs); gradients come back in the input
dtypes. The same chunking as `ops/fused.py` (`linear_cross_entropy`, vocabulary-outer), plus the
sigsoftmax transform and a class mask; the mixture of softmaxes (ops/mixture.py) runs it on the
`N * M` rows of its component contexts.
"""

import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 1024


class Cfg(NamedTuple):
  sigsoftmax: bool
  chunk_size: int


def acc_dtype(*arrays):
  """Accumulation dtype: float32, or float64 for float64 inputs."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def chunks(total, size, body, carry):
  """Runs `carry = body(start, length, carry)` over [0, total) in blocks of `size`.

  A shorter tail block goes first: the loop then depends on it, so XLA cannot hoist the tail's
  matrix product above the loop and hold its output through it. (Shared with ops/fused.py.)
  """
  n, tail = divmod(total, size)
  if tail:
    carry = body(n * size, tail, carry)
  if n == 1:
    return body(0, size, carry)
  return lax.fori_loop(0, n, lambda i, c: body(i * size, size, c), carry) if n else carry


def cols(a, start, size):
  """Columns [start, start + size) of `a` (the last axis); None stays None."""
  if a is None or size == a.shape[-1]:
    return a
  return lax.dynamic_slice_in_dim(a, start, size, a.ndim - 1)


def _scores(cfg, x, w, b, mask, start, size):
  """`(u, zs, keep)` of classes [start, start + size): scores, kept logits (0 elsewhere), kept."""
  z = jnp.dot(x, cols(w, start, size), preferred_element_type=acc_dtype(x, w))
  if b is not None:
    z = z + cols(b, start, size).astype(z.dtype)
  keep = z != -jnp.inf  # NaN is kept: it propagates.
  if mask is not None:
    keep = keep & cols(mask, start, size)[None, :]
  zs = jnp.where(keep, z, 0.0)  # What is not kept is not read (no NaN in a derivative).
  u = zs + jax.nn.log_sigmoid(zs) if cfg.sigsoftmax else zs
  return jnp.where(keep, u, -jnp.inf), zs, keep


def _hit(u, labels, start):
  return lax.broadcasted_iota(labels.dtype, u.shape, 1) + start == labels[:, None]


def _forward(cfg, x, w, b, mask, labels):
  acc = acc_dtype(x, w)

  def body(start, size, carry):
    m, s, u_y = carry
    u, _, _ = _scores(cfg, x, w, b, mask, start, size)
    m_new = jnp.maximum(m, u.max(1))
    m_ref = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # all -inf so far: keep exp finite
    s = s * jnp.exp(m - m_ref) + jnp.exp(u - m_ref[:, None]).sum(1)
    u_y = u_y + jnp.where(_hit(u, labels, start), u, 0.0).sum(1)
    return m_new, s, u_y

  zero = jnp.zeros(x.shape[0], acc)
  m, s, u_y = chunks(w.shape[1], cfg.chunk_size, body, (zero - jnp.inf, zero, zero))
  lse = m + jnp.log(s)  # A fully masked row: -inf.
  ce = jnp.where(jnp.isneginf(u_y) & ~jnp.isnan(lse), jnp.inf, lse - u_y)
  return ce, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def stream(cfg, x, w, b, mask, labels):
  """`(ce [R], lse [R])`, see the module docstring; `cfg` is a static `Cfg`."""
  return _forward(cfg, x, w, b, mask, labels)


def _fwd(cfg, x, w, b, mask, labels):
  ce, lse = _forward(cfg, x, w, b, mask, labels)
  return (ce, lse), (x, w, b, mask, labels, lse)


def _bwd(cfg, res, cts):
  x, w, b, mask, labels, lse = res
  g_ce, g_lse = (g.astype(lse.dtype) for g in cts)
  a, c = g_ce + g_lse, g_ce  # coefficients of softmax(u) and of the one-hot label
  mm, acc = jnp.result_type(x, w), lse.dtype

  def put(total, start, part):
    return lax.dynamic_update_slice_in_dim(total, part.astype(total.dtype), start, total.ndim - 1)

  def body(start, size, carry):
    dx, dw, db = carry
    u, zs, keep = _scores(cfg, x, w, b, mask, start, size)
    du = a[:, None] * jnp.exp(u - lse[:, None]) - c[:, None] * _hit(u, labels, start)
    dz = du * (1.0 + jax.nn.sigmoid(-zs)) if cfg.sigsoftmax else du
    dz = jnp.where(keep & ((a != 0) | (c != 0))[:, None], dz, 0.0)  # masked, unused: exactly 0
    g = dz.astype(mm)
    dx = dx + jnp.dot(g, cols(w, start, size).T, preferred_element_type=acc)
    dw = put(dw, start, jnp.dot(x.T, g, preferred_element_type=acc))
    db = db if db is None else put(db, start, dz.sum(0))
    return dx, dw, db

  zeros = lambda v: None if v is None else jnp.zeros_like(v)
  dx, dw, db = chunks(w.shape[1], cfg.chunk_size, body,
                       (jnp.zeros(x.shape, acc), zeros(w), zeros(b)))
  return dx.astype(x.dtype), dw, db, None, None


stream.defvjp(_fwd, _bwd)
