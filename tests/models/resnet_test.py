"""The CIFAR ResNet: parameter count from the architecture, shapes, BatchNorm in train and eval."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softmax_jax.models import ResNet
from softmax_jax.models.classifier import build_classifier
from softmax_jax.models.resnet import shortcut_a
from softmax_jax.train.state import init_state
from softmax_jax.train.classification import check_classifier_batch, classifier_loss
from softmax_jax.train.step import train_step


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def cifar_resnet_params(depth, widths=(16, 32, 64), in_channels=3):
  """He et al. 2016 §4.2 by hand: bias-free 3x3 convs, BatchNorm scale + bias, option-A shortcuts."""
  n = (depth - 2) // 6
  total = 9 * in_channels * widths[0] + 2 * widths[0]  # stem conv + BN
  prev = widths[0]
  for w in widths:
    for _ in range(n):
      total += 9 * prev * w + 9 * w * w + 4 * w  # conv1, conv2, two BNs; the shortcut has none
      prev = w
  return total


def test_resnet32_parameter_count():
  shapes = jax.eval_shape(lambda: ResNet(depth=32).init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)),
                                                        train=False))
  assert cifar_resnet_params(32) == 463_504  # "0.46M" in He et al. Table 6
  assert _count(shapes['params']) == 463_504
  # Running mean and variance of the 31 BatchNorms: 2 * (16 + 10 * (16 + 32 + 64)).
  assert _count(shapes['batch_stats']) == 2 * (16 + 10 * (16 + 32 + 64)) == 2272
  assert _count(jax.eval_shape(lambda: ResNet(depth=20).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))['params']) == cifar_resnet_params(20)


@pytest.mark.parametrize('depth, shape, expected', [(8, (3, 8, 8, 3), (3, 64)), (14, (2, 9, 9, 1), (2, 64))])
def test_output_shape(depth, shape, expected):
  model = ResNet(depth=depth)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False)
  assert set(variables) == {'params', 'batch_stats'}
  assert model.apply(variables, jnp.ones(shape), train=False).shape == expected


@pytest.mark.parametrize('depth', [30, 2, 9])
def test_depth_must_be_6n_plus_2(depth):
  with pytest.raises(ValueError, match=rf'ResNet: depth must be 2 \* len\(widths\) \* n \+ 2 .*got depth={depth}'):
    ResNet(depth=depth).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)


def test_rejects_flat_images():
  with pytest.raises(ValueError, match=r'ResNet: images must be \[B, H, W, C\] \(rank 4\), got shape \(2, 64\)'):
    ResNet(depth=8).init(jax.random.PRNGKey(0), jnp.zeros((2, 64)), train=False)


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 16))
  y = shortcut_a(x, 32, 2)
  assert y.shape == (2, 3, 3, 32)
  np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])
  assert not np.any(y[..., :8]) and not np.any(y[..., 24:])
  np.testing.assert_array_equal(shortcut_a(x, 16, 1), x)


def test_batchnorm_uses_batch_statistics_in_training_and_running_averages_in_evaluation():
  model = ResNet(depth=8)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3)) * 2.0 + 1.0
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  # Evaluation: each example on its own; training: example 0 depends on the rest of the batch.
  evaluate = lambda v, images: model.apply(v, images, train=False)
  np.testing.assert_allclose(evaluate(variables, x)[:1], evaluate(variables, x[:1]), rtol=1e-5, atol=1e-6)
  train = lambda images: model.apply(variables, images, train=True, mutable=['batch_stats'])
  (out, updated), (out2, _) = train(x), train(x.at[1:].multiply(3.0))
  assert not np.allclose(out[0], out2[0], atol=1e-4)
  # The stem BN's new running averages: 0.9 * old + 0.1 * batch statistics of the stem conv output.
  kernel = variables['params']['stem_conv']['kernel']
  h = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  stats = updated['batch_stats']['stem_bn']
  np.testing.assert_allclose(stats['mean'], 0.1 * h.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * h.var((0, 1, 2)), rtol=1e-4)
  # Evaluation reads the running averages.
  moved = {'params': variables['params'], **updated}
  assert not np.allclose(evaluate(moved, x), evaluate(variables, x), atol=1e-4)


def test_a_train_step_updates_batch_stats():
  model = build_classifier({'name': 'resnet', 'depth': 8}, {'name': 'dense'}, num_classes=3)
  tx = optax.sgd(0.1, momentum=0.9)
  state = init_state(model, tx, (8, 8, 3), seed=0)
  assert set(state['model_state']) == {'batch_stats'}
  batch = {'image': np.asarray(jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 3))),
           'label': np.array([0, 1, 2, 0], np.int32)}
  task = types.SimpleNamespace(loss=functools.partial(classifier_loss, model),
                               check_batch=check_classifier_batch)
  step = jax.jit(functools.partial(train_step, task=task, tx=tx, schedule=lambda s: 0.1))
  new_state, metrics = step(state, batch)
  assert np.isfinite(metrics['loss'])
  _, expected = model.apply({'params': state['params'], **state['model_state']}, batch['image'],
                            batch['label'], train=True, mutable=['batch_stats'])
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), state['model_state'], new_state['model_state'])
  assert all(jax.tree.leaves(changed))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_state['model_state'], dict(expected))
  assert jax.tree.structure(new_state) == jax.tree.structure(jax.tree.map(jnp.asarray, state))
