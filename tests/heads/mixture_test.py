"""MixtureOfSoftmaxes against a float64 NumPy reference of its own parameters, the streamed loss
against the materialized one, M = 1 against DenseSoftmax, the head contract and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from softmax_jax import testing
from softmax_jax.heads import HEADS
from softmax_jax.heads import DenseSoftmax
from softmax_jax.heads import MixtureOfSoftmaxes

K, D, M = 7, 5, 3


def _ref_log_prob(features, params, sig):
  """float64 Yang et al. 2018 (and Kanai et al. 2018 for `sig`), written from the papers."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  h = np.asarray(features, np.float64)
  log_pi = h @ p['prior']
  log_pi = log_pi - special.logsumexp(log_pi, -1, keepdims=True)
  contexts = np.tanh(np.einsum('nd,dmc->nmc', h, p['context']) + p['context_bias'])
  z = contexts @ p['kernel'] + p['bias']
  u = z - np.logaddexp(0.0, -z) if sig else z  # z + log(sigmoid(z))
  log_q = u - special.logsumexp(u, -1, keepdims=True)
  return special.logsumexp(log_pi[..., None] + log_q, axis=-2)


def _setup(seed, **kwargs):
  rng = np.random.default_rng(seed)
  features = jnp.asarray(rng.normal(size=(6, D)) * 2, jnp.float32)
  labels = jnp.asarray(rng.integers(0, K, size=6), jnp.int32)
  head = MixtureOfSoftmaxes(num_classes=K, num_mixtures=M, chunk_size=3, **kwargs)
  params = head.init(jax.random.PRNGKey(seed), features, labels)['params']
  params = jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape).astype(np.float32), params)
  return head, params, features, labels


def test_matches_reference_and_streamed_equals_materialized():
  """log_prob, both losses, predict and eval_stats against float64; the streamed loss's gradients
  (params, features) against the materialized head's on the same parameters. (A mixture of
  sigsoftmaxes: the plain one is the same head code, its op is checked in float64 in
  tests/ops/mixture_test.py and its head by the contract.)"""
  sig = True
  head, params, x, y = _setup(0, sigsoftmax=sig)
  full = head.clone(streamed=False)
  assert {k: v.shape for k, v in params.items()} == {
      'prior': (D, M), 'context': (D, M, D), 'context_bias': (M, D), 'kernel': (D, K), 'bias': (K,)}
  ref = _ref_log_prob(x, params, sig)
  want = -ref[np.arange(6), np.asarray(y)]

  def run(h):
    loss = lambda p, x: h.apply({'params': p}, x, y, train=True)
    return jax.jit(lambda p, x: (h.apply({'params': p}, x, method='log_prob'),
                                 h.apply({'params': p}, x, method='predict'), loss(p, x),
                                 jax.grad(lambda p, x: loss(p, x).sum(), (0, 1))(p, x),
                                 h.apply({'params': p}, x, y, temperatures=(1.0, 2.0),
                                         method='eval_stats')))(params, x)

  (lp, pred, loss, grads, stats), (lp0, _, loss0, grads0, stats0) = run(head), run(full)
  np.testing.assert_allclose(lp, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lp0, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(pred, np.argmax(np.asarray(lp), -1))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(loss0, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # eval_stats: streamed (chunks of 3 classes) == from the full log_prob
  np.testing.assert_array_equal(stats['prediction'], np.argmax(ref, -1))
  np.testing.assert_array_equal(stats['label_rank'], (ref > -want[:, None]).sum(-1))
  for key in ('label_log_prob', 'confidence'):
    np.testing.assert_allclose(stats[key], stats0[key], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['label_log_prob'][:, 0], -want, rtol=1e-5)


def test_one_mixture_is_dense_softmax_on_the_context():
  _, _, x, y = _setup(1)
  head = MixtureOfSoftmaxes(num_classes=K, num_mixtures=1, chunk_size=3)
  params = head.init(jax.random.PRNGKey(1), x, y)['params']
  context = jnp.tanh(x @ params['context'][:, 0] + params['context_bias'][0])
  dense = {'params': {'kernel': params['kernel'], 'bias': params['bias']}}
  run = jax.jit(lambda p, x, c: (
      (head.apply({'params': p}, x, method='log_prob'), head.apply({'params': p}, x, y)),
      (DenseSoftmax(num_classes=K).apply(dense, c, method='log_prob'),
       DenseSoftmax(num_classes=K).apply(dense, c, y))))
  (lp, loss), (lp1, loss1) = run(params, x, context)
  np.testing.assert_allclose(lp, lp1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, loss1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kwargs', [
    dict(num_mixtures=3, chunk_size=3),
    dict(num_mixtures=2, sigsoftmax=True, streamed=False, context_dim=4, use_bias=False)])
def test_head_contract(kwargs):
  """Under jit (the ops' eager paths have their chex variants in tests/ops/mixture_test.py)."""
  rng = np.random.default_rng(7)  # every head's test: these [4, 8] features, K = 8 (jax caches)
  features, labels = rng.normal(size=(4, 8)) * 2, rng.integers(0, 8, size=4)
  testing.assert_head_contract(MixtureOfSoftmaxes(num_classes=8, **kwargs), features, labels,
                               variant=jax.jit)


def test_registered():
  assert HEADS['mos'] is MixtureOfSoftmaxes


@pytest.mark.parametrize('kwargs, msg', [
    (dict(num_mixtures=0), r'`num_mixtures` must be an integer >= 1 \(mixture components\); got 0'),
    (dict(context_dim=0), r'`context_dim` must be an integer >= 1 \(context width\); got 0'),
    (dict(chunk_size=2.5), r'`chunk_size` must be an integer >= 1 \(classes per chunk\); got 2.5'),
    (dict(dtype=jnp.int32), r'`dtype` .*must be None or a floating dtype'),
])
def test_bad_attributes_are_named_in_training_and_evaluation(kwargs, msg):
  head = MixtureOfSoftmaxes(num_classes=K, **kwargs)
  x, y = jnp.ones((2, D)), jnp.zeros((2,), jnp.int32)
  for run in (lambda: head.init(jax.random.PRNGKey(0), x, y, train=True),
              lambda: head.init(jax.random.PRNGKey(0), x, method='log_prob')):
    with pytest.raises(ValueError, match=rf'^MixtureOfSoftmaxes: {msg}'):
      jax.eval_shape(run)
