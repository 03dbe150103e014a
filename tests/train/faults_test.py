"""Fault injection: what a run does when something goes wrong, and that nothing is lost.

Each test injects one fault of issue 14 and checks the run's answer: a NaN at a chosen step and a
real divergence; a truncated, emptied, metadata-less or NaN checkpoint; a config change on
restart; two runs on one workdir; SIGINT and SIGTERM mid-run; two first runs preparing one TFDS
data_dir; a misspelt source_dir; README-style overrides. Training runs are digits with a tiny MLP
for a few steps (tests/train/loop_test.py's `small_config`); subprocesses only where a signal or a
second process is the point.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from softmax_jax.data import builders
from softmax_jax.data import text
from softmax_jax.train import base_config, load_trained, train_and_evaluate
from softmax_jax.train import classification, loop
from softmax_jax.train import runner
from softmax_jax.train.checkpoint import Checkpointer
from softmax_jax.train.config import (check_override_args, config_file_arg, load_config_file,
                                      override_free_form)
from softmax_jax.train.interrupt import Interrupts, TrainingInterrupted
from softmax_jax.train.parallel import JitDriver
from softmax_jax.train.workdir import WorkdirError, WorkdirLock, check_config
from softmax_jax.train.writer import read_metrics

from tests.data.builders_test import _write_fashion
from tests.data.text_test import FAKE_PTB, _write
from tests.train import runner_test
from tests.train.loop_test import REPO, small_config

STEPS = 10  # base run: checkpoints at 5 and 10


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def base(data_dir, **overrides):
  return small_config(data_dir, **{'num_devices': 1, 'num_steps': STEPS, 'checkpoint_every': 5, **overrides})


@pytest.fixture(scope='module')
def finished(data_dir, tmp_path_factory):
  """(workdir, final metrics) of an uninterrupted base run; tests work on copies of it."""
  workdir = str(tmp_path_factory.mktemp('finished') / 'w')
  return workdir, train_and_evaluate(base(data_dir), workdir)


def copy_of(finished, tmp_path):
  return shutil.copytree(finished[0], str(tmp_path / 'w'))


def _eval_metrics(final):
  return {k: v for k, v in final.items() if k.startswith(('test/', 'validation/'))}


def checkpoint_steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, 'checkpoints')) if p.isdigit())


def all_finite(workdir, step):
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'))
  state = ckpt._mgr.restore(step)  # pylint: disable=protected-access
  ckpt.close()
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


# ------------------------------------------------------------------------------------------------
# NaN: the run stops at the first bad step, never saves NaN, and says how to resume.


def test_divergence_names_its_step_and_a_finite_checkpoint_and_a_lower_rate_resumes(data_dir, tmp_path):
  # The repro: learning rate 1e6, a checkpoint every 5 steps.
  workdir = str(tmp_path / 'w')
  config = base(data_dir, num_steps=20, **{'optimizer.learning_rate': 1e6, 'optimizer.warmup_steps': 100})
  with pytest.raises(FloatingPointError) as error:
    train_and_evaluate(config, workdir)
  message = str(error.value)
  assert 'Training diverged' in message
  saved = checkpoint_steps(workdir)
  assert saved and all(all_finite(workdir, s) for s in saved)  # never a NaN checkpoint
  assert (f'The newest checkpoint, {workdir}/checkpoints/{saved[-1]} (step {saved[-1]}), is verified '
          'finite. To resume from it with a lower learning rate, rerun with the same workdir and '
          '--config.optimizer.learning_rate=100000 (now 1e+06)') in message
  assert error.value.resume_flags == ['--config.optimizer.learning_rate=100000']
  # The advice works: the same workdir with a (much) lower rate resumes from that checkpoint.
  config.optimizer.learning_rate = 1e-3
  final = train_and_evaluate(config, workdir)
  assert all(np.isfinite(v) for v in final.values())
  rows = read_metrics(workdir)
  assert not any(k.startswith('nonfinite') for r in rows for k in r)  # the failed steps' rows are gone
  with open(os.path.join(workdir, 'config_changes.jsonl')) as f:
    assert json.loads(f.readline())['changes'] == {'optimizer.learning_rate': [1e6, 1e-3]}


class NaNAtStep(JitDriver):
  """The jit driver, with the images of step `BAD` turned to NaN (a corrupt batch)."""
  BAD = 7

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.done = 0

  def step(self, state, batch):
    self.done += 1
    if self.done == self.BAD:
      batch = dict(batch, image=np.full_like(batch['image'], np.nan))
    return super().step(state, batch)


def test_nan_at_a_chosen_step_stops_there_before_any_later_checkpoint(data_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(loop.DRIVERS, 'jit', NaNAtStep)
  monkeypatch.setattr(classification, 'RESIDENT_BYTES', 0)  # host batches, which the driver spoils
  workdir = str(tmp_path / 'w')
  with pytest.raises(FloatingPointError, match=r'diverged at step 7: the training loss is nan .*'
                     r'newest checkpoint, .*/checkpoints/5 \(step 5\), is verified finite'):
    train_and_evaluate(base(data_dir), workdir)
  assert checkpoint_steps(workdir) == [5] and all_finite(workdir, 5)


def test_nonfinite_gradient_norm_alone_names_its_step(monkeypatch):
  # A head whose loss stays finite while its gradient is NaN (issue 14, defect 2).
  class Driver(runner_test.Driver):
    def step(self, state, batch):
      state, metrics = super().step(state, batch)
      return state, dict(metrics, grad_norm=np.float32(np.nan if int(state) == 3 else 1.0))
  with pytest.raises(FloatingPointError, match=r'diverged at step 3: the gradient norm is nan.*'
                     'No checkpoint was written before it'):
    runner_test.run(monkeypatch, driver=Driver)


# ------------------------------------------------------------------------------------------------
# Broken checkpoints: the newest intact one is restored, the broken ones named and set aside.


def _break(step_dir, how):
  if how == 'truncated data file':
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
             if 'ocdbt.process_' in r and os.path.basename(r) == 'd']  # the arrays' data files
    biggest = max(files, key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)
  elif how == 'emptied step folder':
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)
  elif how == 'deleted _METADATA':
    os.remove(os.path.join(step_dir, 'default', '_METADATA'))


def _state(step, value=None, n=4096):
  """A train state whose arrays do not compress (a truncated file then loses some of them)."""
  w = np.random.default_rng(step).standard_normal(n).astype(np.float32)
  return dict(step=np.asarray(step, np.int32), params={'w': w if value is None else w * value})


@pytest.mark.parametrize('how, reason', [
    ('truncated data file', 'a data file is truncated or corrupt .*OUT_OF_RANGE'),
    ('emptied step folder', 'the step folder is empty or incomplete'),
    ('deleted _METADATA', 'its _METADATA file is missing'),
    ('NaN', r"1 arrays hold NaN or inf, e.g. \['params'\]\['w'\]"),
])
def test_a_broken_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, caplog, how, reason):
  directory = tmp_path / 'checkpoints'
  ckpt = Checkpointer(str(directory))
  ckpt.save(5, _state(5))
  ckpt.save(10, _state(10, np.nan) if how == 'NaN' else _state(10))
  _break(str(directory / '10'), how)
  ckpt.close()
  ckpt = Checkpointer(str(directory))
  state, step = ckpt.restore_latest(_state(0), set_aside_broken=True)
  np.testing.assert_array_equal(state['params']['w'], _state(5)['params']['w'])
  assert step == 5
  assert any('checkpoints/10 is broken' in r.message and
             re.search(reason, r.message) for r in caplog.records), caplog.text
  assert os.listdir(tmp_path / 'broken_checkpoints') == ['10'] and os.listdir(directory) == ['5']
  ckpt.save(10, _state(10))  # the resumed run writes step 10 again
  assert ckpt.restore_latest(_state(0))[1] == 10
  ckpt.close()


def test_no_intact_checkpoint_is_said_plainly(tmp_path):
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'))
  for step in (5, 10):
    ckpt.save(step, _state(step))
    _break(str(tmp_path / 'checkpoints' / str(step)), 'deleted _METADATA')
  with pytest.raises(WorkdirError, match=r'No intact checkpoint in .*checkpoints: step 10: its _METADATA '
                     r'file is missing .*; step 5: its _METADATA file is missing .*To train from '
                     r'scratch, move .* away or pass another --workdir'):
    ckpt.restore_latest(_state(0), set_aside_broken=True)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10', '5']  # nothing moved or deleted


def test_training_resumes_past_a_truncated_checkpoint_and_ends_as_if_nothing_happened(data_dir, finished, tmp_path):
  workdir = copy_of(finished, tmp_path)
  _break(os.path.join(workdir, 'checkpoints', '10'), 'truncated data file')
  final = train_and_evaluate(base(data_dir), workdir)
  assert _eval_metrics(final) == _eval_metrics(finished[1])  # steps 6-10 redone identically
  assert checkpoint_steps(workdir) == [5, 10]
  assert os.listdir(os.path.join(workdir, 'broken_checkpoints')) == ['10']
  steps = [r['step'] for r in read_metrics(workdir) if 'train/loss' in r]
  assert steps == sorted(set(steps)) and steps[-1] == STEPS


# ------------------------------------------------------------------------------------------------
# The workdir's config: incompatible changes are refused before anything is written.


@pytest.mark.parametrize('key, value, shown', [
    ('model.hidden', (128,), 'config.model.hidden: [64] (workdir) -> [128] (now)'),
    ('head', ml_collections.ConfigDict({'name': 'margin', 'kind': 'cosface'}),
     "config.head.kind: '<absent>' (workdir) -> 'cosface' (now)\n  config.head.name: 'dense' (workdir) -> 'margin' (now)"),
    ('data.classes', (0, 1, 2), 'config.data.classes: None (workdir) -> [0, 1, 2] (now)'),
    ('data.name', 'mnist', "config.data.name: 'digits' (workdir) -> 'mnist' (now)"),
    ('seed', 1, 'config.seed: 0 (workdir) -> 1 (now)'),
    ('batch_size', 32, 'config.batch_size: 64 (workdir) -> 32 (now)'),
    ('optimizer.name', 'sgd', "config.optimizer.name: 'adamw' (workdir) -> 'sgd' (now)"),
])
def test_an_incompatible_config_is_refused_with_a_diff(data_dir, tmp_path, key, value, shown):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(base(data_dir).to_json_best_effort())
  config = base(data_dir)
  if key == 'head':
    config.head = value
  else:
    config.update_from_flattened_dict({key: value})
  assert check_config(config, workdir)  # no checkpoint yet: nothing to protect, the change is allowed
  os.makedirs(os.path.join(workdir, 'checkpoints', '5'))
  with pytest.raises(WorkdirError) as error:
    check_config(config, workdir)
  assert f'Workdir {workdir} was created with another config: this run changes\n  {shown}\n' in str(error.value)
  assert 'pass another --workdir' in str(error.value)


def test_harmless_changes_are_allowed(data_dir, tmp_path):
  with open(tmp_path / 'config.json', 'w') as f:
    f.write(base(data_dir).to_json_best_effort())
  config = base(data_dir, num_steps=50, log_every=7, **{'optimizer.learning_rate': 1e-4,
                                                        'optimizer.clip_global_norm': 1.0,
                                                        'data.data_dir': '/elsewhere'})
  assert set(check_config(config, str(tmp_path))) == {
      'num_steps', 'log_every', 'optimizer.learning_rate', 'optimizer.clip_global_norm', 'data.data_dir'}


def test_a_resume_on_another_mesh_is_allowed_and_other_changes_still_refused(data_dir, finished, tmp_path):
  # config.mesh is None ('mesh' in config.json) or a dict ('mesh.data', 'mesh.model'): both harmless.
  workdir = copy_of(finished, tmp_path)
  with pytest.raises(WorkdirError, match=r'this run changes\n  config.model.hidden: \[64\] \(workdir\) '
                     r"-> \[128\] \(now\)\nIts checkpoints"):  # only the refused key is shown
    check_config(base(data_dir, mesh={'data': 1, 'model': 2}, **{'model.hidden': (128,)}), workdir)
  # The run of 1 device resumes on a 1 x 2 mesh with the head split on 'model', and finishes (that
  # a resume on another mesh ends as the uninterrupted run: tests/train/multihost_test.py).
  final = train_and_evaluate(base(data_dir, num_steps=12, num_devices=2, mesh={'data': 1, 'model': 2}),
                             workdir)
  assert checkpoint_steps(workdir) == [10, 12] and np.isfinite(final['test/nll'])
  with open(os.path.join(workdir, 'config_changes.jsonl')) as f:
    change = json.loads(f.readline())
  assert change['step'] == 10 and change['changes'] == {
      'mesh': [None, '<absent>'], 'mesh.data': ['<absent>', 1], 'mesh.model': ['<absent>', 2],
      'num_devices': [1, 2], 'num_steps': [10, 12]}
  # And from one mesh to another.
  assert set(check_config(base(data_dir, num_steps=12, mesh={'data': 2, 'model': 1}), workdir)) == {
      'mesh.data', 'mesh.model', 'num_devices'}


def test_restart_with_a_wider_model_leaves_the_workdir_intact(data_dir, finished, tmp_path):
  workdir = copy_of(finished, tmp_path)
  with open(os.path.join(workdir, 'config.json')) as f:
    before = f.read()
  with pytest.raises(WorkdirError, match=r'config.model.hidden: \[64\] \(workdir\) -> \[128\] \(now\)'):
    train_and_evaluate(base(data_dir, **{'model.hidden': (128,)}), workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == before
  assert load_trained(workdir)[2].backbone.hidden == (64,)  # still loads the model it trained
  with pytest.raises(WorkdirError, match=r'config.num_steps=8 is below the step of the latest '
                     r'checkpoint, .*/checkpoints/10 \(step 10\).*--config.num_steps=10'):
    train_and_evaluate(base(data_dir, num_steps=8), workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == before
  # More steps and another learning rate: allowed, logged, and config.json follows.
  train_and_evaluate(base(data_dir, num_steps=12, **{'optimizer.learning_rate': 1e-3}), workdir)
  with open(os.path.join(workdir, 'config_changes.jsonl')) as f:
    change = json.loads(f.readline())
  assert change['step'] == 10 and change['changes'] == {'num_steps': [10, 12],
                                                        'optimizer.learning_rate': [3e-3, 1e-3]}
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['num_steps'] == 12


def test_final_metrics_row_is_written_once_when_final_evaluation_is_rerun(data_dir, finished, tmp_path):
  # A kill during the final evaluation leaves the checkpoint at num_steps and maybe the final row.
  workdir = copy_of(finished, tmp_path)
  train_and_evaluate(base(data_dir), workdir)
  finals = [r for r in read_metrics(workdir) if 'test/accuracy' in r]
  assert [r['step'] for r in finals] == [STEPS]


@pytest.fixture
def default_handlers():
  """SIGINT and SIGTERM as an interactive Python has them (a background job ignores SIGINT)."""
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  signal.signal(signal.SIGINT, signal.default_int_handler)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  yield
  for s, handler in before.items():
    signal.signal(s, handler)


def test_sigint_during_final_evaluation_says_training_had_finished(data_dir, finished, tmp_path, monkeypatch,
                                                                    default_handlers):
  workdir = copy_of(finished, tmp_path)
  monkeypatch.setattr(loop, 'final_evaluation', lambda *a, **k: os.kill(os.getpid(), signal.SIGINT) or time.sleep(5))
  with pytest.raises(TrainingInterrupted, match=r'Interrupted by SIGINT. Training had finished '
                     r'\(.*/checkpoints/10\); rerun with the same workdir to evaluate it.'):
    train_and_evaluate(base(data_dir), workdir)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


# ------------------------------------------------------------------------------------------------
# Two runs on one workdir; signals.


def test_a_locked_workdir_names_the_run_that_holds_it(data_dir, tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirError, match=f'is in use by another run: pid {os.getpid()} on host '
                       f'{socket.gethostname()}, since .*pass another --workdir'):
      train_and_evaluate(base(data_dir), str(tmp_path))
  assert not os.path.exists(tmp_path / 'config.json')


def _script(workdir, data_dir, *extra):
  return [sys.executable, os.path.join(REPO, 'scripts', 'train.py'), f'--workdir={workdir}',
          '--config', 'configs/digits.py', f'--config.data.data_dir={data_dir}',
          '--config.num_steps=100000', '--config.log_every=5', '--config.checkpoint_every=100000',
          '--config.eval_every=100000', '--config.num_devices=1', '--config.progress=False', *extra]


def _wait_for_training(proc, workdir, timeout=120):
  deadline = time.time() + timeout
  path = os.path.join(workdir, 'metrics.jsonl')
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and os.path.getsize(path):
      return
    time.sleep(0.05)
  raise AssertionError(f'the run did not start training: {proc.poll()}, {proc.stderr.read()[-3000:]}')


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_signal_mid_run_checkpoints_the_step_and_exits_cleanly(data_dir, tmp_path, signum, default_handlers,
                                                               xla_flags):
  # default_handlers: the child inherits an ignored SIGINT (pytest in a background job) otherwise.
  workdir = str(tmp_path / 'w')
  # README-style head overrides on the default config, the second in the space form.
  extra = ['--config.head.name=margin', '--config.head.kind', 'cosface', '--config.model.hidden=(32,)']
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  proc = subprocess.Popen(_script(workdir, data_dir, *extra), cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    _wait_for_training(proc, workdir)
    with pytest.raises(WorkdirError, match=f'in use by another run: pid {proc.pid} on host '
                       f'{socket.gethostname()}.*scripts/train.py'):
      train_and_evaluate(base(data_dir), workdir)  # a second run on the same workdir
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
  finally:
    proc.kill()
  name = signal.Signals(signum).name
  assert proc.returncode == 128 + signum, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  step = checkpoint_steps(workdir)[-1]
  assert (f'Interrupted by {name} after step {step} of 100000: saved checkpoint '
          f'{workdir}/checkpoints/{step}. Rerun with the same workdir and config to resume from it.') in stderr
  assert f'Resume: {sys.executable} ' in stderr and '--config.head.kind cosface' in stderr
  assert step >= 5 and all_finite(workdir, step)  # at least the step of the logged row
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['head'] == {'name': 'margin', 'kind': 'cosface'}
  rows = [r['step'] for r in read_metrics(workdir) if 'train/loss' in r]
  assert rows and rows[-1] <= step  # every logged step is in the checkpoint: a rerun loses nothing


def test_a_second_sigint_aborts_at_once(default_handlers):
  with Interrupts() as interrupts:
    with interrupts.deferred():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
      assert interrupts.signum == signal.SIGINT  # deferred: the loop checkpoints first
      with pytest.raises(KeyboardInterrupt) as error:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
      assert not isinstance(error.value, TrainingInterrupted)
  with Interrupts() as interrupts:  # outside the step loop the first signal raises at once
    with pytest.raises(TrainingInterrupted, match='Interrupted by SIGTERM. Rerun with the same workdir'):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # ignored on purpose (nohup): stays ignored
  with Interrupts():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)


def test_runner_checkpoints_the_step_a_signal_arrives_in(monkeypatch):
  interrupts = Interrupts()

  class Driver(runner_test.Driver):
    def step(self, state, batch):
      state, metrics = super().step(state, batch)
      if int(state) == 7:
        interrupts.signum = signal.SIGTERM
      return state, metrics
  saved = []
  monkeypatch.setattr(runner_test.Ckpt, 'save', lambda self, step, state: saved.append(step))
  with pytest.raises(TrainingInterrupted, match=r'SIGTERM after step 7 of 12: saved checkpoint ckpt/7'):
    clock = runner_test.Clock()
    config = base_config()
    config.update_from_flattened_dict(dict(num_steps=12, log_every=4, eval_every=6, checkpoint_every=5,
                                           progress=False))
    runner.run_steps(config, Driver(clock), np.asarray(0), iter(range(1, 100)), start_step=0,
                     writer=runner_test.Writer(), ckpt=runner_test.Ckpt(clock),
                     evaluate=lambda s: {}, items_per_step=1, rate='examples_per_second',
                     interrupts=interrupts)
  assert saved == [5, 7]


# ------------------------------------------------------------------------------------------------
# Data: concurrent first preparation; a source_dir that does not exist.


def test_two_first_runs_prepare_one_data_dir_without_a_race(tmp_path):
  code = ('import sys; from softmax_jax.data import builders; '
          'print(builders.prepare("digits", data_dir=sys.argv[1]).is_prepared())')
  procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0 and out.strip().endswith('True'), err[-2000:]
  assert os.listdir(tmp_path / 'digits') == ['1.0.0']


def test_a_missing_source_dir_is_an_error_even_once_prepared(tmp_path):
  _write_fashion(str(tmp_path / 'raw'))
  builders.prepare('fashion_mnist_idx', data_dir=str(tmp_path / 'tfds'), source_dir=str(tmp_path / 'raw'))
  with pytest.raises(FileNotFoundError, match=r"config.data.source_dir='/no/such/dir' is not a directory. fashion_mnist_idx is already prepared in "):
    builders.prepare('fashion_mnist_idx', data_dir=str(tmp_path / 'tfds'), source_dir='/no/such/dir')
  text.prepare_corpus('ptb', data_dir=str(tmp_path / 'tfds'), source_dir=_write(tmp_path / 'ptb', FAKE_PTB))
  with pytest.raises(FileNotFoundError, match=r"config.data.source_dir='/no/such/ptb' is not a directory. ptb is already prepared in "):
    text.prepare_corpus('ptb', data_dir=str(tmp_path / 'tfds'), source_dir='/no/such/ptb')


# ------------------------------------------------------------------------------------------------
# Overrides as the README writes them (defect 7).


def test_readme_head_overrides_on_the_default_config(data_dir, tmp_path):
  config = base(data_dir, num_steps=2)
  override_free_form(config, {'head.kind': 'cosface', 'head.name': 'margin'})  # order does not matter
  assert config.head.to_dict() == {'name': 'margin', 'kind': 'cosface'}
  assert train_and_evaluate(config, str(tmp_path))['test/accuracy'] >= 0
  config = load_config_file(os.path.join(REPO, 'configs', 'digits.py'))
  override_free_form(config, {'head.name': 'imbalanced', 'head.loss': 'ldam', 'head.scale': '16',
                              'model.hidden': '(32,)'})
  assert config.is_locked
  assert config.head.to_dict() == {'name': 'imbalanced', 'loss': 'ldam', 'scale': 16.0}
  assert config.model.hidden == (32,) and config.model.dropout == 0.2  # the same model keeps its keys


@pytest.mark.parametrize('overrides, match', [
    ({'head.loss': 'ldam'}, r"Unknown config key config.head.loss .*DenseSoftmax \(head.name='dense'\) "
                            r"takes .*Set --config.head.name to one that does: \['imbalanced', 'sampled'\]"),
    ({'head.name': 'imbalanced', 'head.gama': '2'}, r"config.head.gama .*Did you mean 'gamma'"),
    ({'head.num_classes': '0'}, r'config.head.num_classes .*The data sets num_classes'),
    ({'head.name': 'softmax'}, r"--config.head.name=softmax: unknown; choose one of \['adaptive'"),
    ({'model.hidden': '64'}, r'--config.model.hidden=64: expected a tuple like \(256, 256\)'),
])
def test_bad_head_and_model_overrides_are_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    override_free_form(base_config(), overrides)


def test_the_space_form_of_the_config_flag_is_checked_against_its_config():
  argv = ['train.py', '--config', 'configs/fashion_lt.py:focal,small', '--config.head.gamma=2.0',
          '--workdir=/tmp/x']
  default = os.path.join(REPO, 'configs', 'digits.py')
  assert config_file_arg(argv, default) == 'configs/fashion_lt.py:focal,small'
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    kept, free = check_override_args(argv, default)
  finally:
    os.chdir(cwd)
  assert kept == ['train.py', '--config', 'configs/fashion_lt.py:focal,small', '--workdir=/tmp/x']
  assert free == {'head.gamma': '2.0'}
