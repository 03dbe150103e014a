"""Input pipeline: TFDS data sources -> host NumPy splits -> deterministic batches.

Everything lives in host memory as raw uint8 (the datasets here are at most CIFAR-sized);
batches are normalized on the fly. The batch of training step `s` is a pure function of
`(seed, s)`, so a run resumed at step `s` sees exactly the batches of an uninterrupted run.
"""

import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds

from softmax_jax.data import builders, longtail

# Stock TFDS datasets (need a network the first time) and the splits they ship.
STOCK_SPLITS = {name: ('train', 'test') for name in ('mnist', 'fashion_mnist', 'cifar10', 'cifar100')}
KNOWN_DATASETS = tuple(builders.LOCAL_BUILDERS) + tuple(STOCK_SPLITS)
_LOCAL_SPLITS = ('train', 'test')
_READ_CHUNK = 4096
# 'smote': batches as for 'instance' from a train split balanced once by `smote.smote_dataset`.
SAMPLING = longtail.CLASS_SAMPLING + longtail.RESAMPLING + ('smote',)


@dataclasses.dataclass
class Split:
  """One split in host memory.

  Attributes:
    images: `[n, H, W, C]` uint8, raw pixels; float32 pixel values in [0, 255] for a train split
      with SMOTE's synthetic examples (`smote.smote_dataset`).
    labels: `[n]` int32 class ids in `[0, num_classes)`.
  """
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass
class Dataset:
  """A classification dataset with 'train', 'validation' and 'test' splits.

  Attributes:
    name: dataset name, as in `config.name`.
    num_classes: the number of classes K.
    input_shape: `(H, W, C)` of one image.
    splits: 'train', 'validation', 'test' -> `Split`.
    mean: `[C]` float32 per-channel mean of train pixels scaled to [0, 1].
    std: `[C]` float32 per-channel standard deviation of the same (1 where it is 0).
    class_names: K names, or None.
    num_synthetic: how many of the last train examples are synthetic (`smote.smote_dataset`).
  """
  name: str
  num_classes: int
  input_shape: Tuple[int, int, int]
  splits: Dict[str, Split]
  mean: np.ndarray
  std: np.ndarray
  class_names: Optional[List[str]] = None
  num_synthetic: int = 0

  def normalize(self, images_uint8: np.ndarray) -> np.ndarray:
    """Maps pixels `[..., H, W, C]` (uint8, or float in [0, 255]) to float32 `(x / 255 - mean) / std`."""
    x = np.asarray(images_uint8, np.float32) * np.float32(1.0 / 255.0)
    return (x - self.mean) / self.std

  @property
  def class_counts(self) -> np.ndarray:
    """`[K]` int64 number of real training examples of each class (synthetic ones left out)."""
    labels = self.splits['train'].labels
    return np.bincount(labels[:len(labels) - self.num_synthetic], minlength=self.num_classes)


check_labels = builders.check_labels


def _field(config: Any, key: str, default: Any = None) -> Any:
  if isinstance(config, dict):
    return config.get(key, default)
  return getattr(config, key, default)


def _read(source, *, shape: Tuple[int, ...], dataset: str, split: str) -> Split:
  """Reads every record of a data source (`__getitems__` in chunks when it has it) into NumPy."""
  n = len(source)
  images = np.empty((n,) + tuple(shape), np.uint8)
  labels = np.empty((n,), np.int64)
  for start in range(0, n, _READ_CHUNK):
    keys = list(range(start, min(n, start + _READ_CHUNK)))
    try:
      records = source.__getitems__(keys)  # Batched ArrayRecord reads.
    except (AttributeError, TypeError):  # Plain sequences; `tfds.testing.mock_data` (4.9.10).
      records = [source[k] for k in keys]
    for i, record in zip(keys, records):
      image = np.asarray(record['image'])
      if image.shape != images.shape[1:] or image.dtype != np.uint8:
        raise ValueError(f"dataset '{dataset}' split '{split}': image at position {i} is "
                         f'{image.dtype}{list(image.shape)}, expected uint8{list(shape)}')
      images[i] = image
      labels[i] = record['label']
  return Split(images, labels)


def _carve(train: Split, fraction: float, seed: int) -> Tuple[Split, Split]:
  """Splits `round(fraction * n)` random examples (rng `seed`) off train; both keep source order."""
  n = len(train)
  n_val = int(round(fraction * n))
  if not 0.0 <= fraction < 1.0 or n_val >= n:
    raise ValueError(f'validation_fraction must be in [0, 1) and leave training examples, got '
                     f'{fraction} of {n}')
  perm = np.random.default_rng(seed).permutation(n)
  val, rest = np.sort(perm[:n_val]), np.sort(perm[n_val:])
  take = lambda idx: Split(train.images[idx], train.labels[idx])
  return take(rest), take(val)


def _channel_stats(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Exact per-channel mean and std `[C]` of uint8 `images / 255`, summed in int64 chunks."""
  channels = images.shape[-1]
  total = np.zeros(channels, np.int64)
  total_sq = np.zeros(channels, np.int64)
  count = 0
  for start in range(0, len(images), _READ_CHUNK):
    x = images[start:start + _READ_CHUNK].reshape(-1, channels).astype(np.int64)
    total += x.sum(0)
    total_sq += (x * x).sum(0)
    count += len(x)
  mean = total / max(count, 1)
  var = np.maximum(total_sq / max(count, 1) - mean * mean, 0.0)
  std = np.sqrt(var) / 255.0
  return (mean / 255.0).astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def _keep_classes(splits: Dict[str, Split], classes, num_classes: int, dataset: str) -> Dict[str, Split]:
  """Keeps the examples of `classes` (distinct ids) in every split; class `classes[i]` becomes i."""
  ids = [int(c) for c in classes]
  if len(ids) < 2 or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= num_classes:
    raise ValueError(f"data.classes must be >= 2 distinct class ids in [0, {num_classes}) of "
                     f"'{dataset}'; got {tuple(classes)}")
  relabel = np.full(num_classes, -1, np.int32)
  relabel[ids] = np.arange(len(ids), dtype=np.int32)
  out = {}
  for name, split in splits.items():
    keep = relabel[split.labels] >= 0
    out[name] = Split(split.images[keep], relabel[split.labels[keep]])
  return out


def load_dataset(config: Any) -> Dataset:
  """Loads a dataset into host memory with train/validation/test splits.

  Local builders (`digits`, `fashion_mnist_idx`) are built into `data_dir` on first use; stock
  datasets are read with TFDS data sources (`tfds.data_source`), downloaded if not prepared
  (`builders.prepare_stock`: offline, that fails in seconds with one line on how to get them).
  A split named 'validation' is used when the source has one; otherwise `validation_fraction` of
  train is carved off with `split_seed`. Labels of every source split are checked on the host.

  Args:
    config: attributes (or dict keys) `name` (one of `KNOWN_DATASETS`), `data_dir` (None: TFDS
      default), `source_dir` (fashion_mnist_idx raw files; None: Debian's path),
      `validation_fraction` (default 0.1), `split_seed` (default 0), `classes` (None: all; else
      the class ids to keep, relabelled 0.. in the given order, e.g. to hold classes out for
      open-set evaluation), `imbalance_ratio` (default 1: train unchanged; r > 1: train is cut
      to `longtail.make_long_tailed` counts, from the smallest class count down by r),
      `imbalance_profile` ('exponential' (default) or 'step') and `imbalance_seed` (default 0).
      The long-tailed cut applies to train only, after the validation carve and `classes`, so
      validation and test keep their class balance.

  Returns:
    the `Dataset`; mean/std are computed on its final train split.

  Raises:
    ValueError: unknown name, a label outside `[0, num_classes)`, or a bad imbalance option.
    FileNotFoundError: fashion_mnist_idx files missing (says how to install them).
    builders.NoNetworkError: a stock dataset not prepared in `data_dir`, and no network.
  """
  name = _field(config, 'name')
  data_dir = _field(config, 'data_dir')
  if name in builders.LOCAL_BUILDERS:
    builder = builders.prepare(name, data_dir=data_dir, source_dir=_field(config, 'source_dir'))
    split_names = _LOCAL_SPLITS
  elif name in STOCK_SPLITS:
    # Downloaded and prepared once, also when several first runs share a fresh data_dir.
    builder = builders.prepare_once(lambda: tfds.builder(name, data_dir=data_dir),
                                    builders.prepare_stock)
    split_names = STOCK_SPLITS[name]
  else:
    raise ValueError(f'Unknown dataset {name!r}; known datasets: {", ".join(KNOWN_DATASETS)}')

  label_feature = builder.info.features['label']
  num_classes = int(label_feature.num_classes)
  shape = tuple(int(d) for d in builder.info.features['image'].shape)
  splits = {}
  for split in split_names:
    splits[split] = _read(builder.as_data_source(split=split), shape=shape, dataset=name,
                          split=split)
    check_labels(splits[split].labels, num_classes, dataset=name, split=split)
    splits[split].labels = splits[split].labels.astype(np.int32)
  names = getattr(label_feature, 'names', None)
  names = list(names) if names else None
  classes = _field(config, 'classes')
  if classes is not None:
    splits = _keep_classes(splits, classes, num_classes, name)
    num_classes = len(classes)
    names = [names[int(c)] for c in classes] if names else None
  if 'validation' not in splits:
    splits['train'], splits['validation'] = _carve(
        splits['train'], float(_field(config, 'validation_fraction', 0.1)),
        int(_field(config, 'split_seed', 0)))
  ratio = float(_field(config, 'imbalance_ratio', 1.0))
  if ratio != 1.0:
    splits['train'] = longtail.make_long_tailed(
        splits['train'], ratio, profile=_field(config, 'imbalance_profile', 'exponential'),
        seed=int(_field(config, 'imbalance_seed', 0)), num_classes=num_classes)
  splits = {k: splits[k] for k in ('train', 'validation', 'test')}
  mean, std = _channel_stats(splits['train'].images)
  return Dataset(name=name, num_classes=num_classes, input_shape=shape, splits=splits,
                 mean=mean, std=std, class_names=names)


def train_batches(dataset: Dataset, batch_size: int, *, seed: int, start_step: int = 0,
                  sampling: str = 'instance', num_steps: Optional[int] = None) -> Iterator[Dict]:
  """Infinite training batches: `train_indices`' examples, normalized on the host.

  Yields:
    `{'image': [B, H, W, C] float32 normalized, 'label': [B] int32}`.
  """
  train = dataset.splits['train']
  for idx in train_indices(dataset, batch_size, seed=seed, start_step=start_step,
                           sampling=sampling, num_steps=num_steps):
    yield {'image': dataset.normalize(train.images[idx]), 'label': train.labels[idx]}


def train_indices(dataset: Dataset, batch_size: int, *, seed: int, start_step: int = 0,
                  sampling: str = 'instance', num_steps: Optional[int] = None) -> Iterator[np.ndarray]:
  """Infinite training batches as example indices; the batch of step `s` depends only on `(seed, s)`.

  'instance' (and 'over', 'under' over their resampled index list of length n, and 'smote' over
  the train split that `smote.smote_dataset` balanced, its synthetic examples included): step `s` is
  batch `s % steps_per_epoch` of epoch `e = s // steps_per_epoch` under the permutation
  `np.random.default_rng([seed, e]).permutation(n)`, `steps_per_epoch = n // B` (the remainder
  of each epoch is dropped). 'over'/'under' first resample the train split once with
  `longtail.resampled_indices(labels, sampling, seed=seed)` (Buda et al. 2018).
  'class', 'sqrt', 'progressive' (Kang et al. 2020): step `s` draws B examples i.i.d. with
  `np.random.default_rng([seed, s])`, classes from `longtail.class_sampling_weights` (progress
  `min(s / num_steps, 1)`), then a uniform example of each drawn class.

  Args:
    dataset: the dataset; its 'train' split is used.
    batch_size: B, at most the number of training examples (after resampling).
    seed: non-negative shuffling seed.
    start_step: first step to yield (resume).
    sampling: one of `SAMPLING` ('instance', 'class', 'sqrt', 'progressive', 'over', 'under',
      'smote').
    num_steps: T, the length of training; required by 'progressive'.

  Yields:
    `[B]` int indices into the train split, one array per step.

  Raises:
    ValueError: a bad option; 'smote' on a train split that `smote.smote_dataset` did not balance.
  """
  train = dataset.splits['train']
  if sampling not in SAMPLING:
    raise ValueError(f'sampling must be one of {SAMPLING}, got {sampling!r}')
  if sampling == 'progressive' and (num_steps is None or num_steps < 1):
    raise ValueError(f"sampling='progressive' needs num_steps >= 1, got {num_steps!r}")
  if seed < 0 or start_step < 0:
    raise ValueError(f'seed and start_step must be >= 0, got {seed} and {start_step}')
  pool = None
  if sampling == 'smote':
    counts = np.bincount(train.labels)
    if len(set(counts[counts > 0].tolist())) > 1:
      raise ValueError(f"sampling='smote' draws from a train split balanced by "
                       f'softmax_jax.data.smote.smote_dataset (ClassificationTask applies it); '
                       f"'{dataset.name}' has class counts {counts.tolist()}")
  if sampling in ('instance', 'smote'):
    pool = np.arange(len(train))
  elif sampling in longtail.RESAMPLING:
    pool = longtail.resampled_indices(train.labels, sampling, seed=seed)
  n = len(train) if pool is None else len(pool)
  if not 1 <= batch_size <= n:
    raise ValueError(f'batch_size must be in [1, {n}] (training examples of '
                     f"'{dataset.name}' with sampling {sampling!r}), got {batch_size}")
  if pool is None:  # Class-aware i.i.d. sampling.
    draw, counts = longtail.class_sampler(train.labels, dataset.num_classes), dataset.class_counts
  steps_per_epoch = n // batch_size
  step, epoch, perm = start_step, -1, None
  while True:
    if pool is None:
      progress = min(step / num_steps, 1.0) if sampling == 'progressive' else 0.0
      weights = longtail.class_sampling_weights(counts, sampling, progress=progress)
      idx = draw(weights, batch_size, np.random.default_rng([seed, step]))
    else:
      e, i = divmod(step, steps_per_epoch)
      if e != epoch:
        epoch, perm = e, pool[np.random.default_rng([seed, e]).permutation(n)]
      idx = perm[i * batch_size:(i + 1) * batch_size]
    yield idx
    step += 1


def eval_batches(dataset: Dataset, split: str,
                 batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
  """One ordered pass over a split in fixed-shape batches; the last one is padded.

  Args:
    dataset: the dataset.
    split: 'train', 'validation' or 'test'.
    batch_size: B.

  Yields:
    `{'image': [B, H, W, C] float32, 'label': [B] int32, 'mask': [B] bool}`; padding rows have
    `mask` False, label 0 and zero pixels (before normalization).
  """
  if split not in dataset.splits:
    raise ValueError(f"dataset '{dataset.name}' has no split {split!r}; it has "
                     f'{sorted(dataset.splits)}')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  data = dataset.splits[split]
  for start in range(0, len(data), batch_size):
    images = data.images[start:start + batch_size]
    labels = data.labels[start:start + batch_size]
    k = len(labels)
    if k < batch_size:
      images = np.concatenate([images, np.zeros((batch_size - k,) + images.shape[1:], np.uint8)])
      labels = np.concatenate([labels, np.zeros((batch_size - k,), np.int32)])
    yield {'image': dataset.normalize(images), 'label': labels,
           'mask': np.arange(batch_size) < k}
