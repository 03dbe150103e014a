"""softmax_jax.diagnostics against independent references: NumPy's SVD and matrix_rank, brute-force
pair sums, scipy.spatial.ConvexHull, and dense sampling of the feature space."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import ConvexHull

from softmax_jax import diagnostics

F32_EPS = float(np.finfo(np.float32).eps)


def _softmax_log_probs(n, k, d, *, bias, seed=0):
  """float32 log_softmax(h @ W + b) computed by JAX, as a head's log_prob would be."""
  rng = np.random.default_rng(seed)
  h, w = rng.normal(size=(n, d)), rng.normal(size=(d, k))
  b = 2 * rng.normal(size=k) if bias else np.zeros(k)
  return np.asarray(jax.nn.log_softmax(jnp.asarray(h @ w + b, jnp.float32)))


@pytest.mark.parametrize('d,bias', [(1, False), (3, True), (7, False), (7, True), (20, True)])
def test_softmax_log_probs_have_rank_d_plus_bias(d, bias):
  lp = _softmax_log_probs(120, 90, d, bias=bias, seed=d)
  out = diagnostics.log_prob_rank(lp)
  assert out['rank'] == d + bias
  centred = lp.astype(np.float64) - lp.astype(np.float64).mean(axis=1, keepdims=True)
  s = np.linalg.svd(centred, compute_uv=False)
  np.testing.assert_allclose(out['singular_values'], s, rtol=1e-10, atol=1e-12 * s[0])
  assert out['tolerance'] == pytest.approx(s[0] * 120 * F32_EPS)
  assert out['rank'] == np.linalg.matrix_rank(centred, tol=out['tolerance'])
  np.testing.assert_allclose(out['normalized_spectrum'], s / s[0])
  assert out['shape'] == (120, 90) and 'float32' in out['rule']
  assert out['gap_index'] == d + bias  # the cliff after the last of the d (+ 1) directions
  # Not centred: the normalizer adds one more direction (the rank Yang et al. discount).
  assert diagnostics.matrix_spectrum(lp)['rank'] == d + bias + 1
  # The same float32 numbers in float64 look full rank under float64's eps: why eps= exists.
  assert diagnostics.log_prob_rank(lp.astype(np.float64))['rank'] > d + 5
  assert diagnostics.log_prob_rank(lp.astype(np.float64), eps=F32_EPS)['rank'] == d + bias


def test_generic_log_probs_are_full_rank_after_centring():
  lp = np.random.default_rng(0).normal(size=(30, 12))
  lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
  assert diagnostics.log_prob_rank(lp)['rank'] == 11  # centring removes the ones direction
  assert diagnostics.log_prob_rank(lp.T)['rank'] == 12  # 12 rows of 30 classes: min(12, 29)


def test_tolerance_options():
  rng = np.random.default_rng(1)
  spectrum = np.diag([1, 1, 1, 1e-3, 1e-6, 1e-9, 1e-12, 1e-15])
  a = rng.normal(size=(40, 8)) @ spectrum @ rng.normal(size=(8, 50))
  s = np.linalg.svd(a, compute_uv=False)
  assert diagnostics.matrix_spectrum(a)['rank'] == np.linalg.matrix_rank(a)  # NumPy's default rule
  assert diagnostics.matrix_spectrum(a, rtol=1e-4)['rank'] == 4
  assert diagnostics.matrix_spectrum(a, rtol=1e-4)['tolerance'] == pytest.approx(1e-4 * s[0])
  assert diagnostics.matrix_spectrum(a, tol=s[5] * 0.5)['rank'] == 6
  assert (diagnostics.matrix_spectrum(a, eps=F32_EPS)['rank']
          == np.linalg.matrix_rank(a, tol=s[0] * 50 * F32_EPS))
  assert diagnostics.matrix_spectrum(np.zeros((3, 4)))['rank'] == 0
  spectrum = np.diag([1, 1, 0.1, 1e-9, 1e-10, 1e-11])
  cliff = rng.normal(size=(40, 6)) @ spectrum @ rng.normal(size=(6, 50))
  assert diagnostics.matrix_spectrum(cliff)['gap_index'] == 3  # s_3 / s_4 ~ 1e8; s_6 / s_7 ~ 1e4
  # Values at float64 round-off do not count: exact deficiencies are the rank's business.
  assert diagnostics.matrix_spectrum(np.diag([4.0, 2.0, 1.0, 0.0]))['gap_index'] == 1
  dup = np.vstack([cliff, cliff[:1]])  # a duplicate row: s_41 = 0
  assert diagnostics.matrix_spectrum(dup)['gap_index'] == 3
  assert diagnostics.matrix_spectrum(np.zeros((3, 4)))['gap_index'] == 0
  assert diagnostics.matrix_spectrum(np.ones((1, 4)))['gap_index'] == 0


def test_spectrum_errors_name_the_argument():
  with pytest.raises(ValueError, match='log_probs must be a matrix'):
    diagnostics.log_prob_rank(np.zeros(5))
  with pytest.raises(ValueError, match=r'log_probs must be finite, got 1 NaN or inf entries, '
                     r'the first at \(1, 2\)'):
    diagnostics.log_prob_rank(np.where(np.arange(12).reshape(3, 4) == 6, -np.inf, 0.0))
  with pytest.raises(ValueError, match='give tol or rtol, not both'):
    diagnostics.log_prob_rank(np.zeros((3, 4)), tol=1.0, rtol=0.1)
  with pytest.raises(ValueError, match='rtol must be a finite number >= 0'):
    diagnostics.log_prob_rank(np.zeros((3, 4)), rtol=-1.0)
  with pytest.raises(ValueError, match='kernel must be real numbers'):
    diagnostics.output_layer_spectrum(np.zeros((3, 4), bool))
  with pytest.raises(ValueError, match='features must be a matrix .* N >= 2'):
    diagnostics.anisotropy(np.ones((1, 3)))


def test_effective_rank_and_output_layer_spectrum():
  assert diagnostics.effective_rank(np.ones(7)) == pytest.approx(7)
  assert diagnostics.effective_rank([3.0, 0.0, 0.0]) == pytest.approx(1)
  assert diagnostics.effective_rank(np.zeros(4)) == 0
  p = np.array([0.5, 0.25, 0.25])
  assert diagnostics.effective_rank(4 * p) == pytest.approx(np.exp(-np.sum(p * np.log(p))))
  with pytest.raises(ValueError, match='singular_values'):
    diagnostics.effective_rank([1.0, -1.0])
  w = np.random.default_rng(2).normal(size=(6, 30)).astype(np.float32)
  out = diagnostics.output_layer_spectrum(w)
  np.testing.assert_allclose(out['singular_values'],
                             np.linalg.svd(w.astype(np.float64), compute_uv=False))
  assert out['rank'] == 6 and out['shape'] == (6, 30)
  assert diagnostics.output_layer_spectrum(w[:, :1] * np.ones((1, 30)))['rank'] == 1


def test_anisotropy_is_the_mean_pairwise_cosine():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(25, 4)) + np.array([2.0, 0, 0, 0])
  x[7] = 0.0  # a zero row: cosine 0 with everything
  u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
  brute = np.mean([u[i] @ u[j] for i, j in itertools.permutations(range(25), 2)])
  assert diagnostics.anisotropy(x) == pytest.approx(brute, rel=1e-12)
  assert diagnostics.anisotropy(np.ones((5, 3)) * [1.0, 2.0, 3.0]) == pytest.approx(1.0)
  assert diagnostics.anisotropy(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)


@pytest.mark.parametrize('seed', range(4))
def test_bias_free_2d_unargmaxable_are_the_non_vertices_of_the_hull(seed):
  w = np.random.default_rng(seed).normal(size=(2, 30 + 10 * seed))
  truth = sorted(set(range(w.shape[1])) - set(ConvexHull(w.T).vertices))
  assert len(truth) > w.shape[1] // 2
  for method in ('exact', 'auto'):
    np.testing.assert_array_equal(diagnostics.unargmaxable_classes(w, method=method), truth)
  assert set(truth) <= set(diagnostics.unargmaxable_classes(w, method='fast'))  # a superset


def test_planted_unargmaxable_classes_are_found_among_many():
  rng = np.random.default_rng(4)
  d, k = 32, 2000  # in 32 dimensions 2000 Gaussian vectors are all vertices of their hull
  w, b = rng.normal(size=(d, k)), 0.1 * rng.normal(size=k)
  planted = [3, 777, 1999]
  for c, (i, j) in zip(planted, [(0, 1), (5, 9), (10, 11)]):  # midpoint, bias below the midpoint's
    w[:, c], b[c] = (w[:, i] + w[:, j]) / 2, (b[i] + b[j]) / 2 - 0.05
  np.testing.assert_array_equal(diagnostics.unargmaxable_classes(w, b), planted)
  doubt = diagnostics.unargmaxable_classes(w, b, method='fast', probe_steps=0)
  assert set(planted) <= set(doubt)  # fewer probes, a longer list; exact settles it
  settled = diagnostics.unargmaxable_classes(w, b, method='exact', classes=doubt)
  np.testing.assert_array_equal(settled, planted)
  np.testing.assert_array_equal(diagnostics.unargmaxable_classes(w, b, classes=[0, 777]), [777])
  exact = diagnostics.unargmaxable_classes(w[:, :40], b[:40], method='exact')
  np.testing.assert_array_equal(exact, [3])
  b[3] += 0.1  # above the midpoint now: it wins near the middle of the segment
  assert 3 not in diagnostics.unargmaxable_classes(w, b)


@pytest.mark.parametrize('bound', [None, 1.5, (0.0, None), (-1.0, 0.5)])
def test_with_bias_agrees_with_dense_sampling(bound):
  rng = np.random.default_rng(5)
  w, b = rng.normal(size=(2, 25)), rng.normal(size=25)
  exact = diagnostics.unargmaxable_classes(w, b, method='exact', bound=bound)
  np.testing.assert_array_equal(diagnostics.unargmaxable_classes(w, b, bound=bound), exact)
  lo, hi = {None: (-30, 30), 1.5: (-1.5, 1.5), (0.0, None): (0, 60)}.get(bound, bound)
  g = np.linspace(lo, hi, 401)
  h = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
  z = h @ w + b
  top2 = np.sort(z, axis=1)[:, -2:]
  winners = set(np.argmax(z, axis=1)[top2[:, 1] - top2[:, 0] > 1e-9])
  assert not winners & set(exact)  # nothing that wins somewhere is called unargmaxable
  assert len(winners) + len(exact) == 25  # and the grid finds every other class winning
  if bound is None:  # a class in the hull's interior wins only near the origin, thanks to its bias
    hull = set(ConvexHull(w.T).vertices)
    assert set(range(25)) - hull - set(exact)


def test_ties_degenerate_cases_and_probes():
  w = np.array([[1.0, 1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # classes 0 and 1 identical
  np.testing.assert_array_equal(diagnostics.unargmaxable_classes(w, method='exact'), [0, 1])
  np.testing.assert_array_equal(diagnostics.unargmaxable_classes(w), [0, 1])
  np.testing.assert_array_equal(diagnostics.unargmaxable_classes(np.ones((3, 1))), [])
  np.testing.assert_array_equal(diagnostics.unargmaxable_classes(np.zeros((3, 4))), [0, 1, 2, 3])
  # The probe points alone prove the classes that win at them.
  w = np.random.default_rng(6).normal(size=(3, 8))
  feats = np.eye(3) * 100
  fast = diagnostics.unargmaxable_classes(w, method='fast', probe_steps=0, features=feats)
  assert not set(np.argmax(feats @ w, axis=1)) & set(fast)


def test_unargmaxable_errors_name_the_argument():
  w = np.ones((2, 3))
  with pytest.raises(ValueError, match=r'bias must be \[K\] = \(3,\)'):
    diagnostics.unargmaxable_classes(w, np.ones(2))
  with pytest.raises(ValueError, match='bias must be finite'):
    diagnostics.unargmaxable_classes(w, np.array([0.0, np.nan, 0.0]))
  with pytest.raises(ValueError, match='kernel must be finite'):
    diagnostics.unargmaxable_classes(w * np.nan)
  with pytest.raises(ValueError, match="method must be 'auto', 'exact' or 'fast'"):
    diagnostics.unargmaxable_classes(w, method='lp')
  with pytest.raises(ValueError, match='bound must be None, a finite number > 0 or a pair'):
    diagnostics.unargmaxable_classes(w, bound=0.0)
  with pytest.raises(ValueError, match=r'bound=\(low, high\) needs numbers or None with low < high'):
    diagnostics.unargmaxable_classes(w, bound=(1.0, 0.0))
  with pytest.raises(ValueError, match=r'features must be \[n, d\] with d = 2'):
    diagnostics.unargmaxable_classes(w, features=np.ones((4, 3)))
  with pytest.raises(ValueError, match=r'classes must be \[m\] integer ids in \[0, K = 3\)'):
    diagnostics.unargmaxable_classes(w, classes=[3])
  with pytest.raises(ValueError, match='probe_steps must be an integer >= 0'):
    diagnostics.unargmaxable_classes(w, probe_steps=-1)
