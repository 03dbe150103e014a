"""configs/cifar10_lt.py builds and validates for every method (no training: no CIFAR-10 offline)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax.data import long_tailed_counts
from softmax_jax.models.classifier import build_classifier
from softmax_jax.train import validate_config
from softmax_jax.train.state import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    'cifar10_lt', os.path.join(REPO, 'configs', 'cifar10_lt.py'))
cifar10_lt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cifar10_lt)
COUNTS = long_tailed_counts(5000, 10, 100)  # Cao's CIFAR-10-LT: 12,406 images


def test_ce_small_builds_and_validates():
  c = cifar10_lt.get_config('ce,small')
  validate_config(c)
  assert c.num_steps == 20 and c.data.imbalance_ratio == 100 and c.augment.crop_padding == 4
  model = build_classifier(c.model, c.head, 10, COUNTS)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)),
                                             jnp.zeros((2,), jnp.int32), train=False))
  assert set(shapes) == {'params', 'batch_stats'}
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params'])) == 463_504 + 64 * 10 + 10
  schedule, _ = make_optimizer(c.optimizer, c.num_steps)
  assert float(schedule(c.optimizer.warmup_steps)) == pytest.approx(0.1)


@pytest.mark.parametrize('method', sorted(cifar10_lt.METHODS))
def test_every_method_follows_cao(method):
  c = cifar10_lt.get_config(method)
  validate_config(c)
  build_classifier(c.model, c.head, 10, COUNTS)
  assert sum(COUNTS) == cifar10_lt.LT_TRAIN_IMAGES == 12_406
  assert (c.num_steps, c.optimizer.warmup_steps) == (200 * 97, 5 * 97)
  schedule, _ = make_optimizer(c.optimizer, c.num_steps)
  np.testing.assert_allclose([schedule(s) for s in (484, 485, 160 * 97 - 1, 160 * 97, 180 * 97 - 1, 180 * 97)],
                             [0.1 * 484 / 485, 0.1, 0.1, 1e-3, 1e-3, 1e-5], rtol=1e-6)
  assert c.head.get('drw_start_step', -1) == (160 * 97 if method == 'ldam_drw' else -1)
  assert c.data.sampling == ('class' if method == 'resample' else 'instance')


def test_unknown_method_is_named():
  with pytest.raises(ValueError, match=r"configs/cifar10_lt.py takes '<method>\[,small\]'.*'ldam' not understood"):
    cifar10_lt.get_config('ldam')
