"""ImbalancedSoftmax against float64 NumPy references of each paper's loss on the head's own parameters."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import testing
from softmax_jax.heads import HEADS, ImbalancedSoftmax
from softmax_jax.heads.imbalanced import LOSSES
from softmax_jax.models.classifier import build_classifier

K, D = 5, 4
COUNTS = (500, 120, 40, 11, 3)


def _log_softmax(z):
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _cb(beta):
  n = np.asarray(COUNTS, np.float64)
  w = (1 - beta) / (1 - beta ** n)
  return w * K / w.sum()


def _setup(head, seed=0):
  rng = np.random.default_rng(seed)
  features = jnp.asarray(rng.normal(size=(16, D)) * 2, jnp.float32)
  labels = jnp.asarray(rng.integers(0, K, size=16), jnp.int32)
  params = head.init(jax.random.PRNGKey(seed), features, labels, train=False)['params']
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), params)
  return features, labels, params


def _dense(features, params):
  return np.asarray(features, np.float64) @ np.asarray(params['kernel'], np.float64) + np.asarray(
      params['bias'], np.float64)


def _cos(features, params):
  f = np.asarray(features, np.float64)
  w = np.asarray(params['kernel'], np.float64)
  return (f / np.linalg.norm(f, axis=-1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))


def _reference(loss, z, y, step):
  onehot = np.eye(K)[y]
  logp = _log_softmax(z)
  nll = -(logp * onehot).sum(-1)
  if loss == 'ce':
    return nll
  if loss == 'cb':
    return _cb(0.9999)[y] * nll
  if loss in ('focal', 'cb_focal'):
    p = np.exp(-nll)
    alpha = _cb(0.9999)[y] if loss == 'cb_focal' else 1.0
    return alpha * (1 - p) ** 2.0 * nll
  if loss == 'logit_adjusted':
    prior = np.asarray(COUNTS, np.float64) / sum(COUNTS)
    return -(_log_softmax(z + 0.5 * np.log(prior)) * onehot).sum(-1)
  if loss == 'ldam':  # z are cosines
    m = np.asarray(COUNTS, np.float64) ** -0.25
    m = m * 0.5 / m.max()
    w = _cb(0.9999)[y] if step >= 10 else 1.0
    return w * -(_log_softmax(30.0 * (z - m * onehot)) * onehot).sum(-1)
  raise ValueError(loss)


@pytest.mark.parametrize('loss', ['ce', 'cb', 'focal', 'cb_focal', 'logit_adjusted', 'ldam'])
@pytest.mark.parametrize('step', [0, 20])
def test_training_loss_and_contract_match_reference(loss, step):
  head = ImbalancedSoftmax(num_classes=K, loss=loss, class_counts=COUNTS, gamma=2.0, tau=0.5,
                           drw_start_step=10 if loss == 'ldam' else -1)
  features, labels, params = _setup(head)
  z = _cos(features, params) if loss == 'ldam' else _dense(features, params)
  y = np.asarray(labels)
  got = jax.jit(lambda p: head.apply({'params': p}, features, labels, train=True, step=step))(params)
  np.testing.assert_allclose(got, _reference(loss, z, y, step), rtol=2e-5, atol=2e-5)
  eval_z = 30.0 * z if loss == 'ldam' else z
  ref_logp = _log_softmax(eval_z)
  logp = head.apply({'params': params}, features, method='log_prob')
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(jax.nn.logsumexp(logp, -1), 0.0, atol=1e-5)
  np.testing.assert_allclose(head.apply({'params': params}, features, labels, train=False),
                             -ref_logp[np.arange(16), y], rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(head.apply({'params': params}, features, method='predict'),
                                np.argmax(np.asarray(logp), -1))


def test_ce_drw_switches_to_class_balanced_weights():
  head = ImbalancedSoftmax(num_classes=K, loss='ce', class_counts=COUNTS, drw_start_step=5)
  features, labels, params = _setup(head, seed=1)
  loss = lambda step: head.apply({'params': params}, features, labels, train=True, step=step)
  nll = head.apply({'params': params}, features, labels, train=False)
  np.testing.assert_allclose(loss(4), nll, rtol=1e-6)
  np.testing.assert_allclose(loss(5), _cb(0.9999)[np.asarray(labels)] * nll, rtol=1e-5)


def test_classifier_passes_training_class_counts():
  model = build_classifier(dict(name='mlp', hidden=(4,)), dict(name='imbalanced', loss='cb'), K,
                           class_counts=np.asarray(COUNTS))
  assert model.head.class_counts == COUNTS and HEADS['imbalanced'] is ImbalancedSoftmax
  dense = build_classifier(dict(name='mlp', hidden=(4,)), dict(name='dense'), K, class_counts=COUNTS)
  assert not hasattr(dense.head, 'class_counts')


def test_default_constructor_trains_balanced():
  head = ImbalancedSoftmax(num_classes=K)
  features, labels, params = _setup(head)
  assert np.all(np.isfinite(head.apply({'params': params}, features, labels, train=True)))


@pytest.mark.parametrize('kwargs, match', [
    (dict(loss='lda'), 'loss'),
    (dict(class_counts=(1, 2)), 'class_counts'),
    (dict(loss='cb', beta=1.0, class_counts=COUNTS), '`beta` must be in'),
    (dict(loss='focal', gamma=-1.0), '`gamma` must be in'),
    (dict(loss='focal', gamma=float('inf')), '`gamma` must be in'),
    (dict(loss='cb', class_counts=(5, 0, 1, 1, 1)), '`class_counts` > 0 .*class 1'),
    (dict(loss='ce', class_counts=(5, -1, 1, 1, 1)), '`class_counts` must be finite and >= 0'),
    (dict(loss='ldam', scale=0.0, class_counts=COUNTS), '`scale` must be finite and > 0'),
    (dict(loss='ldam', max_margin=float('nan'), class_counts=COUNTS), '`max_margin` must be finite'),
    (dict(loss='logit_adjusted', tau=-0.5, class_counts=COUNTS), '`tau` must be in'),
    (dict(loss='ce', drw_start_step=-2, class_counts=COUNTS), '`drw_start_step` must be an integer >= -1'),
    (dict(loss='ce', drw_start_step=0, beta=1.5, class_counts=COUNTS), '`beta` must be in'),
])
@pytest.mark.parametrize('path', ['train', 'eval', 'log_prob'])
def test_bad_configuration_is_named_in_training_and_evaluation(kwargs, match, path):
  """The options were checked by the training-loss ops only: evaluation ran with beta = 1 (item 8)."""
  head = ImbalancedSoftmax(num_classes=K, **kwargs)
  x, y = jnp.ones((3, D)), jnp.zeros((3,), jnp.int32)
  call = {'train': lambda: head.init(jax.random.PRNGKey(0), x, y, train=True),
          'eval': lambda: head.init(jax.random.PRNGKey(0), x, y, train=False),
          'log_prob': lambda: head.init(jax.random.PRNGKey(0), x, method='log_prob')}[path]
  with pytest.raises(ValueError, match=f'ImbalancedSoftmax: .*{match}'):
    jax.eval_shape(call)


class ContractTest(chex.TestCase):
  """`softmax_jax.testing.assert_head_contract` per configuration, under each chex variant."""

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  @parameterized.named_parameters(
      (loss, dict(loss=loss, class_counts=(50, 30, 20, 9, 6, 3, 2, 1),
                  drw_start_step=0 if loss == 'ldam' else -1)) for loss in LOSSES)
  def test_head_contract(self, kwargs):
    rng = np.random.default_rng(7)  # every head's test: these [4, 8] features, K = 8 (jax caches)
    features, labels = rng.normal(size=(4, 8)) * 2, rng.integers(0, 8, size=4)
    testing.assert_head_contract(ImbalancedSoftmax(num_classes=8, **kwargs), features, labels,
                                 variant=self.variant)
