"""Embedding geometry and open-set verification metrics, in float64 NumPy (host side).

For margin-softmax heads (`MarginSoftmax`: ArcFace, CosFace, SphereFace) the quantity of
interest is the angle: how tightly each class clusters around its center direction, how far
apart the centers are, and how well cosine similarity separates same-class from
different-class pairs (face verification: TAR at a fixed FAR, 10-fold LFW accuracy).
Everything is invariant to positive per-row scaling of the embeddings: rows are L2-normalized
first. An all-zero row stays zero, so its cosine with anything is 0 (90 degrees), as
`torch.nn.functional.normalize` does. Pairs are accepted as "same" when `score > threshold`.
"""

import numpy as np

_CHUNK = 1 << 18  # floats per gathered block when scoring a random subset of pairs (2 MiB)


def l2_normalize(x, axis=-1):
  """Scales `x` to unit L2 norm along `axis`: `x / max(||x||, tiny)`; zero rows stay zero.

  Rows are first divided by their largest magnitude, so tiny (1e-200) or huge (1e200) rows
  normalize without under- or overflow. NaN propagates.

  Args:
    x: [...] real array.
    axis: the axis to normalize over.

  Returns:
    [...] float64, same shape as `x`.
  """
  x = np.asarray(x, dtype=np.float64)
  tiny = np.finfo(np.float64).tiny
  x = x / np.maximum(np.max(np.abs(x), axis=axis, keepdims=True), tiny)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), tiny)


def _embeddings(embeddings, labels, num_classes=None):  # -> unit [n, d], int64 [n], C
  e = np.asarray(embeddings)
  if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] < 1:
    raise ValueError(f"embeddings must be [n, d] (rank 2, n >= 1, d >= 1), got shape {e.shape}.")
  if not (np.issubdtype(e.dtype, np.floating) or np.issubdtype(e.dtype, np.integer)):
    raise ValueError(f"embeddings must be real numbers, got dtype {e.dtype}.")
  bad = ~np.isfinite(e).all(axis=1)
  if bad.any():
    raise ValueError(f"embeddings must be finite, got NaN or inf in {bad.sum()} row(s), "
                     f"the first at row {np.flatnonzero(bad)[0]}.")
  y = np.asarray(labels)
  if y.shape != e.shape[:1]:
    raise ValueError(f"labels must be [n] = {e.shape[:1]} to match embeddings {e.shape}, "
                     f"got shape {y.shape}.")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {y.dtype}.")
  y = y.astype(np.int64)
  if y.min() < 0:
    raise ValueError(f"labels must be >= 0, got {y.min()}.")
  num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
  if y.max() >= num_classes:
    raise ValueError(f"labels must be < num_classes = {num_classes}, got {y.max()}.")
  return l2_normalize(e), y, num_classes


def _scores(scores, same):  # -> float64 [P], bool [P]
  s, t = np.asarray(scores), np.asarray(same)
  if s.ndim != 1:
    raise ValueError(f"scores must be [P] (rank 1), got shape {s.shape}.")
  if t.shape != s.shape:
    raise ValueError(f"same must be [P] = {s.shape} to match scores, got shape {t.shape}.")
  if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
    raise ValueError(f"scores must be real numbers, got dtype {s.dtype}.")
  if not np.isfinite(s).all():
    raise ValueError(f"scores must be finite, got {(~np.isfinite(s)).sum()} NaN or inf.")
  if t.dtype != bool:
    if not np.issubdtype(t.dtype, np.integer) or not np.isin(t, (0, 1)).all():
      raise ValueError(f"same must be bool (or 0/1 integers), got dtype {t.dtype}.")
    t = t.astype(bool)
  return s.astype(np.float64), t


def class_centers(embeddings, labels, num_classes=None):
  """Unit mean direction of each class: `normalize(sum_{i: y_i = c} normalize(x_i))`.

  Args:
    embeddings: [n, d] real, finite.
    labels: [n] int in [0, num_classes).
    num_classes: C; default `max(labels) + 1`. Every class in range(C) needs an example.

  Returns:
    [C, d] float64 unit rows (a zero row where a class's unit embeddings sum to zero).

  Raises:
    ValueError: on bad shapes or dtypes, non-finite embeddings, or a class with no example.
  """
  u, y, c = _embeddings(embeddings, labels, num_classes)
  counts = np.bincount(y, minlength=c)
  if (counts == 0).any():
    raise ValueError(f"class {np.flatnonzero(counts == 0)[0]} has no example in labels "
                     f"(num_classes = {c}); every class needs at least one.")
  sums = np.zeros((c, u.shape[1]))
  np.add.at(sums, y, u)
  return l2_normalize(sums)


def _degrees(cos):
  return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def angular_statistics(embeddings, labels, num_classes=None):
  """Intra-class spread and inter-class separation of embedding directions, in degrees.

  Angles are `arccos(clip(u . v, -1, 1))` between unit vectors (Deng et al. 2019, ArcFace,
  Sec. 4: intra- and inter-class angle statistics).

  Args:
    embeddings: [n, d] real, finite.
    labels: [n] int in [0, num_classes).
    num_classes: C; default `max(labels) + 1`. Every class in range(C) needs an example.

  Returns:
    dict of floats: 'mean_intra_angle' (mean over examples of the angle to their class
    center), 'per_class_intra_angle' (list of C: the same mean within each class),
    'min_inter_center_angle' and 'mean_inter_center_angle' (over the C(C-1)/2 center
    pairs; NaN when C == 1).
  """
  u, y, c = _embeddings(embeddings, labels, num_classes)
  centers = class_centers(u, y, c)
  intra = _degrees(np.einsum('nd,nd->n', u, centers[y]))
  per_class = np.bincount(y, weights=intra, minlength=c) / np.bincount(y, minlength=c)
  inter = _degrees((centers @ centers.T)[np.triu_indices(c, 1)])
  return {
      'mean_intra_angle': float(intra.mean()),
      'per_class_intra_angle': [float(a) for a in per_class],
      'min_inter_center_angle': float(inter.min()) if inter.size else float('nan'),
      'mean_inter_center_angle': float(inter.mean()) if inter.size else float('nan'),
  }


def _pair_index(k, n):
  """Row-major upper-triangle inverse: linear indices k [m] -> (i, j), i < j, as np.triu_indices."""
  k = np.asarray(k, dtype=np.int64)
  start = lambda i: i * (2 * n - i - 1) // 2  # linear index of pair (i, i + 1)
  i = np.floor(((2 * n - 1) - np.sqrt((2.0 * n - 1) ** 2 - 8.0 * k)) / 2).astype(np.int64)
  i = np.clip(i, 0, n - 2)
  while True:  # the float square root is exact for n < ~10^7, a few off beyond ~10^8
    step = (start(i + 1) <= k).astype(np.int64) - (start(i) > k)
    if not step.any():
      return i, k - start(i) + i + 1
    i += step


def pair_scores(embeddings, labels, *, max_pairs=None, seed=0):
  """Cosine similarity and same-class flag of every unordered pair i < j (or a random subset).

  Args:
    embeddings: [n, d] real, finite, n >= 2.
    labels: [n] int >= 0.
    max_pairs: if given and smaller than n(n-1)/2, a uniform random subset of this many
      distinct pairs, drawn with `np.random.default_rng(seed)` and returned in (i, j) order.
      Memory is then O(max_pairs + n d), so it also serves n far beyond 10^4.
    seed: seed of the subset draw.

  Returns:
    (scores [P] float64 in [-1, 1], same [P] bool), pairs in `np.triu_indices(n, 1)` order.
  """
  u, y, _ = _embeddings(embeddings, labels)
  n = u.shape[0]
  if n < 2:
    raise ValueError(f"embeddings must have n >= 2 rows to form a pair, got shape {u.shape}.")
  total = n * (n - 1) // 2
  if max_pairs is not None and (isinstance(max_pairs, bool) or int(max_pairs) != max_pairs
                                or max_pairs < 1):
    raise ValueError(f"max_pairs must be a positive integer or None, got {max_pairs!r}.")
  if max_pairs is None or max_pairs >= total:
    i, j = np.triu_indices(n, 1)
    return np.clip((u @ u.T)[i, j], -1.0, 1.0), y[i] == y[j]
  k = np.sort(np.random.default_rng(seed).choice(total, size=int(max_pairs), replace=False))
  i, j = _pair_index(k, n)
  scores, step = np.empty(k.size), max(1, _CHUNK // u.shape[1])
  for a in range(0, k.size, step):
    b = slice(a, a + step)
    scores[b] = np.einsum('pd,pd->p', u[i[b]], u[j[b]])
  return np.clip(scores, -1.0, 1.0), y[i] == y[j]


def _check_both(same):
  if same.all() or not same.any():
    raise ValueError(f"same must hold both positive and negative pairs, got {same.sum()} "
                     f"positive of {same.size}.")


def tar_at_far(scores, same, far=1e-2):
  """True accept rate at a false accept rate of at most `far` (accept when score > threshold).

  The threshold is the smallest t with `mean(neg > t) <= far`: the (k+1)-th largest negative
  score, k the largest count with `k / num_neg <= far`. Ties at t are rejected, so the
  achieved FAR never exceeds `far` (it can fall below it).

  Args:
    scores: [P] real, finite (e.g. `pair_scores`).
    same: [P] bool, with at least one True and one False.
    far: target false accept rate in (0, 1).

  Returns:
    (tar, threshold) floats: `tar = mean(pos > threshold)`.
  """
  s, t = _scores(scores, same)
  _check_both(t)
  if not 0.0 < far < 1.0:
    raise ValueError(f"far must be in (0, 1), got {far}.")
  neg = np.sort(s[~t])[::-1]
  n = neg.size
  k = int(np.floor(far * n))
  while k + 1 <= n and (k + 1) / n <= far:  # match `count / n <= far` exactly in floats
    k += 1
  while k > 0 and k / n > far:
    k -= 1
  threshold = neg[k]  # k <= n - 1 because far < 1
  return float(np.mean(s[t] > threshold)), float(threshold)


def roc_curve(scores, same):
  """ROC points of every distinct threshold: accept `score >= v` for each distinct score v.

  Args:
    scores: [P] real, finite.
    same: [P] bool, with at least one True and one False.

  Returns:
    (far [M], tar [M]) float64, M = (number of distinct scores) + 1, both non-decreasing
    from (0, 0) (reject all) to (1, 1) (accept all).
  """
  s, t = _scores(scores, same)
  _check_both(t)
  order = np.argsort(-s, kind='stable')
  s, t = s[order], t[order]
  last = np.r_[s[1:] != s[:-1], True]  # the last pair of each tie group
  tp, fp = np.cumsum(t)[last], np.cumsum(~t)[last]
  return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def _best_threshold(s, t):
  """Accuracy-maximizing threshold on (s, t): the first best candidate in increasing order.

  Candidates: below the minimum (accept all), midpoints of consecutive sorted unique scores,
  and the maximum (reject all). O(P log P) with cumulative counts.
  """
  values, inverse = np.unique(s, return_inverse=True)
  pos_le = np.r_[0, np.cumsum(np.bincount(inverse[t], minlength=values.size))]
  neg_le = np.r_[0, np.cumsum(np.bincount(inverse[~t], minlength=values.size))]
  correct = (pos_le[-1] - pos_le) + neg_le  # [m + 1]: candidate k rejects values[:k]
  k = int(np.argmax(correct))
  if k == 0:
    return float(values[0] - (1.0 + abs(values[0])))
  if k == values.size:
    return float(values[-1])
  mid = (values[k - 1] + values[k]) / 2
  return float(mid if mid < values[k] else values[k - 1])  # adjacent floats: mid may round up


def verification_accuracy(scores, same, *, num_folds=10, seed=0):
  """K-fold verification accuracy, the LFW protocol (Huang et al. 2007; ArcFace's eval code).

  `perm = np.random.default_rng(seed).permutation(P)` is split with
  `np.array_split(perm, num_folds)`; for each fold the threshold maximizing accuracy on the
  other folds is applied to the held fold. Candidate thresholds are the midpoints of the
  sorted unique training scores plus both extremes (below the minimum: accept all; the
  maximum: reject all); on ties in training accuracy the smallest candidate wins.

  Args:
    scores: [P] real, finite.
    same: [P] bool.
    num_folds: number of folds, 2 <= num_folds <= P.
    seed: seed of the shuffle.

  Returns:
    dict: 'mean' and 'std' (population, ddof=0) of the held-out accuracies, 'thresholds'
    (list of num_folds floats) and 'fold_accuracies' (list of num_folds floats).
  """
  s, t = _scores(scores, same)
  if isinstance(num_folds, bool) or int(num_folds) != num_folds or not 2 <= num_folds <= s.size:
    raise ValueError(f"num_folds must be an integer in [2, P = {s.size}], got {num_folds!r}.")
  folds = np.array_split(np.random.default_rng(seed).permutation(s.size), int(num_folds))
  thresholds, accuracies = [], []
  for f in range(len(folds)):
    train = np.concatenate(folds[:f] + folds[f + 1:])
    threshold = _best_threshold(s[train], t[train])
    thresholds.append(threshold)
    accuracies.append(float(np.mean((s[folds[f]] > threshold) == t[folds[f]])))
  return {'mean': float(np.mean(accuracies)), 'std': float(np.std(accuracies)),
          'thresholds': thresholds, 'fold_accuracies': accuracies}
