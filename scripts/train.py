r"""Trains one config and prints a summary table of the final metrics.

  python scripts/train.py                                    # digits, the default
  python scripts/train.py --config=configs/fashion_mnist.py --workdir=/tmp/fmnist
  python scripts/train.py --config=configs/digits.py --config.optimizer.learning_rate=3e-3
  python scripts/train.py --config.head.name=margin --config.head.kind=cosface --workdir=/tmp/cosface

A rerun with the same --workdir resumes from its newest intact checkpoint (a config that changes
the model, head or data is refused there). Ctrl-C or SIGTERM checkpoints the current step and
exits with 128 + the signal's number, printing the command that resumes; a second Ctrl-C aborts.

The console: a line of validation metrics at each evaluation (above the progress bar, or logged
with --config.progress=False, which also logs the train loss at each log step), 'Resuming from
<checkpoint> at step N of M' on a rerun, the final metrics and the files the run wrote. --verbosity
(-v) sets absl's level (default here: INFO); orbax, JAX and TFDS are kept to warnings or errors.
"""

import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from softmax_jax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
from softmax_jax.train.loop import quiet_libraries  # pylint: disable=g-import-not-at-top
from softmax_jax.train.config import check_override_args, override_free_form  # pylint: disable=g-import-not-at-top
from softmax_jax.train.interrupt import TrainingInterrupted  # pylint: disable=g-import-not-at-top
from softmax_jax.train.workdir import WorkdirError  # pylint: disable=g-import-not-at-top

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_overrides(argv):
  """Names a misspelt `--config.key=...` before absl's parser fails on it with a bare traceback.

  Returns:
    `(argv for absl, {model/head key: text})`; see `softmax_jax.train.config.check_override_args`.
  """
  try:
    return check_override_args(argv, os.path.join(_REPO, 'configs', 'digits.py'))
  except ValueError as e:
    sys.exit(f'error: {e}')


_COMMAND = list(sys.argv)  # for the resume hint, as typed
_FREE_OVERRIDES = {}
if __name__ == '__main__':  # config_flags applies --config.* overrides as soon as it is defined
  sys.argv, _FREE_OVERRIDES = check_overrides(sys.argv)

config_flags.DEFINE_config_file(
    'config', os.path.join(_REPO, 'configs', 'digits.py'), 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', os.path.join(_REPO, 'workdirs', 'digits'),
                    'Checkpoints, metrics.jsonl, TensorBoard events; reused to resume.')


def summary_table(metrics) -> str:
  """Final metrics as a two-column text table; integers (num_params) print as integers, None
  (an empty bucket's accuracy) as '-'."""
  def fmt(v):
    return '-' if v is None else f'{v:d}' if isinstance(v, int) else f'{v:.4f}'
  width = max(len(k) for k in metrics)
  lines = [f"{'metric':<{width}}  value", f"{'-' * width}  --------"]
  lines += [f'{k:<{width}}  {fmt(v)}' for k, v in sorted(metrics.items())]
  return '\n'.join(lines)


def outputs_block(workdir: str) -> str:
  """The files of `workdir` a run wrote (those that exist), each with what it holds."""
  def steps():
    found = sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())
    return ', '.join(map(str, found)) or 'none'
  tensorboard = shlex.join(['tensorboard', '--logdir', os.path.join(workdir, 'tensorboard')])
  plot_py = os.path.relpath(os.path.join(_REPO, 'scripts', 'plot.py'))
  plot = shlex.join([sys.executable, plot_py, f'--workdir={workdir}'])
  outputs = [
      ('config.json', lambda: 'the config; a rerun with this workdir must match it'),
      ('config_changes.jsonl', lambda: 'the harmless config changes of reruns'),
      ('metrics.jsonl', lambda: 'train and validation metrics, one JSON object a line'),
      ('final_metrics.json', lambda: 'the table above'),
      ('tensorboard/', lambda: f'TensorBoard events: {tensorboard}'),
      ('checkpoints/', lambda: f'orbax checkpoints, steps {steps()}; a rerun resumes the newest'),
      ('reliability.png', lambda: 'test reliability diagram, before and after temperature scaling'),
      ('curves.png', lambda: 'training curves'),
  ]
  width = max(len(name) for name, _ in outputs)
  lines = [f'Outputs in {workdir}:']
  lines += [f'  {name:<{width}}  {say()}' for name, say in outputs
            if os.path.exists(os.path.join(workdir, name))]
  if not os.path.exists(os.path.join(workdir, 'curves.png')):
    lines.append(f'  Training curves (curves.png): {plot}')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # INFO: the resume line and, without the bar, metrics
    logging.set_verbosity(logging.INFO)
  quiet_libraries()
  config = flags.FLAGS.config
  override_free_form(config, _FREE_OVERRIDES)
  workdir = flags.FLAGS.workdir
  try:
    metrics = train_and_evaluate(config, workdir)
  except TrainingInterrupted as e:  # SIGINT, SIGTERM: the step reached is checkpointed
    print(f'\n{e}\nResume: {shlex.join([sys.executable, *_COMMAND])}', file=sys.stderr)
    sys.exit(128 + e.signum)
  except FloatingPointError as e:  # names the step and a finite checkpoint
    flags_ = getattr(e, 'resume_flags', [])
    keys = {f.split('=', 1)[0] for f in flags_}
    command = [a for a in _COMMAND if a.split('=', 1)[0] not in keys] + flags_
    resume = f'\nResume: {shlex.join([sys.executable, *command])}' if flags_ else ''
    sys.exit(f'error: {e}{resume}')
  except WorkdirError as e:
    sys.exit(f'error: {e}')
  print(f'\nFinal metrics ({config.data.name}, model={config.model.name}, head={config.head.name}, '
        f'workdir={workdir}):')
  print(summary_table(metrics))
  print()
  print(outputs_block(os.path.abspath(workdir)))


if __name__ == '__main__':
  app.run(main)
