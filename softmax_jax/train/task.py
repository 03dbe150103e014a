"""The trainer interface: a task supplies the model, data, loss and evaluation; the loop does the rest.

A task is built from the config (`build_task(config)`, chosen by `task_name(config)` from
`TASKS`) and holds:

- `model`, `dataset`, `items_per_step` (examples or tokens a step consumes) and `rate`, the name
  of the logged throughput ('examples_per_second', 'tokens_per_second');
- `row_state_keys`: train-state keys that hold one row per batch row (an LM's recurrent carry),
  split over the devices like the batch; `log_perplexity`: also log exp(mean train loss);
- `init_state(tx) -> host state` {'step', 'params', 'model_state', 'opt_state', 'rng', ...};
- `check_batch(batch)`: static chex checks of a training batch (under jit);
- `loss(params, state, batch, rng) -> (mean loss, updates)`: the traced per-batch loss and the new
  values of non-parameter state entries ('model_state', and e.g. 'carry'); the one step function
  (`train/step.py`) differentiates it for every task;
- `train_batches(start_step)`: host batches, the first one for step `start_step + 1`;
- `resident`: None, or host arrays the driver keeps on the devices for the whole run; then
  `train_batches` yields small index batches and `gather(resident, batch)` (traced, inside the
  step) builds each training batch on the device;
- `evaluate(driver, state, split) -> {f'{split}/...': float}` and
  `final_evaluation(driver, state, workdir) -> metrics`: on-device passes through
  `driver.evaluate`, which hands back per-example statistics only, never `[N, K]`.

A new task is a class with these members, registered in `TASKS`; `task_name` decides which
config selects it. The start-up, the step loop and the shut-down (`train/loop.py`,
`train/runner.py`) and both drivers (`train/parallel.py`) stay as they are.
"""

import json
import os

import ml_collections

from softmax_jax.data.text import LM_DATASETS
from softmax_jax.train.checkpoint import Checkpointer
from softmax_jax.train.classification import ClassificationTask
from softmax_jax.train.distill import DistillTask, load_teacher
from softmax_jax.train.language_model import LanguageModelTask
from softmax_jax.train.state import make_optimizer

TASKS = {'classification': ClassificationTask, 'language_model': LanguageModelTask}


def task_name(config) -> str:
  """'language_model' for the word-level corpora of `data.text.LM_DATASETS`, else 'classification'."""
  return 'language_model' if config.data.name in LM_DATASETS else 'classification'


def build_task(config, dataset=None):
  """The task of `config` (loads its dataset unless `dataset` is given); checks its config keys.

  With `config.distill.teacher_workdir`, the task is wrapped to train towards that run's softmax
  (`train.distill.DistillTask`)."""
  task = TASKS[task_name(config)](config, dataset)
  distill = config.get('distill')
  if distill is not None and distill.get('teacher_workdir'):
    task = DistillTask(task, config, load_teacher(config, task, load_trained))
  return task


def load_trained(workdir: str, *, dataset=None):
  """Rebuilds a finished (or interrupted) run of any task from its workdir, for analysis.

  Args:
    workdir: the run's workdir (config.json and checkpoints/).
    dataset: the dataset to use instead of loading the config's.

  Returns:
    `(config, dataset, model, variables)`: the config of `workdir/config.json`, its dataset, the
    model (`Classifier` or `LanguageModel`), and the variables of the latest intact checkpoint for
    `model.apply`: `{'params': ..., **model_state}` (e.g. with 'batch_stats' for a ResNet).

  Raises:
    FileNotFoundError: no config.json or no checkpoint in `workdir`.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: is {workdir!r} a workdir of scripts/train.py?')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  task = build_task(config, dataset)
  _, tx = make_optimizer(config.optimizer, config.num_steps)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), config.max_checkpoints)
  try:
    state, step = ckpt.restore_latest(task.init_state(tx))
  finally:
    ckpt.close()
  if not step:
    raise FileNotFoundError(f'no checkpoint under {os.path.join(workdir, "checkpoints")}')
  return config, task.dataset, task.model, {'params': state['params'], **state['model_state']}

