"""SMOTE oversampling of a train split in input space (imbalanced-learn), once, on the host.

SMOTE (Chawla et al. 2002) balances a long-tailed train split with synthetic examples: each one
is `x_i + lam (x_j - x_i)` for a real example `x_i` of a class to grow, `x_j` one of its k nearest
neighbours within the class (Euclidean) and `lam ~ U[0, 1)`. Here `x` is the flattened
*normalized* image (`Dataset.normalize`, what the model sees), so neighbours are those of the
model's input; the synthetic examples are mapped back to (unrounded, float32) pixel values so the
split keeps one representation. Every class grows to the largest class count.
"""

import dataclasses
from typing import Any

from absl import logging
import numpy as np


def check_class_sizes(counts, k: int, *, setting: str = 'k_neighbors', also: str = '') -> None:
  """Raises ValueError unless every class SMOTE grows has k + 1 examples (k neighbours besides itself).

  Args:
    counts: `[K]` examples per class; SMOTE grows every non-empty class below the largest.
    k: the neighbours SMOTE interpolates towards.
    setting: the name of the option that sets k, named in the error with the value to lower it to.
    also: words appended to that advice (e.g. 'or the imbalance ratio').
  """
  counts = np.asarray(counts)
  target = counts.max() if counts.size else 0
  short = np.flatnonzero((counts > 0) & (counts < target) & (counts < k + 1))
  if len(short):
    c = int(short[0])
    named = '' if setting == 'k_neighbors' else f' ({setting})'
    raise ValueError(
        f'SMOTE with k_neighbors={k}{named} needs at least k + 1 = {k + 1} examples in every class '
        f'it grows; class {c} has {counts[c]} (class counts {counts.tolist()}). Lower {setting} to '
        f'at most {counts[short].min() - 1}{" " + also if also else ""}.')


def smote_dataset(dataset: Any, *, k_neighbors: int = 5, seed: int = 0) -> Any:
  """A copy of `dataset` whose train split is balanced by SMOTE (`imblearn.over_sampling.SMOTE`).

  The new train split is the real examples (unchanged, in their order) followed by the synthetic
  ones (imbalanced-learn's order: class by class), `dataset.num_synthetic` of them. Its images
  are float32 pixel values in [0, 255] (real ones exact integers), which `Dataset.normalize`
  maps as it maps uint8, bit for bit for the real examples. Mean, std, validation and test are
  unchanged, and `Dataset.class_counts` stays the count of *real* examples, so heads' class
  priors and long-tail metrics see the real distribution. Deterministic: the same `(dataset,
  k_neighbors, seed)` gives the same synthetic examples. A dataset already resampled is
  resampled again from its real examples only.

  Args:
    dataset: a `pipeline.Dataset`; its 'train' split `[n, H, W, C]` is resampled.
    k_neighbors: k >= 1, the neighbours each synthetic example may be drawn towards
      (`config.data.smote_neighbors`).
    seed: `random_state` of SMOTE, an integer in [0, 2**32) (`config.seed`).

  Returns:
    the new `Dataset` (`dataclasses.replace`); the input is not modified.

  Raises:
    ValueError: a bad `k_neighbors` or `seed`, or a class to oversample with fewer than k + 1
      real examples (SMOTE needs k neighbours besides the example itself), naming
      `config.data.smote_neighbors`.

  References:
    Chawla, Bowyer, Hall and Kegelmeyer, "SMOTE: Synthetic Minority Over-sampling Technique",
    JAIR 16, 2002. Lemaître, Nogueira and Aridas, "Imbalanced-learn", JMLR 18, 2017.
  """
  if isinstance(k_neighbors, bool) or int(k_neighbors) != k_neighbors or k_neighbors < 1:
    raise ValueError(f'k_neighbors (config.data.smote_neighbors) must be an integer >= 1, got '
                     f'{k_neighbors!r}.')
  if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed < 2**32:
    raise ValueError(f'seed (config.seed) must be an integer in [0, 2**32) for SMOTE, got {seed!r}.')
  k, seed = int(k_neighbors), int(seed)
  train = dataset.splits['train']
  n_real = len(train) - int(getattr(dataset, 'num_synthetic', 0))
  images, labels = train.images[:n_real], train.labels[:n_real]
  counts = np.bincount(labels, minlength=dataset.num_classes)
  target = counts.max()
  check_class_sizes(counts, k, setting='config.data.smote_neighbors', also='or the imbalance ratio')
  shape = images.shape[1:]
  x = dataset.normalize(images).reshape(n_real, -1)  # float32, what the model sees
  if (counts[counts > 0] == target).all():
    resampled, new_labels = x, labels
  else:
    from imblearn.over_sampling import SMOTE  # pylint: disable=g-import-not-at-top  (imports sklearn)
    resampled, new_labels = SMOTE(k_neighbors=k, random_state=seed).fit_resample(x, labels)
  synthetic = resampled[n_real:].reshape((-1,) + shape).astype(np.float64)
  pixels = np.clip((synthetic * dataset.std + dataset.mean) * 255.0, 0.0, 255.0).astype(np.float32)
  new_images = np.concatenate([images.astype(np.float32), pixels])
  logging.info('SMOTE (k=%d, seed=%d): %d real + %d synthetic training examples, %d a class.',
               k, seed, n_real, len(pixels), target)
  new_train = type(train)(new_images, np.asarray(new_labels, np.int32))
  return dataclasses.replace(dataset, splits={**dataset.splits, 'train': new_train},
                             num_synthetic=len(pixels))
