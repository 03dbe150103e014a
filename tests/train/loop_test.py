"""End-to-end training on real digits: data parallelism, resume after SIGKILL, failures.

Runs on 8 fake CPU devices (tests/conftest.py). The digits TFDS builder is prepared once per
session in a temporary data_dir (no network).
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from softmax_jax.train import base_config, train_and_evaluate, validate_config
from softmax_jax.train.writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def small_config(data_dir, **overrides):
  c = base_config()
  c.data.data_dir = data_dir
  c.model.hidden = (64,)
  c.model.dropout = 0.0
  c.batch_size = 64
  c.num_steps = 20
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 5
  c.progress = False
  c.log_every = c.eval_every = c.checkpoint_every = 1000
  c.update_from_flattened_dict(overrides)  # dotted keys: {'model.dropout': 0.2}
  return c


def test_jit_and_pmap_on_8_devices_match_one_device(data_dir, tmp_path):
  assert jax.local_device_count() == 8
  losses = {}
  for name, parallel, devices in [('one', 'jit', 1), ('jit8', 'jit', 8), ('pmap8', 'pmap', 8)]:
    config = small_config(data_dir, parallel=parallel, num_devices=devices, log_every=1)
    train_and_evaluate(config, str(tmp_path / name))
    rows = [r for r in read_metrics(str(tmp_path / name)) if 'train/loss' in r]
    losses[name] = np.array([r['train/loss'] for r in rows])
  assert len(losses['one']) == 20
  assert losses['one'][-1] < 0.75 * losses['one'][0]  # it trains, so the comparison has content
  np.testing.assert_allclose(losses['jit8'], losses['one'], rtol=2e-5)
  np.testing.assert_allclose(losses['pmap8'], losses['one'], rtol=2e-5)


def _train_cmd(workdir, data_dir, num_steps):
  return [sys.executable, os.path.join(REPO, 'scripts', 'train.py'), f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', f'--config.num_steps={num_steps}',
          '--config.checkpoint_every=100', '--config.eval_every=100000', '--config.log_every=100',
          '--config.num_devices=1', '--config.progress=False']


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(data_dir, tmp_path):
  # Long enough to kill after step 200 and reach 0.9 accuracy (~0.97 at step 300), short enough for
  # CI: the three runs train ~1300 steps (1200 steps, ~2500 in all, took 65 s of CI's 25 min).
  num_steps, kill_after = 600, 200
  # A compilation cache shared by the three runs: the restart compiles nothing the first run did.
  # XLA's usual optimization level and emitters (not conftest's): these runs are compute, not
  # compilation (23 s against 39 s at -O0 for 2500 steps, one core, 2026-12-02).
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'xla_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  subprocess.run(_train_cmd(tmp_path / 'ref', data_dir, num_steps), check=True, env=env,
                 capture_output=True)
  killed = tmp_path / 'killed'
  proc = subprocess.Popen(_train_cmd(killed, data_dir, num_steps), env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = killed / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if ckpts.exists() and any(p.name.isdigit() and int(p.name) >= kill_after for p in ckpts.iterdir()):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, 'the run finished before it could be killed'
  saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert saved and saved[-1] < num_steps, saved
  result = subprocess.run(_train_cmd(killed, data_dir, num_steps), env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'ref' / 'final_metrics.json') as f:
    ref = json.load(f)
  with open(killed / 'final_metrics.json') as f:
    resumed = json.load(f)
  assert ref['test/accuracy'] > 0.9
  timing = {'train_wall_s', 'train/examples_per_second'}  # this invocation's own clock
  assert timing <= set(ref) and set(resumed) == set(ref)
  assert {k: v for k, v in resumed.items() if k not in timing} == {
      k: v for k, v in ref.items() if k not in timing}
  steps = [r['step'] for r in read_metrics(str(killed)) if 'train/loss' in r]
  assert steps == sorted(set(steps)) and steps[-1] == num_steps  # no duplicated or lost log lines


def test_nonfinite_loss_stops_naming_the_step_and_checkpoint(data_dir, tmp_path):
  config = small_config(data_dir, num_devices=1, checkpoint_every=2, num_steps=50)
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 1e30
  config.optimizer.warmup_steps = 0
  with pytest.raises(FloatingPointError, match=r'Training diverged (at step|in steps?) \d+.*(The newest checkpoint, .*, is verified finite|No checkpoint was written)'):
    train_and_evaluate(config, str(tmp_path / 'w'))


@pytest.mark.parametrize('key, value, match', [
    ('optimizer.lr', 0.1, r"Unknown config key config.optimizer.lr; known keys there: \[.*'learning_rate'"),
    ('batchsize', 3, r"Unknown config key config.batchsize.*Did you mean 'batch_size'"),
])
def test_unknown_config_key(data_dir, tmp_path, key, value, match):
  config = small_config(data_dir)
  node = config
  *path, leaf = key.split('.')
  for p in path:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    train_and_evaluate(config, str(tmp_path / 'w'))


def test_negative_crop_padding_is_named():
  config = base_config()
  config.augment.crop_padding = -4
  with pytest.raises(ValueError, match=r'config.augment.crop_padding must be an integer >= 0, got -4'):
    validate_config(config)


def test_unknown_flag_override_fails_in_the_script(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'train.py'), f'--workdir={tmp_path}',
       '--config.optimizer.lr=0.1'], capture_output=True, text=True)
  assert result.returncode != 0
  assert 'Unknown config key config.optimizer.lr in --config.optimizer.lr' in result.stderr, result.stderr[-2000:]


def test_digits_small_run_writes_its_workdir(data_dir, tmp_path):
  # eval_every is not a multiple of log_every or checkpoint_every: evaluation must still happen.
  config = small_config(data_dir, num_steps=200, eval_every=70, checkpoint_every=100, log_every=50)
  final = train_and_evaluate(config, str(tmp_path))
  assert final['test/accuracy'] > 0.9 and final['test/ece'] < 0.1
  assert {'test/nll', 'validation/accuracy', 'test/balanced_accuracy', 'temperature', 'test_ts/ece'} <= set(final)
  assert not {'test/many_accuracy', 'test_posthoc/accuracy'} & set(final)  # balanced: no long-tail views
  rows = read_metrics(str(tmp_path))
  assert any('train/grad_norm' in r for r in rows)
  assert [r['step'] for r in rows if 'validation/accuracy' in r] == [70, 140, 200]
  assert any(k.startswith('train/grad_norm/backbone/') for r in rows for k in r)
  assert os.listdir(tmp_path / 'tensorboard')
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['num_steps'] == 200


def test_long_tailed_run_reports_frequency_buckets_temperature_and_posthoc(data_dir, tmp_path):
  config = small_config(data_dir, num_steps=60, **{'data.imbalance_ratio': 10.0,
                                                   'data.sampling': 'sqrt',
                                                   'head': {'name': 'imbalanced', 'loss': 'ldam',
                                                            'drw_start_step': 40}})
  final = train_and_evaluate(config, str(tmp_path))
  assert 0.05 <= final['temperature'] <= 20
  for prefix in ('test/', 'test_ts/', 'test_posthoc/'):
    assert {prefix + k for k in ('accuracy', 'many_accuracy', 'medium_accuracy', 'ece')} <= set(final)
  assert final['test_ts/accuracy'] == final['test/accuracy']  # a temperature never changes argmax
  assert final['test_posthoc/accuracy'] != final['test/accuracy']
  assert os.path.getsize(tmp_path / 'reliability.png') > 10000


@pytest.mark.parametrize('key, value, match', [
    ('data.sampling', 'balanced', r"config.data.sampling must be one of .*'class'.*got 'balanced'"),
    ('data.imbalance_profile', 'linear', r"config.data.imbalance_profile must be one of .*got 'linear'"),
    ('data.imbalance_ratio', 0.5, r'config.data.imbalance_ratio must be >= 1 .*got 0.5'),
])
def test_bad_long_tail_config_values_are_named(data_dir, tmp_path, key, value, match):
  config = small_config(data_dir, **{key: value})
  with pytest.raises(ValueError, match=match):
    train_and_evaluate(config, str(tmp_path / 'w'))


@pytest.mark.parametrize('sampling', ['instance', 'class', 'over'])
def test_small_train_splits_are_gathered_on_device_bit_for_bit(data_dir, sampling, monkeypatch):
  from softmax_jax import data  # pylint: disable=g-import-not-at-top
  from softmax_jax.train import classification, build_task  # pylint: disable=g-import-not-at-top
  config = small_config(data_dir, **{'data.sampling': sampling})
  task = build_task(config)
  gather = jax.jit(task.gather)
  device = (gather(task.resident, b) for b in task.train_batches(3))
  host = data.train_batches(task.dataset, config.batch_size, seed=config.seed, start_step=3,
                            sampling=sampling, num_steps=config.num_steps)
  for _ in range(4):
    a, b = next(device), next(host)
    np.testing.assert_array_equal(np.asarray(a['image']), b['image'])
    np.testing.assert_array_equal(np.asarray(a['label']), b['label'])
  assert set(next(task.train_batches(3))) == {'index'}  # only [B] indices travel
  # Past the size limit the host pipeline serves, unchanged.
  monkeypatch.setattr(classification, 'RESIDENT_BYTES', 0)
  task = build_task(config)
  assert task.resident is None and isinstance(next(task.train_batches(3))['image'], np.ndarray)


def test_index_tables_feed_each_step_its_own_batch(data_dir):
  """The jit driver's `feed` of a resident split: tables of INDEX_CHUNK steps from a multiple of it
  (a resumed run's first one padded), one device array for all the steps of a table."""
  from softmax_jax import data  # pylint: disable=g-import-not-at-top
  from softmax_jax.train import build_task, parallel  # pylint: disable=g-import-not-at-top
  from softmax_jax.train.state import make_optimizer  # pylint: disable=g-import-not-at-top
  config = small_config(data_dir, num_steps=1000)
  task = build_task(config)
  schedule, tx = make_optimizer(config.optimizer, config.num_steps)
  driver = parallel.JitDriver(task, tx, schedule)
  c, start = parallel.INDEX_CHUNK, 37
  want = data.train_indices(task.dataset, config.batch_size, seed=config.seed, start_step=start)
  fed = driver.feed(task.train_batches(start), start)
  row = jax.jit(parallel.step_rows)
  tables = []
  for step in range(start, 3 * c + 5):
    table = next(fed)
    assert table['index'].shape == (config.batch_size, c) and isinstance(table['index'], jax.Array)
    assert table['index'].sharding == driver.sharded
    np.testing.assert_array_equal(np.asarray(row(table, step)['index']), next(want), err_msg=step)
    if not tables or tables[-1] is not table:
      tables.append(table)
  assert len(tables) == 4  # steps 37-63, 64-127, 128-191, 192-196
  # One step's batch by itself: a one-column table, read at any step.
  one = driver.put_batch(next(task.train_batches(5)))
  np.testing.assert_array_equal(np.asarray(row(one, 5)['index']), next(task.train_batches(5))['index'])
  assert np.shape(one['index']) == (config.batch_size, 1)
  # pmap gathers each step's batch before its step: no tables.
  pmap = parallel.PmapDriver(task, tx, schedule)
  batch = next(pmap.feed(task.train_batches(start), start))
  assert batch['image'].shape[:2] == (len(pmap.devices), config.batch_size // len(pmap.devices))
