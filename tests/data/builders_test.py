"""Tests for the local TFDS builders: exact round trips against scikit-learn and IDX files."""

import fcntl
import gzip
import os
import re
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets
from sklearn import model_selection

from softmax_jax import data
from softmax_jax.data import builders


def _read_all(data_dir, name, split):
  """All records of a prepared split through the public `tfds.data_source` (no TensorFlow)."""
  source = tfds.data_source(name, data_dir=data_dir, split=split, download=False)
  records = [source[i] for i in range(len(source))]
  return (np.stack([r['image'] for r in records]), np.array([r['label'] for r in records]))


def _write_idx(path, array):
  """Writes a uint8 array as a gzipped IDX file (the reference writer for these tests)."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


def _write_fashion(directory, n_train=7, n_test=3, seed=0, bad_label=None):
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  arrays = {}
  for split, n in (('train', n_train), ('test', n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    if bad_label is not None and split == 'train':
      labels[bad_label[1]] = bad_label[0]
    image_file, label_file = builders.FASHION_FILES[split]
    _write_idx(os.path.join(directory, image_file), images)
    _write_idx(os.path.join(directory, label_file), labels)
    arrays[split] = (images, labels)
  return arrays


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  start = time.perf_counter()
  builders.prepare('digits', data_dir=data_dir)
  print(f'digits build: {time.perf_counter() - start:.2f} s')
  return data_dir


def test_digits_round_trip_matches_sklearn(digits_dir):
  sk = sk_datasets.load_digits()
  train_idx, test_idx = model_selection.train_test_split(
      np.arange(1797), test_size=0.2, stratify=sk.target, random_state=0)
  assert (len(train_idx), len(test_idx)) == (1437, 360)
  for split, idx in (('train', np.sort(train_idx)), ('test', np.sort(test_idx))):
    images, labels = _read_all(digits_dir, 'digits', split)
    assert images.shape == (len(idx), 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, sk.target[idx])
    # Stored as round(v * 255 / 16); inverting gives back scikit-learn's 0..16 exactly.
    np.testing.assert_array_equal(images[..., 0], np.round(sk.images[idx] * 255 / 16))
    np.testing.assert_array_equal(np.round(images[..., 0] / 255 * 16), sk.images[idx])
  assert images.max() == 255


def test_digits_split_is_stratified():
  _, labels = builders._digits_arrays()  # pylint: disable=protected-access
  idx = builders.digits_split_indices(labels)
  assert len(np.intersect1d(idx['train'], idx['test'])) == 0
  assert len(idx['train']) + len(idx['test']) == len(labels)
  per_class = np.bincount(labels)
  np.testing.assert_allclose(np.bincount(labels[idx['test']]), 0.2 * per_class, atol=1)


def test_prepare_reuses_a_built_dataset(digits_dir):
  path = os.path.join(digits_dir, 'digits', '1.0.0', 'dataset_info.json')
  before = os.stat(path).st_mtime_ns
  builder = builders.prepare('digits', data_dir=digits_dir)
  assert os.stat(path).st_mtime_ns == before
  assert builder.info.splits['train'].num_examples == 1437


def test_read_idx_round_trip_and_errors(tmp_path):
  array = np.random.default_rng(1).integers(0, 256, (4, 5, 6), dtype=np.uint8)
  _write_idx(tmp_path / 'a.gz', array)
  np.testing.assert_array_equal(builders.read_idx(str(tmp_path / 'a.gz')), array)
  with gzip.open(tmp_path / 'bad.gz', 'wb') as f:
    f.write(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b'\0\0\0\0')  # float32 payload
  with pytest.raises(ValueError, match='not an unsigned-byte IDX'):
    builders.read_idx(str(tmp_path / 'bad.gz'))
  with gzip.open(tmp_path / 'short.gz', 'wb') as f:
    f.write(bytes([0, 0, 0x08, 1, 0, 0, 0, 5]) + b'\1\2')
  with pytest.raises(ValueError, match='needs 5 bytes'):
    builders.read_idx(str(tmp_path / 'short.gz'))


def test_fashion_idx_builder_round_trip(tmp_path):
  arrays = _write_fashion(str(tmp_path / 'src'))
  data_dir = str(tmp_path / 'tfds')
  builder = builders.prepare('fashion_mnist_idx', data_dir=data_dir,
                             source_dir=str(tmp_path / 'src'))
  assert builder.info.features['label'].names[0] == 'T-shirt/top'
  for split, (images, labels) in arrays.items():
    got_images, got_labels = _read_all(data_dir, 'fashion_mnist_idx', split)
    np.testing.assert_array_equal(got_images, images[..., None])
    np.testing.assert_array_equal(got_labels, labels)


def test_fashion_missing_files_say_how_to_get_them(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape('apt-get install -y dataset-fashion-mnist')):
    builders.prepare('fashion_mnist_idx', data_dir=str(tmp_path), source_dir=str(tmp_path / 'no'))
  config = dict(name='fashion_mnist_idx', data_dir=str(tmp_path), source_dir=str(tmp_path / 'no'))
  with pytest.raises(FileNotFoundError, match='source_dir'):
    data.load_dataset(config)


def test_fashion_bad_label_names_dataset_value_and_position(tmp_path):
  _write_fashion(str(tmp_path / 'src'), bad_label=(12, 3))
  expected = "dataset 'fashion_mnist_idx' split 'train': label 12 at position 3 is outside [0, 10)"
  with pytest.raises(ValueError, match=re.escape(expected)):
    builders.prepare('fashion_mnist_idx', data_dir=str(tmp_path / 'tfds'),
                     source_dir=str(tmp_path / 'src'))


_REAL = builders.DEFAULT_FASHION_DIR
_HAVE_REAL = all(os.path.isfile(os.path.join(_REAL, f))
                 for pair in builders.FASHION_FILES.values() for f in pair)
_NO_REAL = f'Fashion-MNIST IDX files absent from {_REAL} (apt-get install -y dataset-fashion-mnist)'


@pytest.mark.skipif(not _HAVE_REAL, reason=_NO_REAL)
def test_real_fashion_idx_files():
  for split, n in (('train', 60000), ('test', 10000)):
    images_path, labels_path = builders.fashion_paths()[split]
    images, labels = builders.read_idx(images_path), builders.read_idx(labels_path)
    assert images.shape == (n, 28, 28) and labels.shape == (n,)
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, n // 10))


@pytest.mark.skipif(not _HAVE_REAL, reason=_NO_REAL)
def test_real_fashion_build_and_load(request, tmp_path):
  """The full 70k build (~10 s here) happens once into pytest's cache; later runs only read it."""
  cache = getattr(request.config, 'cache', None)  # None under `-p no:cacheprovider`.
  cache = str(cache.mkdir('softmax_jax_fashion_tfds') if cache else tmp_path)
  with open(os.path.join(cache, 'lock'), 'w') as lock:  # Other sessions may share the cache.
    fcntl.flock(lock, fcntl.LOCK_EX)
    start = time.perf_counter()
    dataset = data.load_dataset(dict(name='fashion_mnist_idx', data_dir=cache, source_dir=None,
                                     validation_fraction=0.1, split_seed=0))
    print(f'fashion build (if not cached) + load: {time.perf_counter() - start:.1f} s')
  assert {k: len(v) for k, v in dataset.splits.items()} == {
      'train': 54000, 'validation': 6000, 'test': 10000}
  assert dataset.input_shape == (28, 28, 1) and dataset.num_classes == 10
  assert dataset.class_names[-1] == 'Ankle boot'
  np.testing.assert_array_equal(np.bincount(dataset.splits['test'].labels), np.full(10, 1000))
