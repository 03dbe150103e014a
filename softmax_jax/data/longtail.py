"""Long-tailed splits and class-aware sampling (host NumPy).

A long-tailed train split keeps `n_i` examples of class `i`, decaying from class 0 (the head)
to class C-1 (the tail) with `n_0 / n_{C-1}` = the imbalance ratio (Cao et al. 2019, "Learning
Imbalanced Datasets with Label-Distribution-Aware Margin Loss"; Cui et al. 2019, "Class-Balanced
Loss Based on Effective Number of Samples"). Samplers rebalance what the model sees: class
probabilities `p_c ∝ n_c^q` with q = 1 (instance), 0 (class), 1/2 (square root) or a
progressive blend (Kang et al. ICLR 2020, "Decoupling Representation and Classifier for
Long-Tailed Recognition"); or the dataset is resampled once, over or under (Buda et al. 2018,
"A systematic study of the class imbalance problem in convolutional neural networks").
"""

from typing import Callable, Optional

import numpy as np

PROFILES = ('exponential', 'step')
CLASS_SAMPLING = ('instance', 'class', 'sqrt', 'progressive')
RESAMPLING = ('over', 'under')


def _ints(values, name: str) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
    raise ValueError(f'{name} must be 1-D integers, got {values.dtype}{list(values.shape)}')
  if (values < 0).any():
    raise ValueError(f'{name} must be non-negative, got minimum {values.min()}')
  return values


def long_tailed_counts(max_count: int, num_classes: int, imbalance_ratio: float,
                       profile: str = 'exponential') -> np.ndarray:
  """Per-class example counts of a long-tailed split; class 0 is the most frequent.

  exponential: `n_i = int(max_count * r^(-i / (C - 1)))` (Cao et al. 2019, `img_max *
  imb_factor**(i / (C - 1))` with `imb_factor = 1 / r`). step (Buda et al. 2018; Cao et al. 2019):
  the first `C // 2` classes keep `max_count`, the other `C - C // 2` get `int(max_count / r)`.

  Args:
    max_count: `n_0` >= 1, the count of the most frequent class.
    num_classes: C >= 2.
    imbalance_ratio: r = n_0 / n_{C-1} >= 1 (1: balanced), at most `max_count` so every class
      keeps an example.
    profile: 'exponential' or 'step'.

  Returns:
    `[C]` int64 counts, non-increasing, `n_0 = max_count`.

  Raises:
    ValueError: naming the argument that is out of range.
  """
  if int(max_count) != max_count or max_count < 1:
    raise ValueError(f'max_count must be an integer >= 1, got {max_count!r}')
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f'num_classes must be an integer >= 2, got {num_classes!r}')
  ratio = float(imbalance_ratio)
  if not 1.0 <= ratio <= max_count:  # Also rejects NaN.
    raise ValueError(f'imbalance_ratio must be in [1, max_count={max_count}] (>= 1 so class 0 is '
                     f'the largest, <= max_count so the rarest class keeps an example), got '
                     f'{imbalance_ratio!r}')
  max_count, num_classes = int(max_count), int(num_classes)
  factor = 1.0 / ratio
  if profile == 'exponential':
    counts = [int(max_count * factor**(i / (num_classes - 1.0))) for i in range(num_classes)]
  elif profile == 'step':
    head = num_classes // 2
    counts = [max_count] * head + [int(max_count * factor)] * (num_classes - head)
  else:
    raise ValueError(f'profile must be one of {PROFILES}, got {profile!r}')
  return np.maximum(np.array(counts, np.int64), 1)  # max(1, .) only guards float round-off.


def make_long_tailed(split, imbalance_ratio: float, *, profile: str = 'exponential', seed: int = 0,
                     num_classes: Optional[int] = None, max_count: Optional[int] = None):
  """Subsamples a split to the long-tailed counts of `long_tailed_counts`.

  Class c keeps `n_c` of its examples, the first `n_c` of a shuffle of its indices (one
  `np.random.default_rng(seed)` shuffling classes 0, 1, ... in turn); the kept examples stay
  in source order. Note that ratio 1 balances every class down to `max_count`.

  Args:
    split: a `Split` with `images [n, ...]` and `labels [n]` int class ids.
    imbalance_ratio: r >= 1, `n_0 / n_{C-1}`.
    profile: 'exponential' or 'step'.
    seed: which examples are kept.
    num_classes: C (None: `max(labels) + 1`).
    max_count: `n_0` (None: the smallest class count of `split`, so every class has its quota).

  Returns:
    a new `Split` with `[sum(n_c), ...]` images and labels.

  Raises:
    ValueError: a bad ratio or profile, or a class with fewer examples than its quota.
  """
  labels = _ints(split.labels, 'split.labels')
  if not len(labels):
    raise ValueError('split must have examples, got an empty split')
  num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
  have = np.bincount(labels, minlength=num_classes)
  if len(have) > num_classes:
    raise ValueError(f'split.labels must be < num_classes={num_classes}, got {labels.max()}')
  max_count = int(have.min()) if max_count is None else int(max_count)
  quota = long_tailed_counts(max_count, num_classes, imbalance_ratio, profile)
  short = np.flatnonzero(have < quota)
  if len(short):
    c = int(short[0])
    raise ValueError(f'class {c} has {have[c]} examples, fewer than its quota {quota[c]} '
                     f'(max_count={max_count}, imbalance_ratio={imbalance_ratio}, {profile})')
  rng = np.random.default_rng(seed)
  keep = [rng.permutation(np.flatnonzero(labels == c))[:quota[c]] for c in range(num_classes)]
  keep = np.sort(np.concatenate(keep))
  return type(split)(split.images[keep], split.labels[keep])


def class_sampling_weights(class_counts, mode: str, *, progress: float = 0.0) -> np.ndarray:
  """Probabilities of drawing each class, `p_c ∝ n_c^q` (Kang et al. 2020, eq. 1 and 2).

  'instance': q = 1, `p_c = n_c / n` (what uniform example sampling does). 'class': q = 0,
  uniform over the classes that have examples. 'sqrt': q = 1/2. 'progressive':
  `(1 - t) p^instance + t p^class` with `t = progress` (Kang's t / T). Classes with no examples
  always get 0.

  Args:
    class_counts: `[C]` non-negative integer counts `n_c`, not all 0.
    mode: one of `CLASS_SAMPLING`.
    progress: t in [0, 1], only read by 'progressive'.

  Returns:
    `[C]` float64 probabilities summing to 1.

  Raises:
    ValueError: bad counts, mode or progress.
  """
  counts = _ints(class_counts, 'class_counts').astype(np.float64)
  if counts.sum() <= 0:
    raise ValueError(f'class_counts must have a positive total, got {class_counts!r}')
  instance = counts / counts.sum()
  balanced = (counts > 0) / np.count_nonzero(counts)
  if mode == 'instance':
    return instance
  if mode == 'class':
    return balanced
  if mode == 'sqrt':
    root = np.sqrt(counts)
    return root / root.sum()
  if mode == 'progressive':
    if not 0.0 <= progress <= 1.0:
      raise ValueError(f'progress must be in [0, 1], got {progress!r}')
    return (1.0 - progress) * instance + progress * balanced
  raise ValueError(f'mode must be one of {CLASS_SAMPLING}, got {mode!r}')


def class_sampler(labels, num_classes: Optional[int] = None) -> Callable[..., np.ndarray]:
  """Returns `draw(class_weights, batch_size, rng) -> [B] int64` indices into `labels`.

  `draw` picks B examples i.i.d. with replacement: classes from `class_weights` (`[C]`, e.g.
  `class_sampling_weights`) with `rng.choice`, then a uniform example of each drawn class with
  `rng.integers`. The grouping of indices by class is computed once, here.

  Args:
    labels: `[n]` int class ids.
    num_classes: C (None: `max(labels) + 1`).

  Raises:
    ValueError: (from `draw`) weights of the wrong length, or > 0 for a class without examples.
  """
  labels = _ints(labels, 'labels')
  counts = np.bincount(labels, minlength=0 if num_classes is None else num_classes)
  order = np.argsort(labels, kind='stable')  # Indices grouped by class, each group in source order.
  starts = np.cumsum(counts) - counts

  def draw(class_weights, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    weights = np.asarray(class_weights, np.float64)
    if weights.shape != counts.shape or ((counts == 0) & (weights > 0)).any():
      raise ValueError(f'class_weights must be [{len(counts)}] and 0 for classes without '
                       f'examples; got {weights} for class counts {counts}')
    classes = rng.choice(len(counts), size=batch_size, p=weights)
    return order[starts[classes] + rng.integers(0, counts[classes])]

  return draw


def resampled_indices(labels, mode: str, *, seed: int) -> np.ndarray:
  """Dataset-level random over- or undersampling to equal class counts (Buda et al. 2018).

  'over': every example of class c once, plus `max_c n_c - n_c` of them drawn with replacement.
  'under': `min_c n_c` examples of each class, drawn without replacement. Classes absent from
  `labels` are ignored. One `np.random.default_rng(seed)` serves classes 0, 1, ... in turn.

  Args:
    labels: `[n]` int class ids.
    mode: 'over' or 'under'.
    seed: the resampling seed.

  Returns:
    `[k * m]` int64 indices into `labels`, sorted, for the k present classes and m the largest
    ('over') or smallest ('under') class count; 'over' repeats indices.

  Raises:
    ValueError: unknown mode or bad labels.
  """
  labels = _ints(labels, 'labels')
  if mode not in RESAMPLING:
    raise ValueError(f'mode must be one of {RESAMPLING}, got {mode!r}')
  counts = np.bincount(labels)
  present = np.flatnonzero(counts)
  rng = np.random.default_rng(seed)
  out = []
  for c in present:
    members = np.flatnonzero(labels == c)
    if mode == 'over':
      out += [members, rng.choice(members, size=counts.max() - len(members), replace=True)]
    else:
      out.append(rng.choice(members, size=counts[present].min(), replace=False))
  return np.sort(np.concatenate(out)).astype(np.int64)
