"""Fused linear cross-entropy: `cross_entropy(x @ w + bias, labels)` without the [N, K] logits.

Two passes over vocabulary chunks do all the work: `_lse_pass` (online logsumexp, loss) and
`_grad_pass` (softmax minus target, then dx, dw, db). They read a chunk's logits from
`logits(start, size)`, which is either

* a matrix product `x @ w[:, chunk]` (vocabulary-outer, Cut Cross-Entropy): the forward pass
  keeps O(N) residuals and the backward pass recomputes: four matrix products; or
* a slice of one `[B, K]` block `x_b @ w` (token-outer, Liger Kernel): both passes run in the
  forward pass, which so forms every gradient: three matrix products; a reduced loss only,
  as its cotangent is a scalar the backward pass can apply afterwards.

A NaN feature gives its example a NaN loss (a NaN weight: every example), and `ignore_index`
works as in `cross_entropy`: the NaN rule and `ignore_index` of the package docstring.
"""

import functools
import math
from typing import NamedTuple

import chex
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from softmax_jax.ops import _autotune
from softmax_jax.ops import _checks
from softmax_jax.ops._stream import chunks
from softmax_jax.ops._stream import cols

SymbolicZero = jax.custom_derivatives.SymbolicZero


def _acc(*arrays):
  """Accumulation dtype: float32, or float64 for float64 inputs."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


class _Cfg(NamedTuple):
  reduction: str
  label_smoothing: float
  z_loss: float
  soft_cap: float | None
  chunk_size: int
  token_chunk_size: int


def linear_cross_entropy(x, w, labels, *, bias=None, logit_offsets=None, ignore_index=None,
                         label_smoothing=0.0, z_loss=0.0, logit_soft_cap=None,
                         reduction='none', return_lse=False, chunk_size=None,
                         token_chunk_size=None, where=None):
  """Cross-entropy of the linear logits `x @ w`, streamed over chunks, never [N, K] at once.

  `z = x @ w + bias`; `z = c * tanh(z / c)` if `logit_soft_cap=c`; `z += logit_offsets`;
  `loss = lse(z) - sum_k t_k z_k + z_loss * lse(z)**2`, `t = (1 - eps) onehot + eps / K_valid`
  on the K_valid classes whose logit is not -inf: equal to `cross_entropy(z, labels)`.

  `reduction='none'` streams over vocabulary chunks: an online logsumexp forward (one matrix
  product), O(N) residuals, logits recomputed backward (three more). `'sum'`/`'mean'` stream
  over token chunks of whole rows and form every gradient in the forward pass (three matrix
  products, as Liger Kernel does); the backward pass only scales them. Matrix products
  accumulate in float32 (`preferred_element_type`), all reductions are float32, gradients
  come back in the input dtypes. (On CPU, XLA computes bfloat16 products in float32 and
  hoists a float32 copy of `w` out of the loop: d * K * 4 more bytes. GPUs need no copy.)

  Args:
    x: [..., d] features, float.
    w: [d, K] weights, float.
    labels: [...] int (a list or NumPy array too), in [0, K) or equal to `ignore_index`.
      Concrete out-of-range labels raise; under `jit` they give a NaN loss (and NaN
      gradients), never a silent clip.
    bias: [K] float or None, added before the soft cap.
    logit_offsets: [K] float or None, added after the soft cap, differentiable like `bias`:
      `tau * log(prior)` for logit adjustment, or -inf to drop a class (vocabulary padding).
    ignore_index: None or an int (PyTorch's): examples whose label equals it are padding,
      with loss exactly 0 and gradient exactly 0; their label is not range-checked and their
      features are not read. (To drop classes, give them -inf `logit_offsets`.)
    label_smoothing: eps in [0, 1).
    z_loss: coefficient of `lse**2` (PaLM).
    logit_soft_cap: c > 0 or None (Gemma 2).
    reduction: 'none' -> [...] float32; 'sum' -> scalar; 'mean' -> scalar sum divided by
      the number of examples not ignored (0 when there are none). float64 for float64.
    return_lse: also return lse(z) [...] float32, differentiable (0 for ignored examples).
    chunk_size: vocabulary columns per chunk. 'none' holds ~2 [N, chunk_size] float32 blocks.
      None (default): tuned, see below.
    token_chunk_size: rows per block for 'sum' and 'mean', which hold one [token_chunk_size, K]
      float32 block and a few [token_chunk_size + d, chunk_size] ones, and a float32 [d, K]
      gradient accumulator if w is not float32. None (default): tuned.
      A None chunk size is chosen by measurement on this machine: on first use for a
      (backend, device / CPU model and vector extensions, dtype, reduction, N rounded up to a
      power of two, d, K) a few candidates are timed on a scaled-down problem of those shapes
      (eagerly, also under `jit`; a few seconds), among those needing at most 1.25 times the
      block memory of 4096 / 256, and the fastest is cached in memory and in
      `$SOFTMAX_JAX_CACHE_DIR/fused_chunks.json` (default `~/.cache/softmax_jax/`). Problems
      under 2**32 multiply-adds (N * d * K), and every problem when the environment variable
      `SOFTMAX_JAX_AUTOTUNE=0`, use 4096 and 256 untimed. Integers are used as given.
    where: removed; passing it raises. It was a per-example mask, which is now `ignore_index`
      (`where=m` is `labels=jnp.where(m, labels, -1), ignore_index=-1`): in `cross_entropy`
      `where` masks classes, and one name has one meaning.

  Returns:
    loss: [...] float32 or a float32 scalar; and lse [...] float32 if `return_lse`.

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `w` is not
      `[d, K]`, `x` is not `[..., d]`, `x` or `w` is not float, `labels` is not an integer
      array of shape `x.shape[:-1]`, `bias` or `logit_offsets` is not a float `[K]`, or `where`
      is passed; if a Python option (`ignore_index`, `label_smoothing`, `logit_soft_cap`,
      `reduction`, the chunk sizes) is out of its range; and, for concrete `labels` only, if a
      label other than `ignore_index` lies outside [0, K) (traced ones are not checked: they
      give a NaN loss and NaN gradients).

  References:
    Wijmans et al. 2024, Cut Your Losses in Large-Vocabulary Language Models, arXiv:2411.09009.
    Hsu et al. 2024, Liger Kernel, arXiv:2410.10989. Chowdhery et al. 2022 (PaLM, z-loss).
    Menon et al. 2021, Long-tail learning via logit adjustment, arXiv:2007.07314.

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> x = np.sin(np.arange(8.0)).reshape(2, 4)
    >>> w = np.cos(np.arange(20.0)).reshape(4, 5)
    >>> y = jnp.array([3, 0])
    >>> loss = ops.linear_cross_entropy(x, w, y)
    >>> bool(np.allclose(loss, ops.cross_entropy(x @ w, y), atol=1e-5))
    True
  """
  if where is not None:
    raise _checks.ArgumentError(
        '`where` is not an option of linear_cross_entropy: to ignore examples (padding) pass '
        '`ignore_index` (a per-example mask `m` is `labels=jnp.where(m, labels, -1), '
        'ignore_index=-1`); to drop classes, give them -inf `logit_offsets`; got a `where` of '
        f'shape {np.shape(where)}.')
  x, w = jnp.asarray(x), jnp.asarray(w)
  bias, logit_offsets = (None if a is None else jnp.asarray(a) for a in (bias, logit_offsets))
  _check(x, w, bias, logit_offsets, label_smoothing, logit_soft_cap, reduction, chunk_size,
         token_chunk_size)
  lead, (d, k) = x.shape[:-1], w.shape
  if chunk_size is None or token_chunk_size is None:
    tuned = tuned_chunk_sizes(math.prod(lead), d, k, dtype=jnp.result_type(x, w),
                              reduction=reduction)
    chunk_size = tuned[0] if chunk_size is None else chunk_size
    token_chunk_size = tuned[1] if token_chunk_size is None else token_chunk_size
  labels, ignored = _checks.labels_or_ignored(labels, k, lead, ignore_index, 'x')
  if ignored is not None:
    x = jnp.where(ignored[..., None], jnp.zeros((), x.dtype), x)  # Not read: no NaN leaks.
  valid = jnp.ones(lead, bool) if ignored is None else ~ignored
  rw = valid.reshape(-1).astype(_acc(x, w))
  if reduction == 'mean':
    rw = rw / jnp.maximum(rw.sum(), 1.0)
  cfg = _Cfg(reduction, float(label_smoothing), float(z_loss),
             None if logit_soft_cap is None else float(logit_soft_cap),
             int(chunk_size), int(token_chunk_size))
  loss, lse = _lce(cfg, x.reshape(-1, d), w, bias, logit_offsets, labels.reshape(-1), rw)
  if reduction == 'none':
    loss = loss.reshape(lead)
  lse = lse.reshape(lead)
  if ignored is not None:
    lse = jnp.where(ignored, jnp.zeros_like(lse), lse)
  return (loss, lse) if return_lse else loss


def tuned_chunk_sizes(n, d, k, *, dtype=jnp.float32, reduction='mean'):
  """`(chunk_size, token_chunk_size)` that `linear_cross_entropy` uses when both are None.

  For `x: [n, d]`, `w: [d, K]` of `dtype`: the cached answer, else tuned now (see
  `linear_cross_entropy`); 4096 and 256 for small problems or with `SOFTMAX_JAX_AUTOTUNE=0`.
  """
  return _autotune.chunks(reduction, int(n), int(d), int(k), jnp.dtype(dtype), linear_cross_entropy)


def _check(x, w, bias, offsets, eps, cap, reduction, chunk_size, token_chunk_size):
  """Static checks (shapes, dtypes: also under jit) and checks of the Python options."""
  _checks.rank(w, 2, 'w', '[d, K]')
  d, k = w.shape
  _checks.chex_check(chex.assert_shape, x, (..., d), name='x',
                     need=f'have shape [..., d] with d = w.shape[0] = {d}', got=f'shape {x.shape}')
  _checks.dtype(x, float, 'x', 'be a float array')
  _checks.dtype(w, float, 'w', 'be a float array')
  for name, a in (('bias', bias), ('logit_offsets', offsets)):
    if a is not None:
      _checks.shape(a, (k,), name, '[K]')
      _checks.dtype(a, float, name, 'be a float array')

  def fail(name, need, got):
    raise _checks.ArgumentError(f'`{name}` must {need}; got {got}.')
  if not 0 <= eps < 1:
    fail('label_smoothing', 'be in [0, 1)', eps)
  if cap is not None and not cap > 0:
    fail('logit_soft_cap', 'be None or > 0', cap)
  if reduction not in ('none', 'sum', 'mean'):
    fail('reduction', "be 'none', 'sum' or 'mean'", repr(reduction))
  for name, n in (('chunk_size', chunk_size), ('token_chunk_size', token_chunk_size)):
    if n is not None and (int(n) != n or n < 1):
      fail(name, 'be a positive int', n)  # or None: tuned


def _logits(cfg, u, b, o, start):
  """Logits of classes [start, start + u.shape[1]) from `u = x @ w[:, cols]`; tanh for the cap."""
  size = u.shape[1]
  z = u if b is None else u + cols(b, start, size).astype(u.dtype)
  t = None
  if cfg.soft_cap is not None:
    t = jnp.tanh(z / cfg.soft_cap)
    z = cfg.soft_cap * t
  if o is not None:
    z = z + cols(o, start, size).astype(u.dtype)
  return z, t


def _hit(z, labels, start):
  """[n, size] bool: column start + j is the row's label (a fused iota compare)."""
  return lax.broadcasted_iota(labels.dtype, z.shape, 1) + start == labels[:, None]


def _target(cfg, z, labels, start, kv):
  """Target columns: (1 - eps) onehot + eps / kv on the kv classes with a finite logit."""
  eps, hit = cfg.label_smoothing, _hit(z, labels, start)
  if not eps:
    return hit.astype(z.dtype)
  return jnp.where(hit, 1.0 - eps, 0.0) + jnp.where(jnp.isneginf(z), 0.0, eps / kv[:, None])


def _dlogits(cfg, z, t, lse, kv, labels, a, c, start):
  """d/dz of `a * lse + c * (loss - lse)` per row: before the cap, and after it (offsets)."""
  dz = a[:, None] * jnp.exp(z - lse[:, None]) - c[:, None] * _target(cfg, z, labels, start, kv)
  dz = jnp.where(((a != 0) | (c != 0))[:, None], dz, 0.0)  # padding rows stay exactly 0
  return (dz if t is None else dz * (1.0 - t * t)), dz


def _row_loss(cfg, lse, zl, zsum, kv, labels, rw, k):
  """Per-row loss; 0 where rw == 0 (padding), NaN for an out-of-range label."""
  eps = cfg.label_smoothing
  loss = lse - (1.0 - eps) * zl + cfg.z_loss * lse * lse
  if eps:
    loss = loss - eps * zsum / kv
  ok = (labels >= 0) & (labels < k)
  return jnp.where(rw != 0, jnp.where(ok, loss, jnp.nan), 0.0)


def _coefs(cfg, lse, labels, rw, k):
  """Row weights (a on softmax, c on target) of the gradient of `sum(rw * loss)`."""
  ok = (labels >= 0) & (labels < k)
  a = rw * (1.0 + 2.0 * cfg.z_loss * lse)
  nan = lambda v: jnp.where(rw != 0, jnp.where(ok, v, jnp.nan), 0.0)  # NaN: no silent clip
  return nan(a), nan(rw)


def _lse_pass(cfg, logits, n, k, labels, rw, acc):
  """Per-row loss [n] and lse [n] by an online logsumexp over vocabulary chunks.

  `logits(start, size)` gives the logits of those classes: a matrix product (vocabulary-outer)
  or a slice of one (token-outer); either way only [n, chunk] is formed at a time.
  """
  def body(start, size, carry):
    m, s, zl, zsum, kv = carry
    z, _ = logits(start, size)
    m_new = jnp.maximum(m, z.max(1))
    m_ref = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # all -inf so far: keep exp finite
    s = s * jnp.exp(m - m_ref) + jnp.exp(z - m_ref[:, None]).sum(1)
    zl = zl + jnp.where(_hit(z, labels, start), z, 0.0).sum(1)
    if cfg.label_smoothing:  # smoothing spreads over the classes with a finite logit
      zsum = zsum + jnp.where(jnp.isneginf(z), 0.0, z).sum(1)
      kv = kv + (~jnp.isneginf(z)).sum(1, dtype=acc)
    return m_new, s, zl, zsum, kv

  zero = jnp.zeros(n, acc)
  m, s, zl, zsum, kv = chunks(k, cfg.chunk_size, body, (zero - jnp.inf, zero, zero, zero, zero))
  lse = m + jnp.log(s)
  return _row_loss(cfg, lse, zl, zsum, kv, labels, rw, k), lse, kv


def _grad_pass(cfg, logits, x, w, labels, lse, kv, a, c, carry, need=(True,) * 4,
               accumulate=False):
  """Gradients of `sum(a * lse + c * (loss - lse))` into carry = (dx, dw, db, do).

  Per vocabulary chunk: dz = a p - c t, dx += dz @ w_c.T, dw_c = x.T @ dz, db_c, do_c; the
  class-sized ones are written in place, or added to (`accumulate`, for token blocks).
  """
  k, mm, acc = w.shape[1], jnp.result_type(x, w), _acc(x, w)
  need = tuple(n and a is not None for n, a in zip(need, carry))

  def add(total, start, part):  # total[..., start:start + n] (+)= part, in place
    if accumulate:
      part = cols(total, start, part.shape[-1]).astype(part.dtype) + part
    return lax.dynamic_update_slice_in_dim(total, part.astype(total.dtype), start, total.ndim - 1)

  def body(start, size, carry):
    dx, dw, db, do = carry
    z, t = logits(start, size)
    dzp, dz = _dlogits(cfg, z, t, lse, kv, labels, a, c, start)
    g = dzp.astype(mm)
    if need[0]:
      dx = dx + jnp.dot(g, cols(w, start, size).T, preferred_element_type=acc)
    if need[1]:
      dw = add(dw, start, jnp.dot(x.T, g, preferred_element_type=acc))
    db = add(db, start, dzp.sum(0)) if need[2] else db
    do = add(do, start, dz.sum(0)) if need[3] else do
    return dx, dw, db, do

  return chunks(k, cfg.chunk_size, body, carry)


def _matmul_logits(cfg, x, w, b, o):
  """Vocabulary-outer logits: one [N, C] matrix product per chunk."""
  acc = _acc(x, w)
  return lambda start, size: _logits(
      cfg, jnp.dot(x, cols(w, start, size), preferred_element_type=acc), b, o, start)


def _token_pass(cfg, x, w, b, o, labels, rw, need):
  """Forward with gradients, token-outer: weighted loss sum, lse [N] and (dx, dw, db, do).

  Per block of B rows the one [B, K] buffer is `x_b @ w`; both passes read it by chunks.
  """
  n, (d, k), acc = x.shape[0], w.shape, _acc(x, w)

  def body(start, size, carry):
    total, lse, kv, dx, dw, db, do = carry
    xb, lb, rb = (lax.dynamic_slice_in_dim(a, start, size, 0) for a in (x, labels, rw))
    u = jnp.dot(xb, w, preferred_element_type=acc)
    logits = lambda s, c: _logits(cfg, cols(u, s, c), b, o, s)
    loss, lse_b, kv_b = _lse_pass(cfg, logits, size, k, lb, rb, acc)
    a, c = _coefs(cfg, lse_b, lb, rb, k)
    dxb, dw, db, do = _grad_pass(cfg, logits, xb, w, lb, lse_b, kv_b, a, c,
                                 (jnp.zeros((size, d), acc), dw, db, do), need, True)
    dx = lax.dynamic_update_slice_in_dim(dx, dxb.astype(x.dtype), start, 0)
    lse, kv = (lax.dynamic_update_slice_in_dim(a, v, start, 0)
               for a, v in ((lse, lse_b), (kv, kv_b)))
    return total + (loss * rb).sum(), lse, kv, dx, dw, db, do

  zk = jnp.zeros(k, acc)
  init = (jnp.zeros((), acc), jnp.zeros(n, acc), jnp.zeros(n, acc), jnp.zeros_like(x),
          jnp.zeros(w.shape, acc), zk, zk)
  total, lse, kv, *grads = chunks(n, cfg.token_chunk_size, body, init)
  grads = tuple(g.astype(a.dtype) if ok else None
                for g, a, ok in zip(grads, (x, w, b, o), need))
  return total, lse, kv, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lce(cfg, x, w, b, o, labels, rw):
  return _lce_fwd_none(cfg, x, w, b, o, labels, rw)[0]


def _lce_fwd_none(cfg, x, w, b, o, labels, rw):
  """Forward, vocabulary-outer: one matrix product; residuals O(N) besides the inputs."""
  loss, lse, kv = _lse_pass(cfg, _matmul_logits(cfg, x, w, b, o), x.shape[0], w.shape[1],
                            labels, rw, _acc(x, w))
  out = (loss if cfg.reduction == 'none' else (loss * rw).sum()), lse
  return out, (x, w, b, o, labels, rw, lse, kv, None)


def _lce_fwd(cfg, x, w, b, o, labels, rw):
  need = tuple(a is not None and a.perturbed for a in (x, w, b, o))
  p = lambda a: None if a is None else a.value  # symbolic_zeros wraps primals
  x, w, b, o, labels, rw = map(p, (x, w, b, o, labels, rw))
  if cfg.reduction == 'none':
    return _lce_fwd_none(cfg, x, w, b, o, labels, rw)
  total, lse, kv, grads = _token_pass(cfg, x, w, b, o, labels, rw, need)
  return (total, lse), (x, w, b, o, labels, rw, lse, kv, grads)


def _lce_bwd(cfg, res, cts):
  x, w, b, o, labels, rw, lse, kv, grads = res
  g_loss, g_lse = cts
  zero = lambda g: isinstance(g, SymbolicZero)
  out = None
  if grads is not None and not zero(g_loss):  # reduced: the forward pass formed them
    out = tuple(None if d is None else (d.astype(g_loss.dtype) * g_loss).astype(d.dtype)
                for d in grads)
  if grads is None and not zero(g_loss) or not zero(g_lse):
    a = c = jnp.zeros_like(lse)
    if grads is None and not zero(g_loss):
      a, c = _coefs(cfg, lse, labels, g_loss * rw, w.shape[1])
    if not zero(g_lse):
      a = a + g_lse
    zeros = lambda a: None if a is None else jnp.zeros_like(a)
    dx, *more = _grad_pass(cfg, _matmul_logits(cfg, x, w, b, o), x, w, labels, lse, kv, a, c,
                           (jnp.zeros(x.shape, lse.dtype), zeros(w), zeros(b), zeros(o)))
    more = (dx.astype(x.dtype), *more)
    out = more if out is None else tuple(
        None if u is None else u + v for u, v in zip(out, more))
  if out is None:
    out = (None,) * 4
  return (*out, None, None)


_lce.defvjp(_lce_fwd, _lce_bwd, symbolic_zeros=True)
