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

Multi-host (jax.distributed): run the same command on every host with
--coordinator_address=HOST0:PORT --num_processes=P --process_id=p (or none of them on a TPU pod
slice or under SLURM, where the cluster is detected); process 0 writes the workdir's files and
prints, all processes save and restore the checkpoints together (one shared --workdir).

--print_config prints the config that would train (its file's defaults with the overrides applied,
and the options of the model and head it picks) and exits without training. The configs follow.
"""

import ast
import dataclasses
import os
import shlex
import sys
import textwrap

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from softmax_jax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
from softmax_jax.train.distributed import CoordinatorUnreachable, initialize, is_primary  # pylint: disable=g-import-not-at-top
from softmax_jax.train.loop import quiet_libraries  # pylint: disable=g-import-not-at-top
from softmax_jax.train.config import check_override_args, override_free_form  # pylint: disable=g-import-not-at-top
from softmax_jax.train.interrupt import TrainingInterrupted  # pylint: disable=g-import-not-at-top
from softmax_jax.train.workdir import WorkdirError  # pylint: disable=g-import-not-at-top

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIGS = os.path.join(_REPO, 'configs')


def configs_help(configs_dir: str = _CONFIGS) -> str:
  """Every `configs_dir/*.py` with its docstring's summary line and the `:arg` its `get_config` takes.

  The arguments are the module docstring's paragraph that starts with `get_config(`, else the
  docstring of `get_config`; the files are parsed (ast), not imported, so this costs milliseconds.
  """
  lines = [f'configs (--config=configs/FILE.py[:ARG], in {configs_dir}):']
  for name in sorted(f for f in os.listdir(configs_dir) if f.endswith('.py') and not f.startswith('_')):
    with open(os.path.join(configs_dir, name)) as f:
      tree = ast.parse(f.read())
    doc = ast.get_docstring(tree) or ''
    summary = doc.split('\n', 1)[0].strip() or '(no docstring)'
    get_config = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == 'get_config'),
                      None)
    args = next((p for p in doc.split('\n\n') if p.lstrip().startswith('`get_config(')), None)
    if args is None and get_config is not None:
      args = ast.get_docstring(get_config)
    default = ''
    if get_config is not None and get_config.args.defaults:
      node = get_config.args.defaults[-1]
      default = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ''
    lines.append(f'  {name}  {summary}')
    if args:
      lines.append(textwrap.indent(textwrap.dedent(args).strip(), ' ' * 6))
    if default:
      lines.append(f'      (no :ARG means :{default})')
  return '\n'.join(lines)


# absl's --help prints the main module's docstring, formatting any '%' in it: hence '%%'.
__doc__ += '\n' + configs_help().replace('%', '%%') + '\n'  # pylint: disable=redefined-builtin


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
    'config', os.path.join(_REPO, 'configs', 'digits.py'),
    'Experiment config file[:ARG] (the configs and their ARG are listed above).', lock_config=True)
flags.DEFINE_string('workdir', os.path.join(_REPO, 'workdirs', 'digits'),
                    'Checkpoints, metrics.jsonl, TensorBoard events; reused to resume.')
flags.DEFINE_string('coordinator_address', None,
                    "Multi-host runs (jax.distributed): process 0's 'host:port', the same for every "
                    'process; with --num_processes and --process_id. Unset: the cluster (TPU pod '
                    'slice, SLURM) is detected from the environment, else one process.')
flags.DEFINE_integer('num_processes', None, 'Multi-host runs: the number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host runs: this process, in [0, num_processes).')
flags.DEFINE_float('distributed_timeout_s', 300.0,
                   'Multi-host runs: seconds to wait for the coordinator and the other processes.')
flags.DEFINE_bool('print_config', False,
                  'Print the config with the overrides applied (one KEY = VALUE a line, and the '
                  'defaults of the model and head options it leaves unset), then exit without training.')


def format_config(config, *, source: str = '') -> str:
  """`config` as sorted `key = value` lines (nested keys dotted), then the options of the model and
  head modules that `config.model.name` and `config.head.name` pick and the config leaves unset,
  with their defaults (any of them can be set with `--config.model.KEY=` / `--config.head.KEY=`)."""
  # pylint: disable=g-import-not-at-top
  from softmax_jax.data.text import LM_DATASETS
  from softmax_jax.heads import HEADS
  from softmax_jax.models import BACKBONES, LM_BACKBONES
  import numpy as np

  def text(value):  # a dtype class such as jnp.float32 as its name, as --config.model.dtype takes it
    if not isinstance(value, (str, int, float, tuple, list, type(None))):
      try:
        return repr(np.dtype(value).name)
      except TypeError:
        pass
    return repr(value)

  def flat(node, prefix=''):
    for key, value in sorted(node.items()):
      if hasattr(value, 'items'):
        yield from flat(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value
  lines = [f'# {source or "the config"}, overrides applied; change a key with --config.KEY=VALUE']
  lines += [f'{key} = {text(value)}' for key, value in flat(config)]
  backbones = LM_BACKBONES if config.data.name in LM_DATASETS else BACKBONES
  for section, registry in (('model', backbones), ('head', HEADS)):
    cls = registry.get(config[section].get('name'))
    if cls is None:
      continue
    unset = [(f.name, f.default) for f in dataclasses.fields(cls)
             if f.name not in config[section] and f.default is not dataclasses.MISSING
             and f.name not in ('parent', 'name', 'num_classes', 'class_counts', 'vocab_size')]
    if unset:
      lines.append(f'# {section}: {cls.__name__} options left at their defaults')
      lines += [f'{section}.{key} = {text(value)}' for key, value in unset]
  return '\n'.join(lines)


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
  if flags.FLAGS.print_config:
    print(format_config(config, source=f'--config={config_flags.get_config_filename(flags.FLAGS["config"])}'))
    return
  workdir = flags.FLAGS.workdir
  try:
    initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id,
               timeout_s=flags.FLAGS.distributed_timeout_s)
  except (ValueError, CoordinatorUnreachable) as e:
    sys.exit(f'error: {e}')
  if not is_primary():  # process 0 prints and logs; the others only warn
    logging.set_verbosity(logging.WARNING)
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
  if not is_primary():
    return
  print(f'\nFinal metrics ({config.data.name}, model={config.model.name}, head={config.head.name}, '
        f'workdir={workdir}):')
  print(summary_table(metrics))
  print()
  print(outputs_block(os.path.abspath(workdir)))


if __name__ == '__main__':
  app.run(main)
