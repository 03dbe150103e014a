"""Tests for load_dataset, the label check, and the train/eval batch iterators."""

import itertools
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from softmax_jax import data

_MOCK = dict(policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  config = dict(name='digits', data_dir=str(tmp_path_factory.mktemp('tfds')), source_dir=None,
                validation_fraction=0.1, split_seed=0)
  return config, data.load_dataset(config)


def _tiny(n, num_classes=3):
  """A dataset whose image `i` is the single pixel value `i`, so batches reveal their indices."""
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
  labels = (np.arange(n) % num_classes).astype(np.int32)
  split = data.Split(images, labels)
  return data.Dataset(name='tiny', num_classes=num_classes, input_shape=(1, 1, 1),
                      splits={'train': split, 'validation': split, 'test': split},
                      mean=np.zeros(1, np.float32), std=np.ones(1, np.float32))


def _indices(batch):
  return np.round(batch['image'][:, 0, 0, 0] * 255).astype(int)


def test_digits_splits(digits):
  config, dataset = digits
  assert {k: len(v) for k, v in dataset.splits.items()} == {
      'train': 1293, 'validation': 144, 'test': 360}
  assert dataset.num_classes == 10 and dataset.input_shape == (8, 8, 1)
  assert dataset.class_names == [str(k) for k in range(10)]
  for split in dataset.splits.values():
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    assert split.images.shape[1:] == (8, 8, 1)
  # The carve partitions the builder's train split: rows of train + validation == the 1,437.
  source = data.builders.prepare('digits', data_dir=config['data_dir']).as_data_source('train')
  reference = np.stack([source[i]['image'] for i in range(len(source))]).reshape(1437, -1)
  carved = np.concatenate([dataset.splits['train'].images, dataset.splits['validation'].images])
  key = lambda x: sorted(map(bytes, x.reshape(len(x), -1)))
  assert key(carved) == key(reference)


def test_validation_carve_depends_only_on_split_seed(digits):
  config, dataset = digits
  again = data.load_dataset(config)
  np.testing.assert_array_equal(again.splits['validation'].images,
                                dataset.splits['validation'].images)
  other = data.load_dataset(dict(config, split_seed=1))
  assert not np.array_equal(other.splits['validation'].images, dataset.splits['validation'].images)
  np.testing.assert_array_equal(other.splits['test'].labels, dataset.splits['test'].labels)


def test_normalization_statistics(digits):
  _, dataset = digits
  train = dataset.splits['train'].images.astype(np.float64) / 255
  np.testing.assert_allclose(dataset.mean, train.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(dataset.std, train.std(axis=(0, 1, 2)), rtol=1e-6)
  x = dataset.normalize(dataset.splits['train'].images)
  assert x.dtype == np.float32 and x.shape == dataset.splits['train'].images.shape
  np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=1e-5)


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match='digits, fashion_mnist_idx, mnist, fashion_mnist, cifar10'):
    data.load_dataset(dict(name='imagenet'))


@pytest.mark.parametrize('name, shape', [('mnist', (28, 28, 1)), ('cifar10', (32, 32, 3))])
def test_stock_datasets_with_mock_data(name, shape):
  with tfds.testing.mock_data(num_examples=40, **_MOCK):
    dataset = data.load_dataset(dict(name=name, data_dir=None, validation_fraction=0.25,
                                     split_seed=0))
  assert dataset.input_shape == shape and dataset.num_classes == 10
  assert {k: len(v) for k, v in dataset.splits.items()} == {
      'train': 30, 'validation': 10, 'test': 40}
  batch = next(data.train_batches(dataset, 8, seed=0))
  assert batch['image'].shape == (8,) + shape and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  assert ((batch['label'] >= 0) & (batch['label'] < 10)).all()


def test_out_of_range_label_at_load_names_dataset_value_position():
  def as_data_source(self, split, **kwargs):
    del self, kwargs
    labels = [1, 2, 3, 4, 5, 12, 0, 10] if split == 'train' else [0, 1]
    return [{'image': np.zeros((28, 28, 1), np.uint8), 'label': np.int64(v)} for v in labels]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source, **_MOCK):
    with pytest.raises(ValueError, match=re.escape(
        "dataset 'mnist' split 'train': label 12 at position 5 is outside [0, 10) "
        '(2 labels out of range in all)')):
      data.load_dataset(dict(name='mnist'))


@pytest.mark.parametrize('labels, message', [
    ([0, 9, -1], 'label -1 at position 2 is outside [0, 10)'),
    ([10, 3], 'label 10 at position 0 is outside [0, 10)'),
])
def test_check_labels(labels, message):
  data.check_labels(np.array([0, 9, 3]), 10, dataset='x', split='test')
  with pytest.raises(ValueError, match=re.escape(f"dataset 'x' split 'test': {message}")):
    data.check_labels(np.array(labels), 10, dataset='x', split='test')
  with pytest.raises(ValueError, match='1-D integer'):
    data.check_labels(np.zeros((2, 2), np.int32), 10, dataset='x', split='test')


def test_train_batches_follow_the_documented_permutation(digits):
  _, dataset = digits
  train, b, seed = dataset.splits['train'], 128, 3
  steps_per_epoch = len(train) // b  # 10
  for step, batch in enumerate(itertools.islice(data.train_batches(dataset, b, seed=seed), 25)):
    e, i = divmod(step, steps_per_epoch)
    idx = np.random.default_rng([seed, e]).permutation(len(train))[i * b:(i + 1) * b]
    np.testing.assert_array_equal(batch['label'], train.labels[idx])
    np.testing.assert_array_equal(batch['image'], dataset.normalize(train.images[idx]))


@pytest.mark.parametrize('start_step', [0, 1, 4, 5, 6, 11])
def test_resume_sees_the_same_batches(start_step):
  dataset = _tiny(13)  # 3 steps per epoch of 4, one example dropped each epoch.
  fresh = list(itertools.islice(data.train_batches(dataset, 4, seed=7), 14))
  resumed = list(itertools.islice(
      data.train_batches(dataset, 4, seed=7, start_step=start_step), 14 - start_step))
  for a, b in zip(fresh[start_step:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  other = next(data.train_batches(dataset, 4, seed=8, start_step=start_step))
  assert not np.array_equal(other['image'], resumed[0]['image'])


def test_every_example_once_per_epoch():
  dataset = _tiny(12)
  batches = list(itertools.islice(data.train_batches(dataset, 4, seed=0), 9))
  epochs = [np.concatenate([_indices(b) for b in batches[e * 3:(e + 1) * 3]]) for e in range(3)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(12))
  assert not np.array_equal(epochs[0], epochs[1])
  dropped = list(itertools.islice(data.train_batches(_tiny(14), 4, seed=0), 3))
  assert len(set(np.concatenate([_indices(b) for b in dropped]))) == 12


def test_batch_size_larger_than_train_raises():
  with pytest.raises(ValueError, match='batch_size'):
    next(data.train_batches(_tiny(5), 6, seed=0))


@pytest.mark.parametrize('n, batch_size', [(10, 4), (8, 4), (3, 5)])
def test_eval_batches_pad_and_mask(n, batch_size):
  dataset = _tiny(n)
  batches = list(data.eval_batches(dataset, 'test', batch_size))
  assert len(batches) == -(-n // batch_size)
  for batch in batches:
    assert batch['image'].shape == (batch_size, 1, 1, 1) and batch['mask'].dtype == bool
    assert (batch['label'][~batch['mask']] == 0).all()
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(len(mask)) < n)
  np.testing.assert_array_equal(np.concatenate([_indices(b) for b in batches])[mask], np.arange(n))
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[mask],
                                dataset.splits['test'].labels)


def test_eval_batches_on_digits(digits):
  _, dataset = digits
  batches = list(data.eval_batches(dataset, 'test', 128))
  assert len(batches) == 3 and sum(int(b['mask'].sum()) for b in batches) == 360
  with pytest.raises(ValueError, match="no split 'dev'"):
    next(data.eval_batches(dataset, 'dev', 128))


def test_keep_classes_relabels_in_the_given_order(digits):
  config, full = digits
  subset = data.load_dataset(dict(config, classes=(7, 2, 5)))
  assert subset.num_classes == 3 and subset.class_names == ['7', '2', '5']
  for split in ('train', 'validation', 'test'):
    labels = subset.splits[split].labels
    assert set(np.unique(labels)) == {0, 1, 2}
  test, sub_test = full.splits['test'], subset.splits['test']
  for new, old in enumerate((7, 2, 5)):  # the same images, in source order, under the new label
    np.testing.assert_array_equal(sub_test.images[sub_test.labels == new], test.images[test.labels == old])
  n_train = sum((full.splits[s].labels[:, None] == [7, 2, 5]).any(1).sum() for s in ('train', 'validation'))
  assert len(subset.splits['train']) + len(subset.splits['validation']) == n_train


@pytest.mark.parametrize('classes', [(3,), (1, 1), (0, 10), (-1, 2)])
def test_bad_classes_are_named(digits, classes):
  config, _ = digits
  with pytest.raises(ValueError, match=r'data.classes must be >= 2 distinct class ids in \[0, 10\)'):
    data.load_dataset(dict(config, classes=classes))


def test_stock_dataset_is_prepared_once_by_concurrent_first_runs(tmp_path, monkeypatch):
  """Stock TFDS datasets go through `builders.prepare_once` too: three first runs, one download."""
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from softmax_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  state = {'prepared': False, 'calls': 0}

  class FakeBuilder:  # stands in for tfds.builder('mnist'): no network
    name, data_dir_root = 'mnist', str(tmp_path)

    def is_prepared(self):
      return state['prepared']

    def download_and_prepare(self):
      state['calls'] += 1
      time.sleep(0.3)
      state['prepared'] = True

    @property
    def info(self):
      raise LookupError('stop after preparing')

  monkeypatch.setattr(pipeline.tfds, 'builder', lambda name, data_dir=None: FakeBuilder())
  monkeypatch.setattr(pipeline.builders, 'network_reachable', lambda *a, **k: True)  # the lock's test
  errors = []

  def first_run():
    try:
      pipeline.load_dataset(dict(name='mnist', data_dir=str(tmp_path)))
    except LookupError as e:
      errors.append(e)

  threads = [threading.Thread(target=first_run) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(errors) == 3 and state == {'prepared': True, 'calls': 1}
