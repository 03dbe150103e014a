"""SMOTE in input space (softmax_jax.data.smote) and sampling='smote' through the trainer.

The synthetic examples are checked against their definition in float64: each lies on a segment
from a real example to one of its k nearest same-class neighbours, neighbours found by brute force
on the normalized images.
"""

import importlib.util
import itertools
import os

import numpy as np
import pytest

from softmax_jax import data
from softmax_jax.data.smote import smote_dataset
from softmax_jax.train import base_config, train_and_evaluate, validate_config
from softmax_jax.train.classification import ClassificationTask

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_COUNTS = (30, 12, 7)


def _toy(channels, counts=_COUNTS, seed=0):
  """A long-tailed split of random 3x3 images; per-channel mean and std far from 0 and 1."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int32)
  n = len(labels)
  images = rng.integers(0, 256, size=(n, 3, 3, channels), dtype=np.uint8)
  split = data.Split(images, labels)
  return data.Dataset(name='toy', num_classes=len(counts), input_shape=(3, 3, channels),
                      splits={'train': split, 'validation': split, 'test': split},
                      mean=np.linspace(0.3, 0.6, channels).astype(np.float32),
                      std=np.linspace(0.2, 0.4, channels).astype(np.float32))


def _normalized64(dataset, images):
  x = np.asarray(images, np.float64) / 255.0
  return ((x - dataset.mean.astype(np.float64)) / dataset.std.astype(np.float64)).reshape(len(x), -1)


@pytest.mark.parametrize('channels', [1, 3])
def test_synthetic_examples_lie_between_a_real_example_and_one_of_its_k_neighbours(channels):
  k, toy = 3, _toy(channels)
  out = smote_dataset(toy, k_neighbors=k, seed=1)
  train, real = out.splits['train'], toy.splits['train']
  n_real, target = len(real), max(_COUNTS)
  assert np.bincount(train.labels).tolist() == [target] * 3  # balanced
  assert out.num_synthetic == len(train) - n_real == 3 * target - n_real
  assert out.class_counts.tolist() == list(_COUNTS)  # the real counts, for heads and metrics
  assert train.images.dtype == np.float32 and train.images.shape[1:] == (3, 3, channels)
  np.testing.assert_array_equal(train.images[:n_real], real.images)  # real first, unchanged
  np.testing.assert_array_equal(train.labels[:n_real], real.labels)
  np.testing.assert_array_equal(out.normalize(train.images[:n_real]), toy.normalize(real.images))
  assert 0 <= train.images.min() and train.images.max() <= 255
  assert out.splits['test'] is toy.splits['test'] and toy.splits['train'] is real  # input untouched

  x_real = _normalized64(toy, real.images)
  x_new = _normalized64(toy, train.images[n_real:])
  for c in range(3):
    members = x_real[real.labels == c]
    dist = ((members[:, None] - members[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    neighbours = np.argsort(dist, axis=1)[:, :k]  # the k nearest, the example itself excluded
    new = x_new[train.labels[n_real:] == c]
    assert len(new) == target - _COUNTS[c]
    for s in new:
      best = np.inf
      for i, j in ((i, j) for i in range(len(members)) for j in neighbours[i]):
        d = members[j] - members[i]
        lam = np.clip((s - members[i]) @ d / (d @ d), 0.0, 1.0)
        best = min(best, np.abs(members[i] + lam * d - s).max())
      assert best < 1e-4  # float32 storage of values of order 1


def test_deterministic_in_the_seed_and_idempotent():
  toy = _toy(1)
  a = smote_dataset(toy, k_neighbors=2, seed=5)
  b = smote_dataset(toy, k_neighbors=2, seed=5)
  np.testing.assert_array_equal(a.splits['train'].images, b.splits['train'].images)
  np.testing.assert_array_equal(a.splits['train'].labels, b.splits['train'].labels)
  other = smote_dataset(toy, k_neighbors=2, seed=6)
  assert not np.array_equal(a.splits['train'].images, other.splits['train'].images)
  again = smote_dataset(a, k_neighbors=2, seed=5)  # resamples the real part only
  np.testing.assert_array_equal(again.splits['train'].images, a.splits['train'].images)
  assert again.num_synthetic == a.num_synthetic


@pytest.mark.parametrize('kwargs, match', [
    (dict(k_neighbors=7), r'k_neighbors=7 \(config.data.smote_neighbors\) needs at least k \+ 1 = 8 '
                          r'.* class 2 has 7 .* at most 6'),
    (dict(k_neighbors=0), r'k_neighbors \(config.data.smote_neighbors\) must be an integer >= 1, got 0'),
    (dict(k_neighbors=2.5), r'must be an integer >= 1, got 2.5'),
    (dict(seed=-1), r'seed \(config.seed\) must be an integer in \[0, 2\*\*32\) for SMOTE, got -1'),
])
def test_bad_arguments_name_the_config_key(kwargs, match):
  with pytest.raises(ValueError, match=match):
    smote_dataset(_toy(1), **kwargs)


def test_smote_batches_are_instance_batches_of_the_balanced_split_and_resume():
  balanced = smote_dataset(_toy(1), k_neighbors=3, seed=0)
  take = lambda it, n: list(itertools.islice(it, n))
  smote = take(data.train_indices(balanced, 8, seed=3, sampling='smote'), 30)
  instance = take(data.train_indices(balanced, 8, seed=3, sampling='instance'), 30)
  np.testing.assert_array_equal(smote, instance)
  assert np.concatenate(smote).max() >= len(_toy(1).splits['train'])  # synthetic ones are drawn
  resumed = take(data.train_indices(balanced, 8, seed=3, sampling='smote', start_step=17), 13)
  np.testing.assert_array_equal(resumed, smote[17:])
  with pytest.raises(ValueError, match=r"sampling='smote' draws from a train split balanced by "
                                       r".*smote_dataset .* class counts \[30, 12, 7\]"):
    next(data.train_indices(_toy(1), 8, seed=0, sampling='smote'))


def _fashion_lt(arg):
  spec = importlib.util.spec_from_file_location('fashion_lt', os.path.join(REPO, 'configs', 'fashion_lt.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_fashion_lt_smote_and_augment_configs():
  c = _fashion_lt('smote,seed=2')
  validate_config(c)
  assert (c.data.sampling, c.data.smote_neighbors, c.seed, c.head.loss) == ('smote', 5, 2, 'ce')
  assert not c.augment.rotation_degrees
  c = _fashion_lt('ce,augment,small')
  validate_config(c)
  assert (c.augment.rotation_degrees, c.augment.brightness, c.augment.contrast) == (10.0, 0.2, 0.2)
  assert c.data.sampling == 'instance' and c.num_steps == 100
  assert _fashion_lt('ldam_drw').augment.rotation_degrees == 0
  with pytest.raises(ValueError, match=r"\[,augment\]"):
    _fashion_lt('ce,augmented')


def test_digits_smote_with_augmentation_trains_and_heads_see_the_real_counts(tmp_path):
  c = base_config()
  c.data.update(name='digits', data_dir=str(tmp_path / 'tfds'), imbalance_ratio=10.0,
                sampling='smote', smote_neighbors=5)
  c.head = dict(name='imbalanced', loss='logit_adjusted', tau=1.0)
  c.model.hidden, c.model.dropout = (32,), 0.0
  c.augment.update(rotation_degrees=10.0, brightness=0.2, contrast=0.2)
  c.batch_size, c.num_steps, c.num_devices, c.progress = 32, 5, 1, False
  c.log_every = c.eval_every = c.checkpoint_every = 5
  real = data.load_dataset(c.data)
  task = ClassificationTask(c, dataset=real)
  counts = real.class_counts
  assert counts[0] >= 10 * counts[-1] - 10 and task.dataset.num_synthetic == 10 * counts[0] - counts.sum()
  np.testing.assert_array_equal(task.dataset.class_counts, counts)
  np.testing.assert_array_equal(task.class_counts, counts)
  assert tuple(task.model.head.class_counts) == tuple(counts.tolist())
  final = train_and_evaluate(c, str(tmp_path / 'run'), dataset=real)
  assert np.isfinite(final['test/nll']) and 'test_posthoc/accuracy' in final
  with pytest.raises(ValueError, match=r'config.augment.contrast must be in \[0, 1\]'):
    c.augment.contrast = 2.0
    ClassificationTask(c, dataset=real)
