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

from softmax_jax.data.text import LM_DATASETS
from softmax_jax.train.classification import ClassificationTask
from softmax_jax.train.language_model import LanguageModelTask

TASKS = {'classification': ClassificationTask, 'language_model': LanguageModelTask}


def task_name(config) -> str:
  """'language_model' for the word-level corpora of `data.text.LM_DATASETS`, else 'classification'."""
  return 'language_model' if config.data.name in LM_DATASETS else 'classification'


def build_task(config, dataset=None):
  """The task of `config` (loads its dataset unless `dataset` is given); checks its config keys."""
  return TASKS[task_name(config)](config, dataset)
