"""Local TFDS builders (ArrayRecord, no TensorFlow) for data that needs no network.

* `Digits`: scikit-learn's `load_digits` (1,797 images `[8, 8, 1]`, 10 classes). Pixel values 0..16
  are stored as uint8 `round(v * 255 / 16)` (lossless: `v = round(x * 16 / 255)`). Splits are a
  stratified 80/20 `sklearn.model_selection.train_test_split(random_state=0)`:
  train 1,437 / test 360 examples, each in scikit-learn's order.
* `FashionMnistIdx`: Fashion-MNIST from the IDX `.gz` files in a local directory (default: where
  Debian's `dataset-fashion-mnist` installs them), train 60,000 / test 10,000 `[28, 28, 1]`,
  in file order. The IDX files are parsed with gzip + NumPy, so gzip headers do not matter.

Both builders skip the global TFDS registry (their data lives in `data_dir/<name>/<version>` and
`tfds.data_source(name, data_dir=...)` still reads it once prepared) and keep generation order
(`disable_shuffling=True`), so record `i` of a split is example `i` of its source.

Stock TFDS datasets (mnist, cifar10, lm1b, ...) need a network the first time: `prepare_stock`
probes it for a few seconds first and fails with one line saying how to get the data, instead of
TFDS retrying the download for minutes.

Preparation holds an exclusive lock (`preparation_lock`, a `flock` on `data_dir/.<name>.lock`), so
two first runs on a fresh data_dir do not race: the second waits, then finds the data prepared.
"""

import contextlib
import gzip
import io
import os
import threading
import urllib.error
import urllib.request
from typing import Callable, Dict, Optional, Tuple

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

DEFAULT_FASHION_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
FASHION_CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                       'Sneaker', 'Bag', 'Ankle boot')
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def check_labels(labels: np.ndarray, num_classes: int, *, dataset: str, split: str) -> None:
  """Checks on the host that every label lies in `[0, num_classes)`.

  Args:
    labels: `[n]` integer class ids.
    num_classes: the number of classes K.
    dataset: dataset name, for the message.
    split: split name, for the message.

  Raises:
    ValueError: labels that are not a 1-D integer array, or the first label outside `[0, K)`,
      naming the dataset, the split, the value and its position.
  """
  labels = np.asarray(labels)
  where = f"dataset '{dataset}' split '{split}'"
  if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
    raise ValueError(f'{where}: labels must be a 1-D integer array, got shape {labels.shape} '
                     f'dtype {labels.dtype}')
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    i = int(bad[0])
    more = f' ({bad.size} labels out of range in all)' if bad.size > 1 else ''
    raise ValueError(f'{where}: label {int(labels[i])} at position {i} is outside '
                     f'[0, {num_classes}){more}')


def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
  """scikit-learn digits as uint8 images `[1797, 8, 8, 1]` (0..16 -> 0..255) and int labels `[1797]`."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)


def digits_split_indices(labels: np.ndarray) -> Dict[str, np.ndarray]:
  """The fixed stratified split of the digits: sorted indices `{'train': [1437], 'test': [360]}`."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels,
      random_state=DIGITS_SPLIT_SEED)
  return {'train': np.sort(train), 'test': np.sort(test)}


def _features(shape: Tuple[int, int, int], names) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=shape),
      'label': tfds.features.ClassLabel(names=list(names)),
  })


class _ArrayBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared `_generate_examples`: key `i` -> example `i` of `images` `[n, H, W, C]`, `labels` `[n]`."""

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': _png(image), 'label': int(label)}


def _png(image: np.ndarray) -> bytes:
  """Lossless PNG bytes of a uint8 image `[H, W, C]` (PIL: TFDS would need TensorFlow for arrays)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format='PNG')
  return buffer.getvalue()


class Digits(_ArrayBuilder, skip_registration=True):
  """scikit-learn's 8x8 digits: train 1,437 / test 360, `image` `[8, 8, 1]` uint8, `label` 0..9."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Stratified 80/20 split (random_state=0); pixels round(v * 255 / 16).'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='UCI optical digits as shipped by scikit-learn (load_digits).',
        features=_features((8, 8, 1), [str(k) for k in range(10)]),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is inside scikit-learn.
    images, labels = _digits_arrays()
    check_labels(labels, 10, dataset=self.name, split='all')
    return {split: self._generate_examples(images[idx], labels[idx])
            for split, idx in digits_split_indices(labels).items()}


def fashion_paths(source_dir: Optional[str] = None) -> Dict[str, Tuple[str, str]]:
  """Paths `{split: (images.gz, labels.gz)}` of the Fashion-MNIST IDX files in `source_dir`.

  Raises:
    FileNotFoundError: a file is missing; the message says how to install or point to them.
  """
  source_dir = source_dir or DEFAULT_FASHION_DIR
  paths = {s: tuple(os.path.join(source_dir, f) for f in files) for s, files in FASHION_FILES.items()}
  missing = [p for pair in paths.values() for p in pair if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
        f'Fashion-MNIST IDX files not found: {", ".join(missing)}. Install them with '
        '`apt-get install -y dataset-fashion-mnist` (as root), or set config.data.source_dir to a '
        'directory holding ' + ', '.join(f for pair in FASHION_FILES.values() for f in pair) + '.')
  return paths


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped IDX file (uint8 payload) into an array of the shape in its header.

  Args:
    path: an `.gz` IDX file, e.g. `train-images-idx3-ubyte.gz` (`[n, 28, 28]`) or labels (`[n]`).

  Returns:
    uint8 array `[d0, d1, ...]` as declared by the header.
  """
  with gzip.open(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f'{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})')
  ndim = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  offset = 4 + 4 * ndim
  if len(data) - offset != int(np.prod(shape)):
    raise ValueError(f'{path}: header shape {shape} needs {int(np.prod(shape))} bytes, '
                     f'file has {len(data) - offset}')
  return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


class FashionMnistIdx(_ArrayBuilder, skip_registration=True):
  """Fashion-MNIST from local IDX `.gz` files (`manual_dir`): `image` `[28, 28, 1]`, `label` 0..9."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Local IDX files, file order.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'`apt-get install -y dataset-fashion-mnist` puts the IDX files in {DEFAULT_FASHION_DIR}; '
      'or pass any directory holding ' + ', '.join(f for p in FASHION_FILES.values() for f in p)
      + ' as download_config.manual_dir.')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Fashion-MNIST (Xiao et al., 2017) read from local IDX files.',
        features=_features((28, 28, 1), FASHION_CLASS_NAMES),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    paths = fashion_paths(os.fspath(dl_manager.manual_dir))
    generators = {}
    for split, (image_path, label_path) in paths.items():
      images, labels = read_idx(image_path), read_idx(label_path)
      if images.ndim != 3 or images.shape[1:] != (28, 28) or len(labels) != len(images):
        raise ValueError(f'{image_path}: images {images.shape} and labels {labels.shape} do not '
                         'form a [n, 28, 28] / [n] pair')
      check_labels(labels, 10, dataset=self.name, split=split)
      generators[split] = self._generate_examples(images[..., None], labels)
    return generators


LOCAL_BUILDERS = {'digits': Digits, 'fashion_mnist_idx': FashionMnistIdx}


@contextlib.contextmanager
def preparation_lock(data_dir: str, name: str):
  """Holds an exclusive lock on preparing dataset `name` in TFDS `data_dir` (blocks until free).

  Two processes that prepare the same dataset into one data_dir would both write it and the
  second rename would fail (TFDS: `FileExistsError: Cannot rename .../incomplete...`). The lock
  is a `flock` on `data_dir/.<name>.lock`, dropped by the kernel if its holder dies; without
  `fcntl` (Windows) or on a filesystem without flock it is a no-op.
  """
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:
    fcntl = None
  os.makedirs(data_dir, exist_ok=True)
  path = os.path.join(data_dir, '.' + name.replace('/', '_') + '.lock')
  with open(path, 'a') as f:
    if fcntl is not None:
      try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
      except OSError:
        pass  # no flock on this filesystem: unguarded, as TFDS itself
    yield  # closing the file releases the lock


def prepare_once(make_builder: Callable[[], tfds.core.DatasetBuilder], prepare: Callable) -> tfds.core.DatasetBuilder:
  """`make_builder()`, prepared by `prepare(builder)` unless it is; safe against concurrent runs.

  Under `preparation_lock`, a fresh builder is made again, so a preparation finished by another
  process while this one waited is seen and reused.
  """
  builder = make_builder()
  if builder.is_prepared():
    return builder
  with preparation_lock(os.fspath(builder.data_dir_root), builder.name):
    builder = make_builder()
    if not builder.is_prepared():
      prepare(builder)
  return builder


# Where TFDS downloads stock data from first (its GCS mirror), and how long to wait for it.
NETWORK_PROBE_URL = 'https://storage.googleapis.com/'
NETWORK_PROBE_TIMEOUT_S = 4.0


class NoNetworkError(ConnectionError):
  """A stock dataset is not prepared and its download host cannot be reached."""


def network_reachable(timeout: Optional[float] = None) -> bool:
  """Whether an HTTPS request to TFDS's download host gets any answer within `timeout` s.

  A real request (through the proxy of the environment, as TFDS's downloads go), not a bare
  TCP connect, which a sandbox's interceptor may accept without anything behind it. It runs in
  a daemon thread, so neither a hanging name lookup nor a silent proxy outlasts `timeout`
  (None: `NETWORK_PROBE_TIMEOUT_S`).
  """
  timeout = NETWORK_PROBE_TIMEOUT_S if timeout is None else timeout
  ok = []

  def request():
    try:
      urllib.request.urlopen(NETWORK_PROBE_URL, timeout=timeout).close()
      ok.append(True)
    except urllib.error.HTTPError:  # an answer (e.g. 403): the network is there
      ok.append(True)
    except (OSError, ValueError):  # URLError, timeouts, TLS errors, a malformed proxy
      pass
  thread = threading.Thread(target=request, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(ok)


def prepare_stock(builder: tfds.core.DatasetBuilder) -> None:
  """Downloads and prepares stock TFDS dataset `builder`, failing fast when offline.

  For `prepare_once(lambda: tfds.builder(name, data_dir=...), prepare_stock)`.

  Raises:
    NoNetworkError: the download host cannot be reached within `NETWORK_PROBE_TIMEOUT_S`; the
      one-line message says where the data is looked for and how to get it.
  """
  # Under `tfds.testing.mock_data` (our tests', and users') download_and_prepare is a no-op that
  # downloads nothing: no probe then.
  mocked = getattr(builder.download_and_prepare, '__name__', '') == 'mock_download_and_prepare'
  if not mocked and not network_reachable():
    raise NoNetworkError(
        f'{builder.name} is not prepared in {builder.data_dir_root} and downloading it needs a '
        f'network ({NETWORK_PROBE_URL} gave no answer within {NETWORK_PROBE_TIMEOUT_S:g} s): run once '
        f'where there is one (python -c "import tensorflow_datasets as tfds; '
        f'tfds.builder(\'{builder.name}\', data_dir=\'{builder.data_dir_root}\')'
        f'.download_and_prepare()"), then copy that data_dir here and set config.data.data_dir '
        f'to it.')
  builder.download_and_prepare()


def prepare(name: str, *, data_dir: Optional[str] = None,
            source_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """Builds local dataset `name` into `data_dir` on first use and returns its builder.

  Args:
    name: a key of `LOCAL_BUILDERS`.
    data_dir: TFDS data_dir (None: the TFDS default, `~/tensorflow_datasets`).
    source_dir: raw files for `fashion_mnist_idx` (None: `DEFAULT_FASHION_DIR`).

  Returns:
    the prepared builder; read it with `builder.as_data_source(split)`. Once prepared, the data
    in `data_dir` is reused as is: a different `source_dir` needs a different `data_dir`.
    Concurrent first calls prepare it once (`prepare_once`).

  Raises:
    FileNotFoundError: raw files missing (not prepared), or `source_dir` given but not a
      directory (prepared: a mistyped path must not go unnoticed).
  """
  def prepare_builder(builder):
    download_config = None
    if name == 'fashion_mnist_idx':
      raw = source_dir or DEFAULT_FASHION_DIR
      fashion_paths(raw)  # Fails early with install instructions.
      download_config = tfds.download.DownloadConfig(manual_dir=raw)
    # TFDS prints its own two lines to stdout (termcolor), not through a logger: one line of ours.
    logging.info('Preparing %s in %s (once)...', name, builder.data_dir)
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_config=download_config)

  builder = prepare_once(lambda: LOCAL_BUILDERS[name](data_dir=data_dir, file_format='array_record'),
                         prepare_builder)
  if name == 'fashion_mnist_idx' and source_dir is not None and not os.path.isdir(source_dir):
    # Prepared already (else the raw files would have been missing): say so, do not ignore it.
    raise FileNotFoundError(
        f'config.data.source_dir={source_dir!r} is not a directory. {name} is already prepared in '
        f'{builder.data_dir}; leave config.data.source_dir unset (None) to '
        'use that copy, or point it to the folder of the raw files.')
  return builder

