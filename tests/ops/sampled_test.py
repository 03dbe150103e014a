"""Candidate samplers and sampled losses vs exact probabilities and float64 NumPy references.

The references are written from TF's documented semantics (`_compute_sampled_logits`,
`sampled_softmax_loss`, `nce_loss`, the candidate samplers) and word2vec, not from the module.
Statistical bounds: fixed seeds, |z| <= 5 per class (a false alarm has probability < 1e-6 per
class) plus, where stated, the documented bias of TF's expected-count approximation.
"""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from softmax_jax.ops import sampled as so

K, D = 12, 5
COUNTS = np.arange(K, 0, -1) ** 2  # A frequency-sorted vocabulary.


def _p(name, k=K):
  ids = np.arange(k, dtype=np.float64)
  if name == 'uniform':
    return np.full(k, 1.0 / k)
  if name == 'log_uniform':
    return (np.log(ids + 2) - np.log(ids + 1)) / np.log(k + 1)
  w = COUNTS.astype(np.float64) ** 0.75
  return w / w.sum()


def _sampler(name, num_sampled, *, unique, k=K, true_classes=None):
  if name == 'unigram':
    assert k == K
    return lambda key: so.unigram_sampler(key, num_sampled, COUNTS, unique=unique,
                                          true_classes=true_classes)
  fn = so.uniform_sampler if name == 'uniform' else so.log_uniform_sampler
  return lambda key: fn(key, num_sampled, k, unique=unique, true_classes=true_classes)


def _exact_inclusion(p, s):
  """Inclusion probabilities of successive sampling without replacement, by enumeration."""
  pi = np.zeros(len(p))
  for seq in itertools.permutations(range(len(p)), s):
    pr, used = 1.0, 0.0
    for i in seq:
      pr, used = pr * p[i] / (1 - used), used + p[i]
    pi[list(seq)] += pr
  return pi


def _draw(name, s, unique, m=20000):
  keys = jax.random.split(jax.random.PRNGKey(7), m)
  fn = _sampler(name, s, unique=unique, true_classes=jnp.arange(K))
  out = jax.jit(jax.vmap(fn))(keys)
  return np.asarray(out.sampled), np.asarray(out.true_expected_count[0], np.float64)


SAMPLERS = ['uniform', 'log_uniform', 'unigram']


@pytest.mark.parametrize('name', SAMPLERS)
def test_with_replacement_counts_match_empirical(name):
  s, m = 6, 20000
  sampled, expected = _draw(name, s, unique=False, m=m)
  p = _p(name)
  np.testing.assert_allclose(expected, s * p, rtol=1e-5)  # TF: S * p.
  freq = np.bincount(sampled.ravel(), minlength=K) / m  # Mean count per draw ~ Binomial(S, p).
  z = (freq - s * p) / np.sqrt(s * p * (1 - p) / m)
  assert np.abs(z).max() <= 5, z


@pytest.mark.parametrize('name,method', list(itertools.product(SAMPLERS, ['gumbel', 'rejection'])))
def test_without_replacement_counts_match_empirical(name, method, monkeypatch):
  """Both exact methods (Gumbel-top-k; TF's rejection of repeated i.i.d. draws, used from
  REJECTION_MIN_CLASSES classes on, forced here at K = 12) give successive sampling."""
  s, m = 4, 20000
  calls = []
  if method == 'rejection':
    original = so._unique_by_rejection
    monkeypatch.setattr(so, 'REJECTION_MIN_CLASSES', 1)
    monkeypatch.setattr(so, '_unique_by_rejection', lambda *a: calls.append(1) or original(*a))
  sampled, expected = _draw(name, s, unique=True, m=m)
  assert bool(calls) == (method == 'rejection')
  assert all(len(set(row)) == s for row in sampled)
  p, pi = _p(name), _exact_inclusion(_p(name), 4)
  # TF's formula: expected = 1 - (1 - p)^n, here with n solving sum = S.
  np.testing.assert_allclose(expected.sum(), s, rtol=1e-5)
  n = np.log1p(-expected[0]) / np.log1p(-p[0])
  np.testing.assert_allclose(expected, -np.expm1(n * np.log1p(-p)), rtol=1e-5)
  # The sampler is exact successive sampling: empirical inclusion vs the enumerated pi.
  freq = np.bincount(sampled.ravel(), minlength=K) / m
  sigma = np.sqrt(pi * (1 - pi) / m)
  assert np.abs((freq - pi) / sigma).max() <= 5
  # Expected counts vs empirical: 5 sigma plus the approximation's documented bias (< 5%
  # relative here: 3.6% for log-uniform, 1.2% for unigram, 0 for uniform).
  bias = 0.0 if name == 'uniform' else 0.05
  assert np.all(np.abs(freq - expected) <= 5 * sigma + bias * expected + 1e-6)
  assert np.abs(expected - pi).max() <= bias * pi.max() + 1e-6


def test_alias_table_keeps_tiny_probabilities_exact():
  k = 200_000  # p_min = 3.8e-7: a float32 inverse CDF would quantize these classes by ~20%.
  p = _p('log_uniform', k)
  prob, alias = so._alias_table(p.tobytes())
  rec = prob.astype(np.float64) / k
  np.add.at(rec, alias, (1 - prob.astype(np.float64)) / k)
  assert np.abs(rec / p - 1).max() < 1e-5


@pytest.mark.parametrize('unique', [True, False])
def test_unigram_never_samples_zero_counts(unique):
  counts = np.array([5, 0, 3, 0, 2, 1])
  out = jax.jit(jax.vmap(lambda key: so.unigram_sampler(key, 2, counts, unique=unique,
                                                        true_classes=jnp.arange(6))))(
      jax.random.split(jax.random.PRNGKey(0), 2000))
  assert not np.isin(np.asarray(out.sampled), [1, 3]).any()
  assert np.all(np.asarray(out.true_expected_count)[:, [1, 3]] == 0)
  assert len(np.unique(np.asarray(out.sampled))) == 4


def test_samplers_are_keyed_and_jittable():
  fn = jax.jit(lambda key: so.log_uniform_sampler(key, 20, 1000))
  a, b, c = fn(jax.random.PRNGKey(0)), fn(jax.random.PRNGKey(0)), fn(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a.sampled, b.sampled)
  assert not np.array_equal(a.sampled, c.sampled)
  assert a.sampled.dtype == jnp.int32 and a.sampled_expected_count.dtype == jnp.float32
  assert a.true_expected_count is None and a.sampled.min() >= 0 and a.sampled.max() < 1000
  y = jnp.array([[0, 5], [999, 3]])
  v = jax.jit(lambda key: so.log_uniform_sampler(key, 20, 1000, unique=False, true_classes=y))(
      jax.random.PRNGKey(0))
  assert v.true_expected_count.shape == (2, 2)
  np.testing.assert_allclose(v.true_expected_count, 20 * _p('log_uniform', 1000)[np.asarray(y)],
                             rtol=1e-5)


def test_sampler_errors():
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match='num_sampled.*< num_classes = 12'):
    so.log_uniform_sampler(key, 12, K)
  jax.eval_shape(lambda: so.log_uniform_sampler(key, 30, K, unique=False))  # S > K is fine.
  with pytest.raises(ValueError, match='num_sampled'):
    so.uniform_sampler(key, 0, K)
  with pytest.raises(ValueError, match='num_classes'):
    so.uniform_sampler(key, 1, 1)
  with pytest.raises(ValueError, match='num_sampled.*counts > 0 = 2'):
    so.unigram_sampler(key, 2, [3, 0, 1])
  for bad in ([1, -1, 2], [0, 0], [[1, 2]], [1, np.nan], []):
    with pytest.raises(ValueError, match='counts'):
      so.unigram_sampler(key, 1, bad)
  with pytest.raises(ValueError, match='distortion'):
    so.unigram_sampler(key, 1, [1, 2, 3], distortion=-1.0)
  with pytest.raises(ValueError, match='`true_classes` must be integer class ids'):
    so.uniform_sampler(key, 1, K, true_classes=jnp.zeros(3))
  with pytest.raises(ValueError, match=r'`true_classes` must lie in \[0, 12\); got 12'):
    so.log_uniform_sampler(key, 1, K, true_classes=[0, K])
  with pytest.raises(ValueError, match=r'`true_classes` must lie in \[0, 6\); got -1'):
    so.unigram_sampler(key, 1, [1, 2, 3, 4, 5, 6], true_classes=np.array([-1]))
  # Traced true_classes are not range-checked (no error under jit).
  jax.jit(lambda y: so.uniform_sampler(key, 1, K, true_classes=y))(jnp.array([K]))
  for bad_key, got in ((jax.random.split(key, 4), r'uint32 of shape \(4, 2\)'),
                       (jax.random.split(jax.random.key(0), 4), r'key<fry> of shape \(4,\)'),
                       (jnp.zeros(2, jnp.float32), r'float32 of shape \(2,\)')):
    for run in (lambda f: f(), lambda f: jax.jit(f)()):
      with pytest.raises(ValueError, match=r'`key` must be one PRNG key.*jax.vmap the sampler.*; '
                                           rf'got {got}'):
        run(lambda: so.log_uniform_sampler(bad_key, 2, K))
  with pytest.raises(ValueError,
                     match=r'`num_sampled` must be a Python int >= 1 .*static.*; got a traced'):
    jax.jit(lambda s: so.uniform_sampler(key, s, K))(2)
  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match='`num_classes` must be a Python int >= 1'):
      so.log_uniform_probs(bad)
  with pytest.raises(ValueError, match='`counts` must be concrete'):
    jax.jit(so.unigram_probs)(jnp.ones(3))
  with pytest.raises(ValueError, match=r'`counts` must have shape \[num_classes\] \(rank 1\)'):
    so.unigram_probs([[1, 2]])


# ----------------------------------------------------------------------------------------------
# Losses vs a float64 reference of TF's _compute_sampled_logits (one true class).


def _ref_logits(x, w, b, y, sampled, tc, sc, remove, log_q):
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  y, sampled = np.asarray(y), np.asarray(sampled)
  b = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64)
  zt = (x * w[y]).sum(-1) + b[y]
  zs = x @ w[sampled].T + b[sampled]
  if log_q:
    zt = zt - np.log(np.broadcast_to(np.asarray(tc, np.float64), y.shape))
    zs = zs - np.log(np.asarray(sc, np.float64))
  hit = (sampled == y[..., None]) if remove else np.zeros(zs.shape, bool)
  return zt, zs, hit


def _ref_sampled_softmax(*args):
  zt, zs, hit = _ref_logits(*args)
  z = np.concatenate([zt[..., None], np.where(hit, -np.inf, zs)], -1)
  m = z.max(-1)
  return m + np.log(np.exp(z - m[..., None]).sum(-1)) - zt


def _softplus(v):
  return np.logaddexp(0.0, v)


def _ref_nce(*args):  # Sigmoid cross-entropy, label 1 for the true class, 0 for samples; summed.
  zt, zs, hit = _ref_logits(*args)
  return _softplus(-zt) + np.where(hit, 0.0, _softplus(zs)).sum(-1)


def _case(lead, seed=0, dtype=jnp.float32, s=5):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=lead + (D,)), dtype)
  w = jnp.asarray(rng.normal(size=(K, D)), dtype)
  b = jnp.asarray(rng.normal(size=(K,)), dtype)
  y = jnp.asarray(rng.integers(0, K, size=lead), jnp.int32)
  sampled = jnp.asarray(rng.choice(K, s, replace=False), jnp.int32)
  if lead:  # Make sure some examples have an accidental hit.
    y = y.reshape(-1).at[0].set(sampled[1]).reshape(lead)
  tc = jnp.asarray(rng.uniform(0.05, 1.0, size=lead), jnp.float32)
  sc = jnp.asarray(rng.uniform(0.05, 1.0, size=(s,)), jnp.float32)
  return x, w, b, y, (sampled, tc, sc)


LOSSES = {  # name: (op, reference, default remove_accidental_hits, subtract_log_q).
    'sampled_softmax': (so.sampled_softmax_loss, _ref_sampled_softmax, True, True),
    'nce': (so.nce_loss, _ref_nce, False, True),
    'negative_sampling': (so.negative_sampling_loss, _ref_nce, True, False),
}


@pytest.mark.parametrize('name,lead', list(itertools.product(LOSSES, [(), (6,), (2, 3)])))
def test_losses_match_float64_reference(name, lead):
  op, ref, default_remove, log_q = LOSSES[name]
  x, w, b, y, sv = _case(lead)
  out = jax.jit(lambda x, w, b, y, sv: op(x, w, y, sv, bias=b))(x, w, b, y, sv)
  assert out.shape == lead and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref(x, w, b, y, *sv, default_remove, log_q), rtol=2e-5,
                             atol=1e-5)


@pytest.mark.parametrize('name', LOSSES)
def test_losses_match_reference_without_bias_and_with_the_other_hits_flag(name):
  op, ref, default_remove, log_q = LOSSES[name]
  x, _, y, sv = (lambda c: (c[0], c[1], c[3], c[4]))(_case((2, 4), seed=9))
  w = _case((2, 4), seed=9)[1]
  remove = not default_remove
  out = jax.jit(lambda x, w, y, sv: op(x, w, y, sv, remove_accidental_hits=remove))(x, w, y, sv)
  np.testing.assert_allclose(out, ref(x, w, None, y, *sv, remove, log_q), rtol=2e-5, atol=1e-5)


def test_subtract_log_q_false_and_plain_sample_array():
  x, w, b, y, sv = _case((6,), seed=1)
  out, neg, nce = jax.jit(lambda x, w, b, y, sv: (
      so.sampled_softmax_loss(x, w, y, sv[0], bias=b, subtract_log_q=False),
      so.negative_sampling_loss(x, w, y, sv[0]),
      so.nce_loss(x, w, y, sv, subtract_log_q=False, remove_accidental_hits=True)))(x, w, b, y, sv)
  np.testing.assert_allclose(out, _ref_sampled_softmax(x, w, b, y, *sv, True, False), rtol=2e-5)
  np.testing.assert_allclose(neg, nce, rtol=1e-6)


@pytest.mark.parametrize('name', LOSSES)
def test_accidental_hit_contributes_nothing_and_gradient_is_finite(name):
  op = LOSSES[name][0]
  x, w, b, _, (sampled, _, sc) = _case((), seed=2)
  x, y = x[None], sampled[2][None]  # The label is sample 2, with a large -log Q.
  tc, sc = jnp.array([0.3]), sc.at[2].set(1e-3)
  keep = np.array([0, 1, 3, 4])
  f = lambda x, w, b, sv, remove: op(x, w, y, sv, bias=b, remove_accidental_hits=remove)

  @jax.jit
  def run(x, w, b):
    with_hit, kept = f(x, w, b, (sampled, tc, sc), True), f(x, w, b, (sampled, tc, sc), False)
    without = f(x, w, b, (sampled[keep], tc, sc[keep]), True)
    grads = jax.grad(lambda *a: f(*a, (sampled, tc, sc), True).sum(), (0, 1, 2))(x, w, b)
    return with_hit, kept, without, grads

  with_hit, kept, without, grads = run(x, w, b)
  np.testing.assert_allclose(with_hit, without, rtol=1e-6)
  assert np.all(np.abs(kept - without) > 1e-3)  # The hit does count when not removed.
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert np.all(grads[1][sampled[2]] != 0)  # The label row's own gradient is still there.


@pytest.mark.parametrize('name', LOSSES)
def test_bfloat16_inputs_accumulate_in_float32(name):
  op, ref, remove, log_q = LOSSES[name]
  x, w, b, y, sv = _case((4, 3), seed=3, dtype=jnp.bfloat16)
  out = jax.jit(lambda x, w, b, sv: op(x, w, y, sv, bias=b))(x, w, b, sv)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref(x.astype(jnp.float32), w.astype(jnp.float32),
                                      b.astype(jnp.float32), y, *sv, remove, log_q),
                             rtol=1e-4, atol=1e-4)


def test_check_grads_float64():
  with jax.enable_x64(True):
    x, w, b, y, (sampled, tc, sc) = _case((5,), seed=4)  # y[0] is an accidental hit.
    x, w, b = (jnp.asarray(a, jnp.float64) for a in (x, w, b))
    f = lambda x, w, b: jnp.stack([op(x, w, y, (sampled, tc, sc), bias=b,
                                      remove_accidental_hits=True) for op, *_ in LOSSES.values()])
    assert jax.jit(f)(x, w, b).dtype == jnp.float64
    check_grads(jax.jit(f), (x, w, b), order=1, modes=('rev',))


@pytest.mark.parametrize('name', LOSSES)
def test_gathered_rows_equal_the_table_and_their_gradients_sum_to_its_gradient(name):
  """`gathered_from=K`: the loss of the rows `[labels; sample]` read from the table equals the
  table's, with an ignored example and an accidental hit; the rows' gradients, summed over repeated
  ids (TF's IndexedSlices applied), are the table's gradient, and the bias likewise."""
  op, _, remove, _ = LOSSES[name]
  x, w, b, y, sv = _case((2, 3), seed=8)
  y = y.at[0, 1].set(y[0, 0]).at[1, 2].set(-100)  # a repeated label and an ignored example
  ids = jnp.concatenate([jnp.where(y == -100, 0, y).reshape(-1), sv[0]])

  @jax.jit
  def both(x, w, b):
    table = jax.value_and_grad(lambda x, w, b: op(x, w, y, sv, bias=b, ignore_index=-100).sum(),
                               (0, 1, 2))(x, w, b)
    rows = jax.value_and_grad(lambda x, r, c: op(x, r, y, sv, bias=c, ignore_index=-100,
                                                 gathered_from=K).sum(), (0, 1, 2))(x, w[ids], b[ids])
    return table, rows

  (loss, (gx, gw, gb)), (row_loss, (rx, rw, rb)) = both(x, w, b)
  np.testing.assert_allclose(row_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(rx, gx, rtol=1e-5, atol=1e-7)
  summed_w, summed_b = np.zeros((K, D), np.float32), np.zeros((K,), np.float32)
  np.add.at(summed_w, np.asarray(ids), np.asarray(rw))
  np.add.at(summed_b, np.asarray(ids), np.asarray(rb))
  np.testing.assert_allclose(summed_w, gw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(summed_b, gb, rtol=1e-5, atol=1e-6)
  # The NaN rule and the checks hold: a traced out-of-range label is NaN for its example only;
  # rows of the wrong count, or a bias of the table's shape, are errors naming the argument.
  out = jax.jit(lambda y: op(x, w[ids], y, sv, gathered_from=K))(y.at[0, 2].set(K).at[1, 2].set(0))
  assert np.isnan(out[0, 2]) and np.isfinite(np.delete(np.asarray(out).reshape(-1), 2)).all()
  y = jnp.where(y == -100, 0, y)
  with pytest.raises(ValueError, match=r'`kernel` must .*\[N \+ S, d\] = \[11, 5\]'):
    op(x, w, y, sv, gathered_from=K)
  with pytest.raises(ValueError, match=r'`bias` must have shape \[N \+ S\] \(gathered_from\) = \(11,\); got '
                     r'shape \(12,\)'):
    op(x, w[ids], y, sv, bias=b, gathered_from=K)
  with pytest.raises(ValueError, match='gathered_from'):
    op(x, w[ids], y, sv, gathered_from=0)


def test_traced_out_of_range_label_gives_nan_and_concrete_raises():
  x, w, _, y, sv = _case((4,), seed=5)
  out = jax.jit(so.sampled_softmax_loss)(x, w, y.at[1].set(K), sv)
  assert np.isnan(out[1]) and np.all(np.isfinite(np.delete(np.asarray(out), 1)))
  with pytest.raises(ValueError, match=r'`labels` must lie in \[0, 12\)'):
    so.sampled_softmax_loss(x, w, y.at[1].set(-1), sv)


@pytest.mark.parametrize('bad_id', [K, -1])
def test_traced_out_of_range_sampled_id_gives_nan_never_a_clipped_id(bad_id):
  x, w, _, y, (sampled, tc, sc) = _case((4,), seed=5)
  sampled = sampled.at[2].set(bad_id)  # Shared by every example: every loss is NaN.
  for op, *_ in LOSSES.values():
    out = jax.jit(lambda s: op(x, w, y, (s, tc, sc)))(sampled)
    assert np.isnan(np.asarray(out)).all(), op.__name__
  with pytest.raises(ValueError, match=r'`sampled_values.sampled` must lie in \[0, 12\)'):
    so.sampled_softmax_loss(x, w, y, (sampled, tc, sc))


def test_loss_errors():
  x, w, b, y, sv = _case((4,), seed=6)
  cases = [
      (dict(kernel=w.T), r'`features` must have shape \[\.\.\., d\] with d = kernel.shape\[1\] = '
                         r'12 \(`kernel` holds class rows \[K, d\].*got shape \(4, 5\)'),
      (dict(kernel=w[None]), r'`kernel` must have shape \[num_classes, d\] \(rank 2\); got '
                             r'shape \(1, 12, 5\)'),
      (dict(kernel=w.astype(jnp.int32)), r'`kernel` must be a float array; got dtype int32'),
      (dict(features=x[0, 0]), r'`features` must have shape \[\.\.\., d\] \(rank >= 1\)'),
      (dict(features=x.astype(jnp.int32)), r'`features` must be a float array; got dtype int32'),
      (dict(labels=y[:3]), r'`labels` must have shape features.shape\[:-1\] = \(4,\); got '
                           r'shape \(3,\)'),
      (dict(labels=y.astype(jnp.float32)), '`labels` must be integer class indices'),
      (dict(sampled_values=(sv[0], sv[1])), '`sampled_values` must be .*; got 2 items'),
      (dict(sampled_values=sv[0]), '`sampled_values` must hold the expected counts.*; got no '
                                   'expected counts'),
      (dict(sampled_values=(sv[0], sv[1][:2], sv[2])),
       r'`sampled_values.true_expected_count` must broadcast to the shape of `labels` \(4,\); '
       r'got shape \(2,\)'),
      (dict(sampled_values=(sv[0], sv[1].astype(jnp.int32), sv[2])),
       '`sampled_values.true_expected_count` must be float'),
      (dict(sampled_values=(sv[0], sv[1], sv[2][:2])),
       r'`sampled_values.sampled_expected_count` must have shape sampled_values.sampled.shape = '
       r'\(5,\); got shape \(2,\)'),
      (dict(sampled_values=(sv[0][None], sv[1], sv[2])),
       r'`sampled_values.sampled` must have shape \[S\] \(rank 1\); got shape \(1, 5\)'),
      (dict(sampled_values=(sv[0].astype(jnp.float32), sv[1], sv[2])),
       '`sampled_values.sampled` must be integer class ids'),
      (dict(sampled_values=(sv[0].at[0].set(K), sv[1], sv[2])),
       r'`sampled_values.sampled` must lie in \[0, 12\); got 12 at position \(0,\)'),
      (dict(bias=b[:3]), r'`bias` must have shape \[num_classes\] = \(12,\); got shape \(3,\)'),
      (dict(bias=b.astype(jnp.int32)), '`bias` must be a float array'),
  ]
  for change, msg in cases:
    kw = dict(features=x, kernel=w, labels=y, sampled_values=sv, bias=b) | change
    args = kw['features'], kw['kernel'], kw['labels'], kw['sampled_values']
    with pytest.raises(ValueError, match=msg):
      so.sampled_softmax_loss(*args, bias=kw['bias'])
    if 'must lie' not in msg:  # Static checks: the same error at trace time under jit.
      with pytest.raises(ValueError, match=msg):
        jax.jit(lambda *a, bias: so.sampled_softmax_loss(*a, bias=bias))(*args, bias=kw['bias'])


# ----------------------------------------------------------------------------------------------
# Must show: as num_sampled -> K the sampled softmax loss and gradients approach the full ones.

KC, NC, MC = 64, 32, 64  # classes, examples, keys per num_sampled


def _conv_case():
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(NC, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(KC, 8)) * 0.7, jnp.float32)  # logits of std ~2
  y = jnp.asarray(rng.integers(0, KC, NC), jnp.int32)
  return x, w, y


def _full(x, w, y):
  z = x @ w.T
  return jax.nn.logsumexp(z, -1) - z[jnp.arange(z.shape[0]), y]


def _f64_softmax(x, w):
  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _flat_grad(f, x, w):
  return jnp.concatenate([g.ravel() for g in jax.grad(lambda x, w: f(x, w).mean(), (0, 1))(x, w)])


def _k_minus_1_bounds(x, w, y, q_min):
  """Per example, with S = K - 1 unique samples at most one class c != y is missing and every
  correction is -log q, q in [q_min, 1] (q_min: the smallest count used), so
  log q_min + log(1 - max_{k != y} p_k) <= sampled - full <= log(q_y / q_min) <= -log q_min."""
  p = _f64_softmax(x, w)
  p_other = np.where(np.eye(KC, dtype=bool)[np.asarray(y)], 0, p).max(-1)
  return np.log(q_min) + np.log1p(-p_other) - 1e-5, -np.log(q_min) + 1e-5


def test_sampled_softmax_approaches_full_softmax_as_num_sampled_grows():
  x, w, y = _conv_case()
  full, g_full = jax.jit(lambda x, w: (_full(x, w, y), _flat_grad(
      lambda x, w: _full(x, w, y), x, w)))(x, w)
  gaps, ses, cosines = [], [], []
  for s in (2, 8, 32, KC - 1):
    def one(key, s=s):
      values = so.log_uniform_sampler(key, s, KC, true_classes=y)
      f = lambda x, w: so.sampled_softmax_loss(x, w, y, values)
      g = _flat_grad(f, x, w)
      q_min = jnp.minimum(values.true_expected_count.min(), values.sampled_expected_count.min())
      return f(x, w), g @ g_full / jnp.linalg.norm(g) / jnp.linalg.norm(g_full), q_min
    loss, cos, q_min = jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(s), MC))
    gap = np.asarray((loss - full).mean(-1), np.float64)  # [MC] i.i.d. over keys
    gaps.append(abs(gap.mean()))
    ses.append(gap.std(ddof=1) / np.sqrt(MC))
    cosines.append(float(cos.mean()))
  # The mean gap over MC keys shrinks with S beyond 5 standard errors of both estimates
  # (measured: 4.4, 2.8, 0.87, 0.013 with standard errors <= 0.06).
  for i in range(3):
    assert gaps[i + 1] + 5 * (ses[i] + ses[i + 1]) < gaps[i], (gaps, ses)
  assert gaps[-1] <= 0.05
  # At S = K - 1 every key and example is within the deterministic bound of _k_minus_1_bounds.
  lo, hi = _k_minus_1_bounds(x, w, y, np.asarray(q_min, np.float64)[:, None])
  assert np.all(loss - full <= hi) and np.all(loss - full >= lo)
  # Mean gradient cosine with the full-softmax gradient rises with S (measured .58 .74 .93 .999).
  assert np.all(np.diff(cosines) > 0.02), cosines
  for cos, lo in zip(cosines, (0.45, 0.65, 0.88, 0.995)):
    assert cos > lo, cosines


def test_uniform_at_num_sampled_k_minus_1_is_full_up_to_one_missing_class():
  # Uniform counts are all equal (S / K): the corrections cancel and sampled <= full.
  x, w, y = _conv_case()
  full = jax.jit(_full)(x, w, y)
  one = lambda key: so.sampled_softmax_loss(
      x, w, y, so.uniform_sampler(key, KC - 1, KC, true_classes=y))
  gap = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(9), 32)) - full)
  lo, _ = _k_minus_1_bounds(x, w, y, 1.0)
  assert np.all(gap <= 1e-5) and np.all(gap >= lo)
  assert np.mean(np.abs(gap)) < 0.05


# ----------------------------------------------------------------------------------------------
# chex variants (jit, no jit, on device), vmap over examples and over keys, per-example gradients.


def _ref_tries(p, s):
  """float64 n with sum_k 1 - (1 - p_k)^n = S, by bisection (the module uses Newton steps)."""
  lo, hi = float(s), float(s)
  f = lambda n: np.sum(-np.expm1(n * np.log1p(-p))) - s
  while f(hi) < 0:
    hi *= 2
  for _ in range(200):
    lo, hi = (lo, (lo + hi) / 2) if f((lo + hi) / 2) >= 0 else ((lo + hi) / 2, hi)
  return (lo + hi) / 2


@functools.lru_cache(maxsize=None)  # One function object per case: jit caches hit across variants.
def _keyed_sampler(name, num_sampled, unique):
  """(key, true_classes) -> SampledValues, the static options bound."""
  if name == 'unigram':
    return lambda key, y: so.unigram_sampler(key, num_sampled, COUNTS, unique=unique,
                                             true_classes=y)
  fn = so.uniform_sampler if name == 'uniform' else so.log_uniform_sampler
  return lambda key, y: fn(key, num_sampled, K, unique=unique, true_classes=y)


_jit = functools.lru_cache(maxsize=None)(jax.jit)  # Reference calls: compiled once per function.


class SamplerVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  @parameterized.product(name=SAMPLERS, unique=(True, False))
  def test_counts_match_reference_and_vmap_over_keys_is_one_call_per_key(self, name, unique):
    s, y = 4, jnp.array([[0, 3], [K - 1, 5]], jnp.int32)
    sampler = _keyed_sampler(name, s, unique)
    key = jax.random.key(3) if unique else jax.random.PRNGKey(3)  # Typed and raw keys.
    out = self.variant(sampler)(key, y)
    p = _p(name)
    q = -np.expm1(_ref_tries(p, s) * np.log1p(-p)) if unique else s * p
    ids = np.asarray(out.sampled)
    assert ids.shape == (s,) and ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < K
    assert not unique or len(set(ids.tolist())) == s
    np.testing.assert_allclose(out.true_expected_count, q[np.asarray(y)], rtol=1e-5)
    np.testing.assert_allclose(out.sampled_expected_count, q[ids], rtol=1e-5)
    call = _jit(sampler)
    np.testing.assert_array_equal(ids, call(key, y).sampled)  # The same draw in every variant.
    # Per-example keys: vmap over a batch of keys draws independent samples, row i = keys[i]'s.
    keys = jax.random.split(key, 4)
    batched = self.variant(jax.vmap(sampler, in_axes=(0, None)))(keys, y)
    chex.assert_shape([batched.sampled, batched.sampled_expected_count], (4, s))
    chex.assert_shape(batched.true_expected_count, (4, 2, 2))
    for i in range(4):
      chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], batched), call(keys[i], y),
                                  rtol=1e-6)
    assert len({tuple(row) for row in np.asarray(batched.sampled).tolist()}) > 1

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  def test_host_probabilities(self):
    # Host functions of concrete values: closed over inside jit they are constants.
    for name, probs in (('log_uniform', lambda: so.log_uniform_probs(K)),
                        ('unigram', lambda: so.unigram_probs(COUNTS))):
      np.testing.assert_allclose(self.variant(probs)(), _p(name), rtol=1e-6)
    if self.variant.type == chex.ChexVariantType.WITH_JIT:  # Traced counts are rejected.
      with pytest.raises(ValueError, match='`counts` must be concrete'):
        self.variant(so.unigram_probs)(COUNTS)
    else:  # Concrete counts, on the host or on the device.
      np.testing.assert_allclose(self.variant(so.unigram_probs)(COUNTS), _p('unigram'),
                                 rtol=1e-12)


# The sampler each loss is tried with for per-example keys.
_LOSS_SAMPLER = {'sampled_softmax': 'log_uniform', 'nce': 'unigram',
                 'negative_sampling': 'uniform'}


@functools.lru_cache(maxsize=None)
def _loss_fns(name):
  """The loss `f(x, w, b, y, sample)`, `one(key, x, w, b, y)` drawing its own sample, and the
  jitted Jacobian of `f` w.r.t. the features."""
  op, sampler = LOSSES[name][0], _keyed_sampler(_LOSS_SAMPLER[name], 3, True)
  f = lambda x, w, b, y, sv: op(x, w, y, sv, bias=b)
  return f, lambda key, x, w, b, y: op(x, w, y, sampler(key, y), bias=b), jax.jit(jax.jacrev(f))


class SampledLossVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  @parameterized.parameters(*LOSSES)
  def test_reference_vmap_and_per_example_gradients(self, name):
    _, ref, remove, log_q = LOSSES[name]
    x, w, b, y, sv = _case((4,), seed=10)  # y[0] is an accidental hit.
    sv = so.SampledValues(*sv)
    f, one, jacobian = _loss_fns(name)
    out = self.variant(f)(x, w, b, y, sv)
    np.testing.assert_allclose(out, ref(x, w, b, y, *sv, remove, log_q), rtol=2e-5, atol=1e-5)
    # vmap over examples with the sample held fixed (ids and their counts shared; the true counts
    # follow the labels) equals the batched call; negative sampling takes the ids alone.
    if name == 'negative_sampling':
      sv, sv_axes = sv.sampled, None
    else:
      sv_axes = so.SampledValues(None, 0, None)
    axes = (0, None, None, 0, sv_axes)
    np.testing.assert_allclose(self.variant(jax.vmap(f, in_axes=axes))(x, w, b, y, sv), out,
                               rtol=1e-6, atol=1e-6)
    # vmap(grad) w.r.t. the features: the diagonal blocks of the batched Jacobian, which has no
    # cross-example terms (the shared sample is a constant).
    grads = self.variant(jax.vmap(jax.grad(f), in_axes=axes))(x, w, b, y, sv)
    jac = np.asarray(jacobian(x, w, b, y, sv))  # [N, N, d]
    n = np.arange(x.shape[0])
    np.testing.assert_allclose(grads, jac[n, n], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jac[n[:, None] != n[None, :]], 0)
    assert np.all(np.abs(jac[n, n]).sum(-1) > 0)
    # Per-example keys (vmap over keys and examples): each example draws its own sample, equal to
    # one call per example with its key, and each matches the float64 reference on that sample.
    sampler = _keyed_sampler(_LOSS_SAMPLER[name], 3, True)
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    per_key = self.variant(jax.vmap(one, in_axes=(0, 0, None, None, 0)))(keys, x, w, b, y)
    for i in range(4):
      values = _jit(sampler)(keys[i], y[i])
      np.testing.assert_allclose(per_key[i], _jit(one)(keys[i], x[i], w, b, y[i]), rtol=1e-6)
      np.testing.assert_allclose(per_key[i], ref(x[i], w, b, y[i], *values, remove, log_q),
                                 rtol=2e-5, atol=1e-5)


class GatheredRowsVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  @parameterized.parameters(*LOSSES)
  def test_gathered_rows_equal_the_table_under_each_variant(self, name):
    """`gathered_from=K` (the row-sparse path) under jit, without jit and with device inputs:
    the loss and the features' gradient equal the table's, and a NaN feature is NaN for its own
    example only."""
    op = LOSSES[name][0]
    x, w, b, y, sv = _case((5,), seed=11)  # y[0] is an accidental hit
    ids = jnp.concatenate([y, sv[0]])
    table = lambda x: op(x, w, y, sv, bias=b)
    rows = lambda x, r, c: op(x, r, y, sv, bias=c, gathered_from=K)
    np.testing.assert_allclose(self.variant(rows)(x, w[ids], b[ids]), table(x), rtol=1e-6)
    grad_rows = self.variant(jax.grad(lambda x, r, c: rows(x, r, c).sum()))(x, w[ids], b[ids])
    np.testing.assert_allclose(grad_rows, jax.grad(lambda x: table(x).sum())(x), rtol=1e-5,
                               atol=1e-7)
    out = self.variant(rows)(x.at[2, 1].set(jnp.nan), w[ids], b[ids])
    assert np.isnan(out[2]) and np.isfinite(np.delete(np.asarray(out), 2)).all()
