"""MarginSoftmax against a float64 NumPy reference of its own parameters: contract, margins, errors."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import testing
from softmax_jax.heads import HEADS, MarginSoftmax
from softmax_jax.heads.margin import KINDS
from softmax_jax.models.classifier import build_classifier

K, D = 6, 5


def _cos(features, kernel):
  f = np.asarray(features, np.float64)
  w = np.asarray(kernel, np.float64)
  f = f / np.linalg.norm(f, axis=-1, keepdims=True)
  w = w / np.linalg.norm(w, axis=0, keepdims=True)
  c = np.tensordot(f, w, axes=1)
  return c.max(-1) if w.ndim == 3 else c


def _log_softmax(z):
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _ref_target(kind, c, norm, step):
  """Published target logits (before the scale) of the label column."""
  theta = np.arccos(np.clip(c, -1, 1))
  if kind == 'arcface':  # s=64, m=0.5; insightface fallback past pi - m
    return np.where(theta + 0.5 <= np.pi, np.cos(theta + 0.5), c - 0.5 * np.sin(0.5)), 64.0
  if kind == 'cosface':
    return c - 0.35, 64.0
  if kind == 'combined':  # (1, 0.3, 0.2); theta + 0.3 <= pi away from the fallback
    return np.cos(theta + 0.3) - 0.2, 64.0
  if kind == 'sphereface':  # m=4, lambda annealed, scale = ||x||
    k = np.floor(4 * theta / np.pi)
    psi = (-1.0) ** k * np.cos(4 * theta) - 2 * k
    lam = max(5.0, 1000.0 / (1 + 0.12 * step))
    return (lam * c + psi) / (1 + lam), norm
  raise ValueError(kind)


def _setup(head, lead=(8,), seed=0):
  rng = np.random.default_rng(seed)
  features = jnp.asarray(rng.normal(size=(*lead, D)) * 2, jnp.float32)
  labels = jnp.asarray(rng.integers(0, K, size=lead), jnp.int32)
  params = head.init(jax.random.PRNGKey(seed), features, labels, train=False)['params']
  return features, labels, params


@pytest.mark.parametrize('kind', ['arcface', 'cosface', 'sphereface', 'combined', 'normface'])
@pytest.mark.parametrize('lead', [(8,), (2, 3)])
def test_eval_contract_matches_reference(kind, lead):
  head = MarginSoftmax(num_classes=K, kind=kind)
  features, labels, params = _setup(head, lead)
  c = _cos(features, params['kernel'])
  norm = np.linalg.norm(np.asarray(features, np.float64), axis=-1)
  scale = {'arcface': 64.0, 'cosface': 64.0, 'combined': 64.0, 'normface': 16.0}.get(kind)
  ref = _log_softmax(c * (norm[..., None] if scale is None else scale))
  log_prob = jax.jit(lambda p, f: head.apply({'params': p}, f, method='log_prob'))(params, features)
  np.testing.assert_allclose(log_prob, ref, rtol=2e-5, atol=2e-4)
  np.testing.assert_allclose(jax.nn.logsumexp(log_prob, -1), 0.0, atol=1e-5)
  loss = head.apply({'params': params}, features, labels, train=False)
  np.testing.assert_allclose(loss, -np.take_along_axis(ref, np.asarray(labels)[..., None], -1)[..., 0],
                             rtol=1e-4, atol=2e-4)
  predict = head.apply({'params': params}, features, method='predict')
  np.testing.assert_array_equal(predict, np.argmax(np.asarray(log_prob), -1))
  np.testing.assert_array_equal(predict, np.argmax(c, -1))  # the class with the largest cosine


@pytest.mark.parametrize('kind', ['arcface', 'cosface', 'sphereface', 'combined'])
@pytest.mark.parametrize('step', [0, 100, 100000])
def test_training_loss_applies_the_margin_to_the_label_column(kind, step):
  head = MarginSoftmax(num_classes=K, kind=kind)
  features, labels, params = _setup(head, seed=3)
  c = _cos(features, params['kernel'])
  norm = np.linalg.norm(np.asarray(features, np.float64), axis=-1)
  onehot = np.eye(K, dtype=bool)[np.asarray(labels)]
  target, scale = _ref_target(kind, c, norm, step)
  scale = np.asarray(scale)[..., None] if np.ndim(scale) else scale
  z = scale * np.where(onehot, target, c)
  ref = -(_log_softmax(z) * onehot).sum(-1)
  loss = jax.jit(lambda p, f, y: head.apply({'params': p}, f, y, train=True, step=step))(
      params, features, labels)
  np.testing.assert_allclose(loss, ref, rtol=1e-4, atol=1e-3)
  # The margin makes the training loss larger than the evaluation loss.
  assert np.all(np.asarray(loss) >= np.asarray(head.apply({'params': params}, features, labels)) - 1e-4)


def test_sphereface_without_step_uses_lambda_min():
  head = MarginSoftmax(num_classes=K, kind='sphereface')
  features, labels, params = _setup(head, seed=4)
  apply = lambda **kw: head.apply({'params': params}, features, labels, train=True, **kw)
  np.testing.assert_allclose(apply(), apply(step=10**6), rtol=1e-6)
  assert not np.allclose(apply(), apply(step=0))


def test_subcenters_take_the_closest_and_gradients_are_finite():
  head = MarginSoftmax(num_classes=K, num_subcenters=3)
  features, labels, params = _setup(head, seed=5)
  assert params['kernel'].shape == (D, K, 3)
  c = _cos(features, params['kernel'])
  np.testing.assert_allclose(head.apply({'params': params}, features, method='cosines'), c, atol=1e-6)
  grads = jax.grad(lambda p: head.apply({'params': p}, features, labels, train=True).mean())(params)
  assert np.all(np.isfinite(grads['kernel']))


def test_embed_is_unit_norm():
  head = MarginSoftmax(num_classes=K)
  features, _, params = _setup(head, seed=6)
  e = head.apply({'params': params}, features, method='embed')
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, rtol=1e-6)


def test_default_constructor_and_registry():
  assert HEADS['margin'] is MarginSoftmax
  head = MarginSoftmax(num_classes=K)
  features, labels, params = _setup(head)
  assert np.all(np.isfinite(head.apply({'params': params}, features, labels, train=True)))


def test_classifier_passes_step_only_to_heads_that_use_it():
  images = jnp.zeros((2, 8, 8, 1))
  labels = jnp.zeros((2,), jnp.int32)
  model_cfg = dict(name='mlp', hidden=(4,), dropout=0.0)
  for head_cfg in (dict(name='dense'), dict(name='margin', kind='sphereface')):
    model = build_classifier(model_cfg, head_cfg, K)
    params = model.init(jax.random.PRNGKey(0), images, labels, train=False)['params']
    # A dense head does not take `step`; the classifier must not pass it.
    model.apply({'params': params}, images, labels, train=True, step=jnp.int32(3))


@pytest.mark.parametrize('kwargs, match', [
    (dict(kind='arcfase'), 'kind'),
    (dict(kind='arcface', margin=1.6), 'margin'),
    (dict(kind='arcface', margin=-0.1), 'margin'),
    (dict(kind='cosface', margin=2.5), 'margin'),
    (dict(kind='sphereface', margin=1.5), 'integer'),
    (dict(kind='combined', m1=0.5), 'm1'),
    (dict(kind='arcface', scale=0.0), 'scale'),
    (dict(kind='arcface', scale=-1.0), 'scale'),
    (dict(kind='cosface', scale=float('inf')), '`scale` must be finite and > 0'),
    (dict(kind='combined', scale=float('nan')), '`scale` must be finite and > 0'),
    (dict(kind='sphereface', lambda_min=-1.0), '`lambda_min` must be in'),
    (dict(kind='sphereface', lambda_base=float('nan')), '`lambda_base` must be in'),
    (dict(num_subcenters=0), 'num_subcenters'),
])
def test_bad_configuration_is_named(kwargs, match):
  head = MarginSoftmax(num_classes=K, **kwargs)
  with pytest.raises(ValueError, match=match):
    _setup(head)


def test_sphereface_nan_feature_gives_nan_not_a_scale_error():
  """Its default scale is the feature norm: a NaN feature was blamed on `scale` (item 8); now that
  example's loss is NaN (eagerly, where the scale was checked; the contract test covers jit) and
  the others are unchanged."""
  head = MarginSoftmax(num_classes=K, kind='sphereface')
  features, labels, params = _setup(head)
  loss = lambda f: np.asarray(head.apply({'params': params}, f, labels, train=True))
  got, clean = loss(features.at[2, 1].set(jnp.nan)), loss(features)
  assert np.isnan(got[2]) and np.all(np.isfinite(np.delete(got, 2)))
  np.testing.assert_allclose(np.delete(got, 2), np.delete(clean, 2), rtol=1e-6)


def test_bad_labels_are_named():
  head = MarginSoftmax(num_classes=K)
  features, _, params = _setup(head)
  with pytest.raises(ValueError, match=r'labels.*\[0, 6\)'):
    head.apply({'params': params}, features, jnp.full((8,), K, jnp.int32), train=True)
  with pytest.raises(ValueError, match=r'`labels` must have shape features.shape\[:-1\] = \(8,\).*got shape \(7,\)'):
    head.apply({'params': params}, features, jnp.zeros((7,), jnp.int32), train=True)


class ContractTest(chex.TestCase):
  """`softmax_jax.testing.assert_head_contract` per configuration, under each chex variant."""

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  @parameterized.named_parameters((kind, dict(kind=kind)) for kind in KINDS)
  def test_head_contract(self, kwargs):
    rng = np.random.default_rng(7)  # every head's test: these [4, 8] features, K = 8 (jax caches)
    features, labels = rng.normal(size=(4, 8)) * 2, rng.integers(0, 8, size=4)
    testing.assert_head_contract(MarginSoftmax(num_classes=8, **kwargs), features, labels,
                                 variant=self.variant)
