"""Candidate samplers and sampled losses (sampled softmax, NCE, negative sampling), TF semantics.

A sampler draws one shared sample `[S]` per call (TF's `*_candidate_sampler`) and the expected
counts Q of the log-Q correction: `S p` with replacement (i.i.d. alias-method draws, exact in
float32 also for tiny p); without replacement (`unique=True`, TF's default), successive sampling
proportional to p (the first S distinct ids of i.i.d. draws), drawn exactly either by
Gumbel-top-k over all K classes (O(K) a call) or, for K >= 65,536 where the expected number of
draws n is at most 2S, as TF does: i.i.d. alias-method draws in blocks of 2S, duplicates
rejected, until S distinct ids (O(S log S) a call: 12 ms -> ~1 ms at K = 1M, S = 1024; the same
distribution, another random stream); and TF's inclusion probability `Q = 1 - (1 - p)^n = -expm1(n log1p(-p))`. TF plugs in its random
number of tries n; we draw no tries and take the n solving `sum_k Q_k = S`, by float64 Newton
steps from n = S (monotone: the sum is concave increasing in n). Like TF's, Q approximates the
exact inclusion probabilities (within 3.6% relative at K = 12, S = 4; exact for uniform).

Layout: `kernel: [K, d]` class rows (TF's `weights`, `nn.Embed`'s table; DenseSoftmax's kernel
transposed): a step gathers N + S rows, the gradient scatter-adds them. On this 2-core CPU
(K = 200k, d = 512, N = 2048, S = 1024, f32, jit value_and_grad w.r.t. features and kernel,
median of 15): [K, d] 123-136 ms, [d, K] 135-168 ms (the gather + features gradient alone: 14
vs 24 ms; the rest writes the dense kernel gradient); the full softmax: 16 s.

Batching and keys: one call draws one sample, shared by every example of the batch (TF's
semantics; the losses broadcast it over `features`' leading axes). `jax.vmap(sampler)(keys)` over
a batch of keys `[B]` (typed) or `[B, 2]` (raw) draws B independent samples: row b holds the
ids of `sampler(keys[b])` and its counts (a sampler takes exactly one key; a batch of keys passed
without `vmap` is rejected). A loss vmapped over examples with the sample held fixed
(`in_axes=SampledValues(None, 0, None)`: the ids and their counts shared, the true counts mapped
with the labels) equals the batched call; mapping a per-example sample instead (`in_axes=0`, from
a sampler vmapped over per-example keys) gives each example its own S negatives.

Checks: shapes, ranks and dtypes (and that `num_sampled`/`num_classes` are Python ints, which fix
the output shapes) are checked always, also under `jit`/`vmap`/`grad`; class ids (labels,
`true_classes`, sampled ids) are checked to lie in [0, K) only when concrete. Failures raise
`ArgumentError`, a ValueError naming the argument. Traced ids out of range give NaN, never a
clipped id: a label its example's loss, a sampled id every loss (the sample is shared).

NaN and padding: a NaN feature gives its example a NaN loss, and the losses (and the samplers'
`true_classes`) take `ignore_index` as `cross_entropy` does: the NaN rule and `ignore_index` of
the package docstring.

References: TF `tf.nn.sampled_softmax_loss`, `tf.nn.nce_loss`, "Candidate sampling algorithms
reference"; Jean et al. 2015 (arXiv:1412.2007); Mikolov et al. 2013 (word2vec).
"""

import functools
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.ops import _checks
from softmax_jax.ops.softmax import logsumexp


class SampledValues(NamedTuple):
  """A sampler's output, TF's `sampled_values` triple.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from softmax_jax import ops
    >>> sv = ops.uniform_sampler(jax.random.key(0), 2, 4, true_classes=jnp.array([1, 3]))
    >>> type(sv).__name__, sv._fields
    ('SampledValues', ('sampled', 'true_expected_count', 'sampled_expected_count'))
    >>> sv.sampled.shape, sv.true_expected_count.tolist(), sv.sampled_expected_count.tolist()
    ((2,), [0.5, 0.5], [0.5, 0.5])
  """
  sampled: jnp.ndarray  # [S] int32 class ids.
  true_expected_count: Optional[jnp.ndarray]  # [...] float32 (None without true_classes).
  sampled_expected_count: jnp.ndarray  # [S] float32.


def _check_int(name, value, lo):
  if _checks.is_traced(value):
    raise _checks.ArgumentError(f'`{name}` must be a Python int >= {lo} (it fixes a shape: pass it '
                                f'static, e.g. with functools.partial); got a traced {value!r}.')
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
    raise _checks.ArgumentError(f'`{name}` must be a Python int >= {lo}; got {value!r}.')
  return int(value)


def _check_num_sampled(num_sampled, num_classes, unique, what='num_classes'):
  s = _check_int('num_sampled', num_sampled, 1)
  if unique and s >= num_classes:
    raise _checks.ArgumentError(
        f'`num_sampled` must be < {what} = {num_classes} with unique=True (sampling without '
        f'replacement; use the full softmax instead); got {s}.')
  return s


_NEED_KEY = ('be one PRNG key (jax.random.key: shape (); jax.random.PRNGKey: uint32 [2]); to draw '
             'one sample per key, jax.vmap the sampler over the keys')


def _check_key(key):
  """`key` is one PRNG key (typed: shape (); raw: uint32 of rank 1), a static check."""
  key = key if isinstance(key, jax.Array) else jnp.asarray(key)
  got = f'{key.dtype} of shape {tuple(key.shape)}'
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  if not typed:
    _checks.chex_check(chex.assert_type, key, jnp.uint32, name='key', need=_NEED_KEY, got=got)
  _checks.chex_check(chex.assert_rank, key, 0 if typed else 1, name='key', need=_NEED_KEY, got=got)


def _solve_tries(p, num_sampled):
  """Host float64 n with `sum_k -expm1(n log1p(-p_k)) = num_sampled` (see module docstring)."""
  a = np.log1p(-p[p > 0])  # < 0: unique sampling needs >= 2 classes with p > 0.
  n = float(num_sampled)  # f(S) <= S, and Newton from the left of a concave root stays left.
  for _ in range(500):
    e = np.exp(n * a)
    f, df = np.sum(-np.expm1(n * a)), -np.sum(a * e)
    step = (num_sampled - f) / df
    n += step
    if step <= 1e-13 * n:
      break
  return n


@functools.lru_cache(maxsize=8)
def _alias_table(p_bytes):
  """Walker/Vose alias table of float64 p (as bytes): P(k) = (prob_k + sum_{alias_j=k} (1 -
  prob_j)) / K, so draws need only float32 thresholds, exact to ~1e-7 / K per class (a float32
  inverse CDF would quantize classes with p < ~1e-6). O(K) on the host; 0.15 s at K = 200k."""
  q = np.frombuffer(p_bytes, np.float64) * (len(p_bytes) // 8)
  prob, alias, rest = np.ones(q.size), np.arange(q.size), q.tolist()
  small, large = np.flatnonzero(q < 1).tolist(), np.flatnonzero(q >= 1).tolist()
  while small and large:
    j, i = small.pop(), large[-1]
    prob[j], alias[j], rest[i] = rest[j], i, rest[i] - (1 - rest[j])
    if rest[i] < 1:
      small.append(large.pop())
  return prob.astype(np.float32), alias.astype(np.int32)


REJECTION_MIN_CLASSES = 65536  # unique sampling by rejection from here (when n <= 2 S)


def _alias_draws(p):
  """`draw(key, m) -> [m] int32` i.i.d. ids with probabilities `p` (alias method)."""
  thresholds, alias = _alias_table(np.ascontiguousarray(p, np.float64).tobytes())

  def draw(key, m):
    col_key, u_key = jax.random.split(key)
    col = jax.random.randint(col_key, (m,), 0, p.size)
    u = jax.random.uniform(u_key, (m,), jnp.float32)
    return jnp.where(u < jnp.asarray(thresholds)[col], col, jnp.asarray(alias)[col]).astype(jnp.int32)
  return draw


def _unique_by_rejection(key, s, draw):
  """`[S]` distinct ids in the order i.i.d. `draw`s first hit them (TF's unique sampling: a draw
  already taken is rejected), in blocks of 2S draws until S are found."""
  m = 2 * s

  def body(state):
    key, out, count = state
    key, sub = jax.random.split(key)
    ids = draw(sub, m)
    order = jnp.argsort(ids, stable=True)
    ranked = ids[order]
    first = jnp.zeros((m,), bool).at[order].set(
        jnp.concatenate([jnp.ones((1,), bool), ranked[1:] != ranked[:-1]]))  # first in the block
    taken = jnp.sort(jnp.where(jnp.arange(s) < count, out, -1))
    seen = taken[jnp.clip(jnp.searchsorted(taken, ids), 0, s - 1)] == ids
    new = first & ~seen
    slot = count + jnp.cumsum(new) - 1
    out = out.at[jnp.where(new & (slot < s), slot, s)].set(ids, mode='drop')
    return key, out, jnp.minimum(count + jnp.sum(new), s)

  state = (key, jnp.full((s,), -1, jnp.int32), jnp.zeros((), jnp.int32))
  return jax.lax.while_loop(lambda state: state[2] < s, body, state)[1]


def _candidates(key, s, p, prob, unique, true_classes):
  """Shared sampler body; p: host float64 [K] probabilities, prob(ids): float32 p[ids]."""
  if unique:  # successive sampling without replacement
    n = _solve_tries(p, s)
    if p.size >= REJECTION_MIN_CLASSES and n <= 2 * s:  # TF's rejection: O(S log S)
      sampled = _unique_by_rejection(key, s, _alias_draws(p))
    else:  # Gumbel-top-k over log p: O(K)
      g = jnp.log(jnp.asarray(p, jnp.float32)) + jax.random.gumbel(key, p.shape, jnp.float32)
      sampled = jax.lax.top_k(g, s)[1].astype(jnp.int32)
    n = np.float32(n)
    count = lambda ids: -jnp.expm1(n * jnp.log1p(-prob(ids)))
  else:  # i.i.d. draws by the alias method.
    sampled = _alias_draws(p)(key, s)
    count = lambda ids: s * prob(ids)
  true_count = None
  if true_classes is not None:
    true_count = count(true_classes)
  return SampledValues(sampled, true_count, count(sampled))


def _check_sampler_args(key, true_classes, num_classes, ignore_index):
  """Static checks of `key` and `true_classes`; concrete `true_classes` must lie in [0, K) or
  equal `ignore_index`. Returns `true_classes` with ignored ones replaced by class 0."""
  _check_key(key)
  ignore_index = _checks.ignore_index_value(ignore_index)
  if true_classes is None:
    return None
  if not isinstance(true_classes, jax.Array):
    true_classes = np.asarray(true_classes)
  _checks.dtype(true_classes, int, 'true_classes', 'be integer class ids')
  if ignore_index is not None:  # np.where keeps concrete ids concrete for the range check.
    where = jnp.where if _checks.is_traced(true_classes) else np.where
    true_classes = where(true_classes == ignore_index, 0, true_classes)
  _checks.in_range('true_classes', true_classes, num_classes)
  return jnp.asarray(true_classes)


def uniform_sampler(key, num_sampled, num_classes, *, unique=True, true_classes=None,
                    ignore_index=None):
  """Uniform sampler, `P(k) = 1 / K` (TF `uniform_candidate_sampler`); counts are S / K exactly.

  Draws one sample `[S]` per call, shared by a whole batch; `jax.vmap` it over a batch of keys
  for independent samples (row b equals the call with `keys[b]`; see the module docstring).

  Args:
    key: one PRNG key (`jax.random.key`, or a raw `jax.random.PRNGKey` uint32 [2]).
    num_sampled: S >= 1, a Python int (< K if unique).
    num_classes: K, a Python int (>= 2 if unique).
    unique: sample without replacement (Gumbel-top-k; TF's default) or with replacement.
    true_classes: optional [...] int labels in [0, K) whose expected counts to return.
    ignore_index: None or an int: `true_classes` equal to it (ignored labels, see the losses)
      are not range-checked and get the count of class 0.

  Returns:
    SampledValues(sampled [S] int32, true_expected_count [...] float32 or None,
    sampled_expected_count [S] float32): `S p` with replacement, `1 - (1 - p)^n` without.

  Raises:
    ValueError: always, also under `jit`/`vmap`: `key` is not one PRNG key (a batch of keys:
      `jax.vmap` the sampler), `num_sampled` or `num_classes` is not a Python int in range
      (they fix the output shapes), `true_classes` is not an integer array. Only for concrete
      `true_classes`: ids outside [0, K); traced out-of-range ids are not caught and get a
      meaningless expected count (the losses return NaN for such labels).

  References:
    TF `tf.random.uniform_candidate_sampler`; "Candidate sampling algorithms reference".

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from softmax_jax import ops
    >>> sv = ops.uniform_sampler(jax.random.key(0), 2, 4, true_classes=jnp.array([1]))
    >>> len(set(sv.sampled.tolist()))  # unique=True: two distinct ids
    2
    >>> sv.true_expected_count.tolist(), sv.sampled_expected_count.tolist()
    ([0.5], [0.5, 0.5])
  """
  k = _check_int('num_classes', num_classes, 2 if unique else 1)
  s = _check_num_sampled(num_sampled, k, unique)
  true_classes = _check_sampler_args(key, true_classes, k, ignore_index)
  return _candidates(key, s, np.full(k, 1.0 / k), lambda ids: jnp.full(ids.shape, 1.0 / k),
                     unique, true_classes)


def log_uniform_probs(num_classes: int) -> np.ndarray:
  """`[K]` float64 log-uniform (Zipf) law `p(k) = log((k + 2) / (k + 1)) / log(K + 1)`, sorted ids.

  A host (NumPy) function of a concrete K; inside `jit` it is a compile-time constant.

  Args:
    num_classes: K >= 1, a Python int.

  Returns:
    [K] float64 NumPy probabilities, summing to 1.

  Raises:
    ValueError: `num_classes` is not a Python int >= 1 (a traced K included).

  Example:
    >>> from softmax_jax import ops
    >>> [round(float(v), 4) for v in ops.log_uniform_probs(3)]
    [0.5, 0.2925, 0.2075]
    >>> round(float(ops.log_uniform_probs(3).sum()), 4)
    1.0
  """
  k = _check_int('num_classes', num_classes, 1)
  return np.log1p(1.0 / np.arange(1.0, k + 1.0)) / np.log(k + 1.0)


def log_uniform_sampler(key, num_sampled, num_classes, *, unique=True, true_classes=None,
                        ignore_index=None):
  """Log-uniform (Zipf) sampler, `P(k) = log((k + 2) / (k + 1)) / log(K + 1)`.

  TF `log_uniform_candidate_sampler`; ids must be sorted by decreasing frequency. Arguments
  and returns as `uniform_sampler`.

  Raises:
    ValueError: as `uniform_sampler` (static checks always, the range of `true_classes` only
      when concrete).

  References:
    TF `tf.random.log_uniform_candidate_sampler`.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from softmax_jax import ops
    >>> sv = ops.log_uniform_sampler(jax.random.key(0), 3, 10, true_classes=jnp.array([0, 9]))
    >>> sv.sampled.shape, len(set(sv.sampled.tolist()))
    ((3,), 3)
    >>> bool(sv.true_expected_count[0] > sv.true_expected_count[1])
    True
  """
  k = _check_int('num_classes', num_classes, 2 if unique else 1)
  s = _check_num_sampled(num_sampled, k, unique)
  true_classes = _check_sampler_args(key, true_classes, k, ignore_index)
  log_k1 = np.log(k + 1.0)
  prob = lambda ids: jnp.log1p(1.0 / (jnp.asarray(ids, jnp.float32) + 1.0)) / np.float32(log_k1)
  p = log_uniform_probs(k)
  return _candidates(key, s, p, prob, unique, true_classes)


def unigram_probs(counts, distortion=0.75):
  """Host float64 `[K]` probabilities `counts**distortion / sum(counts**distortion)`.

  Zero counts get probability 0 (also with distortion 0). A host (NumPy) function: `counts` and
  `distortion` must be concrete (inside `jit`, close over them).

  Args:
    counts: [K] concrete counts >= 0 (NumPy array, list or tuple) with a positive sum.
    distortion: a concrete number >= 0 (word2vec: 0.75).

  Returns:
    [K] float64 NumPy probabilities, summing to 1.

  Raises:
    ValueError: `counts` traced, not 1-D, empty, negative, non-finite or all zero;
      `distortion` traced, non-finite or < 0.

  Example:
    >>> from softmax_jax import ops
    >>> [round(float(v), 4) for v in ops.unigram_probs([3, 1], distortion=1.0)]
    [0.75, 0.25]
    >>> [round(float(v), 4) for v in ops.unigram_probs([3, 1, 0], distortion=0.0)]
    [0.5, 0.5, 0.0]
  """
  if _checks.is_traced(counts):
    raise _checks.ArgumentError(
        '`counts` must be concrete (NumPy array, list or tuple), not traced.')
  c = np.asarray(counts, np.float64)
  _checks.rank(c, 1, 'counts', '[num_classes]')
  if c.size == 0:
    raise _checks.ArgumentError(f'`counts` must be a non-empty [num_classes] array; got shape '
                                f'{c.shape}.')
  if not np.all(np.isfinite(c) & (c >= 0)) or not np.any(c > 0):
    raise _checks.ArgumentError(
        f'`counts` must be finite and >= 0 with a positive sum; got {c[:8]}...')
  if _checks.is_traced(distortion) or not np.isfinite(distortion) or distortion < 0:
    raise _checks.ArgumentError(
        f'`distortion` must be a concrete finite number >= 0; got {distortion!r}.')
  w = np.where(c > 0, np.power(np.where(c > 0, c, 1.0), float(distortion)), 0.0)
  return w / np.sum(w)


def unigram_sampler(key, num_sampled, counts, *, distortion=0.75, unique=True,
                    true_classes=None, ignore_index=None):
  """Unigram sampler, `P(k) ∝ counts_k ** distortion` (TF `fixed_unigram_candidate_sampler`).

  Distortion 0.75 is word2vec's; 0 is uniform over the classes with counts > 0. Arguments and
  returns as `uniform_sampler`, with `counts: [K]` concrete counts >= 0 (zero counts are never
  sampled; if unique, S must be < the number of classes with counts > 0) instead of
  `num_classes`, and `distortion` as in `unigram_probs`.

  Raises:
    ValueError: as `uniform_sampler` with K = len(counts) (static checks always, the range of
      `true_classes` only when concrete), and `counts` or `distortion` rejected by
      `unigram_probs` (they must be concrete).

  References:
    TF `tf.random.fixed_unigram_candidate_sampler`; Mikolov et al. 2013 (word2vec).

  Example:
    >>> import jax
    >>> from softmax_jax import ops
    >>> sv = ops.unigram_sampler(jax.random.key(0), 2, [5, 0, 3, 2])
    >>> 1 in sv.sampled.tolist(), sv.sampled.shape
    (False, (2,))
  """
  p = unigram_probs(counts, distortion)
  s = _check_num_sampled(num_sampled, int(np.sum(p > 0)), unique,
                         'the number of classes with counts > 0')
  true_classes = _check_sampler_args(key, true_classes, p.size, ignore_index)
  p32 = jnp.asarray(p, jnp.float32)
  return _candidates(key, s, p, lambda ids: jnp.take(p32, ids, mode='clip'), unique,
                     true_classes)


def _sampled_logits(features, kernel, labels, sampled_values, bias, remove_hits, log_q,
                    ignore_index, gathered_from=None):
  """Checks; returns z_true [N], z_sampled [N, S], keep [N, S] bool and `finish`, mapping the
  [N] loss to [...] with NaN for an out-of-range label and 0 for an ignored one.

  `gathered_from=K`: `kernel` [N + S, d] (and `bias` [N + S]) are the rows already gathered from
  a K-class table, the labels' (in `labels.reshape(-1)` order) then the samples'; they are sliced,
  not gathered, so the gradient w.r.t. `kernel` is one row per read (no scatter)."""
  features, kernel = jnp.asarray(features), jnp.asarray(kernel)
  gathered = gathered_from is not None
  _checks.rank(kernel, 2, 'kernel', '[N + S, d] gathered rows' if gathered else '[num_classes, d]')
  _checks.dtype(kernel, float, 'kernel', 'be a float array')
  k, d = (_checks.static_int('gathered_from', gathered_from, 1) if gathered else kernel.shape[0],
          kernel.shape[1])
  need = f'have shape [..., d] with d = kernel.shape[1] = {d}'
  if not gathered and features.ndim and features.shape[-1] != d and features.shape[-1] == k:
    need += ' (`kernel` holds class rows [K, d], the transpose of a [d, K] Dense kernel)'
  _checks.rank_at_least(features, 1, 'features', '[..., d]')
  _checks.chex_check(chex.assert_axis_dimension, features, -1, d, name='features', need=need,
                     got=f'shape {features.shape}')
  _checks.dtype(features, float, 'features', 'be a float array')
  lead = features.shape[:-1]
  labels, ignored = _checks.labels_or_ignored(labels, k, lead, ignore_index, 'features')
  sampled, ids_name, true_count, sampled_count = _checks.sampled_values(sampled_values, lead, log_q)
  _checks.in_range(ids_name, sampled, k)
  rows = int(np.prod(lead, dtype=np.int64)) + sampled.shape[0]
  if gathered:
    _checks.shape(kernel, (rows, d), 'kernel', 'hold the N labels\' rows then the S samples\' '
                  f'(gathered_from), [N + S, d] = [{rows}, {d}]')
  if bias is not None:
    bias = jnp.asarray(bias)
    _checks.shape(bias, (rows,) if gathered else (k,), 'bias',
                  '[N + S] (gathered_from)' if gathered else '[num_classes]')
    _checks.dtype(bias, float, 'bias', 'be a float array')
  acc = jnp.promote_types(jnp.result_type(features, kernel), jnp.float32)
  x, y = features.reshape(-1, d), labels.reshape(-1)
  in_range = (y >= 0) & (y < k)
  y_safe = jnp.where(in_range, y, 0)
  if log_q:
    true_count = jnp.broadcast_to(true_count, lead).reshape(-1)
  if ignored is not None:  # Ignored rows are not read: zero features, count 1.
    ignored = ignored.reshape(-1)
    x, in_range = jnp.where(ignored[:, None], jnp.zeros((), x.dtype), x), in_range | ignored
    true_count = jnp.where(ignored, 1, true_count) if log_q else None
  s_ok = (sampled >= 0) & (sampled < k)  # A traced id out of range: NaN, never a clipped id.
  s_safe = jnp.where(s_ok, sampled, 0)
  n = x.shape[0]
  if gathered:  # Slices, not gathers: the backward writes one gradient row per read row.
    w_true, w_samp = kernel[:n], jnp.where(s_ok[:, None], kernel[n:], jnp.nan)
  else:
    w_true = jnp.take(kernel, y_safe, axis=0, mode='clip')  # [N, d]: contiguous rows.
    w_samp = jnp.where(s_ok[:, None], jnp.take(kernel, s_safe, axis=0, mode='clip'), jnp.nan)
  z_true = jnp.einsum('nd,nd->n', x, w_true, preferred_element_type=acc).astype(acc)
  z_samp = jnp.einsum('nd,sd->ns', x, w_samp, preferred_element_type=acc).astype(acc)
  if bias is not None:
    b = jnp.asarray(bias).astype(acc)
    z_true = z_true + (b[:n] if gathered else jnp.take(b, y_safe, mode='clip'))
    z_samp = z_samp + (b[n:] if gathered else jnp.take(b, s_safe, mode='clip'))
  if log_q:
    z_true = z_true - jnp.log(true_count.astype(acc))
    z_samp = z_samp - jnp.log(sampled_count.astype(acc))
  keep = (sampled[None, :] != y[:, None]) if remove_hits else jnp.ones(z_samp.shape, bool)

  def finish(loss):
    loss = jnp.where(in_range, loss, jnp.nan)
    return (loss if ignored is None else jnp.where(ignored, 0.0, loss)).reshape(lead)
  return z_true, z_samp, keep, finish


def sampled_softmax_loss(features, kernel, labels, sampled_values, *, bias=None,
                         remove_accidental_hits=True, subtract_log_q=True, ignore_index=None,
                         gathered_from=None):
  """Per-example sampled softmax loss (TF `tf.nn.sampled_softmax_loss`, one true class).

  `z_0 = <x, w_y> + b_y - log Q_y`, `z_j = <x, w_{s_j}> + b_{s_j} - log Q_{s_j}` over the S
  shared samples (Q: expected counts; no `- log Q` if not `subtract_log_q`); samples equal to
  the label (accidental hits) are masked out (-inf logit, zero gradient) if
  `remove_accidental_hits`; `loss = logsumexp(z) - z_0`, the cross-entropy with the true class
  at index 0. Generally an underestimate of the full softmax loss; with unique samples it
  tends to it as S -> K. Matrix products accumulate in float32 (bfloat16 inputs give a float32
  loss). The S samples are shared by all examples: under `jax.vmap` over examples, hold the
  sample fixed (`in_axes=SampledValues(None, 0, None)`) to get the batched result.

  Args:
    features: [..., d] float.
    kernel: [K, d] float class rows (TF's `weights`; the transpose of DenseSoftmax's kernel).
    labels: [...] int in [0, K), or `ignore_index`; concrete ones are checked, traced ones out
      of range give NaN.
    sampled_values: SampledValues / (sampled [S] int, true_expected_count [...] float
      (broadcastable to `labels`), sampled_expected_count [S] float) from a sampler called with
      `true_classes=labels`; the ids `[S] int` alone if not `subtract_log_q`.
    bias: optional [K] float.
    remove_accidental_hits: mask samples equal to the example's label.
    subtract_log_q: subtract the log expected counts (the log-Q correction).
    ignore_index: None or an int; examples with this label get loss 0 and gradient 0 (call
      the sampler with the same `ignore_index`).
    gathered_from: None, or K: `kernel` is then not the table but the rows already read from a
      K-class table, `[N + S, d]`: the N = labels.size labels' rows in `labels.reshape(-1)`
      order, then the S samples' rows in `sampled` order (`bias`: `[N + S]` likewise), TF's
      `embedding_lookup` of `concat(labels, sampled)`. The loss slices them instead of
      gathering, so its gradient w.r.t. `kernel` is one row per read, duplicates not summed
      (TF's `IndexedSlices` values) and no scatter is formed; the ids serve the accidental-hit
      mask and the range checks against K. Row-sparse training uses it
      (`SampledSoftmax.row_loss`).

  Returns:
    [...] float32 per-example loss (float64 for float64 inputs).

  Raises:
    ValueError: always, also under `jit`/`vmap`/`grad` (shapes and dtypes): `kernel` is not a
      float `[K, d]`; `features` is not a float `[..., d]` with d = kernel.shape[1]; `labels`
      is not an integer array of shape `features.shape[:-1]`; `sampled_values` is not 3 items
      (or the ids alone), its ids are not an integer `[S]`, its `sampled_expected_count` not
      a float `[S]`, its `true_expected_count` not a float broadcastable to `labels`, or the
      counts are missing with `subtract_log_q`; `bias` is not a float `[K]`; `ignore_index` is
      not None or an int. Only on concrete values: `labels` (other than `ignore_index`) and
      sampled ids outside [0, K). A traced out-of-range label gives a NaN loss for its
      example; a traced out-of-range sampled id a NaN loss for every example (the samplers
      never produce one).

  References:
    TF `tf.nn.sampled_softmax_loss`; Jean et al., "On using very large target vocabulary for
    neural machine translation", ACL 2015 (arXiv:1412.2007).

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> x = np.sin(np.arange(6.0)).reshape(2, 3)
    >>> kernel = np.cos(np.arange(12.0)).reshape(4, 3)
    >>> y = jnp.array([1, 2])
    >>> loss = ops.sampled_softmax_loss(x, kernel, y, jnp.arange(4), subtract_log_q=False)
    >>> bool(np.allclose(loss, ops.cross_entropy(x @ kernel.T, y), atol=1e-5))
    True
  """
  z_t, z_s, keep, finish = _sampled_logits(features, kernel, labels, sampled_values, bias,
                                           remove_accidental_hits, subtract_log_q, ignore_index,
                                           gathered_from)
  z = jnp.concatenate([z_t[:, None], z_s], axis=-1)
  mask = jnp.concatenate([jnp.ones_like(keep[:, :1]), keep], axis=-1)
  return finish(logsumexp(z, where=mask) - z_t)


def _logistic_loss(features, kernel, labels, sampled_values, bias, remove_hits, log_q,
                   ignore_index, gathered_from):
  z_t, z_s, keep, finish = _sampled_logits(features, kernel, labels, sampled_values, bias,
                                           remove_hits, log_q, ignore_index, gathered_from)
  negatives = jnp.where(keep, -jax.nn.log_sigmoid(-z_s), 0)  # z_s finite: finite gradients.
  return finish(-jax.nn.log_sigmoid(z_t) + jnp.sum(negatives, axis=-1))


def nce_loss(features, kernel, labels, sampled_values, *, bias=None,
             remove_accidental_hits=False, subtract_log_q=True, ignore_index=None,
             gathered_from=None):
  """Per-example noise-contrastive estimation loss (TF `tf.nn.nce_loss`, one true class).

  With the logits `z_0`, `z_j` of `sampled_softmax_loss` (log-Q corrected):
  `loss = -log sigmoid(z_0) - sum_j log sigmoid(-z_j)`, the sigmoid cross-entropy with label 1
  for the true class and 0 for each sample, summed; an accidental hit, if removed, adds 0. TF's
  default keeps accidental hits.

  Arguments, returns and raises as `sampled_softmax_loss` (shapes and dtypes checked always,
  ids in range only when concrete); `remove_accidental_hits` defaults to False.

  References:
    TF `tf.nn.nce_loss`; Gutmann & Hyvärinen, "Noise-contrastive estimation", AISTATS 2010;
    Mnih & Teh, "A fast and simple algorithm for training neural probabilistic language
    models", ICML 2012.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> x = np.sin(np.arange(3.0)).reshape(1, 3)
    >>> kernel = np.cos(np.arange(12.0)).reshape(4, 3)
    >>> z = x @ kernel.T
    >>> loss = ops.nce_loss(x, kernel, jnp.array([1]), jnp.array([3]), subtract_log_q=False)
    >>> ref = -jax.nn.log_sigmoid(z[:, 1]) - jax.nn.log_sigmoid(-z[:, 3])
    >>> bool(np.allclose(loss, ref, atol=1e-5))
    True
  """
  return _logistic_loss(features, kernel, labels, sampled_values, bias,
                        remove_accidental_hits, subtract_log_q, ignore_index, gathered_from)


def negative_sampling_loss(features, kernel, labels, sampled_values, *, bias=None,
                           remove_accidental_hits=True, ignore_index=None, gathered_from=None):
  """Per-example negative sampling loss (word2vec), no log-Q correction.

  `loss = -log sigmoid(s_y) - sum_j log sigmoid(-s_{n_j})` with raw scores `s = <x, w> + b` of
  the label and the S shared negatives; word2vec skips a negative equal to the target, hence
  `remove_accidental_hits=True` by default.

  Arguments, returns and raises as `sampled_softmax_loss` (shapes and dtypes checked always,
  ids in range only when concrete), except that `sampled_values` may be the negatives
  `[S] int` alone (expected counts are unused and not checked).

  References:
    Mikolov et al., "Distributed representations of words and phrases and their
    compositionality", NIPS 2013 (eq. 4).

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> x = np.sin(np.arange(3.0)).reshape(1, 3)
    >>> kernel = np.cos(np.arange(12.0)).reshape(4, 3)
    >>> z = x @ kernel.T
    >>> loss = ops.negative_sampling_loss(x, kernel, jnp.array([1]), jnp.array([0, 3]))
    >>> ref = -jax.nn.log_sigmoid(z[:, 1]) - jax.nn.log_sigmoid(-z[:, [0, 3]]).sum(-1)
    >>> bool(np.allclose(loss, ref, atol=1e-5))
    True
  """
  return _logistic_loss(features, kernel, labels, sampled_values, bias,
                        remove_accidental_hits, False, ignore_index, gathered_from)
