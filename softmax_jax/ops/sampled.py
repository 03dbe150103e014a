"""Candidate samplers and sampled losses (sampled softmax, NCE, negative sampling), TF semantics.

A sampler draws one shared sample `[S]` per call (TF's `*_candidate_sampler`) and the expected
counts Q of the log-Q correction: `S p` with replacement (i.i.d. alias-method draws, exact in
float32 also for tiny p); without replacement (`unique=True`, TF's default), successive sampling
proportional to p (the first S distinct ids of i.i.d. draws), drawn exactly by Gumbel-top-k, and
TF's inclusion probability `Q = 1 - (1 - p)^n = -expm1(n log1p(-p))`. TF plugs in its random
number of tries n; we draw no tries and take the n solving `sum_k Q_k = S`, by float64 Newton
steps from n = S (monotone: the sum is concave increasing in n). Like TF's, Q approximates the
exact inclusion probabilities (within 3.6% relative at K = 12, S = 4; exact for uniform).

Layout: `kernel: [K, d]` class rows (TF's `weights`, `nn.Embed`'s table; DenseSoftmax's kernel
transposed): a step gathers N + S rows, the gradient scatter-adds them. On this 2-core CPU
(K = 200k, d = 512, N = 2048, S = 1024, f32, jit value_and_grad w.r.t. features and kernel,
median of 15): [K, d] 123-136 ms, [d, K] 135-168 ms (the gather + features gradient alone: 14
vs 24 ms; the rest writes the dense kernel gradient); the full softmax: 16 s.

References: TF `tf.nn.sampled_softmax_loss`, `tf.nn.nce_loss`, "Candidate sampling algorithms
reference"; Jean et al. 2015 (arXiv:1412.2007); Mikolov et al. 2013 (word2vec).
"""

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.ops import _checks
from softmax_jax.ops.softmax import logsumexp


class SampledValues(NamedTuple):
  """A sampler's output, TF's `sampled_values` triple."""
  sampled: jnp.ndarray  # [S] int32 class ids.
  true_expected_count: Optional[jnp.ndarray]  # [...] float32 (None without true_classes).
  sampled_expected_count: jnp.ndarray  # [S] float32.


def _check_int(name, value, lo):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
    raise ValueError(f'`{name}` must be a Python int >= {lo}; got {value!r}.')
  return int(value)


def _check_num_sampled(num_sampled, num_classes, unique, what='num_classes'):
  s = _check_int('num_sampled', num_sampled, 1)
  if unique and s >= num_classes:
    raise ValueError(f'`num_sampled` must be < {what} = {num_classes} with unique=True (sampling '
                     f'without replacement; use the full softmax instead); got {s}.')
  return s


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


def _candidates(key, s, p, prob, unique, true_classes):
  """Shared sampler body; p: host float64 [K] probabilities, prob(ids): float32 p[ids]."""
  if unique:  # Gumbel-top-k over log p: successive sampling without replacement.
    g = jnp.log(jnp.asarray(p, jnp.float32)) + jax.random.gumbel(key, p.shape, jnp.float32)
    sampled = jax.lax.top_k(g, s)[1].astype(jnp.int32)
    n = np.float32(_solve_tries(p, s))
    count = lambda ids: -jnp.expm1(n * jnp.log1p(-prob(ids)))
  else:  # i.i.d. draws by the alias method.
    thresholds, alias = _alias_table(np.ascontiguousarray(p, np.float64).tobytes())
    col_key, u_key = jax.random.split(key)
    col = jax.random.randint(col_key, (s,), 0, p.size)
    u = jax.random.uniform(u_key, (s,), jnp.float32)
    sampled = jnp.where(u < jnp.asarray(thresholds)[col], col, jnp.asarray(alias)[col])
    count = lambda ids: s * prob(ids)
  true_count = None
  if true_classes is not None:
    true_classes = jnp.asarray(true_classes)
    if not jnp.issubdtype(true_classes.dtype, jnp.integer):
      raise ValueError(f'`true_classes` must be integer class ids; got dtype {true_classes.dtype}.')
    true_count = count(true_classes)
  return SampledValues(sampled, true_count, count(sampled))


def uniform_sampler(key, num_sampled, num_classes, *, unique=True, true_classes=None):
  """Uniform sampler, `P(k) = 1 / K` (TF `uniform_candidate_sampler`); counts are S / K exactly.

  Args:
    key: a PRNG key.
    num_sampled: S >= 1, a Python int (< K if unique).
    num_classes: K, a Python int.
    unique: sample without replacement (Gumbel-top-k; TF's default) or with replacement.
    true_classes: optional [...] int labels whose expected counts to return.

  Returns:
    SampledValues(sampled [S] int32, true_expected_count [...] float32 or None,
    sampled_expected_count [S] float32): `S p` with replacement, `1 - (1 - p)^n` without.
  """
  k = _check_int('num_classes', num_classes, 2 if unique else 1)
  s = _check_num_sampled(num_sampled, k, unique)
  return _candidates(key, s, np.full(k, 1.0 / k), lambda ids: jnp.full(ids.shape, 1.0 / k),
                     unique, true_classes)


def log_uniform_probs(num_classes: int) -> np.ndarray:
  """`[K]` float64 log-uniform (Zipf) law `p(k) = log((k + 2) / (k + 1)) / log(K + 1)` of sorted ids."""
  return np.log1p(1.0 / np.arange(1.0, num_classes + 1.0)) / np.log(num_classes + 1.0)


def log_uniform_sampler(key, num_sampled, num_classes, *, unique=True, true_classes=None):
  """Log-uniform (Zipf) sampler, `P(k) = log((k + 2) / (k + 1)) / log(K + 1)`.

  TF `log_uniform_candidate_sampler`; ids must be sorted by decreasing frequency. Arguments
  and returns as `uniform_sampler`.
  """
  k = _check_int('num_classes', num_classes, 2 if unique else 1)
  s = _check_num_sampled(num_sampled, k, unique)
  log_k1 = np.log(k + 1.0)
  prob = lambda ids: jnp.log1p(1.0 / (jnp.asarray(ids, jnp.float32) + 1.0)) / np.float32(log_k1)
  p = log_uniform_probs(k)
  return _candidates(key, s, p, prob, unique, true_classes)


def unigram_probs(counts, distortion=0.75):
  """Host float64 `[K]` probabilities `counts**distortion / sum(counts**distortion)`.

  Zero counts get probability 0 (also with distortion 0). Raises ValueError on counts that are
  traced, not 1-D, negative, non-finite or all zero, or a distortion < 0.
  """
  if isinstance(counts, jax.core.Tracer):
    raise ValueError('`counts` must be concrete (NumPy array, list or tuple), not traced.')
  c = np.asarray(counts, np.float64)
  if c.ndim != 1 or c.size == 0:
    raise ValueError(f'`counts` must be a non-empty 1-D [num_classes] array; got shape {c.shape}.')
  if not np.all(np.isfinite(c) & (c >= 0)) or not np.any(c > 0):
    raise ValueError(f'`counts` must be finite and >= 0 with a positive sum; got {c[:8]}...')
  if isinstance(distortion, jax.core.Tracer) or not np.isfinite(distortion) or distortion < 0:
    raise ValueError(f'`distortion` must be a concrete finite number >= 0; got {distortion!r}.')
  w = np.where(c > 0, np.power(np.where(c > 0, c, 1.0), float(distortion)), 0.0)
  return w / np.sum(w)


def unigram_sampler(key, num_sampled, counts, *, distortion=0.75, unique=True,
                    true_classes=None):
  """Unigram sampler, `P(k) ∝ counts_k ** distortion` (TF `fixed_unigram_candidate_sampler`).

  Distortion 0.75 is word2vec's; 0 is uniform over the classes with counts > 0. Arguments and returns as `uniform_sampler`, with
  `counts: [K]` concrete counts >= 0 (zero counts are never sampled; if unique, S must be <
  the number of classes with counts > 0) instead of `num_classes`.
  """
  p = unigram_probs(counts, distortion)
  s = _check_num_sampled(num_sampled, int(np.sum(p > 0)), unique,
                         'the number of classes with counts > 0')
  p32 = jnp.asarray(p, jnp.float32)
  return _candidates(key, s, p, lambda ids: jnp.take(p32, ids, mode='clip'), unique,
                     true_classes)


def _sampled_logits(fn, features, kernel, labels, sampled_values, bias, remove_hits, log_q):
  """Checks; returns z_true [N], z_sampled [N, S], keep [N, S] bool, in_range [N], lead shape."""
  def fail(arg, got, needs):
    raise ValueError(f'{fn}: `{arg}` got {got}, needs {needs}.')
  features, kernel, labels = jnp.asarray(features), jnp.asarray(kernel), jnp.asarray(labels)
  triple = sampled_values if isinstance(sampled_values, (tuple, list)) else (sampled_values,)
  if len(triple) not in (1, 3):
    fail('sampled_values', f'{len(triple)} items', '(sampled, true_expected_count, '
         'sampled_expected_count) as returned by a sampler')
  sampled, true_count, sampled_count = (*triple, None, None)[:3]
  sampled = jnp.asarray(sampled)
  if kernel.ndim != 2:
    fail('kernel', f'shape {kernel.shape}', 'rank 2 [num_classes, d] (class rows)')
  k, d = kernel.shape
  if features.ndim < 1 or features.shape[-1] != d:
    fail('features', f'shape {features.shape}', f'[..., d] with d = kernel.shape[1] = {d}')
  if not jnp.issubdtype(jnp.result_type(features, kernel), jnp.floating):
    fail('features', f'{features.dtype} with kernel {kernel.dtype}', 'float dtypes')
  lead = features.shape[:-1]
  if labels.shape != lead or not jnp.issubdtype(labels.dtype, jnp.integer):
    fail('labels', f'{labels.dtype}{list(labels.shape)}', f'int with features.shape[:-1] = {lead}')
  if sampled.ndim != 1 or not jnp.issubdtype(sampled.dtype, jnp.integer):
    fail('sampled_values', f'sampled ids {sampled.dtype}{list(sampled.shape)}', 'int [S]')
  for name, ids in (('labels', labels), ('sampled_values', sampled)):
    _checks.in_range(name, ids, k)
  if bias is not None and jnp.shape(bias) != (k,):
    fail('bias', f'shape {jnp.shape(bias)}', f'[num_classes] = ({k},)')
  if log_q:
    if true_count is None or sampled_count is None:
      fail('sampled_values', 'no expected counts', 'the (sampled, true_expected_count, '
           'sampled_expected_count) of a sampler called with true_classes=labels, or '
           'subtract_log_q=False')
    true_count, sampled_count = jnp.asarray(true_count), jnp.asarray(sampled_count)
    if sampled_count.shape != sampled.shape:
      fail('sampled_values', f'sampled_expected_count shape {sampled_count.shape}',
           f'the shape of sampled {sampled.shape}')
    if true_count.ndim > len(lead) or any(
        a not in (1, b) for a, b in zip(true_count.shape[::-1], lead[::-1])):
      fail('sampled_values', f'true_expected_count shape {true_count.shape}',
           f'a shape broadcastable to labels.shape = {lead}')
  acc = jnp.promote_types(jnp.result_type(features, kernel), jnp.float32)
  x, y = features.reshape(-1, d), labels.reshape(-1)
  in_range = (y >= 0) & (y < k)
  y_safe = jnp.where(in_range, y, 0)
  w_true = jnp.take(kernel, y_safe, axis=0, mode='clip')  # [N, d]: contiguous rows.
  w_samp = jnp.take(kernel, sampled, axis=0, mode='clip')  # [S, d]
  z_true = jnp.einsum('nd,nd->n', x, w_true, preferred_element_type=acc).astype(acc)
  z_samp = jnp.einsum('nd,sd->ns', x, w_samp, preferred_element_type=acc).astype(acc)
  if bias is not None:
    b = jnp.asarray(bias).astype(acc)
    z_true = z_true + jnp.take(b, y_safe, mode='clip')
    z_samp = z_samp + jnp.take(b, sampled, mode='clip')
  if log_q:
    z_true = z_true - jnp.log(jnp.broadcast_to(true_count, lead).astype(acc)).reshape(-1)
    z_samp = z_samp - jnp.log(sampled_count.astype(acc))
  keep = (sampled[None, :] != y[:, None]) if remove_hits else jnp.ones(z_samp.shape, bool)
  return z_true, z_samp, keep, in_range, lead


def sampled_softmax_loss(features, kernel, labels, sampled_values, *, bias=None,
                         remove_accidental_hits=True, subtract_log_q=True):
  """Per-example sampled softmax loss (TF `tf.nn.sampled_softmax_loss`, one true class).

  `z_0 = <x, w_y> + b_y - log Q_y`, `z_j = <x, w_{s_j}> + b_{s_j} - log Q_{s_j}` over the S
  shared samples (Q: expected counts; no `- log Q` if not `subtract_log_q`); samples equal to
  the label (accidental hits) are masked out (-inf logit, zero gradient) if
  `remove_accidental_hits`; `loss = logsumexp(z) - z_0`, the cross-entropy with the true class
  at index 0. Generally an underestimate of the full softmax loss; with unique samples it
  tends to it as S -> K. Matrix products accumulate in float32 (bfloat16 inputs give a float32 loss).

  Args:
    features: [..., d] float.
    kernel: [K, d] float class rows (TF's `weights`; the transpose of DenseSoftmax's kernel).
    labels: [...] int in [0, K); concrete ones are checked, traced ones out of range give NaN.
    sampled_values: SampledValues / (sampled [S] int, true_expected_count [...] (broadcastable),
      sampled_expected_count [S]) from a sampler called with `true_classes=labels`.
    bias: optional [K] float.
    remove_accidental_hits: mask samples equal to the example's label.
    subtract_log_q: subtract the log expected counts (the log-Q correction).

  Returns:
    [...] float32 per-example loss (float64 for float64 inputs).
  """
  z_t, z_s, keep, ok, lead = _sampled_logits(
      'sampled_softmax_loss', features, kernel, labels, sampled_values, bias,
      remove_accidental_hits, subtract_log_q)
  z = jnp.concatenate([z_t[:, None], z_s], axis=-1)
  mask = jnp.concatenate([jnp.ones_like(keep[:, :1]), keep], axis=-1)
  loss = logsumexp(z, where=mask) - z_t
  return jnp.where(ok, loss, jnp.nan).reshape(lead)


def _logistic_loss(fn, features, kernel, labels, sampled_values, bias, remove_hits, log_q):
  z_t, z_s, keep, ok, lead = _sampled_logits(fn, features, kernel, labels, sampled_values, bias,
                                             remove_hits, log_q)
  negatives = jnp.where(keep, -jax.nn.log_sigmoid(-z_s), 0)  # z_s finite: finite gradients.
  loss = -jax.nn.log_sigmoid(z_t) + jnp.sum(negatives, axis=-1)
  return jnp.where(ok, loss, jnp.nan).reshape(lead)


def nce_loss(features, kernel, labels, sampled_values, *, bias=None,
             remove_accidental_hits=False, subtract_log_q=True):
  """Per-example noise-contrastive estimation loss (TF `tf.nn.nce_loss`, one true class).

  With the logits `z_0`, `z_j` of `sampled_softmax_loss` (log-Q corrected):
  `loss = -log sigmoid(z_0) - sum_j log sigmoid(-z_j)`, the sigmoid cross-entropy with label 1
  for the true class and 0 for each sample, summed; an accidental hit, if removed, adds 0. TF's
  default keeps accidental hits. Reference: Gutmann & Hyvärinen 2010; Mnih & Teh 2012.

  Arguments and returns as `sampled_softmax_loss`; `remove_accidental_hits` defaults to False.
  """
  return _logistic_loss('nce_loss', features, kernel, labels, sampled_values, bias,
                        remove_accidental_hits, subtract_log_q)


def negative_sampling_loss(features, kernel, labels, sampled_values, *, bias=None,
                           remove_accidental_hits=True):
  """Per-example negative sampling loss (word2vec), no log-Q correction.

  `loss = -log sigmoid(s_y) - sum_j log sigmoid(-s_{n_j})` with raw scores `s = <x, w> + b` of
  the label and the S shared negatives; word2vec skips a negative equal to the target, hence
  `remove_accidental_hits=True` by default. Reference: Mikolov et al. 2013, "Distributed
  representations of words and phrases and their compositionality" (eq. 4).

  Arguments and returns as `sampled_softmax_loss`, except that `sampled_values` may be the
  negatives `[S] int` alone (expected counts are unused).
  """
  return _logistic_loss('negative_sampling_loss', features, kernel, labels, sampled_values, bias,
                        remove_accidental_hits, False)
