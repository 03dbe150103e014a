"""The classification task: images -> backbone -> head, with calibration and long-tail views.

Evaluation runs on device: the head reduces each batch to per-example statistics
(`Classifier.eval_stats`: prediction, label rank, label log-prob and confidence at each
temperature, and the same after post-hoc logit adjustment), so nothing of shape `[N, K]` reaches
the host whatever K; metrics, the temperature fit and the reliability diagrams work from them.

Sparse heads (`config.head.mapping='sparsemax'|'entmax15'|'entmax_bisect'`, whose `eval_stats`
add 'support' and 'fy_loss'): a label outside the support has probability 0, so NLL is undefined
and left out of every summary (logged once); '<split>/support_size' (mean support) and
'<split>/fy_loss' (mean Fenchel-Young loss) take its place. The temperature is fitted on the
mean FY loss of `mapping(z / T)` over the same grid (the loss the head is trained on, a proper
loss for its distribution); accuracy, top-5 and ECE (of `max mapping(z / T)`) are as for softmax.
"""

import functools
import os
from typing import Dict

from absl import logging
import chex
import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax import calibration
from softmax_jax import data
from softmax_jax import metrics as metrics_lib
from softmax_jax import ops
from softmax_jax.data.augment import augment_images
from softmax_jax.data.smote import smote_dataset
from softmax_jax.models.classifier import build_classifier
from softmax_jax.train import writer
from softmax_jax.train.parallel import check_divisible, data_shards, head_config
from softmax_jax.train.state import init_state

# Augmentation draws from keys folded into the per-step key (`data.augment.augment_images`), so the
# dropout and sample keys (a split of the per-step key) are those of runs without augmentation.
AUGMENT_KEYS = ('crop_padding', 'flip', 'rotation_degrees', 'brightness', 'contrast')
# Train splits up to this size (float32, normalized) stay on the devices; steps gather their batch there.
RESIDENT_BYTES = 256 << 20


def check_classifier_batch(batch) -> None:
  """Static chex checks (shapes, ranks, dtypes; also under jit) of `{'image': [B, ...], 'label': [B] int}`."""
  chex.assert_rank(batch['label'], 1, custom_message="batch['label'] must be [B] class ids")
  chex.assert_type(batch['label'], int, custom_message="batch['label'] must be integer class ids")
  chex.assert_type(batch['image'], float, custom_message="batch['image'] must be float [B, ...]")
  chex.assert_equal_shape_prefix(
      (batch['image'], batch['label']), 1,
      custom_message="batch['image'] [B, ...] and batch['label'] [B] must have the same B")


def classifier_loss(model, params, state, batch, rng, *, crop_padding: int = 0, flip: bool = False,
                    rotation_degrees: float = 0.0, brightness: float = 0.0, contrast: float = 0.0,
                    method=None):
  """`(mean loss, {'model_state': ...})` of a `Classifier` on `batch` {'image', 'label'} (traced).

  `rng` is split into the 'dropout' and 'sample' streams; with any of `crop_padding` > 0, `flip`,
  `rotation_degrees`, `brightness`, `contrast` > 0, the images are augmented on device first
  (`data.augment.augment_images`, keys folded from `rng`; crop and flip draw as they always did).
  `method` (None: `Classifier.__call__`) is a function `(module, images, labels, *, train, step)
  -> [B]` losses applied in its place, e.g. distillation's (`train/distill.py`).
  """
  dropout_rng, sample_rng = jax.random.split(rng)
  images = batch['image']
  images = augment_images(rng, images, crop_padding=crop_padding, flip=flip,
                          rotation_degrees=rotation_degrees, brightness=brightness, contrast=contrast)
  model_state = state['model_state']
  kwargs = dict(train=True, step=state['step'], rngs={'dropout': dropout_rng, 'sample': sample_rng},
                method=method)
  variables = {'params': params, **model_state}
  if model_state:
    losses, new_model_state = model.apply(variables, images, batch['label'],
                                          mutable=list(model_state), **kwargs)
  else:
    losses, new_model_state = model.apply(variables, images, batch['label'], **kwargs), model_state
  return jnp.mean(losses.astype(jnp.float32)), {'model_state': dict(new_model_state)}


def _columns(stats, column: int, adjusted: bool = False):
  """One temperature column of the statistics, as `metrics.summary_from_stats` reads them."""
  p = 'adjusted_' if adjusted else ''
  out = {'prediction': stats[p + 'prediction'], 'label_rank': stats[p + 'label_rank'],
         'label_log_prob': stats[p + 'label_log_prob'][:, column],
         'confidence': stats[p + 'confidence'][:, column]}
  if not adjusted and 'fy_loss' in stats:  # a sparse head's
    out |= {'support': stats['support'], 'fy_loss': stats['fy_loss'][:, column]}
  return out


def log_nll_undefined(head, where: str) -> None:
  """Logs (absl, info) why a sparse head's run reports no NLL / perplexity."""
  logging.info('%s: NLL and perplexity are undefined for %s(mapping=%r), a sparse distribution '
               '(a label outside the support has probability 0); they are not reported. '
               "Reported instead: 'support_size' (mean support) and 'fy_loss' (mean Fenchel-Young "
               'loss).', where, type(head).__name__, getattr(head, 'mapping', None))


def eval_step(variables, carry, batch, *, model, temperatures, log_prior=None):
  """`({statistics, 'label', 'mask'}, carry)` of one evaluation batch: per-example arrays only."""
  stats = model.apply(variables, batch['image'], batch['label'], method='eval_stats',
                      temperatures=temperatures, log_prior=log_prior)
  return dict(stats, label=batch['label'], mask=batch['mask']), carry


def _check_augment(augment) -> None:
  """Raises ValueError naming the `config.augment` key whose value the augmentations refuse."""
  for key in ('rotation_degrees', 'brightness', 'contrast'):
    value = augment.get(key, 0.0)
    if not (isinstance(value, (int, float)) and 0 <= value < float('inf')):
      raise ValueError(f'config.augment.{key} must be a finite number >= 0 (0: off), got {value!r}.')
  if augment.get('contrast', 0.0) > 1:
    raise ValueError(f"config.augment.contrast must be in [0, 1] (contrast factors in [1 - c, 1 + c]), "
                     f"got {augment['contrast']!r}.")


class ClassificationTask:
  """Image classification on a `data.Dataset` with a `Classifier` (see `train.task`).

  With `config.data.sampling='smote'` the train split is oversampled once here, before anything
  else sees it (`data.smote.smote_dataset`, seed `config.seed`, `k = config.data.smote_neighbors`):
  the batches come from the balanced split (real then synthetic examples) as for 'instance', while
  `dataset.class_counts`, and so the heads' class priors and margins (LDAM, logit adjustment, CB
  weights), the many/medium/few buckets and post-hoc adjustment, stay those of the real examples.
  """
  rate = 'examples_per_second'
  row_state_keys = ()
  log_perplexity = False

  def __init__(self, config, dataset=None):
    self.config = config
    self.augment = {k: v for k, v in dict(config.augment).items() if k in AUGMENT_KEYS}
    _check_augment(self.augment)  # before the data: a bad value fails in seconds
    self.dataset = data.load_dataset(config.data) if dataset is None else dataset
    if config.data.sampling == 'smote':
      self.dataset = smote_dataset(self.dataset, k_neighbors=config.data.smote_neighbors,
                                   seed=config.seed)
    self.model = build_classifier(config.model, head_config(config), self.dataset.num_classes,
                                  self.dataset.class_counts)
    # Many/medium/few-shot accuracy and post-hoc adjustment only for long-tailed runs.
    self.class_counts = self.dataset.class_counts if config.data.imbalance_ratio > 1 else None
    self.items_per_step = config.batch_size
    self._eval_fns = {}
    self._logged_sparse = False

  @property
  def batch_sizes(self) -> Dict[str, int]:
    """{config key: global batch size}: the sizes the devices split (`parallel.usable_devices`)."""
    return {'batch_size': int(self.config.batch_size),
            'eval_batch_size': int(self.config.eval_batch_size)}

  def check_devices(self, num_devices: int) -> None:
    """Raises ValueError (naming the fixes) unless the data axis of `num_devices` devices (all of
    them, or `num_devices / M` with `config.mesh`) divides every batch size."""
    for key, size in self.batch_sizes.items():
      check_divisible(size, data_shards(self.config, num_devices), key)

  def init_state(self, tx):
    return init_state(self.model, tx, self.dataset.input_shape, self.config.seed)

  check_batch = staticmethod(check_classifier_batch)

  def loss(self, params, state, batch, rng):
    return classifier_loss(self.model, params, state, batch, rng, **self.augment)

  @functools.cached_property
  def resident(self):
    """The normalized train split (host arrays {'image', 'label'}) when it is at most
    `RESIDENT_BYTES`, else None. The driver keeps it on the devices for the whole run and each
    step gathers its batch there (`gather`), so only `[B]` indices travel from the host."""
    train = self.dataset.splits['train']
    if train.images.size * 4 > RESIDENT_BYTES:
      return None
    return {'image': self.dataset.normalize(train.images), 'label': train.labels}

  @staticmethod
  def gather(resident, batch):
    """`{'image', 'label'}` of the rows `batch['index']` ([B] int32) of `resident` (traced)."""
    return {k: resident[k][batch['index']] for k in ('image', 'label')}

  def train_batches(self, start_step: int):
    """Host batches {'image', 'label'}; or, when the train split is `resident`, `{'index': [B]}`.

    The indices are `data.train_indices`', so `gather` builds the batches of `data.train_batches`
    bit for bit.
    """
    c = self.config
    kwargs = dict(seed=c.seed, start_step=start_step, sampling=c.data.sampling, num_steps=c.num_steps)
    if self.resident is None:
      return data.train_batches(self.dataset, c.batch_size, **kwargs)
    return ({'index': idx.astype(np.int32)}
            for idx in data.train_indices(self.dataset, c.batch_size, **kwargs))

  def _stats_fn(self, temperatures, adjust: bool):
    """`eval_step` for `driver.evaluate`, one function (and so one compilation) per kind of pass."""
    key = (temperatures, adjust)
    if key not in self._eval_fns:
      log_prior = ops.log_prior(self.class_counts) if adjust else None
      self._eval_fns[key] = functools.partial(eval_step, model=self.model, temperatures=temperatures,
                                              log_prior=log_prior)
    return self._eval_fns[key]

  def statistics(self, driver, state, split: str, temperatures=(1.0,), adjust: bool = False):
    """Per-example statistics of `split` on the host: `[N]` and `[N, len(temperatures)]` arrays."""
    batches = data.eval_batches(self.dataset, split, self.config.eval_batch_size)
    outs = driver.evaluate(self._stats_fn(tuple(float(t) for t in temperatures), adjust), state, batches)
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  def summary(self, stats, prefix: str, column: int = 0, adjusted: bool = False) -> Dict[str, float]:
    sparse = 'fy_loss' in stats
    if sparse and not self._logged_sparse:
      log_nll_undefined(self.model.head, 'classification')
      self._logged_sparse = True
    return metrics_lib.summary_from_stats(
        _columns(stats, column, adjusted), stats['label'], num_classes=self.dataset.num_classes,
        where=stats['mask'], prefix=prefix, class_counts=self.class_counts, nll=not sparse)

  def evaluate(self, driver, state, split: str = 'validation') -> Dict[str, float]:
    """Classification metrics of `split`, keys prefixed with f'{split}/'."""
    return self.summary(self.statistics(driver, state, split), f'{split}/')

  def final_evaluation(self, driver, state, workdir: str) -> Dict[str, float]:
    """Validation and test metrics, plus the post-training views of the test split.

    - 'temperature' fitted on validation (Guo et al. 2017) and f'test_ts/...' metrics with it;
      `workdir/reliability.png` draws test reliability before and after;
    - with class counts (a long-tailed run): many/medium/few-shot accuracy, and
      f'test_posthoc/...', post-hoc logit adjustment `log_probs - log prior` (tau = 1, Menon 2021).

    A sparse head's temperature minimizes the mean FY loss (see the module doc): the fit of
    `calibration.fit_temperature_from_stats` run on `-fy_loss` in place of the label log-probs.
    """
    grid = tuple(float(t) for t in calibration.TEMPERATURE_GRID)
    val = self.statistics(driver, state, 'validation', temperatures=(1.0, *grid))
    out = self.summary(val, 'validation/')
    # The fit minimizes the mean of -column over the grid: the NLL, or a sparse head's FY loss.
    fit_on = -val['fy_loss'][:, 1:] if 'fy_loss' in val else val['label_log_prob'][:, 1:]
    t = calibration.fit_temperature_from_stats(fit_on, grid, where=val['mask'])
    adjust = self.class_counts is not None
    test = self.statistics(driver, state, 'test', temperatures=(1.0, t), adjust=adjust)
    out.update(self.summary(test, 'test/'))
    out['temperature'] = t
    out.update(self.summary(test, 'test_ts/', column=1))
    correct = test['prediction'] == test['label']
    if workdir is not None:  # None: a process other than 0 of a multi-process run
      calibration.save_reliability_figure_from_stats(
          os.path.join(workdir, 'reliability.png'),
          {'test': (test['confidence'][:, 0], correct),
           f'test, temperature {t:.2f}': (test['confidence'][:, 1], correct)}, where=test['mask'])
    # Test F1 of each class, for the run's TensorBoard image (train/loop.py: `task.per_class`).
    self.per_class = dict(writer.per_class_f1(test['prediction'], test['label'],
                                              num_classes=self.dataset.num_classes, where=test['mask']),
                          class_names=self.dataset.class_names)
    if adjust:
      out.update(self.summary(test, 'test_posthoc/', adjusted=True))
    return out
