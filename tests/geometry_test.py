"""Tests for softmax_jax.geometry against naive float64 loops and exactly known geometry."""

import itertools
import math
import time
import tracemalloc

import numpy as np
import pytest

from softmax_jax import geometry


def _clustered(n=60, d=5, c=4, seed=0):
  """[n, d] float32 embeddings scattered around c random directions, labels [n] (all c present)."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(c, d))
  labels = np.r_[np.arange(c), rng.integers(0, c, size=n - c)]
  x = 3 * centers[labels] + rng.normal(size=(n, d))
  return x.astype(np.float32), labels


def _unit(v):
  norm = math.sqrt(sum(float(a) ** 2 for a in v))
  return [float(a) / norm if norm > 0 else 0.0 for a in v]


def _angle(u, v):
  return math.degrees(math.acos(max(-1.0, min(1.0, sum(a * b for a, b in zip(u, v))))))


def _circle(angles_deg, radii=None):
  """Points on the circle at the given angles (degrees), scaled by radii: [n, 2]."""
  a = np.radians(np.asarray(angles_deg, dtype=np.float64))
  r = np.ones_like(a) if radii is None else np.asarray(radii, dtype=np.float64)
  return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _verification_data(p=400, seed=0, decimals=1):
  """Scores with many ties (rounded) and a mild positive shift."""
  rng = np.random.default_rng(seed)
  same = rng.random(p) < 0.3
  scores = np.round(rng.normal(size=p) + 1.2 * same, decimals)
  return scores, same


def test_l2_normalize_matches_reference_and_keeps_zero_rows():
  x, _ = _clustered()
  x[3] = 0.0
  x[5] *= 1e-30
  got = geometry.l2_normalize(x)
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, [_unit(row) for row in x.astype(np.float64)], rtol=1e-12)
  np.testing.assert_array_equal(got[3], 0.0)
  np.testing.assert_allclose(geometry.l2_normalize(x.T, axis=0), got.T, rtol=1e-12)
  for scale in (1e-200, 1e200):  # squares would under/overflow without the max rescaling
    np.testing.assert_allclose(geometry.l2_normalize([[3 * scale, 4 * scale]]), [[0.6, 0.8]])


def test_class_centers_match_reference():
  x, y = _clustered(c=5)
  units = [_unit(row) for row in x]
  want = [_unit([sum(col) for col in zip(*[u for u, label in zip(units, y) if label == c])])
          for c in range(5)]
  np.testing.assert_allclose(geometry.class_centers(x, y), want, rtol=1e-10, atol=1e-12)
  assert geometry.class_centers(x, y, num_classes=5).shape == (5, 5)


def test_angular_statistics_match_reference():
  x, y = _clustered(c=5, seed=3)
  got = geometry.angular_statistics(x, y)
  centers = geometry.class_centers(x, y)
  intra = [_angle(_unit(row), centers[label]) for row, label in zip(x, y)]
  per_class = [np.mean([a for a, label in zip(intra, y) if label == c]) for c in range(5)]
  inter = [_angle(centers[a], centers[b]) for a, b in itertools.combinations(range(5), 2)]
  np.testing.assert_allclose(got['mean_intra_angle'], np.mean(intra), rtol=1e-10)
  np.testing.assert_allclose(got['per_class_intra_angle'], per_class, rtol=1e-10)
  np.testing.assert_allclose(got['min_inter_center_angle'], min(inter), rtol=1e-10)
  np.testing.assert_allclose(got['mean_inter_center_angle'], np.mean(inter), rtol=1e-10)


@pytest.mark.parametrize('d', [2, 7])
def test_angular_statistics_known_angles(d):
  """Centers at 0, 90, 200 degrees; two examples at +-5 degrees around each (any radii)."""
  base = np.array([0.0, 90.0, 200.0])
  rng = np.random.default_rng(d)
  x2 = _circle(np.r_[base - 5, base + 5], radii=rng.uniform(0.1, 10.0, size=6))
  y = np.r_[0, 1, 2, 0, 1, 2]
  rotation = np.linalg.qr(rng.normal(size=(d, d)))[0][:2]  # [2, d] orthonormal rows
  got = geometry.angular_statistics(x2 @ rotation, y)
  np.testing.assert_allclose(got['mean_intra_angle'], 5.0, rtol=1e-9)
  np.testing.assert_allclose(got['per_class_intra_angle'], [5.0] * 3, rtol=1e-9)
  np.testing.assert_allclose(got['min_inter_center_angle'], 90.0, rtol=1e-9)
  np.testing.assert_allclose(got['mean_inter_center_angle'], (90 + 110 + 160) / 3, rtol=1e-9)
  np.testing.assert_allclose(geometry.class_centers(x2, y), _circle(base), atol=1e-12)
  one = geometry.angular_statistics(_circle([10.0, 30.0]), [0, 0])  # one class: no center pair
  np.testing.assert_allclose(one['mean_intra_angle'], 10.0, rtol=1e-9)
  assert math.isnan(one['min_inter_center_angle']) and math.isnan(one['mean_inter_center_angle'])


def test_scale_invariance():
  x, y = _clustered(seed=5)
  factors = np.random.default_rng(1).uniform(1e-3, 1e3, size=(x.shape[0], 1))
  a, b = geometry.angular_statistics(x, y), geometry.angular_statistics(x * factors, y)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)
  (s1, t1), (s2, t2) = geometry.pair_scores(x, y), geometry.pair_scores(x * factors, y)
  np.testing.assert_allclose(s1, s2, atol=1e-12)
  np.testing.assert_array_equal(t1, t2)


def test_pair_scores_match_reference():
  x, y = _clustered(n=25, seed=2)
  scores, same = geometry.pair_scores(x, y)
  units = [_unit(row) for row in x]
  want = [(sum(a * b for a, b in zip(units[i], units[j])), y[i] == y[j])
          for i in range(25) for j in range(i + 1, 25)]
  assert scores.shape == same.shape == (300,) and scores.dtype == np.float64 and same.dtype == bool
  np.testing.assert_allclose(scores, [w[0] for w in want], rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(same, [w[1] for w in want])


@pytest.mark.parametrize('n', [2, 3, 7, 50, 301, 10**9])
def test_pair_index_inverts_triu_order(n):
  """Linear pair index -> (i, j); at 10^9 rows the float square root is several rows off."""
  if n < 1000:
    (i, j), k = np.triu_indices(n, 1), np.arange(n * (n - 1) // 2)
  else:  # the first, (r, r + 1), and the last, (r, n - 1), pair of random rows r
    r = np.r_[0, 1, np.random.default_rng(0).integers(2, n - 2, size=2000), n - 2]
    first = r * (2 * n - r - 1) // 2
    k, i, j = np.r_[first, first + n - r - 2], np.r_[r, r], np.r_[r + 1, np.full_like(r, n - 1)]
  got_i, got_j = geometry._pair_index(k, n)  # pylint: disable=protected-access
  np.testing.assert_array_equal(got_i, i)
  np.testing.assert_array_equal(got_j, j)


def _positions(sub, full):
  """Index in `full` of each score in `sub` (the subset path sums in another order: ~1 ulp)."""
  where = np.abs(sub[:, None] - full[None, :]).argmin(1)
  np.testing.assert_allclose(full[where], sub, rtol=0, atol=1e-14)
  return where


def test_pair_scores_subset_is_seeded_in_order_and_uniform():
  x, y = _clustered(n=40, d=6, seed=4)  # continuous data: every pair's score is distinct
  full, full_same = geometry.pair_scores(x, y)
  assert np.diff(np.sort(full)).min() > 1e-9
  sub, sub_same = geometry.pair_scores(x, y, max_pairs=100, seed=7)
  where = _positions(sub, full)
  assert sub.size == 100 and np.all(np.diff(where) > 0)  # distinct, in (i, j) order
  np.testing.assert_array_equal(sub_same, full_same[where])
  np.testing.assert_array_equal(geometry.pair_scores(x, y, max_pairs=100, seed=7)[0], sub)
  assert not np.array_equal(geometry.pair_scores(x, y, max_pairs=100, seed=8)[0], sub)
  np.testing.assert_array_equal(geometry.pair_scores(x, y, max_pairs=10**6)[0], full)
  x, y = _clustered(n=6, d=3, seed=1)  # uniform: 15 pairs, draw 5 each time, inclusion 1/3
  full = geometry.pair_scores(x, y)[0]
  assert np.diff(np.sort(full)).min() > 1e-9
  counts, trials = np.zeros(15), 3000
  for seed in range(trials):
    counts[_positions(geometry.pair_scores(x, y, max_pairs=5, seed=seed)[0], full)] += 1
  sd = math.sqrt(trials * (1 / 3) * (2 / 3))
  assert np.all(np.abs(counts - trials / 3) < 5 * sd), counts


def test_pair_scores_2000_is_fast_and_small():
  x, y = _clustered(n=2000, d=128, c=50, seed=0)
  tracemalloc.start()
  start = time.perf_counter()
  scores, same = geometry.pair_scores(x, y)
  seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert scores.size == same.size == 1999000
  assert seconds < 5.0, seconds
  assert peak < 300 * 2**20, peak  # ~32 MB Gram + 2 x 16 MB indices + outputs


def _tar_at_far_reference(scores, same, far):
  """Every candidate threshold (each distinct score, and -inf): the smallest with FAR <= far."""
  neg, pos = [s for s, t in zip(scores, same) if not t], [s for s, t in zip(scores, same) if t]
  for threshold in [-math.inf] + sorted(set(scores)):
    if sum(s > threshold for s in neg) / len(neg) <= far:
      return sum(s > threshold for s in pos) / len(pos), threshold
  raise AssertionError('unreachable: the maximum score always has FAR 0')


@pytest.mark.parametrize('far', [1e-3, 0.01, 0.05, 0.1, 0.29, 0.5, 0.9])
@pytest.mark.parametrize('decimals', [0, 1, 6])
def test_tar_at_far_matches_brute_force(far, decimals):
  scores, same = _verification_data(p=300, decimals=decimals)
  scores[np.flatnonzero(~same)[:100]] = np.round(scores[~same][:100], 0)  # heavy ties
  tar, threshold = geometry.tar_at_far(scores, same, far)
  want_tar, want_threshold = _tar_at_far_reference(scores, same, far)
  assert np.mean(scores[~same] > threshold) <= far  # never exceeds, ties included
  np.testing.assert_allclose(tar, want_tar, rtol=1e-12)
  np.testing.assert_allclose(threshold, want_threshold, rtol=1e-12)


def test_tar_at_far_separable_float_boundary_and_roc_envelope():
  scores, same = _verification_data(p=200, seed=3, decimals=2)
  far_pts, tar_pts = geometry.roc_curve(scores, same)
  for far in (0.002, 0.01, 0.1, 0.3):
    tar, _ = geometry.tar_at_far(scores, same, far)
    assert tar == tar_pts[far_pts <= far].max()  # the best TAR any threshold reaches at this FAR
  separable = np.where(same, 0.5 + scores / 100, -0.5 + scores / 100)
  assert geometry.tar_at_far(separable, same, 1e-3)[0] == 1.0
  # 29 negatives of 100 above the threshold is FAR 0.29 <= 0.29, although 0.29 * 100 < 29.
  assert 0.29 * 100 < 29 and 29 / 100 <= 0.29
  scores, same = np.r_[np.arange(100.0), 1000.0], np.r_[np.zeros(100, bool), True]
  assert geometry.tar_at_far(scores, same, 0.29)[1] == 70.0  # accepts 71..99


def test_roc_curve_matches_brute_force():
  scores, same = _verification_data(p=150, seed=4)
  far, tar = geometry.roc_curve(scores, same)
  neg, pos = scores[~same], scores[same]
  want = [(0.0, 0.0)] + [(np.mean(neg >= v), np.mean(pos >= v))
                         for v in sorted(set(scores), reverse=True)]
  np.testing.assert_allclose(np.stack([far, tar], 1), want, rtol=1e-12)
  assert far[-1] == tar[-1] == 1.0 and np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)


def _best_threshold_reference(scores, same):
  values = sorted(set(scores))
  candidates = ([values[0] - (1 + abs(values[0]))]
                + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1]])
  correct = [sum((s > c) == t for s, t in zip(scores, same)) for c in candidates]
  best_correct = max(correct)
  for threshold in values + [np.nextafter(v, -np.inf) for v in values]:  # no threshold beats it
    assert sum((s > threshold) == t for s, t in zip(scores, same)) <= best_correct
  return candidates[correct.index(best_correct)]  # the first (smallest) best candidate


@pytest.mark.parametrize('num_folds,seed,decimals', [(10, 0, 1), (3, 5, 0), (7, 2, 6)])
def test_verification_accuracy_matches_brute_force(num_folds, seed, decimals):
  scores, same = _verification_data(p=230, seed=seed, decimals=decimals)
  got = geometry.verification_accuracy(scores, same, num_folds=num_folds, seed=seed)
  folds = np.array_split(np.random.default_rng(seed).permutation(scores.size), num_folds)
  accuracies, thresholds = [], []
  for f, held in enumerate(folds):
    train = np.concatenate(folds[:f] + folds[f + 1:])
    threshold = _best_threshold_reference(list(scores[train]), list(same[train]))
    thresholds.append(threshold)
    accuracies.append(np.mean([(scores[i] > threshold) == same[i] for i in held]))
  np.testing.assert_allclose(got['thresholds'], thresholds, rtol=1e-12)
  np.testing.assert_allclose(got['fold_accuracies'], accuracies, rtol=1e-12)
  np.testing.assert_allclose(got['mean'], np.mean(accuracies), rtol=1e-12)
  np.testing.assert_allclose(got['std'], np.std(accuracies), rtol=1e-9, atol=1e-15)
  assert 0.6 < got['mean'] < 1.0


def test_verification_accuracy_separable_one_sided_and_adjacent_floats():
  scores, same = _verification_data(p=300, seed=6, decimals=6)
  separable = np.where(same, 2.0 + scores, -2.0 + scores)
  got = geometry.verification_accuracy(separable, same)
  assert got['mean'] == 1.0 and got['std'] == 0.0 and len(got['thresholds']) == 10
  # One-sided training folds pick an extreme: accept all (below the minimum), or reject all
  # (the training maximum, so a larger held-out score is a false accept).
  assert geometry.verification_accuracy(scores, np.ones(300, bool), num_folds=5)['mean'] == 1.0
  got = geometry.verification_accuracy(scores, np.zeros(300, bool), num_folds=5, seed=1)
  folds = np.array_split(np.random.default_rng(1).permutation(300), 5)
  train_max = [np.delete(scores, held).max() for held in folds]
  np.testing.assert_array_equal(got['thresholds'], train_max)
  a = np.nextafter(1.0, 2.0)  # odd last mantissa bit: (a + b) / 2 rounds (to even) up to b
  b = np.nextafter(a, 2.0)
  assert (a + b) / 2 == b
  scores, same = np.array([a, b] * 10), np.array([False, True] * 10)
  assert geometry.verification_accuracy(scores, same, num_folds=2)['mean'] == 1.0


_X, _Y = _clustered(n=10)
_S, _T = _verification_data(p=50)


@pytest.mark.parametrize('fn,match', [
    (lambda: geometry.class_centers(_X[0], _Y), r'embeddings must be \[n, d\].*got shape \(5,\)'),
    (lambda: geometry.angular_statistics(_X, _Y[:-1]), r'labels must be \[n\] = \(10,\)'),
    (lambda: geometry.angular_statistics(_X, _Y.astype(float)), 'labels must be integers'),
    (lambda: geometry.class_centers(_X, _Y - 1), 'labels must be >= 0, got -1'),
    (lambda: geometry.class_centers(_X, np.where(_Y == 2, 1, _Y)), 'class 2 has no example'),
    (lambda: geometry.angular_statistics(_X, _Y, num_classes=5), 'class 4 has no example'),
    (lambda: geometry.class_centers(_X, _Y, num_classes=2), 'labels must be < num_classes = 2'),
    (lambda: geometry.pair_scores(np.where(np.arange(10)[:, None] == 4, np.nan, _X), _Y),
     'embeddings must be finite.*first at row 4'),
    (lambda: geometry.pair_scores(_X[:1], _Y[:1]), 'n >= 2'),
    (lambda: geometry.pair_scores(_X, _Y, max_pairs=0), 'max_pairs must be a positive integer'),
    (lambda: geometry.tar_at_far(_S, _T, far=1.0), r'far must be in \(0, 1\), got 1.0'),
    (lambda: geometry.tar_at_far(_S, _T, far=0.0), r'far must be in \(0, 1\)'),
    (lambda: geometry.tar_at_far(_S, np.zeros(50, bool)), 'got 0 positive of 50'),
    (lambda: geometry.tar_at_far(_S, np.ones(50, bool)), 'got 50 positive of 50'),
    (lambda: geometry.roc_curve(_S, _T[:-1]), r'same must be \[P\] = \(50,\).*got shape \(49,\)'),
    (lambda: geometry.roc_curve(_S[None], _T[None]), r'scores must be \[P\] \(rank 1\)'),
    (lambda: geometry.roc_curve(np.r_[_S[:-1], np.nan], _T), 'scores must be finite'),
    (lambda: geometry.roc_curve(_S, _T * 2), 'same must be bool'),
    (lambda: geometry.verification_accuracy(_S, _T, num_folds=1), r'num_folds must be .*\[2, P'),
    (lambda: geometry.verification_accuracy(_S, _T, num_folds=51), 'got 51'),
])
def test_errors(fn, match):
  with pytest.raises(ValueError, match=match):
    fn()
