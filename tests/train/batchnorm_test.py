"""Training a BatchNorm ResNet with on-device augmentation: resume and data parallelism.

ResNet-8 on a mock CIFAR-10 (`tfds.testing.mock_data`, 48 random images a split; no network),
random crop (padding 4) and flip, a few steps. 8 fake CPU devices come from tests/conftest.py.
"""

import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from softmax_jax.train import base_config, load_trained, train_and_evaluate
from softmax_jax.train.checkpoint import Checkpointer
from softmax_jax.train.writer import read_metrics

NUM_STEPS = 6


def resnet_config(**overrides):
  c = base_config()
  c.data.name = 'cifar10'
  c.model = dict(name='resnet', depth=8)
  c.augment.crop_padding, c.augment.flip = 4, True
  c.batch_size = c.eval_batch_size = 16
  c.num_steps, c.num_devices = NUM_STEPS, 1
  c.optimizer.name, c.optimizer.learning_rate, c.optimizer.warmup_steps = 'sgd', 0.05, 2
  c.log_every, c.eval_every, c.checkpoint_every = 1, 1000, 3
  c.progress = False
  for key, value in overrides.items():
    setattr(c, key, value)
  return c


def _train(config, workdir):
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    return train_and_evaluate(config, workdir)


def _losses(workdir):
  return np.array([r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r])


def _checkpoint(workdir, step):
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'))
  state = jax.tree.map(np.asarray, ckpt._mgr.restore(step))  # pylint: disable=protected-access
  ckpt.close()
  return state


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ref'))
  return workdir, _train(resnet_config(), workdir)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(reference, tmp_path):
  ref_dir, ref_final = reference
  # The run "killed" after its step-3 checkpoint: drop what it saved later, then rerun.
  killed = str(tmp_path / 'killed')
  shutil.copytree(ref_dir, killed)
  shutil.rmtree(os.path.join(killed, 'checkpoints', str(NUM_STEPS)))
  os.remove(os.path.join(killed, 'final_metrics.json'))
  probe = Checkpointer(os.path.join(killed, 'checkpoints'))
  assert probe.latest_step() == 3
  probe.close()
  resumed_final = _train(resnet_config(), killed)
  timing = {'train_wall_s', 'train/examples_per_second'}  # each invocation's own clock
  assert set(resumed_final) == set(ref_final) and timing <= set(ref_final)
  assert ({k: v for k, v in resumed_final.items() if k not in timing}
          == {k: v for k, v in ref_final.items() if k not in timing})
  np.testing.assert_array_equal(_losses(killed), _losses(ref_dir))
  ref_state, resumed_state = _checkpoint(ref_dir, NUM_STEPS), _checkpoint(killed, NUM_STEPS)
  assert set(ref_state['model_state']) == {'batch_stats'}
  jax.tree.map(np.testing.assert_array_equal, resumed_state, ref_state)  # batch_stats included
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), _checkpoint(ref_dir, 3)['model_state'],
                       ref_state['model_state'])
  assert all(jax.tree.leaves(moved))  # the batch statistics changed after the resume point


def test_load_trained_returns_the_batch_statistics(reference):
  ref_dir, _ = reference
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    _, dataset, model, variables = load_trained(ref_dir)
  assert set(variables) == {'params', 'batch_stats'}
  jax.tree.map(np.testing.assert_array_equal, variables['batch_stats'],
               _checkpoint(ref_dir, NUM_STEPS)['model_state']['batch_stats'])
  images = dataset.normalize(dataset.splits['test'].images[:4])
  log_prob = model.apply(variables, images, method='log_prob')
  np.testing.assert_allclose(jax.nn.logsumexp(log_prob, axis=-1), 0.0, atol=1e-5)


def test_jit_on_8_devices_matches_one_device(reference, tmp_path):
  ref_dir, _ = reference
  assert jax.local_device_count() == 8
  _train(resnet_config(num_devices=8), str(tmp_path / 'jit8'))
  one, eight = _losses(ref_dir), _losses(str(tmp_path / 'jit8'))
  assert len(one) == NUM_STEPS and np.all(np.isfinite(one))
  np.testing.assert_allclose(eight, one, rtol=2e-5)
