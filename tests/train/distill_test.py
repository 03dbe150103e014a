"""Distillation on the one trainer (train/distill.py): the loss it trains, both teacher paths, LMs, errors."""

import os
import sys

import jax
import numpy as np
import pytest

from softmax_jax.train import language_model, train_and_evaluate
from softmax_jax.train.checkpoint import Checkpointer
from softmax_jax.train import load_trained
from softmax_jax.train.state import make_optimizer
from softmax_jax.train.task import build_task
from softmax_jax.train.workdir import record_config
from softmax_jax.train.writer import read_metrics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_test  # pylint: disable=g-import-not-at-top,wrong-import-position
import loop_test  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A digits teacher (MLP 64, untrained: the tests check plumbing) and the data_dir both use."""
  root = tmp_path_factory.mktemp('kd')
  data_dir = str(root / 'tfds')
  teacher = str(root / 'teacher')
  untrained_run(loop_test.small_config(data_dir), teacher)
  return data_dir, teacher


def untrained_run(config, workdir):
  """A workdir that `load_trained` reads (config.json, a checkpoint of the initial state), with no
  training: the plumbing tests need a teacher, not a good one, and compiling a run costs seconds."""
  task = build_task(config)
  _, tx = make_optimizer(config.optimizer, config.num_steps)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'))
  ckpt.save(1, task.init_state(tx))
  ckpt.close()
  record_config(config, workdir, {}, 1)
  return workdir


def _student(data_dir, teacher, **overrides):
  c = loop_test.small_config(data_dir, **{'num_devices': 1, 'log_every': 1, **overrides})
  c.model.hidden = (32,)
  c.distill.teacher_workdir = teacher
  return c


def _losses(workdir):
  return np.array([r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r])


def _log_softmax64(z, t=1.0):
  z = np.asarray(z, np.float64) / t
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_the_step_loss_is_alpha_ce_plus_kd_against_a_float64_reference(runs):
  data_dir, teacher = runs
  alpha, t = 0.3, 4.0
  config = _student(data_dir, teacher, **{'distill.alpha': alpha, 'distill.temperature': t})
  task = build_task(config)
  assert task.cached  # digits stay on the device, no augmentation
  _, tx = make_optimizer(config.optimizer, config.num_steps)
  state = task.init_state(tx)
  batch = task.gather(task.resident, {'index': np.arange(16, dtype=np.int32)})
  loss, _ = task.loss(state['params'], state, batch, jax.random.PRNGKey(0))
  variables = {'params': state['params']}
  student = np.asarray(task.model.apply(variables, batch['image'], method='log_prob'))
  _, _, t_model, t_vars = load_trained(teacher)  # the same dataset: the same normalization
  t_lp = np.asarray(t_model.apply(t_vars, batch['image'], method='log_prob'))
  np.testing.assert_allclose(batch['teacher_log_prob'], t_lp, rtol=1e-5, atol=1e-5)
  labels = np.asarray(batch['label'])
  ce = -_log_softmax64(student)[np.arange(16), labels]
  p_t = np.exp(_log_softmax64(t_lp, t))
  kd = t * t * np.sum(p_t * (_log_softmax64(t_lp, t) - _log_softmax64(student, t)), -1)
  np.testing.assert_allclose(float(loss), np.mean(alpha * ce + (1 - alpha) * kd), rtol=1e-5)
  assert abs(float(loss) - np.mean(ce)) > 1e-2  # the KD term changes the loss


def test_alpha_1_is_the_plain_loss_and_the_in_step_teacher_is_the_cached_one(runs):
  data_dir, teacher = runs
  rng, index = jax.random.PRNGKey(1), {'index': np.arange(32, dtype=np.int32)}
  losses = {}
  for name, overrides in [('plain', None), ('alpha1', {'distill.alpha': 1.0}),
                          ('cached', {'distill.alpha': 0.5}),
                          ('in_step', {'distill.alpha': 0.5, 'distill.cache_teacher': False})]:
    config = _student(data_dir, teacher, **(overrides or {}))
    if overrides is None:
      config.distill.teacher_workdir = None
    task = build_task(config)
    _, tx = make_optimizer(config.optimizer, config.num_steps)
    state = task.init_state(tx)
    assert ('teacher' in state) == (name == 'in_step')
    batch = task.gather(task.resident, index)
    losses[name] = float(jax.jit(task.loss)(state['params'], state, batch, rng)[0])
  assert losses['alpha1'] == pytest.approx(losses['plain'], rel=1e-6)
  assert losses['in_step'] == pytest.approx(losses['cached'], rel=1e-5)
  assert abs(losses['cached'] - losses['plain']) > 1e-2


def test_in_step_teacher_trains_under_pmap_like_the_cached_one_on_one_device(runs, tmp_path):
  data_dir, teacher = runs
  cached, in_step = str(tmp_path / 'cached'), str(tmp_path / 'in_step')
  common = {'distill.alpha': 0.5, 'num_steps': 8}
  train_and_evaluate(_student(data_dir, teacher, **common), cached)
  train_and_evaluate(_student(data_dir, teacher, parallel='pmap', num_devices=2,
                              **common, **{'distill.cache_teacher': False}), in_step)
  np.testing.assert_allclose(_losses(in_step), _losses(cached), rtol=2e-5)
  assert len(_losses(cached)) == 8 and _losses(cached)[-1] < _losses(cached)[0]


def test_language_model_distillation_carries_the_teachers_state(tmp_path):
  data = lm_test.markov_dataset()
  with pytest.MonkeyPatch.context() as m:
    m.setattr(language_model, 'load_text_dataset', lambda cfg: data)
    teacher = untrained_run(lm_test.small_config(), str(tmp_path / 'teacher'))
    overrides = {'model.hidden': 16, 'num_steps': 16, 'log_every': 1, 'checkpoint_every': 8}
    student = lm_test.small_config(**overrides)
    student.distill.teacher_workdir = teacher
    student.distill.alpha = 0.0
    out = train_and_evaluate(student, str(tmp_path / 'student'))
    task = build_task(student)
    assert task.row_state_keys == ('carry', 'teacher_carry')
    # Resume from step 8 reproduces the uninterrupted run (teacher carry restored, reset at epochs).
    ckpt = Checkpointer(str(tmp_path / 'student' / 'checkpoints'))
    _, tx = make_optimizer(student.optimizer, student.num_steps)
    state, step = ckpt.restore(8, task.init_state(tx)), 8
    ckpt.close()
    assert np.any(np.asarray(jax.tree.leaves(state['teacher_carry'])[0]) != 0)
    resumed = str(tmp_path / 'resumed')
    os.makedirs(os.path.join(resumed, 'checkpoints'))
    os.system(f'cp -r {tmp_path}/student/checkpoints/{step} {resumed}/checkpoints/ && '
              f'cp {tmp_path}/student/config.json {resumed}/')
    again = train_and_evaluate(student, resumed)
  assert np.isfinite(out['test/perplexity'])
  np.testing.assert_allclose(again['test/perplexity'], out['test/perplexity'], rtol=1e-5)
  losses = _losses(str(tmp_path / 'student'))
  assert len(losses) == 16 and losses[-1] < losses[0]


@pytest.mark.parametrize('overrides, match', [
    ({'distill.alpha': 1.5}, r'config.distill.alpha must be in \[0, 1\].*1.5'),
    ({'distill.alpha': -0.1}, r'config.distill.alpha must be in \[0, 1\]'),
    ({'distill.temperature': 0.0}, r'config.distill.temperature must be a finite number > 0.*0.0'),
    ({'distill.temperature': float('nan')}, r'config.distill.temperature'),
])
def test_bad_alpha_and_temperature_are_named(runs, tmp_path, overrides, match):
  data_dir, teacher = runs
  with pytest.raises(ValueError, match=match):
    train_and_evaluate(_student(data_dir, teacher, **overrides), str(tmp_path / 'w'))


def test_missing_teacher_and_teachers_that_do_not_fit_are_named(runs, tmp_path):
  data_dir, teacher = runs
  with pytest.raises(ValueError, match=r'teacher_workdir=.*nowhere.* does not exist'):
    build_task(_student(data_dir, str(tmp_path / 'nowhere')))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(ValueError, match=r'holds no trained run'):
    build_task(_student(data_dir, str(tmp_path / 'empty')))
  three = str(tmp_path / 'three')
  untrained_run(loop_test.small_config(data_dir, **{'data.classes': (0, 1, 2)}), three)
  with pytest.raises(ValueError, match=r'teacher has 3 classes.*student 10'):
    build_task(_student(data_dir, three))
  sparse = _student(data_dir, teacher)
  sparse.head = dict(name='dense', mapping='sparsemax')
  with pytest.raises(ValueError, match=r"mapping='sparsemax'.*cannot be distilled"):
    build_task(sparse)


def test_teachers_with_other_inputs_or_vocabularies_are_named():
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top
  from softmax_jax.train.distill import check_teacher  # pylint: disable=g-import-not-at-top
  config = SimpleNamespace(distill=SimpleNamespace(teacher_workdir='/t'),
                           data=SimpleNamespace(name='fashion_mnist_idx'))
  head = SimpleNamespace(fenchel_young=None)
  image = lambda shape: SimpleNamespace(num_classes=10, input_shape=shape)
  task = SimpleNamespace(dataset=image((28, 28, 1)), model=SimpleNamespace(head=head))
  t_config = SimpleNamespace(data=SimpleNamespace(name='digits'))
  check_teacher(config, task, t_config, image((28, 28, 1)))
  with pytest.raises(ValueError, match=r"teacher takes inputs \(8, 8, 1\).*student \(28, 28, 1\)"):
    check_teacher(config, task, t_config, image((8, 8, 1)))
  text = lambda vocab: SimpleNamespace(num_classes=len(vocab), vocab=vocab)
  lm = SimpleNamespace(dataset=text(('a', 'b', 'c')), model=SimpleNamespace(head=head))
  with pytest.raises(ValueError, match=r"vocabulary differs from the student's at id 1 \('c' vs 'b'\)"):
    check_teacher(config, lm, t_config, text(('a', 'c', 'b')))
  with pytest.raises(ValueError, match=r'the teacher is a classifier.*the student a language model'):
    check_teacher(config, lm, t_config, image((28, 28, 1)))
