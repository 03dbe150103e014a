"""The NaN rule of `softmax_jax.ops` (its package docstring), op by op.

A NaN in what an op reads for one example (a logit, cosine, score, feature row or per-example
scale) makes that example's output NaN, never a finite number; the other examples are unaffected:
bit for bit the values (and the gradients with respect to their own inputs) of the same call
without the NaN, an identity, since every op maps examples independently. Host functions of class
counts reject a NaN count. Each op runs once under `jit` on three examples; example 1 gets the NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import ops

N, K, D = 3, 5, 4
BAD = 1  # The example that gets the NaN.
_RNG = np.random.default_rng(0)
X = jnp.asarray(_RNG.normal(size=(N, K)) * 2, jnp.float32)
Y = jnp.asarray([3, 0, 2], jnp.int32)  # Example 1's label is not the NaN entry's class (2).
COS = jnp.tanh(X) * 0.9
T = jax.nn.softmax(jnp.asarray(_RNG.normal(size=(N, K)), jnp.float32))
FEAT = jnp.asarray(_RNG.normal(size=(N, D)), jnp.float32)
W = jnp.asarray(_RNG.normal(size=(D, K)), jnp.float32)
KERNEL = W.T  # [K, d] class rows of the sampled ops.
COUNTS = np.asarray([50.0, 20.0, 10.0, 5.0, 2.0])
TREE = ops.huffman_tree(COUNTS)
NODES = jnp.asarray(_RNG.normal(size=(K - 1, D)), jnp.float32)
CUTOFFS = (2,)
HEAD = jnp.asarray(_RNG.normal(size=(D, 3)), jnp.float32)
TAILS = [(jnp.asarray(_RNG.normal(size=(D, 2)), jnp.float32),
          jnp.asarray(_RNG.normal(size=(2, 3)), jnp.float32))]
SAMPLE = ops.log_uniform_sampler(jax.random.key(0), 2, K, true_classes=Y)
NORM = jnp.linalg.norm(FEAT, axis=-1)


def _margin_loss(kind):
  def loss(f):
    cos = ops.cosine_logits(f, W)
    if kind == 'sphereface':  # The head's scale: the feature norm, NaN for a NaN feature.
      z = ops.sphereface_logits(cos, Y, scale=jnp.linalg.norm(f, axis=-1))
    else:
      z = getattr(ops, f'{kind}_logits')(cos, Y, scale=30.0)
    return ops.cross_entropy(z, Y)
  return loss


# name -> (f, the input that gets the NaN, 'row' | 'entry' (a NaN row, or at least the entry)).
CASES = {
    'softmax': (ops.softmax, X, 'row'),
    'softmax_temperature': (lambda x: ops.softmax(x, temperature=0.5), X, 'row'),
    'softmax_cold': (lambda x: ops.softmax(x, temperature=0.0), X, 'row'),
    'logsumexp_cold': (lambda x: ops.logsumexp(x - jnp.max(x, -1, keepdims=True), temperature=0.0),
                       X, 'row'),  # Finite: log(number of maxima) when the max is 0.
    'log_softmax': (ops.log_softmax, X, 'row'),
    'logsumexp': (ops.logsumexp, X, 'row'),
    'cross_entropy': (lambda x: ops.cross_entropy(x, Y), X, 'row'),
    'cross_entropy_options': (lambda x: ops.cross_entropy(
        x, Y, label_smoothing=0.1, class_weights=jnp.arange(1.0, K + 1)), X, 'row'),
    'soft_cross_entropy': (lambda x: ops.soft_cross_entropy(x, T), X, 'row'),
    'focal_loss': (lambda x: ops.focal_loss(x, Y, gamma=2.0), X, 'row'),
    'logit_adjusted_cross_entropy': (lambda x: ops.logit_adjusted_cross_entropy(
        x, Y, log_prior=ops.log_prior(COUNTS)), X, 'row'),
    'ldam_loss': (lambda c: ops.ldam_loss(c, Y, class_counts=COUNTS), COS, 'row'),
    'posthoc_logit_adjustment': (lambda x: ops.posthoc_logit_adjustment(
        x, log_prior=ops.log_prior(COUNTS)), X, 'entry'),
    'spherical_softmax': (ops.spherical_softmax, X, 'row'),
    'taylor_softmax': (ops.taylor_softmax, X, 'row'),
    'l2_normalize': (ops.l2_normalize, FEAT, 'row'),
    'cosine_logits': (lambda f: ops.cosine_logits(f, W), FEAT, 'row'),
    'arcface_logits': (lambda c: ops.arcface_logits(c, Y), COS, 'entry'),
    'cosface_logits': (lambda c: ops.cosface_logits(c, Y), COS, 'entry'),
    'combined_margin_logits': (lambda c: ops.combined_margin_logits(c, Y), COS, 'entry'),
    'sphereface_logits': (lambda c: ops.sphereface_logits(c, Y), COS, 'entry'),
    'sphereface_logits_scale': (lambda s: ops.sphereface_logits(COS, Y, scale=s), NORM, 'row'),
    'sphereface_psi': (ops.sphereface_psi, COS, 'entry'),
    'arcface_loss': (_margin_loss('arcface'), FEAT, 'row'),
    'cosface_loss': (_margin_loss('cosface'), FEAT, 'row'),
    'combined_margin_loss': (_margin_loss('combined_margin'), FEAT, 'row'),
    'sphereface_loss': (_margin_loss('sphereface'), FEAT, 'row'),
    'linear_cross_entropy': (lambda f: ops.linear_cross_entropy(f, W, Y, chunk_size=3), FEAT,
                             'row'),
    'linear_cross_entropy_lse': (lambda f: ops.linear_cross_entropy(
        f, W, Y, label_smoothing=0.1, return_lse=True)[1], FEAT, 'row'),
    'adaptive_log_softmax': (lambda f: ops.adaptive_log_softmax(f, HEAD, TAILS, cutoffs=CUTOFFS),
                             FEAT, 'row'),
    'adaptive_softmax_loss': (lambda f: ops.adaptive_softmax_loss(
        f, Y, HEAD, TAILS, cutoffs=CUTOFFS), FEAT, 'row'),
    'hierarchical_log_prob': (lambda f: ops.hierarchical_log_prob(f, NODES, TREE), FEAT, 'row'),
    'hierarchical_loss': (lambda f: ops.hierarchical_loss(f, Y, NODES, TREE), FEAT, 'row'),
    'sampled_softmax_loss': (lambda f: ops.sampled_softmax_loss(f, KERNEL, Y, SAMPLE), FEAT,
                             'row'),
    'nce_loss': (lambda f: ops.nce_loss(f, KERNEL, Y, SAMPLE), FEAT, 'row'),
    'negative_sampling_loss': (lambda f: ops.negative_sampling_loss(f, KERNEL, Y, SAMPLE.sampled),
                               FEAT, 'row'),
}


def _with_nan(a):
  a = np.array(a)
  if a.ndim == 1:
    a[BAD] = np.nan
  else:
    a[BAD, 2] = np.nan
  return jnp.asarray(a)


@pytest.mark.parametrize('name', sorted(CASES))
def test_a_nan_gives_nan_for_its_example_and_changes_no_other(name):
  f, a, kind = CASES[name]
  f = jax.jit(f)
  clean, bad = np.asarray(f(a)), np.asarray(f(_with_nan(a)))
  assert np.isfinite(clean).all()
  nan = np.isnan(bad[BAD])
  assert nan.all() if kind == 'row' else nan.any(), (name, bad[BAD])
  others = np.arange(N) != BAD
  np.testing.assert_array_equal(bad[others], clean[others])
  # Gradients of the other examples' outputs with respect to their own inputs: unchanged.
  g = jax.jit(jax.grad(lambda a: jnp.sum(jnp.where(others.reshape((N,) + (1,) * (bad.ndim - 1)),
                                                   f(a), 0))))
  g_clean, g_bad = np.asarray(g(a)), np.asarray(g(_with_nan(a)))
  np.testing.assert_array_equal(g_bad[others], g_clean[others])


@pytest.mark.parametrize('predict', [
    lambda f: ops.adaptive_predict(f, HEAD, TAILS, cutoffs=CUTOFFS),
    lambda f: ops.hierarchical_predict(f, NODES, TREE),
])
def test_predict_of_a_nan_row_changes_no_other(predict):
  clean, bad = (np.asarray(jax.jit(predict)(f)) for f in (FEAT, _with_nan(FEAT)))
  np.testing.assert_array_equal(np.delete(bad, BAD), np.delete(clean, BAD))
  assert 0 <= bad[BAD] < K  # An int cannot be NaN: some class id.


def test_masked_nan_is_not_read():
  """A `where=False` entry is excluded like a -inf logit: its NaN does not reach the row."""
  x, mask = _with_nan(X), np.ones((N, K), bool)
  mask[BAD, 2] = False
  clean = ops.log_softmax(jnp.where(mask, X, -jnp.inf))
  for f in (ops.log_softmax, lambda x, where: jnp.log(ops.softmax(x, where=where))):
    np.testing.assert_allclose(f(x, where=mask), clean, rtol=1e-6)
  np.testing.assert_allclose(ops.logsumexp(x, where=mask), ops.logsumexp(X, where=mask))
  np.testing.assert_allclose(ops.cross_entropy(x, Y.at[BAD].set(0), where=mask),
                             -clean[np.arange(N), Y.at[BAD].set(0)], rtol=1e-6)
  np.testing.assert_allclose(ops.spherical_softmax(x, where=mask),
                             ops.spherical_softmax(X, where=mask))


def test_soft_cross_entropy_of_a_nan_row_is_nan_even_with_zero_targets():
  t = T.at[BAD].set(0.0)
  loss = np.asarray(ops.soft_cross_entropy(_with_nan(X), t))
  assert np.isnan(loss[BAD]) and ops.soft_cross_entropy(X, t)[BAD] == 0


def test_sphereface_with_a_nan_feature_norm_does_not_blame_scale():
  """Eagerly the per-example scale is concrete: its NaN is data, not a bad option."""
  z = np.asarray(ops.sphereface_logits(COS, Y, scale=_with_nan(NORM)))
  assert np.isnan(z[BAD]).all() and np.isfinite(np.delete(z, BAD, 0)).all()
  with pytest.raises(ValueError, match=r'`scale` must be finite and > 0; got nan'):
    ops.sphereface_logits(COS, Y, scale=np.nan)  # A scalar is an option: checked.


def test_nan_step_and_per_example_temperature():
  assert np.isnan(ops.sphereface_lambda(jnp.nan))
  t = np.asarray([[1.0], [np.nan], [2.0]], np.float32)
  for f in (ops.softmax, jax.jit(lambda x, temperature: ops.softmax(x, temperature=temperature))):
    p = np.asarray(f(X, temperature=t))
    assert np.isnan(p[BAD]).all()
    np.testing.assert_allclose(np.delete(p, BAD, 0), np.delete(jax.nn.softmax(X / t), BAD, 0),
                               rtol=1e-6)


@pytest.mark.parametrize('call', [
    lambda c: ops.class_balanced_weights(c),
    lambda c: ops.ldam_margins(c),
    lambda c: ops.log_prior(c),
    lambda c: ops.drw_class_weights(0, class_counts=c, start_step=1),
    lambda c: ops.ldam_loss(X, Y, class_counts=c),
    lambda c: ops.adaptive_cutoffs(c),
    lambda c: ops.huffman_tree(c),
    lambda c: ops.unigram_probs(c),
    lambda c: ops.unigram_sampler(jax.random.key(0), 2, c),
])
def test_host_functions_reject_a_nan_count(call):
  with pytest.raises(ValueError, match='finite'):
    call(np.where(np.arange(K) == 2, np.nan, COUNTS))
