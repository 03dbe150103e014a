"""Building models from config: unknown keys and names are errors that name the key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax.models import CNN
from softmax_jax.models.classifier import build_classifier


def test_builds_every_backbone_with_the_dense_head():
  images, labels = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32)
  for model_cfg in ({'name': 'mlp', 'hidden': [16]}, {'name': 'cnn', 'channels': [4], 'dense': 8}):
    model = build_classifier(model_cfg, {'name': 'dense'}, num_classes=3)
    params = model.init(jax.random.PRNGKey(0), images, labels, train=False)
    assert model.apply(params, images, method='log_prob').shape == (2, 3)


@pytest.mark.parametrize('model_cfg, head_cfg, match', [
    ({'name': 'mlp', 'hiden': [8]}, {'name': 'dense'}, r"config.model.hiden.*Did you mean 'hidden'"),
    ({'name': 'mlp'}, {'name': 'dense', 'smoothing': 0.1}, r'Unknown config key config.head.smoothing'),
    ({'name': 'resnet9'}, {'name': 'dense'}, r"config.model.name='resnet9' is unknown"),
    ({'name': 'mlp'}, {'name': 'dense', 'num_classes': 4}, r'Unknown config key config.head.num_classes'),
])
def test_unknown_keys_are_named(model_cfg, head_cfg, match):
  with pytest.raises(ValueError, match=match):
    build_classifier(model_cfg, head_cfg, num_classes=3)


def test_cnn_rejects_flat_inputs():
  with pytest.raises(ValueError, match=r'CNN: images must be \[B, H, W, C\] \(rank 4\), got shape \(2, 64\)'):
    CNN().init(jax.random.PRNGKey(0), jnp.zeros((2, 64)), train=False)


def test_cnn_embedding_is_a_final_linear_layer():
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
  cnn = CNN(channels=(4,), dense=8, embedding=2)
  params = cnn.init(jax.random.PRNGKey(0), images, train=False)['params']
  out = cnn.apply({'params': params}, images, train=False)
  assert out.shape == (3, 2)
  # Reference: the same network without the embedding, then an affine map with no activation.
  trunk = {k: v for k, v in params.items() if k != 'Dense_1'}
  hidden = CNN(channels=(4,), dense=8).apply({'params': trunk}, images, train=False)
  np.testing.assert_allclose(out, hidden @ params['Dense_1']['kernel'] + params['Dense_1']['bias'],
                             rtol=1e-5, atol=1e-6)


def test_classifier_eval_stats_forward_the_head_in_evaluation_mode():
  images = jax.random.normal(jax.random.PRNGKey(0), (5, 8, 8, 1))
  labels = jnp.array([0, 1, 2, 3, 1], jnp.int32)
  model = build_classifier({'name': 'mlp', 'hidden': [16], 'dropout': 0.5}, {'name': 'dense'},
                           num_classes=4)
  params = model.init(jax.random.PRNGKey(0), images, labels, train=False)
  stats = jax.jit(lambda p: model.apply(p, images, labels, temperatures=(1.0, 3.0),
                                        method='eval_stats'))(params)
  lp = np.asarray(model.apply(params, images, method='log_prob'), np.float64)
  assert set(stats) == {'prediction', 'label_rank', 'label_log_prob', 'confidence'}
  np.testing.assert_array_equal(stats['prediction'], lp.argmax(-1))
  np.testing.assert_allclose(stats['label_log_prob'][:, 0], lp[np.arange(5), labels], rtol=1e-5)
  np.testing.assert_allclose(stats['confidence'][:, 0], np.exp(lp.max(-1)), rtol=1e-5)
