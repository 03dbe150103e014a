"""`train_and_evaluate(config, workdir)`: the training loop that scripts, tests and notebooks share."""

import json
import os
from typing import Dict

import ml_collections
import numpy as np
from absl import logging

from softmax_jax import calibration
from softmax_jax import data
from softmax_jax import metrics as metrics_lib
from softmax_jax import ops
from softmax_jax.models.classifier import build_classifier
from softmax_jax.train.checkpoint import Checkpointer
from softmax_jax.train.config import validate_config
from softmax_jax.train.interrupt import Interrupts
from softmax_jax.train.parallel import DRIVERS, check_divisible
from softmax_jax.train.runner import finished, restore, run_steps
from softmax_jax.train.state import init_state, make_optimizer
from softmax_jax.train.workdir import WorkdirLock, atomic_write, check_config
from softmax_jax.train.writer import MetricWriter


def predict_split(driver, state, dataset, split: str, batch_size: int):
  """`(log_probs [N, K], labels [N], mask [N])` on the host for the whole `split` (padded rows masked)."""
  log_probs, labels, masks = [], [], []
  for batch in data.eval_batches(dataset, split, batch_size):
    log_probs.append(np.asarray(driver.log_prob(state, batch['image'])))
    labels.append(batch['label'])
    masks.append(batch['mask'])
  return np.concatenate(log_probs), np.concatenate(labels), np.concatenate(masks)


def evaluate(driver, state, dataset, split: str, batch_size: int, class_counts=None) -> Dict[str, float]:
  """Classification metrics of the whole `split`, keys prefixed with f'{split}/'.

  With `class_counts` (training examples per class) also many/medium/few-shot accuracy.
  """
  log_probs, labels, mask = predict_split(driver, state, dataset, split, batch_size)
  return metrics_lib.classification_metrics(log_probs, labels, where=mask, prefix=f'{split}/',
                                            class_counts=class_counts)


def final_evaluation(driver, state, dataset, batch_size: int, workdir: str,
                     class_counts=None) -> Dict[str, float]:
  """Validation and test metrics, plus the post-training views of the test split.

  - 'temperature' fitted on validation (Guo et al. 2017) and f'test_ts/...' metrics with it;
    `workdir/reliability.png` draws test reliability before and after;
  - with `class_counts` (a long-tailed run): many/medium/few-shot accuracy, and
    f'test_posthoc/...', post-hoc logit adjustment `log_probs - log prior` (tau = 1, Menon 2021).
  """
  counts = class_counts
  out, preds = {}, {}
  for split in ('validation', 'test'):
    preds[split] = predict_split(driver, state, dataset, split, batch_size)
    lp, y, mask = preds[split]
    out.update(metrics_lib.classification_metrics(lp, y, where=mask, prefix=f'{split}/',
                                                  class_counts=counts))
  lp, y, mask = preds['test']
  t = calibration.fit_temperature(preds['validation'][0], preds['validation'][1],
                                  where=preds['validation'][2])
  scaled = calibration.apply_temperature(lp, t).astype(np.float32)
  out['temperature'] = t
  out.update(metrics_lib.classification_metrics(scaled, y, where=mask, prefix='test_ts/',
                                                class_counts=counts))
  calibration.save_reliability_figure(
      os.path.join(workdir, 'reliability.png'),
      {'test': (lp, y), f'test, temperature {t:.2f}': (scaled, y)}, where=mask)
  if counts is not None:
    adjusted = np.asarray(ops.log_softmax(ops.posthoc_logit_adjustment(lp, log_prior=ops.log_prior(counts))))
    out.update(metrics_lib.classification_metrics(adjusted, y, where=mask, prefix='test_posthoc/',
                                                  class_counts=counts))
  return out


def load_trained(workdir: str):
  """Rebuilds a finished (or interrupted) run from its workdir, for analysis after training.

  Returns:
    `(config, dataset, model, variables)`: the config of `workdir/config.json`, its dataset, the
    `Classifier`, and the variables of the latest checkpoint for `model.apply`:
    `{'params': ..., **model_state}` (e.g. with 'batch_stats' for a ResNet).

  Raises:
    FileNotFoundError: no config.json or no checkpoint in `workdir`.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: is {workdir!r} a workdir of scripts/train.py?')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  dataset = data.load_dataset(config.data)
  model = build_classifier(config.model, config.head, dataset.num_classes, dataset.class_counts)
  _, tx = make_optimizer(config.optimizer, config.num_steps)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), config.max_checkpoints)
  state, step = ckpt.restore_latest(init_state(model, tx, dataset.input_shape, config.seed))
  ckpt.close()
  if not step:
    raise FileNotFoundError(f'no checkpoint under {os.path.join(workdir, "checkpoints")}')
  return config, dataset, model, {'params': state['params'], **state['model_state']}


def train_and_evaluate(config, workdir: str) -> Dict[str, float]:
  """Trains `config` in `workdir` (resuming from its newest intact checkpoint) and evaluates.

  The workdir is locked for the run (train/workdir.py); a workdir created with a config that
  differs in the model, head, data, seed or batch size is refused before anything in it changes;
  a SIGINT or SIGTERM checkpoints the current step and raises `TrainingInterrupted`.

  Returns:
    The final metrics, e.g. {'test/accuracy', 'test/nll', 'test/ece', 'validation/accuracy', ...};
    also written to `workdir/final_metrics.json`.

  Raises:
    ValueError: an unknown config key or a bad value, naming it.
    WorkdirError: another run holds the workdir; the workdir was created with an incompatible
      config, or trained past `config.num_steps`; it has checkpoints but none is intact.
    FloatingPointError: the training loss, gradient norm or state became NaN or infinite; names
      the first bad step and the newest (finite) checkpoint, and how to resume from it.
    TrainingInterrupted: SIGINT or SIGTERM; says what was saved and how to resume.
  """
  from softmax_jax.train.lm import LM_DATASETS, train_and_evaluate_lm  # pylint: disable=g-import-not-at-top
  if config.data.name in LM_DATASETS:  # word-level language modelling: train/lm.py
    return train_and_evaluate_lm(config, workdir)
  validate_config(config)
  workdir = os.path.abspath(workdir)
  with Interrupts() as interrupts, WorkdirLock(workdir):
    changes = check_config(config, workdir)
    dataset = data.load_dataset(config.data)
    model = build_classifier(config.model, config.head, dataset.num_classes, dataset.class_counts)
    lt_counts = dataset.class_counts if config.data.imbalance_ratio > 1 else None  # long-tail metrics
    schedule, tx = make_optimizer(config.optimizer, config.num_steps)
    driver = DRIVERS[config.parallel](model, tx, schedule, config.num_devices,
                                      augment=config.augment.to_dict())
    check_divisible(config.batch_size, len(driver.devices), 'batch_size')
    check_divisible(config.eval_batch_size, len(driver.devices), 'eval_batch_size')

    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), config.max_checkpoints)
    try:
      template = init_state(model, tx, dataset.input_shape, config.seed)
      host_state, start_step = restore(config, workdir, ckpt, template, changes=changes,
                                       interrupts=interrupts)
      state = driver.put_state(host_state)
      writer = MetricWriter(workdir, start_step)
      batches = data.train_batches(dataset, config.batch_size, seed=config.seed, start_step=start_step,
                                   sampling=config.data.sampling, num_steps=config.num_steps)
      try:
        state, _ = run_steps(
            config, driver, state, batches, start_step=start_step, writer=writer, ckpt=ckpt,
            evaluate=lambda s: evaluate(driver, s, dataset, 'validation', config.eval_batch_size, lt_counts),
            items_per_step=config.batch_size, rate='examples_per_second', interrupts=interrupts)
        finished(interrupts, ckpt, config.num_steps)
        final = final_evaluation(driver, state, dataset, config.eval_batch_size, workdir, lt_counts)
        writer.write_final(config.num_steps, final)
      finally:
        writer.close()
    finally:
      ckpt.close()
    atomic_write(os.path.join(workdir, 'final_metrics.json'), json.dumps(final, indent=2, sort_keys=True))
  return final
