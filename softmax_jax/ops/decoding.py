"""Decoding: the sampling filters (top-k, top-p, min-p), `sample`, `greedy` and `beam_search`.

Every op reads logits `[..., K]` over the last axis and is jit- and vmap-safe. A class is a
candidate when `where` keeps it and its logit is not `-inf` (a `-inf` logit is a mask too). The
masks say which candidates a filter KEEPS; their rules, chosen so that a filter is a function of
the values alone (never of the class order), are:

- `top_k_mask`: the classes whose logit is >= the k-th largest candidate logit, so every class
  tied with the k-th is kept (>= k classes; HF transformers' `TopKLogitsWarper` does the same).
- `top_p_mask` (nucleus): class j is kept iff the probability mass of the classes STRICTLY more
  probable than j is < p. Tied classes are kept or dropped together; the most probable class
  is always kept (mass before it is 0 < p); `p >= 1` keeps every candidate explicitly (no float32
  cumsum decides it, so a tail that rounds the sum below 1 is never dropped). A class whose
  float32 probability underflows to 0 is kept only by `p >= 1`.
- `min_p_mask`: the classes with `p_j >= min_p * max_i p_i`; the argmax always, `min_p = 0` all.

Temperature `T` (per example, `T = 0` included) acts before the probability filters; `T = 0` is
the limit T -> 0+: the distribution is a one-hot of the max (ties: the tied classes share it), so
top-p and min-p (> 0) keep exactly the classes tied with the max, and `sample` returns `greedy`.

**Rows with no candidate** (`where` all False or all logits `-inf`): with concrete inputs every op
raises a ValueError naming `where` (if it alone empties the row) or `logits`; traced (under jit),
the masks of such a row are all False and `sample`/`greedy` return -1. **NaN rule**
(`softmax_jax.ops`): a NaN in what a row reads (a candidate logit, its temperature or threshold)
gives that row an all-False mask and the id -1 (the package leaves integer ids of a NaN row
unspecified; here they are -1); other rows are unaffected. A NaN logit masked by `where` is not
read.
"""

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.ops import _checks

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
_LEAD = 'logits.shape[:-1]'


def _check_values(name: str, value, ok: Callable[[np.ndarray], np.ndarray], need: str) -> None:
  """Concrete `value` must satisfy `ok`; NaN entries of an array (the NaN rule) and tracers pass."""
  if value is None or _checks.is_traced(value):
    return
  a = np.asarray(value, np.float64)
  with np.errstate(invalid='ignore'):
    bad = ~ok(a) & ~(np.isnan(a) & (a.ndim > 0))
  if a.ndim == 0 and bad:
    raise _checks.ArgumentError(f'`{name}` must {need}; got {value}.')
  if a.ndim and bad.any():
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    raise _checks.ArgumentError(f'`{name}` must {need}; got {a[pos]} at position {pos} '
                                f'({int(bad.sum())} bad in all).')


def _check_not_empty(logits, where) -> None:
  """Concrete inputs: every row keeps a class, else raises naming `where` or `logits`."""
  if _checks.is_traced(logits) or _checks.is_traced(where):
    return
  a = np.asarray(logits)
  w = np.ones(a.shape, bool) if where is None else np.broadcast_to(np.asarray(where), a.shape)
  empty = ~np.any((a != -np.inf) & w, axis=-1)
  if empty.any():
    pos = tuple(int(i) for i in np.argwhere(empty)[0])
    if not w[pos].any():
      raise _checks.ArgumentError(f'`where` must keep at least one class in every row; got the '
                                  f'row at position {pos} all False.')
    raise _checks.ArgumentError(f'`logits` must have a logit > -inf not masked by `where` in every '
                                f'row; got none in the row at position {pos}.')


def _prepare(logits, where):
  """Checks; returns (x in float32 or wider, candidates [..., K] bool)."""
  x = jnp.asarray(logits)
  _checks.last_dim_at_least(x, 1, 'logits', '[..., K]', 'K')
  where = _checks.where_mask(where, x)
  _check_not_empty(logits, where)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  keep = x != -jnp.inf
  return x, keep if where is None else keep & where


def _per_example(value, name: str, x, dtype=None):
  """A scalar or per-example array broadcastable to `logits.shape[:-1]`, returned as [..., 1]."""
  v = jnp.asarray(value, dtype or x.dtype)
  _checks.broadcastable(v, x.shape[:-1], name, _LEAD)
  return v[..., None]


def _temperature(temperature, x):
  _check_values('temperature', temperature, lambda a: np.isfinite(a) & (a >= 0),
                'be finite and >= 0')
  if isinstance(temperature, (int, float)) and temperature == 1:
    return None
  return _per_example(temperature, 'temperature', x)


def _nan_rows(x, keep, *params):
  """[..., 1] True where a candidate logit or a per-example parameter is NaN."""
  bad = jnp.any(jnp.isnan(x) & keep, axis=-1, keepdims=True)
  for p in params:
    if p is not None:
      bad = bad | jnp.isnan(p)
  return bad


def _log_ratio(x, keep, t):
  """`log(p_j / p_max)` at temperature t ([..., 1] or None): `(x - max) / t`, -inf off `keep`;
  where t = 0 the limit: 0 at the maxima, -inf elsewhere."""
  m = jnp.max(jnp.where(keep, x, -jnp.inf), axis=-1, keepdims=True)
  d = jnp.where(keep, x - jnp.where(jnp.isfinite(m), m, 0), -jnp.inf)
  if t is None:
    return d
  cold = t == 0
  return jnp.where(cold, jnp.where(d == 0, 0.0, -jnp.inf), d / jnp.where(cold, 1, t))


def _top_k(x, keep, k, k_max=None):
  """`keep` and `x >=` the k-th largest kept logit. With `k_max` (a concrete bound on k) the k-th
  comes from `lax.top_k(x, k_max)`, O(K) a row; a traced k sorts the whole row."""
  kept = jnp.where(keep, x, -jnp.inf)
  if k_max is None:
    s = -jnp.sort(-kept, axis=-1)  # descending
  else:
    s, _ = jax.lax.top_k(kept, k_max)
  kk = jnp.clip(k, 1, s.shape[-1]) - 1
  kth = jnp.take_along_axis(s, jnp.broadcast_to(kk, s.shape[:-1] + (1,)), axis=-1)
  return keep & (x >= kth)


def _k_max(k, x):
  """The largest of a concrete `top_k` (clipped to [1, K]), or None when it is traced."""
  if isinstance(k, jax.core.Tracer):
    return None
  return int(np.clip(np.max(np.asarray(k)), 1, x.shape[-1]))


def _top_p(x, keep, p, t):
  r = _log_ratio(x, keep, t)
  s = -jnp.sort(-r, axis=-1)  # descending log-ratios; non-candidates (-inf) last
  e = jnp.exp(s)
  probs = e / jnp.sum(e, axis=-1, keepdims=True)
  before = jnp.concatenate([jnp.zeros_like(probs[..., :1]), jnp.cumsum(probs, axis=-1)[..., :-1]],
                           axis=-1)  # mass strictly before each sorted position
  count = jnp.sum((before < p) & (probs > 0), axis=-1, keepdims=True)  # a prefix: the nucleus
  last = jnp.take_along_axis(s, jnp.maximum(count - 1, 0), axis=-1)
  return jnp.where(p >= 1, keep, keep & (r >= last))  # >= last: ties with it join


def _min_p(x, keep, min_p, t):
  return keep & (jnp.exp(_log_ratio(x, keep, t)) >= min_p)


def _check_k(k, x):
  k = jnp.asarray(k)
  _checks.dtype(k, int, 'top_k', 'be an integer (or integer array)')
  K = x.shape[-1]
  _check_values('top_k', k, lambda a: (a >= 1) & (a <= K), f'lie in [1, K = {K}]')
  _checks.broadcastable(k, x.shape[:-1], 'top_k', _LEAD)
  return k[..., None]


def _check_p(p, x):
  _check_values('top_p', p, lambda a: (a > 0) & (a <= 1), 'lie in (0, 1]')
  return _per_example(p, 'top_p', x)


def _check_min_p(min_p, x):
  _check_values('min_p', min_p, lambda a: (a >= 0) & (a < 1), 'lie in [0, 1)')
  return _per_example(min_p, 'min_p', x)


def top_k_mask(logits: ArrayLike, k: ArrayLike, *, where: Optional[ArrayLike] = None) -> Array:
  """The classes top-k sampling keeps: logit >= the k-th largest candidate logit.

  Ties with the k-th largest are all kept, so a row keeps >= k classes (all its candidates when it
  has fewer than k).

  Args:
    logits: [..., K] float.
    k: int in [1, K], a scalar or per-example array broadcastable to `logits.shape[:-1]`; a traced
      k is clipped to [1, K].
    where: optional [..., K] bool mask of classes (broadcastable); False classes are never kept.

  Returns:
    [..., K] bool; all False for a row with a NaN candidate or (traced) no candidate.

  Raises:
    ValueError: if `logits` is not `[..., K]`, `where` not a bool mask broadcasting to it, `k` not
      an integer broadcasting to `logits.shape[:-1]` (always, also under jit); for concrete
      values, if `k` is outside [1, K] or a row has no candidate.

  References:
    Fan et al., "Hierarchical neural story generation", ACL 2018.

  Example:
    >>> import jax.numpy as jnp
    >>> from softmax_jax import ops
    >>> mask = ops.top_k_mask(jnp.array([[1.0, 3.0, 2.0, 0.0]]), 2)
    >>> mask.tolist()
    [[False, True, True, False]]
    >>> int(mask.sum())
    2
  """
  x, keep = _prepare(logits, where)
  kk = _check_k(k, x)
  return _top_k(x, keep, kk, _k_max(k, x)) & ~_nan_rows(x, keep)


def top_p_mask(logits: ArrayLike, p: ArrayLike, *, temperature: ArrayLike = 1.0,
               where: Optional[ArrayLike] = None) -> Array:
  """The classes nucleus (top-p) sampling keeps: mass of strictly more probable classes < p.

  With `q = softmax(logits / T)` over the candidates, class j is kept iff
  `sum_{i: q_i > q_j} q_i < p`: tied classes go together, the argmax is always kept and
  `p >= 1` keeps every candidate (decided explicitly, not by a float32 cumsum).

  Args:
    logits: [..., K] float.
    p: in (0, 1], a scalar or per-example array broadcastable to `logits.shape[:-1]`.
    temperature: T >= 0, a scalar or per-example array; T = 0 keeps the classes tied with the max
      (for p < 1).
    where: optional [..., K] bool mask of classes (broadcastable); False classes are never kept.

  Returns:
    [..., K] bool; all False for a row with a NaN candidate, p or T, or (traced) no candidate.

  Raises:
    ValueError: shapes and dtypes as `top_k_mask`; for concrete values, if `p` is outside
      (0, 1], `temperature` negative or infinite, or a row has no candidate.

  References:
    Holtzman et al., "The curious case of neural text degeneration", ICLR 2020.

  Example:
    >>> import jax.numpy as jnp
    >>> from softmax_jax import ops
    >>> log_p = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    >>> ops.top_p_mask(log_p, 0.6).tolist()
    [[True, True, False]]
    >>> ops.top_p_mask(log_p, 0.4).tolist()
    [[True, False, False]]
  """
  x, keep = _prepare(logits, where)
  pp, t = _check_p(p, x), _temperature(temperature, x)
  return _top_p(x, keep, pp, t) & ~_nan_rows(x, keep, pp, t)


def min_p_mask(logits: ArrayLike, min_p: ArrayLike, *, temperature: ArrayLike = 1.0,
               where: Optional[ArrayLike] = None) -> Array:
  """The classes min-p sampling keeps: `q_j >= min_p * max_i q_i`, `q = softmax(logits / T)`.

  Args:
    logits: [..., K] float.
    min_p: in [0, 1), a scalar or per-example array broadcastable to `logits.shape[:-1]`; 0 keeps
      every candidate.
    temperature: T >= 0, a scalar or per-example array; T = 0 keeps the classes tied with the max
      (for min_p > 0).
    where: optional [..., K] bool mask of classes (broadcastable); False classes are never kept.

  Returns:
    [..., K] bool; all False for a row with a NaN candidate, min_p or T, or (traced) no candidate.

  Raises:
    ValueError: shapes and dtypes as `top_k_mask`; for concrete values, if `min_p` is outside
      [0, 1), `temperature` negative or infinite, or a row has no candidate.

  References:
    Nguyen et al., "Turning up the heat: min-p sampling for creative and coherent LLM outputs",
    arXiv:2407.01082, 2024.

  Example:
    >>> import jax.numpy as jnp
    >>> from softmax_jax import ops
    >>> log_p = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    >>> ops.min_p_mask(log_p, 0.5).tolist()
    [[True, True, False]]
    >>> ops.min_p_mask(log_p, 0.1).tolist()
    [[True, True, True]]
  """
  x, keep = _prepare(logits, where)
  mp, t = _check_min_p(min_p, x), _temperature(temperature, x)
  return _min_p(x, keep, mp, t) & ~_nan_rows(x, keep, mp, t)


def _argmax(x, keep):
  ids = jnp.argmax(jnp.where(keep, x, -jnp.inf), axis=-1).astype(jnp.int32)
  return jnp.where(jnp.any(keep, axis=-1), ids, -1)


def greedy(logits: ArrayLike, *, where: Optional[ArrayLike] = None) -> Array:
  """The most probable candidate class of each row; ties go to the lowest index.

  Args:
    logits: [..., K] float.
    where: optional [..., K] bool mask of classes (broadcastable); False classes are never chosen.

  Returns:
    [...] int32 class ids; -1 for a row with a NaN candidate or (traced) no candidate.

  Raises:
    ValueError: if `logits` is not `[..., K]` or `where` not a bool mask broadcasting to it
      (always); for concrete values, if a row has no candidate.

  Example:
    >>> import jax.numpy as jnp
    >>> from softmax_jax import ops
    >>> ops.greedy(jnp.array([[0.1, 2.0, 0.3], [1.0, 1.0, 0.0]])).tolist()
    [1, 0]
  """
  x, keep = _prepare(logits, where)
  return _argmax(x, keep & ~_nan_rows(x, keep))


def sample(key: Array, logits: ArrayLike, *, temperature: ArrayLike = 1.0,
           top_k: Optional[ArrayLike] = None, top_p: Optional[ArrayLike] = None,
           min_p: Optional[ArrayLike] = None, where: Optional[ArrayLike] = None) -> Array:
  """One class per row from `softmax(logits / T)` restricted to the filters' classes.

  The filters compose in HF transformers' default order (`_get_logits_processor`: temperature,
  then top-k, then top-p, then min-p): each filter sees the classes the previous one kept, and
  top-p/min-p read the probabilities at temperature T renormalized over them. A row with
  T = 0 returns `greedy` (the argmax, lowest index among ties), never NaN. The filters are the
  masks of this module, with their tie rules; the argmax survives every filter.

  Args:
    key: a PRNG key, shared by the rows (each row draws independently); vmap over keys for many
      draws.
    logits: [..., K] float.
    temperature: T >= 0, a scalar or per-example array broadcastable to `logits.shape[:-1]`.
    top_k: None (off) or int in [1, K], scalar or per-example.
    top_p: None (off) or in (0, 1], scalar or per-example.
    min_p: None (off) or in [0, 1), scalar or per-example.
    where: optional [..., K] bool mask of classes (broadcastable); False classes are never drawn.

  Returns:
    [...] int32 class ids; -1 for a row with a NaN candidate, temperature or threshold, or
    (traced) no candidate.

  Raises:
    ValueError: as the masks and `greedy` (shapes always; values when concrete).

  References:
    Fan et al. 2018 (top-k); Holtzman et al. 2020 (top-p); Nguyen et al. 2024 (min-p); HF
    transformers `generation/utils.py` (filter order).

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from softmax_jax import ops
    >>> z = jnp.array([[0.1, 2.0, 0.3], [3.0, 1.0, 0.0]])
    >>> key = jax.random.key(0)
    >>> ops.sample(key, z, top_k=1).tolist() == ops.greedy(z).tolist()
    True
  """
  x, keep = _prepare(logits, where)
  t = _temperature(temperature, x)
  kk = None if top_k is None else _check_k(top_k, x)
  pp = None if top_p is None else _check_p(top_p, x)
  mp = None if min_p is None else _check_min_p(min_p, x)
  bad = _nan_rows(x, keep, t, pp, mp)
  if kk is not None:
    keep = _top_k(x, keep, kk, _k_max(top_k, x))
  if pp is not None:
    keep = _top_p(x, keep, pp, t)
  if mp is not None:
    keep = _min_p(x, keep, mp, t)
  keep = keep & ~bad
  drawn = jax.random.categorical(key, _log_ratio(x, keep, t), axis=-1).astype(jnp.int32)
  best = _argmax(x, keep)
  cold = jnp.zeros(x.shape[:-1], bool) if t is None else jnp.broadcast_to(t == 0, x.shape[:-1] +
                                                                           (1,))[..., 0]
  return jnp.where(cold | (best < 0), best, drawn)


def beam_search(step_fn: Callable[[Array, Any], Tuple[Array, Any]], init_state: Any, *,
                beam_size: int, max_len: int, eos_id: int, length_penalty: float = 1.0,
                batch_size: Optional[int] = None, bos_id: int = 0) -> Tuple[Array, Array]:
  """Beam search with the GNMT length penalty, under `lax.while_loop` with static shapes.

  Each step extends every beam by every class and keeps the `beam_size` best candidates of each
  batch entry by `score = log P(y) / ((5 + |y|) / 6) ** length_penalty` (GNMT, Wu et al. 2016,
  eq. 14, as t5x's `brevity_penalty`; `length_penalty = 0` ranks by log-probability). |y| counts
  the tokens up to and including the first `eos_id`. A beam that emitted `eos_id` is finished:
  it is extended only by `eos_id` at log-prob 0 (its score and length stay), so finished and live
  hypotheses compete for the same slots. The state of each kept beam is taken from its parent
  (`jnp.take` on the leading axis). The loop stops after `max_len` tokens or when every beam is
  finished.

  Args:
    step_fn: `(tokens [B * beam] int32, state) -> (log_probs [B * beam, K] float, new_state)`;
      `tokens` are each beam's last token (`bos_id` at the first step), rows ordered
      `b * beam_size + j`; `state` is a pytree of arrays with leading dim B * beam.
    init_state: pytree of arrays with leading dim B (each is repeated for the beams).
    beam_size: beams per batch entry (static int >= 1).
    max_len: tokens decoded, the length of the output (static int >= 1).
    eos_id: the end-of-sequence class id.
    length_penalty: alpha >= 0 of the GNMT penalty.
    batch_size: B; needed only when `init_state` holds no array (else read and checked from it).
    bos_id: the token fed to `step_fn` at the first step.

  Returns:
    `(sequences [B, beam, max_len] int32, scores [B, beam] float32)` sorted best first, the
    scores being the penalized `log P(y) / ((5 + |y|) / 6) ** length_penalty` (log-probs summed
    in float32); a finished sequence is padded with `eos_id` after its eos. A score of -inf
    (fewer than `beam_size` hypotheses exist) marks a slot with arbitrary tokens.

  Raises:
    ValueError: if `beam_size`/`max_len` are not ints >= 1, `eos_id` not in [0, K), the leaves
      of `init_state` do not share a leading dim B (= `batch_size` when given), or `step_fn`
      returns log-probs not of shape [B * beam, K].

  References:
    Wu et al., "Google's neural machine translation system", arXiv:1609.08144, 2016 (eq. 14).
    t5x `decoding.py` (`beam_search`, `brevity_penalty`), read for the structure only.

  Example:
    >>> import jax.numpy as jnp
    >>> from softmax_jax import ops
    >>> table = jnp.log(jnp.array([[0.1, 0.5, 0.4], [0.6, 0.1, 0.3], [0.0, 0.0, 1.0]]))
    >>> step_fn = lambda tokens, state: (table[tokens], state)
    >>> seqs, scores = ops.beam_search(step_fn, jnp.zeros((1, 1)), beam_size=1, max_len=3, eos_id=2)
    >>> seqs.tolist()
    [[[1, 0, 1]]]
    >>> [int(jnp.argmax(table[0])), int(jnp.argmax(table[1])), int(jnp.argmax(table[0]))]
    [1, 0, 1]
  """
  beam = _checks.static_int('beam_size', beam_size, 1)
  max_len = _checks.static_int('max_len', max_len, 1)
  eos_id = _checks.static_int('eos_id', eos_id, 0)
  _check_values('length_penalty', length_penalty, lambda a: np.isfinite(a) & (a >= 0),
                'be finite and >= 0')
  leaves = jax.tree.leaves(init_state)
  if batch_size is None and not leaves:
    raise _checks.ArgumentError('`batch_size` must be given when `init_state` holds no array; '
                                'got None.')
  if batch_size is not None:
    B = _checks.static_int('batch_size', batch_size, 1)
  else:
    B = np.shape(leaves[0])[0] if np.ndim(leaves[0]) else 0
  for leaf in leaves:
    if not np.ndim(leaf) or np.shape(leaf)[0] != B:
      raise _checks.ArgumentError(f'`init_state` must hold arrays with leading dim batch_size = '
                                  f'{B}; got a leaf of shape {np.shape(leaf)}.')
  n = B * beam
  alpha = jnp.asarray(length_penalty, jnp.float32)
  penalty = lambda length: ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha

  def body(c):
    i, tokens, logp, done, lens, seqs, state = c
    lp, state = step_fn(tokens, state)
    lp = jnp.asarray(lp)
    _checks.shape(lp, (n, None), 'step_fn(tokens, state)[0]', '[B * beam_size, K]')
    K = lp.shape[-1]
    if eos_id >= K:
      raise _checks.ArgumentError(f'`eos_id` must lie in [0, K = {K}); got {eos_id}.')
    lp = lp.astype(jnp.float32).reshape(B, beam, K)  # the carried scores are float32
    eos_only = jnp.where(jnp.arange(K) == eos_id, 0.0, -jnp.inf).astype(jnp.float32)
    cand = logp[..., None] + jnp.where(done[..., None], eos_only, lp)  # [B, beam, K]
    cand_len = jnp.broadcast_to(jnp.where(done, lens, i + 1)[..., None], cand.shape)
    _, idx = jax.lax.top_k((cand / penalty(cand_len)).reshape(B, beam * K), beam)
    parent, token = idx // K, (idx % K).astype(jnp.int32)
    logp = jnp.take_along_axis(cand.reshape(B, beam * K), idx, axis=1)
    was_done = jnp.take_along_axis(done, parent, axis=1)
    lens = jnp.where(was_done, jnp.take_along_axis(lens, parent, axis=1), i + 1)
    seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[:, :, i].set(token)
    flat = (jnp.arange(B)[:, None] * beam + parent).reshape(n)
    state = jax.tree.map(lambda a: jnp.take(a, flat, axis=0), state)
    return i + 1, token.reshape(n), logp, was_done | (token == eos_id), lens, seqs, state

  def cond(c):
    i, _, logp, done = c[:4]
    return (i < max_len) & ~jnp.all(done | (logp == -jnp.inf))

  logp0 = jnp.where(jnp.arange(beam) == 0, 0.0, -jnp.inf) * jnp.ones((B, 1), jnp.float32)
  init = (jnp.int32(0), jnp.full((n,), bos_id, jnp.int32), logp0, jnp.zeros((B, beam), bool),
          jnp.zeros((B, beam), jnp.int32), jnp.full((B, beam, max_len), eos_id, jnp.int32),
          jax.tree.map(lambda a: jnp.repeat(jnp.asarray(a), beam, axis=0), init_state))
  _, _, logp, _, lens, seqs, _ = jax.lax.while_loop(cond, body, init)
  return seqs, (logp / penalty(lens)).astype(jnp.float32)
