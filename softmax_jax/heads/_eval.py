"""Per-example evaluation statistics of a head, by one online pass over chunks of classes.

`chunked_eval_stats(chunk, labels, ...)` reduces the scores of all K classes, handed over one chunk
of classes at a time by `chunk(start, size) -> [..., size]`, to per-example statistics, keeping
only a running state per example (the running max, one running sum of exponentials per
temperature, the running argmax, the count of scores above the label's), so its memory is
O(N (chunk + G)) whatever K, and nothing of shape `[N, K]` exists unless `chunk` builds it.
`log_prob_eval_stats(log_prob, labels)` is the same from a full `[..., K]` array.

The scores may be any per-row shift of the head's normalized `log_prob` (logits work: every
statistic below is invariant to a per-row constant). With `lp` the normalized log-probabilities:

- 'prediction' [...] int32: `argmax_k lp_k`, the lowest class id on ties (as `jnp.argmax`);
- 'label_rank' [...] int32: `#{k != label : lp_k > lp_label}` (0: the label is top);
- 'label_log_prob' [..., G] float32: `log_softmax(lp / t)[label]` for each temperature t;
- 'confidence' [..., G] float32: `max_k softmax(lp / t)_k` for each t;
- with `log_prior` ([K]), the same four prefixed 'adjusted_' for the scores `lp - log_prior`
  (post-hoc logit adjustment, Menon et al. 2021), renormalized.

NaN: a row with a NaN score gets NaN 'label_log_prob' and 'confidence' (and a prediction in
[0, K)); other rows are unaffected. A traced label outside [0, K) gives NaN 'label_log_prob'.

The label's score comes from `label_scores` (a head's own O(N d) gather, e.g. the label's column
`x . w_y + b_y`) or else from the chunks; the label's own column is never counted in the rank, so
a label score that differs from its chunk column in the last bit cannot shift the rank by one.
"""

import math
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.heads import _checks

DEFAULT_CHUNK_SIZE = 2048
KEYS = ('prediction', 'label_rank', 'label_log_prob', 'confidence')


def check_temperatures(temperatures: Sequence[float]) -> tuple:
  """`temperatures` is a non-empty sequence of finite numbers > 0; returns it as a float tuple."""
  try:
    ts = tuple(float(t) for t in np.asarray(temperatures, np.float64).reshape(-1))
    ok = len(ts) > 0 and np.ndim(temperatures) <= 1 and all(0 < t < math.inf for t in ts)
  except (TypeError, ValueError):
    ok, ts = False, ()
  if not ok:
    raise ValueError(f'eval_stats: `temperatures` must be a non-empty sequence of finite numbers '
                     f'> 0 (concrete, e.g. calibration.TEMPERATURE_GRID); got {temperatures!r}.')
  return ts


def check_prior(log_prior, k: int):
  """`log_prior` as a float32 `[k]` array (None passes), or a ValueError naming it."""
  if log_prior is None:
    return None
  log_prior = jnp.asarray(log_prior)
  if log_prior.shape != (k,) or not jnp.issubdtype(log_prior.dtype, jnp.floating):
    raise ValueError(f'eval_stats: `log_prior` must be a [num_classes] = ({k},) float array (e.g. '
                     f'log class frequencies); got shape {log_prior.shape} and dtype '
                     f'{log_prior.dtype}.')
  return log_prior.astype(jnp.float32)


def _init(shape, g, k):
  return dict(max=jnp.full(shape, -jnp.inf, jnp.float32),
              sums=jnp.zeros(shape + (g,), jnp.float32),
              best=jnp.full(shape, k, jnp.int32),
              above=jnp.zeros(shape, jnp.int32))


def _update(state, a, ids, label, label_score, ts, k):
  """Folds one chunk of scores `a: [..., c]` (classes `ids: [c]`; -inf and id -1: columns of
  the last chunk already seen) in."""
  cm = jnp.max(a, axis=-1)
  new_max = jnp.maximum(state['max'], cm)  # NaN propagates
  ref = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
  old = jnp.where(jnp.isfinite(state['max']), state['max'], ref)
  sums = []
  for g, t in enumerate(ts):  # one [..., c] block at a time, never [..., c, G]
    carried = state['sums'][..., g] * jnp.exp((old - ref) / t)
    sums.append(carried + jnp.sum(jnp.exp((a - ref[..., None]) / t), axis=-1))
  cid = jnp.min(jnp.where((a == cm[..., None]) & (ids >= 0), ids, k), axis=-1)
  best = jnp.where(cm > state['max'], cid,
                   jnp.where(cm == state['max'], jnp.minimum(state['best'], cid), state['best']))
  above = (a > label_score[..., None]) & (ids != label[..., None])
  return dict(max=new_max, sums=jnp.stack(sums, -1), best=best,
              above=state['above'] + jnp.sum(above, axis=-1, dtype=jnp.int32))


def _finish(state, label_score, ts, k):
  t = jnp.asarray(ts, jnp.float32)
  log_sums = jnp.log(state['sums'])
  lse = state['max'][..., None] / t + log_sums
  return {'prediction': jnp.where(state['best'] < k, state['best'], 0).astype(jnp.int32),
          'label_rank': state['above'],
          'label_log_prob': label_score[..., None] / t - lse,
          'confidence': jnp.exp(-log_sums)}


def chunked_eval_stats(chunk: Callable[[jax.Array, int], jax.Array], labels: jax.Array, *,
                       num_classes: int, chunk_size: Optional[int] = None,
                       temperatures: Sequence[float] = (1.0,), log_prior=None,
                       label_scores: Optional[jax.Array] = None,
                       class_ids: Optional[np.ndarray] = None) -> Dict[str, jax.Array]:
  """Per-example statistics of the scores of K classes, from one pass over chunks of classes.

  Args:
    chunk: `chunk(start, size) -> [..., size] float` scores of positions `[start, start + size)`
      (`start` a traced int32 scalar with `0 <= start <= K - size`, `size` a static int); the
      scores are `lp + c` for a per-row constant c. Called inside `lax.scan`: pure, no Flax.
    labels: [...] int class ids, the leading shape of the scores.
    num_classes: K.
    chunk_size: classes per chunk (None: `DEFAULT_CHUNK_SIZE`); at most K are used. The last
      chunk starts at K - size and skips the columns already seen.
    temperatures: G finite temperatures > 0 (static).
    log_prior: optional [K] float, adds the 'adjusted_' statistics of `lp - log_prior`.
    label_scores: optional [...] float, the label's score on the scale of the chunks (None: taken
      from the chunks; NaN for a label outside [0, K)).
    class_ids: optional static [K] int permutation: position p holds class `class_ids[p]`
      (chunks in another order than the ids, e.g. a tree's leaves depth first).

  Returns:
    dict of [...] int32 'prediction', 'label_rank' and [..., G] float32 'label_log_prob',
    'confidence' (and the 'adjusted_' ones with `log_prior`).
  """
  k = int(num_classes)
  ts = check_temperatures(temperatures)
  log_prior = check_prior(log_prior, k)
  size = min(int(chunk_size or DEFAULT_CHUNK_SIZE), k)
  if size < 1:
    raise ValueError(f'eval_stats: `chunk_size` must be an int >= 1; got {chunk_size!r}.')
  labels = jnp.asarray(labels).astype(jnp.int32)
  shape = labels.shape
  in_range = (labels >= 0) & (labels < k)
  num_chunks = -(-k // size)

  def scores_of(i):
    start = jnp.minimum(i * size, k - size).astype(jnp.int32)
    pos = start + jnp.arange(size, dtype=jnp.int32)
    s = jnp.asarray(chunk(start, size)).astype(jnp.float32)
    ids = pos if class_ids is None else jax.lax.dynamic_slice_in_dim(
        jnp.asarray(class_ids, jnp.int32), start, size)
    fresh = pos >= i * size  # the last chunk's columns seen before are not counted again
    return jnp.where(fresh, s, -jnp.inf), jnp.where(fresh, ids, -1)

  if label_scores is None:  # a first pass for the label's own score, so the rank can be counted
    def find(acc, i):
      s, ids = scores_of(i)
      return acc + jnp.sum(jnp.where(ids == labels[..., None], s, 0.0), -1), None
    label_scores, _ = jax.lax.scan(find, jnp.zeros(shape, jnp.float32), jnp.arange(num_chunks))
  label_scores = jnp.where(in_range, jnp.asarray(label_scores, jnp.float32), jnp.nan)
  views = [(None, label_scores)]
  if log_prior is not None:
    views.append((log_prior, label_scores - log_prior[jnp.clip(labels, 0, k - 1)]))

  def body(states, i):
    s, ids = scores_of(i)
    out = []
    for (prior, label_score), state in zip(views, states):
      a = s if prior is None else s - prior[ids]
      out.append(_update(state, a, ids, labels, label_score, ts, k))
    return out, None

  states = [_init(shape, len(ts), k) for _ in views]
  states, _ = jax.lax.scan(body, states, jnp.arange(num_chunks))
  stats = _finish(states[0], views[0][1], ts, k)
  if log_prior is not None:
    stats |= {'adjusted_' + key: v for key, v in _finish(states[1], views[1][1], ts, k).items()}
  return stats


def log_prob_eval_stats(log_prob: jax.Array, labels: jax.Array, *,
                        temperatures: Sequence[float] = (1.0,), log_prior=None,
                        chunk_size: Optional[int] = None) -> Dict[str, jax.Array]:
  """`chunked_eval_stats` of a full `log_prob: [..., K]` (one chunk by default), `labels: [...]`."""
  log_prob = jnp.asarray(log_prob)
  k = log_prob.shape[-1]
  labels = jnp.asarray(labels).astype(jnp.int32)
  picked = jnp.take_along_axis(log_prob, jnp.clip(labels, 0, k - 1)[..., None], -1)[..., 0]
  return chunked_eval_stats(
      lambda start, size: jax.lax.dynamic_slice_in_dim(log_prob, start, size, axis=-1), labels,
      num_classes=k, chunk_size=chunk_size or k, temperatures=temperatures, log_prior=log_prior,
      label_scores=picked)


def from_log_prob(head, features, labels, **options) -> Dict[str, jax.Array]:
  """A head's `eval_stats` from its full `log_prob` (the default for heads whose K is small)."""
  log_prob = head.log_prob(features)  # checks the head's attributes and the features first
  _, labels = _checks.features_and_labels(type(head).__name__, features, labels,
                                          num_classes=head.num_classes)
  return log_prob_eval_stats(log_prob, labels, **options)


def label_rows(weights: jax.Array, labels: jax.Array, axis: int) -> jax.Array:
  """The labels' rows `[..., d]` of a class matrix (`axis`: its class axis), ids clipped to [0, K)."""
  k = weights.shape[axis]
  rows = jnp.take(weights, jnp.clip(labels, 0, k - 1), axis=axis)  # [d, ...] or [..., d]
  return jnp.moveaxis(rows, 0, -1) if axis == 1 else rows


def linear_eval_stats(x: jax.Array, weights: jax.Array, bias: Optional[jax.Array], labels: jax.Array, *,
                      class_axis: int, num_classes: int, chunk_size: Optional[int] = None,
                      **options) -> Dict[str, jax.Array]:
  """`chunked_eval_stats` of the linear logits `x @ W + b`, formed `chunk_size` classes at a time.

  `x: [..., d]` (the compute dtype), `weights`: `[d, K]` (`class_axis=1`, a kernel) or `[K, d]`
  (`class_axis=0`, an embedding), `bias: [K]` or None. The label's score is its own row's product
  (O(N d)), so no chunk is ever `[N, K]`; `options` are `chunked_eval_stats`'.
  """
  spec = '...d,dk->...k' if class_axis == 1 else '...d,kd->...k'

  def chunk(start, size):
    w = jax.lax.dynamic_slice_in_dim(weights, start, size, axis=class_axis).astype(x.dtype)
    z = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    return z if bias is None else z + jax.lax.dynamic_slice_in_dim(bias, start, size)

  label = jnp.einsum('...d,...d->...', x, label_rows(weights, labels, class_axis).astype(x.dtype),
                     preferred_element_type=jnp.float32)
  if bias is not None:
    label = label + label_rows(bias, labels, 0)
  return chunked_eval_stats(chunk, labels, num_classes=num_classes, chunk_size=chunk_size,
                            label_scores=label, **options)


def check_recall_target(head: str, recall_target) -> float:
  """`recall_target` of `jax.lax.approx_max_k` is a number in (0, 1]; returns it as a float."""
  ok = (isinstance(recall_target, (int, float, np.integer, np.floating))
        and not isinstance(recall_target, bool) and 0 < float(recall_target) <= 1)
  if not ok:
    raise ValueError(f'{head}: `recall_target` (of jax.lax.approx_max_k, the expected fraction of '
                     f'the exact top-k that the approximate top-k finds) must be a number in '
                     f'(0, 1]; got {recall_target!r}.')
  return float(recall_target)


def top_k(scores: jax.Array, k: int, *, approx: bool = False,
          recall_target: float = 0.95) -> tuple:
  """The `k` largest scores of the last axis and their ids, exactly or by `jax.lax.approx_max_k`.

  `approx=True` is TPU's fast path (Chern et al. 2022): on TPU it finds each of the exact top-k
  with probability about `recall_target`; on CPU and GPU XLA computes it exactly (recall 1).
  Measure the recall on the target device with `top_k_recall`.

  Args:
    scores: [..., K] float (e.g. log-probabilities; -inf entries, such as padded classes, are
      never returned while k finite entries are left).
    k: static int in [1, K].
    approx: use `jax.lax.approx_max_k` instead of `jax.lax.top_k`.
    recall_target: approx_max_k's expected recall, in (0, 1].

  Returns:
    `(values [..., k] like scores, ids [..., k] int32)`, values in decreasing order.

  References:
    Chern et al., "TPU-KNN: K Nearest Neighbor Search at Peak FLOP/s", NeurIPS 2022.
  """
  if approx:
    values, ids = jax.lax.approx_max_k(scores, k, recall_target=recall_target)
  else:
    values, ids = jax.lax.top_k(scores, k)
  return values, ids.astype(jnp.int32)


def top_k_recall(approx_ids: jax.typing.ArrayLike, exact_ids: jax.typing.ArrayLike) -> jax.Array:
  """Recall of an approximate top-k against the exact one: `|approx & exact| / k`, averaged.

  Args:
    approx_ids: [..., k] int, the ids an approximate search returned (order ignored).
    exact_ids: [..., k] int, the exact top-k ids (distinct in each row).

  Returns:
    [] float32, the mean over rows of the fraction of `exact_ids` found in `approx_ids` (1.0 when
    they are the same sets).
  """
  approx_ids, exact_ids = jnp.asarray(approx_ids), jnp.asarray(exact_ids)
  found = jnp.any(exact_ids[..., :, None] == approx_ids[..., None, :], axis=-1)
  return jnp.mean(found.astype(jnp.float32))


def fenchel_young_eval_stats(logits: jax.Array, labels: jax.Array, *,
                             probs: Callable[[jax.Array], jax.Array],
                             loss: Callable[[jax.Array, jax.Array], jax.Array],
                             temperatures: Sequence[float] = (1.0,),
                             log_prior=None) -> Dict[str, jax.Array]:
  """Per-example statistics of a head whose distribution is a sparse map `p = probs(z)`.

  For sparsemax / entmax heads (`DenseSoftmax(mapping=...)`), whose distribution at temperature
  t is `probs(z / t)` (exact zeros off the support), not a softmax of `log p`. With the logits
  `z: [..., K]`:

  - 'prediction' [...] int32: `argmax_k z_k` (the lowest id on ties), the most probable class;
  - 'label_rank' [...] int32: `#{k != label : z_k > z_label}`, by the z-order, which also ranks
    the classes outside the support (there p ties at 0);
  - 'label_log_prob' [..., G] float32: `log probs(z / t)[label]`, -inf outside the support;
  - 'confidence' [..., G] float32: `max_k probs(z / t)_k`;
  - 'fy_loss' [..., G] float32: `loss(z / t, label)`, the Fenchel-Young loss at each t;
  - 'support' [...] int32: `#{k : probs(z)_k > 0}`, the support size at t = 1;
  - with `log_prior` ([K]), the first four prefixed 'adjusted_' for the scores `z - log_prior`.

  Forms `[V, ..., G (+ 1), K]` on the device (V = 2 views with `log_prior`; one map and one loss
  call for every view and temperature, t = 1 added for the support unless among them); only per-example
  values are returned. NaN: a NaN row gets NaN 'label_log_prob', 'confidence' and 'fy_loss'
  (support 0, a prediction in [0, K)); a traced label outside [0, K) NaN 'label_log_prob' and
  'fy_loss'.

  Args:
    logits: [..., K] float logits z (float32 is used).
    labels: [...] int class ids.
    probs: `z [..., K] -> p [..., K]`, the sparse map (e.g. `ops.sparsemax`).
    loss: `(z [..., K], labels [...]) -> [...]`, its Fenchel-Young loss (e.g. `ops.sparsemax_loss`).
    temperatures: G finite temperatures > 0 (static).
    log_prior: optional [K] float, adds the 'adjusted_' statistics of `z - log_prior`.

  Returns:
    dict of the keys above.

  References:
    Blondel, Martins & Niculae, "Learning with Fenchel-Young losses", JMLR 2020.
  """
  ts = check_temperatures(temperatures)
  z = jnp.asarray(logits).astype(jnp.float32)
  k = z.shape[-1]
  log_prior = check_prior(log_prior, k)
  labels = jnp.asarray(labels).astype(jnp.int32)
  in_range = (labels >= 0) & (labels < k)
  safe = jnp.where(in_range, labels, 0)
  views = jnp.stack([z] if log_prior is None else [z, z - log_prior])  # [V, ..., K]
  # The support is that of t = 1: a column of its own unless the temperatures include 1.
  extra = 0 if 1.0 in ts else 1
  one = ts.index(1.0) if not extra else 0
  t = jnp.asarray((1.0,) * extra + ts, jnp.float32)[:, None]
  scaled = views[..., None, :] / t  # [V, ..., G (+ 1), K]: one map and one loss call in all
  p = probs(scaled)
  fy_loss = loss(scaled[0], jnp.broadcast_to(labels[..., None], scaled.shape[1:-1]))
  s_label = jnp.take_along_axis(views, jnp.broadcast_to(safe[..., None], views.shape[:-1] + (1,)),
                                axis=-1)
  above = jnp.sum((views > s_label) & (jnp.arange(k) != safe[..., None]), axis=-1, dtype=jnp.int32)
  index = jnp.broadcast_to(safe[..., None, None], p.shape[:-1] + (1,))
  p_label = jnp.take_along_axis(p, index, axis=-1)[..., 0]  # [V, ..., 1 + G]
  label_log_prob = jnp.where(in_range[..., None], jnp.log(p_label), jnp.nan)
  confidence = jnp.max(p, axis=-1)
  prediction = jnp.argmax(views, axis=-1).astype(jnp.int32)
  stats = {}
  for v in range(views.shape[0]):
    prefix = 'adjusted_' if v else ''
    stats |= {prefix + 'prediction': prediction[v], prefix + 'label_rank': above[v],
              prefix + 'label_log_prob': label_log_prob[v][..., extra:],
              prefix + 'confidence': confidence[v][..., extra:]}
  stats['fy_loss'] = fy_loss[..., extra:]
  stats['support'] = jnp.sum(p[0][..., one, :] > 0, axis=-1, dtype=jnp.int32)
  return stats
