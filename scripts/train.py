r"""Trains one config and prints a summary table of the final metrics.

  python scripts/train.py                                    # digits, the default
  python scripts/train.py --config=configs/fashion_mnist.py --workdir=/tmp/fmnist
  python scripts/train.py --config=configs/digits.py --config.optimizer.learning_rate=3e-3

A rerun with the same --workdir resumes from its latest checkpoint.
"""

import importlib.util
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from softmax_jax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
from softmax_jax.train.config import check_key_path  # pylint: disable=g-import-not-at-top

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_overrides(argv) -> None:
  """Names a misspelt `--config.key=...` before absl's parser fails on it with a bare traceback."""
  spec = os.path.join(_REPO, 'configs', 'digits.py')
  for a in argv[1:]:
    if a.startswith('--config='):
      spec = a.split('=', 1)[1]
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_config', path)
  if module_spec is None or not os.path.exists(path):
    sys.exit(f'--config={spec}: no config file at {path!r}.')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for a in argv[1:]:
    if a.startswith('--config.'):
      try:
        check_key_path(config, a[len('--config.'):].split('=', 1)[0])
      except ValueError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':  # config_flags applies --config.* overrides as soon as it is defined
  check_overrides(sys.argv)

config_flags.DEFINE_config_file(
    'config', os.path.join(_REPO, 'configs', 'digits.py'), 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', os.path.join(_REPO, 'workdirs', 'digits'),
                    'Checkpoints, metrics.jsonl, TensorBoard events; reused to resume.')


def summary_table(metrics) -> str:
  """Final metrics as a two-column text table."""
  width = max(len(k) for k in metrics)
  lines = [f"{'metric':<{width}}  value", f"{'-' * width}  --------"]
  lines += [f'{k:<{width}}  {v:.4f}' for k, v in sorted(metrics.items())]
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir
  metrics = train_and_evaluate(config, workdir)
  print(f'\nFinal metrics ({config.data.name}, model={config.model.name}, head={config.head.name}, '
        f'workdir={workdir}):')
  print(summary_table(metrics))


if __name__ == '__main__':
  app.run(main)
