"""Multi-process training over jax.distributed: 2 processes x 4 fake CPU devices == 1 x 8.

The processes are this file run as a script (`python multihost_test.py WORKDIR ADDRESS P ID TASKS`):
each joins the run through `train.distributed.initialize` on a free 127.0.0.1 port and trains the
named tasks with `train_and_evaluate`. The reference runs in the test process, which has 8 fake
devices (tests/conftest.py). CPU collectives between the processes go over gloo (jax's default).

One launch of both processes trains the LM (a small LSTM on a synthetic Markov corpus: the real
PTB's evaluation passes take minutes on one core) to the end and then digits, where process 1
SIGKILLs itself at step 15 (after the checkpoint of step 10); the test then kills process 0 (a
cluster manager restarts the whole job) and launches both again, which resume digits from step 10
and finish. Per-step losses (metrics.jsonl, log_every=1) and final metrics must equal the
single-process run's up to float summation order.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILL_AT = 15  # digits step at which process 1 kills itself in the first launch
TIMING_KEYS = ('train_wall_s', 'per_second')


def digits_config():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('digits', os.path.join(REPO, 'configs', 'digits.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config('small')
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 1, 10, 10
  c.progress = False
  return c, None


def lm_config():
  """A 1-layer LSTM (dropout on) on a Markov corpus of 769 train tokens: 12 steps an epoch of
  8 rows x 8 tokens, so 20 steps cross an epoch start (the carry resets)."""
  from softmax_jax.data.text import TextDataset  # pylint: disable=g-import-not-at-top
  from softmax_jax.train.config import base_config  # pylint: disable=g-import-not-at-top
  V, rng = 24, np.random.default_rng(0)
  stream = rng.integers(V, size=769 + 2 * 200).astype(np.int32)
  for i in range(1, len(stream)):  # a Markov chain: mostly the successor of the previous token
    if rng.random() < 0.8:
      stream[i] = (stream[i - 1] * 7 + 3) % V
  splits = {'train': stream[:769], 'validation': stream[769:969], 'test': stream[969:]}
  data = TextDataset(name='ptb', vocab=tuple(f'w{i}' for i in range(V)),
                     counts=np.bincount(splits['train'], minlength=V).astype(np.int64), splits=splits)
  c = base_config()
  c.data.name, c.data.seq_len = 'ptb', 8
  c.model = dict(name='lstm', embed_dim=16, hidden=32, num_layers=1, dropout=0.2)
  c.head = dict(name='dense')
  c.batch_size = c.eval_batch_size = 8
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 1, 1000, 10
  c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.schedule = 3e-2, 0, 'constant'
  c.progress = False
  return c, data


CONFIGS = {'lm': lm_config, 'digits': digits_config}


def _worker(root, address, num_processes, process_id, tasks, kill_at):
  """One process of the run: joins it, then trains `tasks` (names of CONFIGS) in `root/<name>`."""
  sys.path.insert(0, REPO)
  from softmax_jax.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(address, num_processes, process_id, timeout_s=60)
  from softmax_jax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  from softmax_jax.train.classification import ClassificationTask  # pylint: disable=g-import-not-at-top
  if kill_at:
    batches = ClassificationTask.train_batches

    def train_batches(self, start_step):  # SIGKILL when the batch of step `kill_at` is drawn
      for step, batch in enumerate(batches(self, start_step), start_step + 1):
        if step == kill_at:
          os.kill(os.getpid(), signal.SIGKILL)
        yield batch
    ClassificationTask.train_batches = train_batches
  for name in tasks:
    config, dataset = CONFIGS[name]()
    train_and_evaluate(config, os.path.join(root, name), dataset=dataset)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(root, tasks, *, kill_at=0, timeout_s=120):
  """Runs 2 worker processes x 4 devices; returns their (returncode, output). Process 1 gets
  `kill_at`; once it has died of SIGKILL, process 0 is killed too. Both are killed on a timeout."""
  # A compilation cache shared by the launches: the restart compiles nothing the first one did.
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONUNBUFFERED='1', JAX_COMPILATION_CACHE_DIR=os.path.join(root, 'xla_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  address = f'127.0.0.1:{_free_port()}'
  logs = [open(os.path.join(root, f'process{p}.log'), 'w+') for p in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, __file__, root, address, '2', str(p), ','.join(tasks), str(kill_at if p else 0)],
      env=env, stdout=logs[p], stderr=subprocess.STDOUT, cwd=REPO) for p in range(2)]
  deadline = time.monotonic() + timeout_s
  try:
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if kill_at and procs[1].poll() == -signal.SIGKILL and procs[0].poll() is None:
        procs[0].kill()  # the job is restarted as a whole
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read()[-3000:])
    log.close()
  assert time.monotonic() < deadline, f'timed out after {timeout_s} s:\n' + '\n'.join(outputs)
  return [(p.returncode, out) for p, out in zip(procs, outputs)]


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return np.array([(r['step'], r['train/loss']) for r in rows if 'train/loss' in r])


def _final(workdir):
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    return {k: v for k, v in json.load(f).items() if not any(t in k for t in TIMING_KEYS)}


def test_two_processes_train_like_one_and_resume_after_sigkill(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from softmax_jax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8 and jax.process_count() == 1
  root = str(tmp_path / 'multi')
  os.makedirs(root)
  first = _launch(root, ['lm', 'digits'], kill_at=KILL_AT)
  assert first[1][0] == -signal.SIGKILL, f'process 1 should have killed itself:\n{first[1][1]}'
  digits = os.path.join(root, 'digits')
  assert sorted(os.listdir(os.path.join(digits, 'checkpoints'))) == ['10'], first[0][1]
  assert _losses(digits)[-1, 0] < 20  # it stopped mid-run
  second = _launch(root, ['digits'])
  assert [r for r, _ in second] == [0, 0], '\n'.join(out for _, out in second)
  assert sorted(os.listdir(os.path.join(digits, 'checkpoints'))) == ['10', '20']
  # Only process 0 wrote files: one TensorBoard event file per launch that trained.
  assert len(os.listdir(os.path.join(digits, 'tensorboard'))) == 2
  for name, factory in CONFIGS.items():
    config, dataset = factory()
    reference = str(tmp_path / f'single_{name}')
    train_and_evaluate(config, reference, dataset=dataset)
    single, multi = _losses(reference), _losses(os.path.join(root, name))
    np.testing.assert_array_equal(multi[:, 0], np.arange(1, 21), err_msg=name)
    np.testing.assert_allclose(multi[:, 1], single[:, 1], rtol=1e-5, err_msg=f'{name}: per-step losses')
    want, got = _final(reference), _final(os.path.join(root, name))
    assert sorted(got) == sorted(want), name
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=f'{name}: {key}')


def test_unreachable_coordinator_is_a_clear_error_within_the_timeout():
  import pytest  # pylint: disable=g-import-not-at-top
  from softmax_jax.train import distributed  # pylint: disable=g-import-not-at-top
  address = f'127.0.0.1:{_free_port()}'  # closed: nothing listens there
  start = time.monotonic()
  with pytest.raises(distributed.CoordinatorUnreachable, match=f'{address} within 2 s'):
    distributed.initialize(address, 2, 1, timeout_s=2)
  assert time.monotonic() - start < 6
  with pytest.raises(ValueError, match='Give all of --coordinator_address'):
    distributed.initialize(address, 2)
  with pytest.raises(ValueError, match='0 <= process_id < num_processes'):
    distributed.initialize(address, 2, 2)
  assert not distributed.initialize()  # no cluster in this environment: single process


if __name__ == '__main__':
  _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split(','),
          int(sys.argv[6]))
