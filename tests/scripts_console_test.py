"""The console of scripts/train.py (issue 22): validation lines, the resume line, the outputs block.

Two runs of the script on real digits in a fresh TFDS data_dir (stdout and stderr are pipes, not a
TTY): 20 steps without the progress bar, then a rerun to 30 steps with it, which resumes.
"""

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from softmax_jax.train import loop, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(flags, workdir, data_dir, cache_dir, num_steps, *extra):
  command = [sys.executable, os.path.join(REPO, 'scripts', 'train.py'),
             '--config=configs/digits.py:small', f'--workdir={workdir}',
             f'--config.data.data_dir={data_dir}', f'--config.num_steps={num_steps}',
             '--config.model.hidden=(32,)', '--config.log_every=5', '--config.checkpoint_every=10',
             '--config.num_devices=1', *extra]
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu',
             # The rerun reads the first run's compilations (saves ~4 s of CPU).
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, result.stderr


def _rows(workdir, step):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['step'] == step]


def _check_no_library_logs(text):
  """Only our own modules log (absl lines name the file); TFDS's warnings and bars are gone."""
  ours = {f for _, _, files in os.walk(os.path.join(REPO, 'softmax_jax')) for f in files}
  logged = set(re.findall(r'^[DIWE]\d{4} [\d:.]+ +\d+ ([^:\s]+):\d+\]', text, re.M))
  assert logged <= ours, logged - ours
  for noise in ('OpenCV', '\x1b[A', 'Generating splits', 'Shuffling'):
    assert noise not in text, noise


def _check_outputs_block(out, workdir, names):
  block = out[out.index(f'Outputs in {workdir}:'):]
  for name in names:
    assert re.search(rf'^  {re.escape(name)} +\S', block, re.M), (name, block)
    assert os.path.exists(os.path.join(workdir, name))
  assert f'tensorboard --logdir {workdir}/tensorboard' in block
  assert f'scripts/plot.py --workdir={workdir}' in block  # curves.png is not made: how to make it


@pytest.fixture(scope='module')
def runs(tmp_path_factory, xla_flags):
  """(workdir, (stdout, stderr) of the first run, of the resumed run)."""
  tmp = tmp_path_factory.mktemp('console')
  paths = str(tmp / 'w'), str(tmp / 'tfds'), str(tmp / 'xla')
  first = _train(xla_flags(1), *paths, 20, '--config.eval_every=10', '--config.progress=False')
  resumed = _train(xla_flags(1), *paths, 30, '--config.eval_every=5', '--config.progress=True')
  workdir = paths[0]
  return workdir, first, resumed


def test_first_run_logs_validation_and_train_lines_and_names_its_outputs(runs):
  workdir, (out, err), _ = runs
  text = out + err
  # The validation line at step 10 shows what metrics.jsonl holds for it.
  val = next(r for r in _rows(workdir, 10) if 'validation/accuracy' in r)
  line = re.search(r'step 10/20 validation: accuracy (\S+), nll (\S+), ece (\S+)$', err, re.M)
  assert line, err[-3000:]
  got = [float(v) for v in line.groups()]
  want = [val['validation/accuracy'], val['validation/nll'], val['validation/ece']]
  assert got == [float(f'{v:.4g}') for v in want]
  # Without the bar each log step logs the train loss (the window mean written at that step).
  train = next(r for r in _rows(workdir, 5) if 'train/loss' in r)
  assert f"step 5/20 train: loss {train['train/loss']:.4g}, examples/s " in err
  num_params = 64 * 32 + 32 + 32 * 10 + 10  # 8x8 digits, hidden (32,), 10 classes
  assert re.search(rf'^num_params +{num_params}$', out, re.M), out
  _check_outputs_block(out, workdir, ['config.json', 'metrics.jsonl', 'final_metrics.json',
                                      'tensorboard/', 'checkpoints/', 'reliability.png'])
  assert 'runner.py' in ' '.join(re.findall(r'^I\d{4} \S+ +\d+ \S+', err, re.M))  # the check sees lines
  _check_no_library_logs(text)


def test_rerun_prints_the_resume_line_and_validation_above_the_bar(runs):
  workdir, _, (out, err) = runs
  text = out + err
  ckpt = os.path.join(workdir, 'checkpoints', '20')
  assert f'Resuming from {ckpt} at step 20 of 30' in err, err[-3000:]
  assert 'Downloading and preparing' not in text  # prepared by the first run
  val = next(r for r in _rows(workdir, 25) if 'validation/accuracy' in r)
  assert f"step 25/30 validation: accuracy {val['validation/accuracy']:.4g}, " in out  # tqdm.write
  assert 'train: loss' not in text  # the bar shows the loss
  _check_outputs_block(out, workdir, ['config.json', 'config_changes.jsonl', 'metrics.jsonl',
                                      'tensorboard/', 'checkpoints/', 'reliability.png'])
  assert re.search(r'checkpoints/ +orbax checkpoints, steps 20, 30;', out), out
  _check_no_library_logs(text)


@pytest.mark.parametrize('package, level, shown', [
    ('orbax/checkpoint/checkpoint_manager.py', logging.INFO, False),
    ('orbax/checkpoint/checkpoint_manager.py', logging.WARNING, True),
    ('tensorflow_datasets/core/features/image_feature.py', logging.WARNING, False),  # OpenCV
    ('tensorflow_datasets/core/features/image_feature.py', logging.ERROR, True),
    ('jax/_src/xla_bridge.py', logging.INFO, False),
    ('flax/linen/module.py', logging.INFO, True),  # a library not listed keeps its level
])
def test_library_levels_filter_absl_records_by_the_package_that_logged(package, level, shown):
  # scripts/geometry.py and train.py install it with quiet_libraries(); records of our own files
  # (even under a folder named like a library) pass.
  def record(path):
    return logging.LogRecord('absl', level, path, 1, 'message', None, None)
  keep = loop._LibraryLevels().filter  # pylint: disable=protected-access
  assert keep(record(f'/venv/lib/python3.11/site-packages/{package}')) == shown
  assert keep(record(f'/home/orbax/jax/softmax_jax/train/{os.path.basename(package)}'))


def test_key_metrics_pick_the_shown_ones_in_order_and_skip_empty_buckets():
  metrics = {'validation/ece': 0.01, 'validation/few_accuracy': None, 'validation/accuracy': 0.98765,
             'validation/nll': 0.07, 'test/accuracy': 0.5}
  line = runner.metrics_line(100, 1500, 'validation', runner.key_metrics(metrics, 'validation'))
  assert line == 'step 100/1500 validation: accuracy 0.9877, nll 0.07, ece 0.01'
  sparse = {'validation/support_size': 3.0, 'validation/few_accuracy': None}  # none of the shown
  assert runner.key_metrics(sparse, 'validation') == {'support_size': 3.0}
  assert runner.metrics_line(5, 9, 'train', {'loss': 2.0, 'examples/s': 123456.7}) == (
      'step 5/9 train: loss 2, examples/s 123457')
