"""Past the softmax bottleneck: sigsoftmax and the mixture of softmaxes, exact and streamed.

A softmax over `z = h @ W` has log-probabilities of rank <= d + 1 across contexts (the softmax
bottleneck). Two cures, both in log space (nothing takes `log(p + eps)`):

- sigsoftmax: `log_softmax(z + log_sigmoid(z))` (Kanai et al. 2018);
- mixture of softmaxes (MoS): `log p_k = logsumexp_m(log pi_m + log_softmax(z_m)_k)` over M
  components with prior `pi = softmax(prior_logits)` (Yang et al. 2018); with `sigsoftmax` a
  mixture of sigsoftmaxes.

`mixture_log_softmax` is exact and forms `[..., M, K]`; `mixture_cross_entropy` is the training
loss of a MoS head with a shared output layer `w`, streamed over vocabulary chunks (never
`[N, M, K]`), and `linear_logsumexp` the streamed normalizer of each component. Numerics follow
`softmax_jax.ops.softmax`: float32 for 16-bit inputs, `where=False` and `-inf` logits get
probability 0 and gradient 0, and the NaN rule of the package docstring.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from softmax_jax.ops import _checks
from softmax_jax.ops import _normalize as _norm
from softmax_jax.ops import _stream

Array = jax.Array


# Eager calls reuse one compiled stream per shape and configuration (a bare `fori_loop` body is
# retraced and recompiled on every eager call); under an outer `jit` this is inlined.
_stream_jit = jax.jit(_stream.stream, static_argnums=0)


def _sig(x, keep):
  """`x + log_sigmoid(x)` where `keep`, `-inf` elsewhere (entries not kept are never read)."""
  xs = jnp.where(keep, x, 0)
  return jnp.where(keep, xs + jax.nn.log_sigmoid(xs), -jnp.inf)


def _sig_scores(x, where):
  keep = x != -jnp.inf
  return _sig(x, keep if where is None else keep & where)


def sigsoftmax(logits: Array, *, where: Optional[Array] = None) -> Array:
  """Sigsoftmax over the last axis: `softmax(z + log_sigmoid(z))`, optionally masked.

  `p_k = exp(z_k) sigmoid(z_k) / sum_j [where_j] exp(z_j) sigmoid(z_j)`; masked entries and `-inf`
  logits are exactly 0 (gradient 0), a fully masked row all zeros, a NaN row all NaN.

  Args:
    logits: [..., K] float; 16-bit floats are computed in float32.
    where: optional [..., K] bool (broadcastable); False entries are excluded.

  Returns:
    [..., K] probabilities in the dtype of `logits`.

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `logits`
      is not `[..., K]` with K >= 1 or `where` is not a bool mask that broadcasts to it.

  References:
    Kanai et al., "Sigsoftmax: Reanalysis of the softmax bottleneck", NeurIPS 2018.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = jnp.array([[1.0, 2.0, -3.0]])
    >>> p = ops.sigsoftmax(z)
    >>> round(float(p.sum()), 4)
    1.0
    >>> bool(np.allclose(p, ops.softmax(z + jax.nn.log_sigmoid(z))))
    True
  """
  x, where = _norm.prepare(logits, where, 'logits')
  return _norm.normalize(_sig_scores(x, where), None)[0].astype(_norm.out_dtype(logits, x))


def log_sigsoftmax(logits: Array, *, where: Optional[Array] = None) -> Array:
  """Log-sigsoftmax over the last axis: `log_softmax(z + log_sigmoid(z))`, optionally masked.

  Masked entries and `-inf` logits are `-inf` (gradient 0; a fully masked row all `-inf`, never
  NaN); a NaN logit that `where` keeps makes its row NaN.

  Args:
    logits: [..., K] float; 16-bit floats are computed in float32.
    where: optional [..., K] bool (broadcastable); False entries are excluded.

  Returns:
    [..., K] log-probabilities in the dtype of `logits`.

  Raises:
    ValueError: as `sigsoftmax`.

  References:
    Kanai et al., "Sigsoftmax: Reanalysis of the softmax bottleneck", NeurIPS 2018.

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> z = jnp.array([[1.0, 2.0, -3.0]])
    >>> bool(np.allclose(ops.log_sigsoftmax(z), jnp.log(ops.sigsoftmax(z))))
    True
  """
  x, where = _norm.prepare(logits, where, 'logits')
  return _norm.normalize(_sig_scores(x, where), None)[1].astype(_norm.out_dtype(logits, x))


def _float(x, name, layout):
  _checks.dtype(x, float, name, f'be a float array {layout}')


# pylint: disable=redefined-outer-name (the option `sigsoftmax` shadows the op of that name)


def mixture_log_softmax(logits: Array, prior_logits: Array, *, where: Optional[Array] = None,
                        sigsoftmax: bool = False) -> Array:
  """Exact log-probabilities of a mixture of M softmaxes, mixed in log space.

  `log p_k = logsumexp_m(log_softmax(prior_logits)_m + log_softmax(logits_m)_k)` (with
  `sigsoftmax`, `log_sigsoftmax(logits_m)_k`). Forms `[..., M, K]`; for training with many
  classes use `mixture_cross_entropy`. A class masked by `where` (or `-inf` in every component)
  gets `-inf` and gradient 0; a NaN logit of a component or a NaN prior logit makes the row NaN.

  Args:
    logits: [..., M, K] float, component m's logits; 16-bit floats are computed in float32.
    prior_logits: [..., M] float, the mixture weights' logits (`pi = softmax(prior_logits)`).
    where: optional [..., K] bool mask of classes (broadcastable to the output), shared by the
      components; False classes are excluded.
    sigsoftmax: mix sigsoftmaxes instead of softmaxes.

  Returns:
    [..., K] normalized log-probabilities in the dtype of `logits`.

  Raises:
    ValueError: always (from shapes and dtypes, so also under `jit`/`vmap`/`grad`) if `logits` is
      not a float `[..., M, K]` (M, K >= 1), `prior_logits` not a float of shape
      `logits.shape[:-1]`, or `where` not a bool mask that broadcasts to `[..., K]`.

  References:
    Yang et al., "Breaking the softmax bottleneck: a high-rank RNN language model", ICLR 2018.
    Kanai et al., "Sigsoftmax: Reanalysis of the softmax bottleneck", NeurIPS 2018.

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> logits = jnp.array([[[1.0, 2.0, 3.0], [3.0, 0.0, 0.0]]])
    >>> prior = jnp.array([[0.0, 0.0]])
    >>> lp = ops.mixture_log_softmax(logits, prior)
    >>> round(float(ops.logsumexp(lp)[0]), 4)
    0.0
    >>> bool(np.allclose(jnp.exp(lp), ops.softmax(logits).mean(-2)))
    True
  """
  x, prior = jnp.asarray(logits), jnp.asarray(prior_logits)
  _checks.rank_at_least(x, 2, 'logits', '[..., M, K]')
  _checks.last_dim_at_least(x, 1, 'logits', '[..., M, K]', 'K')
  _checks.last_dim_at_least(prior, 1, 'prior_logits', '[..., M]', 'M')
  _float(x, 'logits', '[..., M, K]')
  _float(prior, 'prior_logits', '[..., M]')
  _checks.shape(prior, x.shape[:-1], 'prior_logits', 'logits.shape[:-1]')
  out_shape = x.shape[:-2] + x.shape[-1:]
  if where is not None:
    where = jnp.asarray(where)
    _checks.dtype(where, bool, 'where', 'be a bool mask')
    _checks.broadcastable(where, out_shape, 'where', 'output [..., K]')
    where = where[..., None, :] if where.ndim else where
  dtype = jnp.promote_types(jnp.result_type(x, prior), jnp.float32)
  xc, pc = x.astype(dtype), prior.astype(dtype)
  comp = _sig_scores(xc, where) if sigsoftmax else xc
  log_q = _norm.normalize(comp, None if sigsoftmax else where)[1]  # [..., M, K]
  log_pi = _norm.normalize(pc, None)[1]  # [..., M]
  joint = jnp.swapaxes(log_pi[..., :, None] + log_q, -1, -2)  # [..., K, M]
  return _norm.normalize(joint, None)[2][..., 0].astype(_norm.out_dtype(x, xc))


def _check_stream(x, w, bias, where, chunk_size, x_name, x_layout):
  _checks.rank(w, 2, 'w', '[d, K]')
  d, k = w.shape
  _checks.rank_at_least(x, 1, x_name, x_layout)
  if x.shape[-1] != d:
    raise _checks.ArgumentError(f'`{x_name}` must have shape {x_layout} with d = w.shape[0] = '
                                f'{d}; got shape {x.shape}.')
  _float(x, x_name, x_layout)
  _float(w, 'w', '[d, K]')
  if bias is not None:
    _checks.shape(bias, (k,), 'bias', '[K]')
    _float(bias, 'bias', '[K]')
  if where is not None:
    _checks.shape(where, (k,), 'where', '[K]')
    _checks.dtype(where, bool, 'where', 'be a bool mask of classes')
  if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size
                                 or chunk_size < 1):
    raise _checks.ArgumentError(f'`chunk_size` must be None or a positive int; got {chunk_size!r}.')
  return _stream.Cfg(False, int(chunk_size or _stream.DEFAULT_CHUNK_SIZE))


def linear_logsumexp(x: Array, w: Array, *, bias: Optional[Array] = None,
                     where: Optional[Array] = None, sigsoftmax: bool = False,
                     chunk_size: Optional[int] = None) -> Array:
  """`logsumexp` of the linear scores `x @ w + bias`, streamed over vocabulary chunks.

  `lse = logsumexp_k u_k`, `u = z` or (with `sigsoftmax`) `z + log_sigmoid(z)`, `z = x @ w + b`,
  never forming `[..., K]`: an online logsumexp over `chunk_size` classes at a time, and a
  `custom_vjp` that recomputes each chunk (gradient `softmax(u)`, times `1 + sigmoid(-z)` for
  sigsoftmax). The normalizer of a mixture's components: `log_softmax(u_m)_k = u_mk - lse_m`.

  Args:
    x: [..., d] float (bfloat16 inputs: products accumulate in float32).
    w: [d, K] float.
    bias: optional [K] float.
    where: optional [K] bool mask of classes; False classes are excluded (so are `-inf` logits).
    sigsoftmax: the scores of sigsoftmax instead of the logits.
    chunk_size: classes per chunk (None: 1024); the loop holds ~3 [rows, chunk] float32 blocks.

  Returns:
    [...] float32 (float64 for float64 inputs); `-inf` for a fully masked row.

  Raises:
    ValueError: always (static checks) if `w` is not a float `[d, K]`, `x` not a float `[..., d]`,
      `bias` not a float `[K]`, `where` not a bool `[K]`, or `chunk_size` not a positive int.

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> x = np.sin(np.arange(8.0)).reshape(2, 4)
    >>> w = np.cos(np.arange(20.0)).reshape(4, 5)
    >>> bool(np.allclose(ops.linear_logsumexp(x, w), ops.logsumexp(x @ w), atol=1e-5))
    True
  """
  x, w = jnp.asarray(x), jnp.asarray(w)
  bias, where = (None if a is None else jnp.asarray(a) for a in (bias, where))
  cfg = _check_stream(x, w, bias, where, chunk_size, 'x', '[..., d]')._replace(
      sigsoftmax=bool(sigsoftmax))
  rows = x.reshape(-1, x.shape[-1])
  labels = jnp.zeros(rows.shape[0], jnp.int32)
  return _stream_jit(cfg, rows, w, bias, where, labels)[1].reshape(x.shape[:-1])


def mixture_cross_entropy(contexts: Array, prior_logits: Array, w: Array, labels: Array, *,
                          bias: Optional[Array] = None, where: Optional[Array] = None,
                          sigsoftmax: bool = False, chunk_size: Optional[int] = None,
                          ignore_index: Optional[int] = None) -> Array:
  """Per-example cross-entropy of a mixture of softmaxes, streamed: never `[N, M, K]`.

  `loss = -logsumexp_m(log pi_m + log_softmax(u_m)_y)`, `pi = softmax(prior_logits)`,
  `u_m = c_m @ w + bias` (with `sigsoftmax`, `z + log_sigmoid(z)` of it): equal to
  `-mixture_log_softmax(contexts @ w + bias, prior_logits)[y]`. The M components' per-row
  cross-entropies come from `linear_logsumexp`'s stream run on the `N * M` context rows (an
  online logsumexp over vocabulary chunks, a `custom_vjp` recomputing each chunk); backward,
  `d loss / d u_mk = r_m (softmax(u_m)_k - 1[k = y])` with `r` the posterior responsibilities.
  A label on a masked class gives `+inf` and gradient 0; an example whose label is
  `ignore_index` gets loss 0 and gradient 0 and is not read; a traced out-of-range label gives
  NaN; a NaN context or prior logit makes its example NaN (the NaN rule).

  Args:
    contexts: [..., M, d] float, the component contexts (Yang et al.: `tanh(h @ W_m)`).
    prior_logits: [..., M] float.
    w: [d, K] float, the shared output layer.
    labels: [...] int in [0, K), or `ignore_index`.
    bias: optional [K] float.
    where: optional [K] bool mask of classes; False classes are excluded.
    sigsoftmax: a mixture of sigsoftmaxes.
    chunk_size: classes per chunk (None: 1024); the loop holds ~3 [N * M, chunk] float32 blocks.
    ignore_index: None or an int; examples with this label are ignored (loss exactly 0).

  Returns:
    [...] float32 per-example loss (float64 for float64 inputs).

  Raises:
    ValueError: always (static checks) if `w` is not a float `[d, K]`, `contexts` not a float
      `[..., M, d]`, `prior_logits` not a float of shape `contexts.shape[:-1]`, `labels` not an
      integer array of shape `contexts.shape[:-2]`, `bias` not a float `[K]`, `where` not a bool
      `[K]`, `chunk_size` not a positive int or `ignore_index` not None or an int; and for
      concrete `labels` only, if a label other than `ignore_index` lies outside [0, K).

  References:
    Yang et al., "Breaking the softmax bottleneck: a high-rank RNN language model", ICLR 2018.
    Wijmans et al., "Cut your losses in large-vocabulary language models", 2024 (the chunking).

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> contexts = np.sin(np.arange(24.0)).reshape(2, 3, 4)
    >>> prior = jnp.zeros((2, 3))
    >>> w = np.cos(np.arange(20.0)).reshape(4, 5)
    >>> y = jnp.array([0, 4])
    >>> loss = ops.mixture_cross_entropy(contexts, prior, w, y)
    >>> lp = ops.mixture_log_softmax(contexts @ w, prior)
    >>> bool(np.allclose(loss, -lp[np.arange(2), y], atol=1e-5))
    True
  """
  c, prior, w = jnp.asarray(contexts), jnp.asarray(prior_logits), jnp.asarray(w)
  bias, where = (None if a is None else jnp.asarray(a) for a in (bias, where))
  _checks.rank_at_least(c, 2, 'contexts', '[..., M, d]')
  cfg = _check_stream(c, w, bias, where, chunk_size, 'contexts', '[..., M, d]')._replace(
      sigsoftmax=bool(sigsoftmax))
  _float(prior, 'prior_logits', '[..., M]')
  _checks.shape(prior, c.shape[:-1], 'prior_logits', 'contexts.shape[:-1]')
  lead, (m, d), k = c.shape[:-2], c.shape[-2:], w.shape[1]
  labels, ignored = _checks.labels_or_ignored(labels, k, lead, ignore_index, 'prior_logits')
  if ignored is not None:  # not read: no NaN of theirs leaks into a value or a gradient
    c = jnp.where(ignored[..., None, None], jnp.zeros((), c.dtype), c)
    prior = jnp.where(ignored[..., None], jnp.zeros((), prior.dtype), prior)
  in_range = (labels >= 0) & (labels < k)
  rows = jnp.broadcast_to(jnp.where(in_range, labels, 0)[..., None], lead + (m,))
  ce, _ = _stream_jit(cfg, c.reshape(-1, d), w, bias, where, rows.reshape(-1).astype(jnp.int32))
  ce = ce.reshape(lead + (m,))
  log_pi = _norm.normalize(prior.astype(ce.dtype), None)[1]
  loss = -_norm.normalize(log_pi - ce, None)[2][..., 0]
  return _norm.ignore(ignored, jnp.where(in_range, loss, jnp.nan))
