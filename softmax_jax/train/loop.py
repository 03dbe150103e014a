"""`train_and_evaluate(config, workdir)`: the one trainer that scripts, tests and notebooks share.

Every task (classification, language modelling; `train/task.py`) runs through the same start-up
(workdir lock and config check, restore, placement on the devices), the same step loop
(`train/runner.py`) over one step function and the same drivers (`train/parallel.py`), and the
same shut-down (final evaluation, `final_metrics.json`).
"""

import contextlib
import logging
import os
from typing import Dict

from absl import logging as absl_logging
import jax
import numpy as np

from softmax_jax.train.checkpoint import Checkpointer
from softmax_jax.train.config import validate_config
from softmax_jax.train.interrupt import Interrupts
from softmax_jax.train.parallel import DRIVERS
from softmax_jax.train.runner import finished, restore, run_steps
from softmax_jax.train.state import make_optimizer
from softmax_jax.train.task import build_task
from softmax_jax.train.workdir import WorkdirLock, atomic_write, check_config
from softmax_jax.train.writer import MetricWriter, NullWriter, to_json


# Per library, the lowest level the scripts' console shows (`quiet_libraries`): this hides orbax's
# INFO lines (~20 per checkpoint read), JAX's 'Unable to initialize backend' and TFDS's warnings on
# our local builders ('OpenCV is not installed', 'Variant folder ... has no dataset_info.json').
LIBRARY_LEVELS = {'orbax': logging.WARNING, 'jax': logging.WARNING, 'jaxlib': logging.WARNING,
                  'tensorflow_datasets': logging.ERROR}


class _LibraryLevels(logging.Filter):
  """Drops records below `LIBRARY_LEVELS` of the installed package whose file logged them.

  TFDS and orbax log through absl's one logger ('absl'), where a logger level cannot tell them
  apart: absl names the calling file in `record.pathname`, whose package is the folder after
  site-packages (or dist-packages).
  """

  def filter(self, record: logging.LogRecord) -> bool:
    parts = os.path.normpath(record.pathname).split(os.sep)
    for i in range(len(parts) - 2, -1, -1):
      if parts[i] in ('site-packages', 'dist-packages'):
        return record.levelno >= LIBRARY_LEVELS.get(parts[i + 1], logging.NOTSET)
    return True


def quiet_libraries() -> None:
  """Hides third-party chatter on the console of the scripts (not called by the library itself).

  Sets the levels of `LIBRARY_LEVELS` on their Python loggers and, for the records they log
  through absl, on absl's logger (a `logging.Filter` by package); turns TFDS's progress bars off:
  preparing a local data set drew nested bars, which leave cursor-up codes ('[A') in a log file.
  Idempotent.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  for name, level in LIBRARY_LEVELS.items():
    logging.getLogger(name).setLevel(level)
  absl_logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, _LibraryLevels) for f in absl_logger.filters):
    absl_logger.addFilter(_LibraryLevels())
  tfds.disable_progress_bar()


def final_evaluation(task, driver, state, workdir: str) -> Dict[str, float]:
  """The task's final metrics (validation and test, and its post-training views)."""
  return task.final_evaluation(driver, state, workdir)


def final_row(final: Dict[str, float], rate: str) -> Dict[str, float]:
  """The final metrics as the last row of metrics.jsonl and TensorBoard.

  The steady rate of the whole invocation, `final[f'train/{rate}']`, is logged as
  f'train/steady_{rate}': the last log step already wrote the rate of its own window as
  f'train/{rate}' at the same step, and a tag takes one value per step.
  """
  row = dict(final)
  if f'train/{rate}' in row:
    row[f'train/steady_{rate}'] = row.pop(f'train/{rate}')
  return row


def train_and_evaluate(config, workdir: str, *, dataset=None) -> Dict[str, float]:
  """Trains `config` in `workdir` (resuming from its newest intact checkpoint) and evaluates.

  The task (classification or language modelling) follows from `config.data.name`
  (`train.task.task_name`). The workdir is locked for the run (train/workdir.py); a workdir
  created with a config that differs in the model, head, data, seed or batch size is refused
  before anything in it changes; a SIGINT or SIGTERM checkpoints the current step and raises
  `TrainingInterrupted`.

  Args:
    config: `base_config()` with overrides (configs/*.py).
    workdir: config.json, metrics.jsonl, TensorBoard events (scalars, the config as text and
      hparams, end-of-run images: train/writer.py), checkpoints, final_metrics.json.
    dataset: a dataset to use instead of loading `config.data` (tests, notebooks).

  Returns:
    The final metrics, e.g. {'test/accuracy', 'test/nll', 'test/ece', 'validation/accuracy', ...}
    for classifiers, '{validation,test}/{perplexity,nll,accuracy}' for language models; also
    'num_params' (an int), 'train_wall_s' (this invocation's loop, compilation, evaluation and
    checkpoints included) and f'train/{rate}' (steady state: after the first step of this
    invocation, evaluation and checkpoint time left out); also written to final_metrics.json.

  Raises:
    ValueError: an unknown config key or a bad value, naming it.
    WorkdirError: another run holds the workdir; the workdir was created with an incompatible
      config, or trained past `config.num_steps`; it has checkpoints but none is intact.
    FloatingPointError: the training loss, gradient norm or state became NaN or infinite; names
      the first bad step and the newest (finite) checkpoint, and how to resume from it.
    TrainingInterrupted: SIGINT or SIGTERM; says what was saved and how to resume.
  """
  validate_config(config)
  workdir = os.path.abspath(workdir)
  # Multi-process (jax.distributed): process 0 holds the lock and writes every file; checkpoints
  # are saved and restored by all processes together (train/checkpoint.py).
  primary = jax.process_index() == 0
  with Interrupts() as interrupts, WorkdirLock(workdir) if primary else contextlib.nullcontext():
    changes = check_config(config, workdir)
    task = build_task(config, dataset)
    schedule, tx = make_optimizer(config.optimizer, config.num_steps)
    driver = DRIVERS[config.parallel](task, tx, schedule, config.num_devices)
    task.check_devices(len(driver.devices))
    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), config.max_checkpoints)
    try:
      host_state, start_step = restore(config, workdir, ckpt, task.init_state(tx), changes=changes,
                                       interrupts=interrupts)
      num_params = sum(int(np.size(p)) for p in jax.tree.leaves(host_state['params']))
      state = driver.put_state(host_state)
      writer = MetricWriter(workdir, start_step) if primary else NullWriter()
      try:
        writer.write_config(start_step, config)
        state, final = run_steps(
            config, driver, state, task.train_batches(start_step), start_step=start_step,
            writer=writer, ckpt=ckpt, evaluate=lambda s: task.evaluate(driver, s, 'validation'),
            items_per_step=task.items_per_step, rate=task.rate, log_perplexity=task.log_perplexity,
            interrupts=interrupts)
        finished(interrupts, ckpt, config.num_steps)
        final['num_params'] = num_params  # an int: the summary prints it as one
        final.update(final_evaluation(task, driver, state, workdir if primary else None))
        writer.write_final(config.num_steps, final_row(final, task.rate))
        writer.write_figures(config.num_steps, per_class=getattr(task, 'per_class', None))
      finally:
        writer.close()
    finally:
      ckpt.close()
    if primary:
      atomic_write(os.path.join(workdir, 'final_metrics.json'),
                   to_json(final, indent=2, sort_keys=True))
  return final
