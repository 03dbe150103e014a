"""Tests for long-tailed splits, class-aware sampling and resampling (softmax_jax.data.longtail)."""

import itertools

import numpy as np
import pytest
from scipy import stats

from softmax_jax import data
from softmax_jax.data import longtail
from softmax_jax.data.smote import smote_dataset

_COUNTS = (40, 20, 10, 5, 2)  # A long-tailed toy train split, 77 examples.


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  config = dict(name='digits', data_dir=str(tmp_path_factory.mktemp('tfds')), source_dir=None,
                validation_fraction=0.1, split_seed=0)
  return config, data.load_dataset(config)


def _toy(counts=_COUNTS, seed=0):
  """Shuffled labels; image `i` is the pixel value `i`, so batches show their indices."""
  labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
  n = len(labels)
  split = data.Split(np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1), labels.astype(np.int32))
  return data.Dataset(name='toy', num_classes=len(counts), input_shape=(1, 1, 1),
                      splits={'train': split, 'validation': split, 'test': split},
                      mean=np.zeros(1, np.float32), std=np.ones(1, np.float32))


def _indices(batch):
  return np.round(batch['image'][:, 0, 0, 0] * 255).astype(int)


def _batches(dataset, steps, **kwargs):
  kwargs.setdefault('seed', 0)
  return list(itertools.islice(data.train_batches(dataset, kwargs.pop('batch_size', 7), **kwargs),
                               steps))


def test_counts_match_cao_for_cifar10_and_ratio_1_is_balanced():
  expected = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
  cao = [int(5000 * 0.01**(i / (10 - 1.0))) for i in range(10)]  # Cao et al. 2019, imb_factor 0.01
  assert cao == expected
  counts = data.long_tailed_counts(5000, 10, 100)
  assert counts.dtype == np.int64 and counts.tolist() == expected
  np.testing.assert_array_equal(data.long_tailed_counts(5000, 10, 1.0), [5000] * 10)
  c100 = data.long_tailed_counts(500, 100, 100)
  assert c100[0] == 500 and c100[-1] == 5 and (np.diff(c100) <= 0).all()


def test_step_profile():
  assert data.long_tailed_counts(500, 10, 10, 'step').tolist() == [500] * 5 + [50] * 5
  assert data.long_tailed_counts(500, 5, 10, profile='step').tolist() == [500] * 2 + [50] * 3


@pytest.mark.parametrize('args, match', [
    ((5000, 10, 0.5), r'imbalance_ratio must be in \[1, max_count=5000\].*got 0.5'),
    ((10, 10, 20.0), r'imbalance_ratio must be in \[1, max_count=10\].*got 20.0'),
    ((5000, 10, float('nan')), 'imbalance_ratio must be'),
    ((5000, 1, 10), 'num_classes must be an integer >= 2, got 1'),
    ((0, 10, 10), 'max_count must be an integer >= 1, got 0'),
    ((5000, 10, 10, 'linear'), "profile must be one of .*'exponential', 'step'.*got 'linear'"),
])
def test_long_tailed_counts_errors(args, match):
  with pytest.raises(ValueError, match=match):
    data.long_tailed_counts(*args)


def test_make_long_tailed_keeps_the_counts_in_source_order():
  source = _toy((30, 35, 32, 40, 31), seed=1).splits['train']
  lt = data.make_long_tailed(source, 10.0, seed=3)
  quota = data.long_tailed_counts(30, 5, 10.0)  # max_count = the smallest class, 30
  np.testing.assert_array_equal(np.bincount(lt.labels, minlength=5), quota)
  kept = lt.images[:, 0, 0, 0].astype(int)  # image i is index i of the source
  assert (np.diff(kept) > 0).all()  # a subset, in source order
  np.testing.assert_array_equal(lt.labels, source.labels[kept])
  rng = np.random.default_rng(3)  # the documented choice: one shuffle per class, classes in turn
  for c in range(5):
    chosen = rng.permutation(np.flatnonzero(source.labels == c))[:quota[c]]
    np.testing.assert_array_equal(np.sort(chosen), kept[lt.labels == c])
  again = data.make_long_tailed(source, 10.0, seed=3)
  np.testing.assert_array_equal(again.images, lt.images)
  other = data.make_long_tailed(source, 10.0, seed=4)
  assert not np.array_equal(other.images, lt.images)
  np.testing.assert_array_equal(other.labels.shape, lt.labels.shape)
  step = data.make_long_tailed(source, 3.0, profile='step', max_count=24)
  np.testing.assert_array_equal(np.bincount(step.labels), [24, 24, 8, 8, 8])


def test_make_long_tailed_errors():
  source = _toy((30, 20, 32, 35, 31)).splits['train']
  with pytest.raises(ValueError, match=r'class 1 has 20 examples, fewer than its quota 25'):
    data.make_long_tailed(source, 2.0, max_count=30)
  with pytest.raises(ValueError, match='imbalance_ratio must be'):
    data.make_long_tailed(source, 0.9)
  with pytest.raises(ValueError, match=r'split.labels must be < num_classes=4, got 4'):
    data.make_long_tailed(source, 2.0, num_classes=4)


def test_load_dataset_cuts_only_train(digits):
  config, full = digits
  lt = data.load_dataset(dict(config, imbalance_ratio=10))
  quota = data.long_tailed_counts(full.class_counts.min(), 10, 10.0)
  np.testing.assert_array_equal(lt.class_counts, quota)
  assert quota[0] > 100 and quota[-1] == quota[0] // 10
  for split in ('validation', 'test'):  # unchanged, so they stay balanced
    np.testing.assert_array_equal(lt.splits[split].images, full.splits[split].images)
    np.testing.assert_array_equal(lt.splits[split].labels, full.splits[split].labels)
  rows = lambda d: [bytes(x) for x in d.splits['train'].images.reshape(len(d.splits['train']), -1)]
  assert set(rows(lt)) <= set(rows(full))  # a subset of the balanced train split
  train = lt.splits['train'].images.astype(np.float64) / 255  # statistics of the cut train split
  np.testing.assert_allclose(lt.mean, train.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(lt.std, train.std(axis=(0, 1, 2)), rtol=1e-6)
  assert not np.allclose(lt.mean, full.mean, rtol=1e-4)
  step = data.load_dataset(dict(config, imbalance_ratio=4, imbalance_profile='step',
                                imbalance_seed=1, classes=(3, 8, 1)))
  m = step.class_counts[0]
  np.testing.assert_array_equal(step.class_counts, [m, m // 4, m // 4])
  with pytest.raises(ValueError, match='imbalance_ratio must be'):
    data.load_dataset(dict(config, imbalance_ratio=0.5))


def test_class_counts_and_sampling_weights():
  counts = _toy().class_counts
  np.testing.assert_array_equal(counts, _COUNTS)
  n = np.array(_COUNTS, np.float64)
  expected = {'instance': n / n.sum(), 'class': np.full(5, 0.2),
              'sqrt': np.sqrt(n) / np.sqrt(n).sum()}
  for mode, p in expected.items():
    np.testing.assert_allclose(data.class_sampling_weights(counts, mode), p, rtol=1e-12)
  for t in (0.0, 0.25, 1.0):  # Kang et al. 2020: (1 - t/T) p_instance + (t/T) p_class
    np.testing.assert_allclose(data.class_sampling_weights(counts, 'progressive', progress=t),
                               (1 - t) * expected['instance'] + t * expected['class'], rtol=1e-12)
  np.testing.assert_allclose(data.class_sampling_weights([3, 0, 1], 'class'), [0.5, 0, 0.5])
  with pytest.raises(ValueError, match=r"mode must be one of \('instance', 'class', 'sqrt', "
                                       r"'progressive'\), got 'over'"):
    data.class_sampling_weights(counts, 'over')
  with pytest.raises(ValueError, match=r'progress must be in \[0, 1\], got 1.5'):
    data.class_sampling_weights(counts, 'progressive', progress=1.5)
  with pytest.raises(ValueError, match='class_counts must be non-negative, got minimum -1'):
    data.class_sampling_weights([3, -1], 'class')


@pytest.mark.parametrize('sampling, progress', [
    ('class', None), ('sqrt', None), ('progressive', 0.0), ('progressive', 0.5),
    ('progressive', 1.0)])
def test_samplers_draw_classes_and_examples_with_the_intended_probabilities(sampling, progress):
  """Chi-square goodness of fit over 300 batches of 77 (23,100 draws), p > 1e-4."""
  dataset, steps, num_steps = _toy(), 300, 10**7
  start = 0 if progress is None else int(progress * num_steps)  # progress drifts by < 3e-5
  batches = _batches(dataset, steps, batch_size=77, sampling=sampling, num_steps=num_steps,
                     start_step=start)
  labels = np.concatenate([b['label'] for b in batches])
  p = data.class_sampling_weights(dataset.class_counts, 'progressive' if progress is not None
                                  else sampling, progress=progress or 0.0)
  observed = np.bincount(labels, minlength=5)
  assert stats.chisquare(observed, p * len(labels)).pvalue > 1e-4, (observed, p * len(labels))
  if progress is None:  # and never the instance frequencies (the test has power)
    instance = data.class_sampling_weights(dataset.class_counts, 'instance')
    assert stats.chisquare(observed, instance * len(labels)).pvalue < 1e-10
  # Within its class, every example is equally likely: p_c / n_c per draw.
  idx = np.concatenate([_indices(b) for b in batches])
  train = dataset.splits['train']
  np.testing.assert_array_equal(train.labels[idx], labels)
  per_example = p[train.labels] / dataset.class_counts[train.labels]
  assert stats.chisquare(np.bincount(idx, minlength=77), per_example * len(idx)).pvalue > 1e-4


def test_progressive_moves_from_instance_to_class_balance():
  dataset = _toy()
  early = _batches(dataset, 50, batch_size=77, sampling='progressive', num_steps=100)
  late = _batches(dataset, 50, batch_size=77, sampling='progressive', num_steps=100, start_step=50)
  tail = lambda bs: np.mean(np.concatenate([b['label'] for b in bs]) == 4)
  # Class 4 has 2 / 77 of the data; its mean probability is 0.026 + 0.174 * mean(progress).
  assert 0.05 < tail(early) < 0.09 and 0.13 < tail(late) < 0.18


@pytest.mark.parametrize('sampling, per_class, batch_size', [('over', 40, 20), ('under', 2, 2)])
def test_resampling_balances_every_epoch(sampling, per_class, batch_size):
  dataset = _toy()
  steps_per_epoch = 5 * per_class // batch_size
  batches = _batches(dataset, 3 * steps_per_epoch, batch_size=batch_size, sampling=sampling)
  epochs = [np.concatenate([_indices(b) for b in batches[e * steps_per_epoch:][:steps_per_epoch]])
            for e in range(3)]
  labels = dataset.splits['train'].labels
  pool = data.resampled_indices(labels, sampling, seed=0)
  for order in epochs:
    np.testing.assert_array_equal(np.bincount(labels[order], minlength=5), [per_class] * 5)
    np.testing.assert_array_equal(np.sort(order), pool)  # each epoch is a permutation of the pool
  assert not np.array_equal(epochs[0], epochs[1])
  if sampling == 'over':  # every example kept, minority ones repeated
    assert set(pool) == set(range(77)) and len(pool) == 200
  else:  # a subset without repeats
    assert len(set(pool)) == len(pool) == 10
  assert not np.array_equal(pool, data.resampled_indices(labels, sampling, seed=1))


def test_resampled_indices_ignore_absent_classes_and_name_bad_modes():
  labels = np.array([0, 0, 0, 2, 2, 0])
  for mode, expected in (('under', [2, 0, 2]), ('over', [4, 0, 4])):
    kept = labels[data.resampled_indices(labels, mode, seed=0)]
    np.testing.assert_array_equal(np.bincount(kept), expected)
  with pytest.raises(ValueError, match=r"mode must be one of \('over', 'under'\), got 'both'"):
    data.resampled_indices(labels, 'both', seed=0)


@pytest.mark.parametrize('sampling', data.SAMPLING)
@pytest.mark.parametrize('start_step', [1, 5, 11])
def test_resume_sees_the_same_batches_in_every_mode(sampling, start_step):
  # 'smote' draws from the split SMOTE balanced (class 4 has 2 examples: one neighbour).
  dataset = smote_dataset(_toy(), k_neighbors=1, seed=0) if sampling == 'smote' else _toy()
  kwargs = dict(sampling=sampling, num_steps=10, batch_size=4, seed=7)
  fresh = _batches(dataset, 14, **kwargs)
  resumed = _batches(dataset, 14 - start_step, start_step=start_step, **kwargs)
  for a, b in zip(fresh[start_step:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  other = _batches(dataset, 14 - start_step, start_step=start_step, **dict(kwargs, seed=8))
  assert not all(np.array_equal(a['image'], b['image']) for a, b in zip(resumed, other))


def test_instance_sampling_is_the_default_epoch_permutation(digits):
  _, dataset = digits
  default = _batches(dataset, 12, batch_size=128, seed=3)
  explicit = _batches(dataset, 12, batch_size=128, seed=3, sampling='instance', num_steps=5)
  for a, b in zip(default, explicit):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_train_batches_errors():
  dataset = _toy()
  with pytest.raises(ValueError, match=r"sampling must be one of \('instance', 'class', 'sqrt', "
                                       r"'progressive', 'over', 'under', 'smote'\), got 'balanced'"):
    next(data.train_batches(dataset, 4, seed=0, sampling='balanced'))
  with pytest.raises(ValueError, match="sampling='progressive' needs num_steps >= 1, got None"):
    next(data.train_batches(dataset, 4, seed=0, sampling='progressive'))
  with pytest.raises(ValueError, match=r"batch_size must be in \[1, 10\].*sampling 'under'"):
    next(data.train_batches(dataset, 11, seed=0, sampling='under'))
