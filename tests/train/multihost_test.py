"""Multi-process training over jax.distributed: 2 processes x 4 fake CPU devices == 1 x 8.

The processes are this file run as a script (`python multihost_test.py WORKDIR ADDRESS P ID TASKS`):
each joins the run through `train.distributed.initialize` on a free 127.0.0.1 port and trains the
named tasks with `train_and_evaluate`. The reference runs in the test process, which has 8 fake
devices (tests/conftest.py). CPU collectives between the processes go over gloo (jax's default).

One launch of both processes trains a small LSTM on the real PTB words (`ptb_config`) on the 2-D
mesh {'data': 4, 'model': 2} (the batch split over both processes, the dense head's 10k classes
over 2 devices of each) to the end, then digits on the 1-D mesh, where process 1 SIGKILLs itself
at step 15 (after the checkpoint of step 10); the test then kills process 0 (a cluster manager
restarts the whole job) and launches both again, which resume digits from step 10 on the 2-D mesh
{'data': 1, 'model': 8}, whose 'model' axis spans both processes (config.mesh may change on
resume: checkpoints hold the host state; digits' 10 classes are padded to 16 from the start, so
shards 5-7 hold padded classes only) and finish. Per-step losses
(metrics.jsonl, log_every=1) and final metrics must equal the single-process runs' (PTB on the
same 4 x 2 mesh, digits on the 1-D one, uninterrupted) up to float summation order.
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
PTB_MESH = {'data': 4, 'model': 2}  # the dense head's 10k classes split over 2 devices
EVAL_TOKENS = 257  # of PTB's validation and test splits: 8 rows of 4 windows of 8 tokens
# digits' resume: its 16 (padded) classes over a 'model' axis that spans both processes.
RESHARDED_MESH = {'data': 1, 'model': 8}


def _config_module(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def digits_config(root, mesh=None):
  """configs/digits.py:small for 20 steps, on the 1-D mesh or `mesh`."""
  del root  # digits: a local TFDS builder (sklearn's digits) in the default data_dir
  c = _config_module('digits').get_config('small').unlock()
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 1, 10, 10
  c.mesh = mesh
  c.head.pad_classes_to = 8  # 10 -> 16 classes from the start, so the resume may split them 8 ways
  c.progress = False
  return c, None


def ptb_config(root):
  """A 1-layer LSTM (32 units, dropout on) on the real PTB words (10k vocabulary, the full train
  stream) with the dense head split on 'model' of the 2-D mesh {'data': 4, 'model': 2}: 8 rows x
  8 tokens a step, the evaluation splits cut to their first 257 tokens (4 windows of 8 x 8).
  Built from configs/ptb_lstm.py:dense,small (plain SGD, clipping); the tokens come from
  `root/ptb.npz`, written by the test (`write_ptb`) so the workers do not prepare PTB again."""
  from softmax_jax.data.text import TextDataset  # pylint: disable=g-import-not-at-top
  c = _config_module('ptb_lstm').get_config('dense,small').unlock()
  c.model.hidden = c.model.embed_dim = 32
  c.model.num_layers, c.model.dropout = 1, 0.2
  c.data.seq_len, c.batch_size, c.eval_batch_size = 8, 8, 8
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 1, 1000, 10
  c.mesh = PTB_MESH
  c.progress = False
  with np.load(os.path.join(root, 'ptb.npz')) as f:
    data = TextDataset(name='ptb', vocab=tuple(f['vocab']), counts=f['counts'],
                       splits={k: f[k] for k in ('train', 'validation', 'test')})
  return c, data


def write_ptb(root, data_dir):
  """Prepares PTB from its raw files (configs/ptb_lstm.py's source_dir) into `data_dir` and
  writes `root/ptb.npz`: the vocabulary, train counts, the train split and 257 tokens of the
  others. Returns False when the raw files are missing."""
  from softmax_jax.data.text import load_text_dataset  # pylint: disable=g-import-not-at-top
  c = _config_module('ptb_lstm').get_config('dense,small').unlock()
  if not os.path.exists(os.path.join(c.data.source_dir, 'ptb.train.txt')):
    return False
  c.data.data_dir = data_dir
  ptb = load_text_dataset(c.data)
  assert (len(ptb.vocab), len(ptb.splits['train'])) == (10_000, 929_589)
  np.savez(os.path.join(root, 'ptb.npz'), vocab=np.array(ptb.vocab), counts=ptb.counts,
           train=ptb.splits['train'], validation=ptb.splits['validation'][:EVAL_TOKENS],
           test=ptb.splits['test'][:EVAL_TOKENS])
  return True


CONFIGS = {'ptb': ptb_config, 'digits': digits_config,
           # digits resumed on another mesh (config.mesh may change on resume): its head split
           'digits_resharded': lambda root: digits_config(root, RESHARDED_MESH)}
WORKDIRS = {'digits_resharded': 'digits'}  # name -> workdir (root/<name> when not listed)


def _worker(root, address, num_processes, process_id, tasks, kill_at):
  """One process of the run: joins it, then trains `tasks` (names of CONFIGS) in `root/<workdir>`."""
  sys.path.insert(0, REPO)
  from softmax_jax.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(address, num_processes, process_id, timeout_s=60)
  from softmax_jax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  from softmax_jax.train.parallel import JitDriver  # pylint: disable=g-import-not-at-top
  if kill_at:
    driver_step = JitDriver.step

    # SIGKILL before digits' step `kill_at` is dispatched (its batches are drawn 64 steps ahead,
    # `JitDriver.feed`; PTB's driver has no resident split to gather from).
    def step(self, state, batch):
      self.calls = getattr(self, 'calls', 0) + 1
      if self.calls == kill_at and self._gather is not None:
        os.kill(os.getpid(), signal.SIGKILL)
      return driver_step(self, state, batch)
    JitDriver.step = step
  for name in tasks:
    config, dataset = CONFIGS[name](root)
    train_and_evaluate(config, os.path.join(root, WORKDIRS.get(name, name)), dataset=dataset)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(root, tasks, flags, *, kill_at=0, timeout_s=120):
  """Runs 2 worker processes x 4 devices; returns their (returncode, output). Process 1 gets
  `kill_at`; once it has died of SIGKILL, process 0 is killed too. Both are killed on a timeout.
  `flags`: their XLA_FLAGS (conftest's compile flags, 4 fake devices each)."""
  # A compilation cache shared by the launches: the restart compiles nothing the first one did.
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags,
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


def test_two_processes_train_like_one_and_resume_after_sigkill(tmp_path, xla_flags):
  import jax  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from softmax_jax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8 and jax.process_count() == 1
  root = str(tmp_path / 'multi')
  os.makedirs(root)
  if not write_ptb(root, str(tmp_path / 'tfds')):
    pytest.skip('PTB raw files not found (configs/ptb_lstm.py: ../shared/data/ptb)')
  first = _launch(root, ['ptb', 'digits'], xla_flags(4), kill_at=KILL_AT)
  assert first[1][0] == -signal.SIGKILL, f'process 1 should have killed itself:\n{first[1][1]}'
  digits = os.path.join(root, 'digits')
  assert sorted(os.listdir(os.path.join(digits, 'checkpoints'))) == ['10'], first[0][1]
  assert _losses(digits)[-1, 0] < 20  # it stopped mid-run
  second = _launch(root, ['digits_resharded'], xla_flags(4))
  assert [r for r, _ in second] == [0, 0], '\n'.join(out for _, out in second)
  assert sorted(os.listdir(os.path.join(digits, 'checkpoints'))) == ['10', '20']
  # Only process 0 wrote files: one TensorBoard event file per launch that trained.
  assert len(os.listdir(os.path.join(digits, 'tensorboard'))) == 2
  with open(os.path.join(digits, 'config_changes.jsonl')) as f:  # the mesh changed on resume
    assert [json.loads(line)['changes'] for line in f] == [
        {'mesh': [None, '<absent>'], 'mesh.data': ['<absent>', 1], 'mesh.model': ['<absent>', 8]}]
  for name in ('ptb', 'digits'):  # the references: PTB on its 4 x 2 mesh, digits on the 1-D one
    config, dataset = CONFIGS[name](root)
    reference = str(tmp_path / f'single_{name}')
    train_and_evaluate(config, reference, dataset=dataset)
    single, multi = _losses(reference), _losses(os.path.join(root, name))
    np.testing.assert_array_equal(multi[:, 0], np.arange(1, 21), err_msg=name)
    np.testing.assert_allclose(multi[:, 1], single[:, 1], rtol=1e-5, err_msg=f'{name}: per-step losses')
    want, got = _final(reference), _final(os.path.join(root, name))
    assert sorted(got) == sorted(want), name
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=f'{name}: {key}')
  ptb = _final(os.path.join(root, 'ptb'))
  assert 100 < ptb['test/perplexity'] < 5000, ptb  # it learned (uniform: 10k); the eval ran


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
