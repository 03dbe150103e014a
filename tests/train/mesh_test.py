"""`config.mesh`: the jit driver on a 2-D ('data', 'model') mesh with the vocabulary-parallel dense head.

On 8 fake CPU devices (tests/conftest.py): digits (the MLP classifier of loop_test, plain dense
head) and the synthetic Markov LM of lm_test (fused dense head) train on a 2 x 4 mesh to the
per-step losses and final metrics of the default 1-D data mesh; the trained head's kernel, bias
and Adam moments are split on 'model' (`[d, K_pad / 4]` per device), every other leaf
replicated; a run stopped at step 10 and resumed ends like the uninterrupted one; bad meshes,
heads and drivers are named errors; the compiled train and evaluation steps of an LM with
V = 8192 hold no per-device array with V columns (no `[N, V]` logits, no `[d, V]` kernel).
"""

import functools
import os
import re
import shutil

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from softmax_jax.data.text import TextDataset, lm_eval_batches
from softmax_jax.train import base_config, language_model, train_and_evaluate
from softmax_jax.train.parallel import JitDriver
from softmax_jax.train.state import make_optimizer
from softmax_jax.train.writer import read_metrics
from tests.train.lm_test import markov_dataset
from tests.train.lm_test import small_config as lm_config

MESH = {'data': 2, 'model': 4}
K_PAD = 12  # digits' 10 classes padded to a multiple of 4 (the 'model' axis)
METRICS = ('validation/accuracy', 'validation/nll', 'test/accuracy', 'test/nll', 'test/ece',
           'test_ts/nll', 'temperature')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def digits_config(data_dir, **overrides):
  c = base_config()
  c.data.data_dir = data_dir
  c.model.hidden = (32,)
  c.model.dropout = 0.0
  c.head = dict(name='dense', pad_classes_to=4)
  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_steps = 20
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 5
  c.progress = False
  c.log_every = 1
  c.eval_every = 1000
  c.checkpoint_every = 10
  c.num_devices = 8
  c.update_from_flattened_dict(overrides)
  return c


def losses(workdir):
  return np.array([r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r])


class Recorder:
  """Wraps `JitDriver.get_state` to keep the placement of the device state it last saw."""

  def __init__(self):
    self.seen = None

  def install(self, monkeypatch):
    get_state = JitDriver.get_state

    def get_state_and_record(driver, state):
      self.seen = jax.tree.map(lambda x: (x.sharding.spec, x.addressable_shards[0].data.shape),
                               {k: state[k] for k in ('params', 'opt_state')})
      return get_state(driver, state)
    monkeypatch.setattr(JitDriver, 'get_state', get_state_and_record)


@pytest.fixture(scope='module')
def digits_runs(data_dir, tmp_path_factory):
  """{name: (workdir, final metrics, recorded placement)}: the 1-D mesh and the 2 x 4 mesh."""
  runs = {}
  for name, overrides in (('1d', {}), ('mesh', {'mesh': MESH})):
    workdir = str(tmp_path_factory.mktemp(name))
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as m:
      recorder.install(m)
      final = train_and_evaluate(digits_config(data_dir, **overrides), workdir)
    runs[name] = (workdir, final, recorder.seen)
  return runs


def test_digits_mesh_matches_the_data_mesh(digits_runs):
  (ref_dir, ref, _), (mesh_dir, got, _) = digits_runs['1d'], digits_runs['mesh']
  want = losses(ref_dir)
  assert len(want) == 20 and want[-1] < 0.75 * want[0]  # it trains: the comparison has content
  np.testing.assert_allclose(losses(mesh_dir), want, rtol=2e-5)
  for key in METRICS:
    np.testing.assert_allclose(got[key], ref[key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_the_head_and_its_adam_moments_are_split_on_model(digits_runs):
  _, _, seen = digits_runs['mesh']
  split = {'kernel': (P(None, 'model'), (32, K_PAD // 4)), 'bias': (P('model'), (K_PAD // 4,))}
  assert seen['params']['head'] == split
  adam = [s for s in jax.tree.leaves(seen['opt_state'], is_leaf=lambda x: isinstance(x, dict))
          if isinstance(s, dict) and 'head' in s]
  assert len(adam) == 2  # mu and nu
  for moments in adam:
    assert moments['head'] == split
  is_leaf = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], P)
  others = [v for path, v in jax.tree_util.tree_leaves_with_path(seen, is_leaf=is_leaf)
            if "['head']" not in jax.tree_util.keystr(path)]
  assert len(others) > 4 and all(spec == P() for spec, _ in others)
  _, _, one_d = digits_runs['1d']
  assert one_d['params']['head']['kernel'] == (P(), (32, K_PAD))


def test_resume_at_step_10_matches_the_uninterrupted_run(digits_runs, data_dir, tmp_path):
  """The uninterrupted run's workdir as a run stopped at step 10 leaves it (its step-10
  checkpoint, the newer one gone), resumed: the same steps 11-20 and final metrics, bit for bit."""
  ref_dir, ref, _ = digits_runs['mesh']
  stopped = str(tmp_path / 'stopped')
  shutil.copytree(ref_dir, stopped)
  shutil.rmtree(os.path.join(stopped, 'checkpoints', '20'))
  os.remove(os.path.join(stopped, 'final_metrics.json'))
  got = train_and_evaluate(digits_config(data_dir, mesh=MESH), stopped)
  np.testing.assert_array_equal(losses(stopped), losses(ref_dir))
  for key in METRICS:
    assert got[key] == ref[key], key


def test_language_model_mesh_fused_matches_the_data_mesh(tmp_path):
  """The LM on the 2 x 4 mesh with the fused head (2 classes a chunk) against the 1-D mesh's
  plain head (digits tests the plain head on the mesh)."""
  runs = {}
  for name, mesh in (('1d', None), ('mesh', MESH)):
    config = lm_config(num_steps=20, num_devices=8, log_every=1, eval_every=1000, mesh=mesh)
    if mesh:
      config.head = dict(name='dense', fused=True, chunk_size=2)
    runs[name] = train_and_evaluate(config, str(tmp_path / name), dataset=markov_dataset())
  want = losses(str(tmp_path / '1d'))
  assert len(want) == 20 and want[-1] < 0.9 * want[0]
  np.testing.assert_allclose(losses(str(tmp_path / 'mesh')), want, rtol=2e-5)
  for key in ('validation/nll', 'test/nll', 'test/accuracy', 'test/top5_accuracy'):
    np.testing.assert_allclose(runs['mesh'][key], runs['1d'][key], rtol=2e-5, err_msg=key)


@pytest.mark.parametrize('overrides, match', [
    ({'mesh': {'data': 3, 'model': 4}},
     r"config.mesh=\{'data': 3, 'model': 4\} has 3 x 4 = 12 devices, but the run uses 8"),
    ({'mesh': {'data': 0, 'model': 3}}, r'has 2 x 3 = 6 devices, but the run uses 8'),
    ({'mesh': {'data': 8, 'model': 1}, 'batch_size': 60},
     r"config.batch_size=60 must be divisible by the 'data' axis of config.mesh"),
    ({'mesh': {'data': 2}}, r"config.mesh must be None or \{'data': D, 'model': M\}"),
    ({'mesh': MESH, 'head': {'name': 'adaptive'}},
     r"config.mesh=.* needs config.head.name='dense'.*got config.head.name='adaptive'"),
    ({'mesh': MESH, 'head': {'name': 'dense', 'pad_classes_to': 4, 'label_smoothing': 0.1}},
     r'config.mesh=.* cannot train .* config.head.label_smoothing=0.1'),
    ({'mesh': MESH, 'parallel': 'pmap'},
     r"config.parallel='pmap' cannot run config.mesh=.*jit over a Mesh only"),
    ({'mesh': MESH, 'head': {'name': 'dense'}}, r"the head's classes K = 10 must divide by the size 4 .*pad_classes_to=4"),
])
def test_bad_mesh_is_named(data_dir, tmp_path, overrides, match):
  config = digits_config(data_dir, num_steps=1)
  for key, value in overrides.items():
    config[key] = value
  with pytest.raises(ValueError, match=match):
    train_and_evaluate(config, str(tmp_path))


def test_language_model_task_builds_the_vocab_parallel_head():
  task = language_model.LanguageModelTask(lm_config(mesh=MESH), markov_dataset())
  assert task.model.head.vocab_parallel_axis == 'model'
  plain = language_model.LanguageModelTask(lm_config(), markov_dataset())
  assert plain.model.head.vocab_parallel_axis is None


def compiled_lm_steps(v, head=None):
  """The compiled (SPMD-partitioned) HLO texts `{'train', 'eval'}` of an LM with vocabulary `v`
  on the 2 x 4 mesh (`head`: config.head, default the small config's dense head), and its state."""
  stream = np.random.default_rng(0).integers(0, v, 2000).astype(np.int32)
  data = TextDataset(name='ptb', vocab=tuple(f'w{i}' for i in range(v)),
                     counts=np.bincount(stream[:1500], minlength=v).astype(np.int64),
                     splits={'train': stream[:1500], 'validation': stream[1500:], 'test': stream[1500:]})
  config = lm_config(num_devices=8, mesh=MESH)
  if head is not None:
    config.head = head
  task = language_model.LanguageModelTask(config, data)
  schedule, tx = make_optimizer(config.optimizer, config.num_steps)
  driver = JitDriver(task, tx, schedule, 8)
  state = driver.put_state(task.init_state(tx))
  fn = functools.partial(language_model.eval_step, model=task.model)
  batch = next(iter(lm_eval_batches(data.splits['validation'], 8, 8)))
  carry = task.model.initial_carry(8)
  driver.evaluate(fn, state, [batch], carry=carry)  # builds the evaluation's jit
  with jax.set_mesh(driver.mesh):
    texts = {'train': driver._step.lower(state, None, next(iter(task.train_batches(0)))),
             'eval': driver._eval_fns[fn].lower(driver.variables(state), carry, batch)}
    return {k: lowered.compile().as_text() for k, lowered in texts.items()}, state


def test_no_device_holds_the_full_kernel_or_logits():
  """The compiled (SPMD-partitioned) train and evaluation steps of an LM with V = 8192 on the
  2 x 4 mesh: no array of a device has V columns (the input embedding `[V, 16]` is the
  backbone's, replicated); the head's shards `[..., V / 4]` are there."""
  v = 8192
  texts, _ = compiled_lm_steps(v)
  for name, text in texts.items():
    full = [line.strip()[:200] for line in text.splitlines() if re.search(rf'\[[0-9,]*,{v}\]', line)]
    assert not full, (name, full[:3])
    assert re.search(rf'\[[0-9,]*,{v // 4}\]', text), name  # the pattern sees the shards
