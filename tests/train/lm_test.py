"""Language-model training (train/language_model.py through the one trainer) on a tiny synthetic corpus, plus one real-PTB smoke run.

Runs on 8 fake CPU devices (tests/conftest.py). The synthetic corpus is a first-order Markov
chain (next token = a fixed permutation of the current one with probability 0.9), so a model that
learns reaches a perplexity far below the vocabulary size.
"""

import dataclasses
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from softmax_jax.data.text import TextDataset
from softmax_jax.train import base_config, train_and_evaluate
from softmax_jax.train import language_model
from softmax_jax.train.checkpoint import Checkpointer
from softmax_jax.train.state import make_optimizer
from softmax_jax.train.writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
V = 24


def markov_dataset(n_train=8 * 8 * 12 + 1, n_eval=300, seed=0) -> TextDataset:
  rng = np.random.default_rng(seed)
  perm = rng.permutation(V)
  stream = np.empty(n_train + 2 * n_eval, np.int32)
  stream[0] = 0
  for i in range(1, len(stream)):
    stream[i] = perm[stream[i - 1]] if rng.random() < 0.9 else rng.integers(V)
  order = np.argsort(-np.bincount(stream[:n_train], minlength=V), kind='stable')  # ids by train frequency
  stream = np.argsort(order)[stream].astype(np.int32)
  splits = {'train': stream[:n_train], 'validation': stream[n_train:n_train + n_eval],
            'test': stream[n_train + n_eval:]}
  return TextDataset(name='ptb', vocab=tuple(f'w{i}' for i in range(V)),
                     counts=np.bincount(splits['train'], minlength=V).astype(np.int64), splits=splits)


def small_config(**overrides):
  c = base_config()
  c.data.name = 'ptb'
  c.data.seq_len = 8
  c.model = dict(name='lstm', embed_dim=16, hidden=32, num_layers=1, dropout=0.0)
  c.head = dict(name='dense')
  c.batch_size = c.eval_batch_size = 8
  c.num_steps = 30
  c.num_devices = 1
  c.optimizer.learning_rate = 3e-2
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = 'constant'
  c.progress = False
  c.log_every = c.eval_every = c.checkpoint_every = 1000
  c.update_from_flattened_dict(overrides)  # dotted keys: {'model.dropout': 0.2}
  return c


# The reference run, shared: 12 steps an epoch, so 30 steps cross two epoch starts (carry reset);
# dropout on, so the per-step keys matter too.
# eval_every is not a multiple of log_every or checkpoint_every: evaluation must still happen.
REF = dict(num_steps=30, log_every=5, eval_every=12, checkpoint_every=10, **{'model.dropout': 0.2})


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """`(workdir, final metrics)` of REF run through `train_and_evaluate` (the loop.py dispatch)."""
  data, workdir = markov_dataset(), str(tmp_path_factory.mktemp('ref'))
  with pytest.MonkeyPatch.context() as m:
    m.setattr(language_model, 'load_text_dataset', lambda cfg: data)
    return workdir, train_and_evaluate(small_config(**REF), workdir)


def test_trains_and_writes_its_workdir(reference):
  workdir, final = reference
  assert 1.8 < final['test/perplexity'] < 6.0 < V  # the chain's perplexity is 1.85, uniform's 24
  for split in ('validation', 'test'):
    assert set(f'{split}/{k}' for k in ('perplexity', 'nll', 'accuracy')) <= set(final)
    assert np.isclose(final[f'{split}/perplexity'], np.exp(final[f'{split}/nll']))
    assert 0.5 < final[f'{split}/accuracy'] <= 0.95  # the chain allows 0.904
  assert final['num_params'] == 4 * 32 * (16 + 32 + 1) + V * 16 + 32 * V + V
  assert final['train/tokens_per_second'] > 0 and final['train_wall_s'] > 0
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    assert json.load(f) == pytest.approx(final)
  rows = read_metrics(workdir)
  train_rows = [r for r in rows if 'train/loss' in r]
  assert [r['step'] for r in train_rows] == [5, 10, 15, 20, 25, 30]
  assert {'train/perplexity', 'train/learning_rate', 'train/grad_norm', 'train/tokens_per_second'} <= set(train_rows[1])
  assert any(k.startswith('train/grad_norm/') for k in train_rows[1])  # per-layer norms, as classifiers
  assert train_rows[-1]['train/loss'] < 0.8 * train_rows[0]['train/loss']  # it trains (later tests compare)
  assert [r['step'] for r in rows if 'validation/perplexity' in r] == [12, 24, 30]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '30']


class Interrupt(Exception):
  pass


def _final_state(workdir):
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'))
  step = ckpt.latest_step()
  state = ckpt._mgr.restore(step)  # pylint: disable=protected-access
  ckpt.close()
  return step, state


def test_resume_after_interruption_matches_an_uninterrupted_run(reference, tmp_path, monkeypatch):
  # The interruption at step 20 falls mid-epoch: the resumed run needs the checkpointed carry.
  data, config, killed = markov_dataset(), small_config(**REF), str(tmp_path / 'killed')
  save = Checkpointer.save

  def save_then_die(self, step, state):
    save(self, step, state)
    if step == 20:
      raise Interrupt

  monkeypatch.setattr(Checkpointer, 'save', save_then_die)
  with pytest.raises(Interrupt):
    train_and_evaluate(config, killed, dataset=data)
  monkeypatch.setattr(Checkpointer, 'save', save)
  assert float(np.abs(_final_state(killed)[1]['carry'][0][1]).max()) > 0.01  # a live carry was saved
  resumed = train_and_evaluate(config, killed, dataset=data)
  (step_a, a), (step_b, b) = _final_state(reference[0]), _final_state(killed)
  assert step_a == step_b == 30
  jax.tree.map(np.testing.assert_array_equal, a, b)
  for key in ('test/perplexity', 'validation/nll', 'test/accuracy'):
    assert resumed[key] == reference[1][key]
  steps = [r['step'] for r in read_metrics(killed) if 'train/loss' in r]
  assert steps == [5, 10, 15, 20, 25, 30]  # no duplicated or lost log lines


def test_mesh_of_8_devices_matches_one_device(reference, tmp_path):
  assert jax.local_device_count() == 8
  final = train_and_evaluate(small_config(num_devices=8, **REF), str(tmp_path), dataset=markov_dataset())
  losses = {w: np.array([r['train/loss'] for r in read_metrics(w) if 'train/loss' in r])
            for w in (reference[0], str(tmp_path))}
  np.testing.assert_allclose(losses[str(tmp_path)], losses[reference[0]], rtol=2e-5)
  for key in ('validation/nll', 'test/nll', 'test/accuracy'):
    np.testing.assert_allclose(final[key], reference[1][key], rtol=2e-5)


def test_pmap_matches_jit_for_20_steps_on_8_devices(tmp_path):
  # Dropout off: under pmap the per-step keys are per device. The carry is split over the devices.
  runs = {}
  for parallel in ('jit', 'pmap'):
    config = small_config(num_steps=20, num_devices=8, parallel=parallel, log_every=1, eval_every=10)
    runs[parallel] = train_and_evaluate(config, str(tmp_path / parallel), dataset=markov_dataset())
  losses = {p: np.array([r['train/loss'] for r in read_metrics(str(tmp_path / p)) if 'train/loss' in r])
            for p in runs}
  assert len(losses['jit']) == 20 and losses['jit'][-1] < 0.9 * losses['jit'][0]
  np.testing.assert_allclose(losses['pmap'], losses['jit'], rtol=1e-5)
  for key in ('validation/nll', 'test/nll', 'test/accuracy'):
    np.testing.assert_allclose(runs['pmap'][key], runs['jit'][key], rtol=1e-5)


def test_transformer_backbone_trains_and_resumes_from_its_checkpoint(tmp_path):
  data = markov_dataset()
  config = small_config(num_steps=20, checkpoint_every=20, **{'model': dict(
      name='transformer', d_model=16, num_layers=1, num_heads=2, mlp_dim=32, dropout=0.0, max_len=8)})
  config.optimizer.learning_rate = 3e-3
  first = train_and_evaluate(config, str(tmp_path), dataset=data)
  again = train_and_evaluate(config, str(tmp_path), dataset=data)  # restores step 20 (carry None)
  assert first['test/perplexity'] < 0.5 * V
  assert again['test/perplexity'] == first['test/perplexity'] and again['train/tokens_per_second'] == 0.0


def test_nonfinite_loss_stops_naming_the_step_and_checkpoint(tmp_path):
  config = small_config(checkpoint_every=2, num_steps=50)
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 1e30
  with pytest.raises(FloatingPointError, match=r'Training diverged (at step|in steps?) \d+.*(The newest checkpoint, .*, is verified finite|No checkpoint was written)'):
    train_and_evaluate(config, str(tmp_path), dataset=markov_dataset())


@pytest.mark.parametrize('key, value, match', [
    ('data.seqlen', 3, r"Unknown config key config.data.seqlen.*Did you mean 'seq_len'"),
    ('model.hiden', 3, r"Unknown config key config.model.hiden for LSTMLM.*Did you mean 'hidden'"),
    ('data.seq_len', 0, r'config.data.seq_len must be an integer >= 1, got 0'),
    ('batch_size', 100, r'too short for one window of config.batch_size x config.data.seq_len = 100 x 8'),
    ('num_devices', 8, r'config.batch_size=8 must be divisible|config.eval_batch_size=12 must be divisible'),
])
def test_bad_config_is_named(tmp_path, key, value, match):
  config = small_config(**{key: value})
  if key == 'num_devices':
    config.batch_size, config.eval_batch_size = 8, 12
  with pytest.raises(ValueError, match=match):
    train_and_evaluate(config, str(tmp_path), dataset=markov_dataset())


def _ptb_config(arg):
  spec = importlib.util.spec_from_file_location('ptb_lstm', os.path.join(REPO, 'configs', 'ptb_lstm.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(arg)


def test_ptb_config_is_zaremba_small_with_plain_sgd_and_halving():
  module, c = _ptb_config('dense')
  assert (c.batch_size, c.data.seq_len, c.num_steps) == (20, 20, 13 * 2323)
  assert (c.model.hidden, c.model.num_layers, c.model.init_scale, c.model.dropout) == (200, 2, 0.1, 0.0)
  assert os.path.isabs(c.data.source_dir) and c.data.source_dir.endswith(os.path.join('shared', 'data', 'ptb'))
  schedule, tx = make_optimizer(c.optimizer, c.num_steps)
  epoch = lambda e: e * 2323  # the first step of epoch e + 1
  for e in range(13):  # Zaremba: lr = 1 * 0.5 ** max(e + 1 - 4, 0) in (1-based) epoch e + 1, here x20
    np.testing.assert_allclose(schedule(epoch(e)), 20.0 * 0.5 ** max(e - 3, 0), rtol=1e-6)
    np.testing.assert_allclose(schedule(epoch(e + 1) - 1), 20.0 * 0.5 ** max(e - 3, 0), rtol=1e-6)
  params = {'w': np.zeros(3, np.float32)}
  for grads, expected in ((np.array([0.1, 0.0, 0.0]), -2.0), (np.array([3.0, 4.0, 0.0]), -0.25 * 0.6 * 20)):
    updates, _ = tx.update({'w': grads.astype(np.float32)}, tx.init(params), params)
    np.testing.assert_allclose(updates['w'][0], expected, rtol=1e-6)  # plain SGD, clipped at norm 0.25
  assert _ptb_config('adaptive,small,epochs=6')[1].optimizer.decay_at == (4 / 6, 5 / 6)
  assert set(module.HEADS) == {'dense', 'adaptive', 'sampled', 'hierarchical', 'mos', 'sigsoftmax'}
  assert _ptb_config('mos')[1].head.num_mixtures == 5
  assert _ptb_config('mos,mixtures=15,small')[1].head.to_dict() == dict(name='mos', num_mixtures=15)
  assert _ptb_config('sigsoftmax')[1].head.to_dict() == dict(name='dense', sigsoftmax=True)
  with pytest.raises(ValueError, match=r'mixtures=3 is an option of the mos head'):
    _ptb_config('dense,mixtures=3')
  with pytest.raises(ValueError, match=r"takes '<head>\[,small\]\[,epochs=N\]\[,mixtures=M\]'.*'softmax' not understood"):
    module.get_config('softmax')


def test_real_ptb_small_run(tmp_path, monkeypatch):
  _, config = _ptb_config('dense,small')
  if not os.path.exists(os.path.join(config.data.source_dir, 'ptb.train.txt')):
    pytest.skip(f'PTB raw files not found in {config.data.source_dir}')
  config = config.unlock()
  config.data.data_dir = str(tmp_path / 'tfds')
  config.num_steps, config.progress, config.num_devices = 20, False, 1
  config.eval_every = config.checkpoint_every = 1000
  config.model.hidden = config.model.embed_dim = 32
  load = language_model.load_text_dataset

  def load_with_short_eval_splits(cfg):  # evaluating all 156k tokens would take most of a minute here
    ptb = load(cfg)
    assert (len(ptb.vocab), len(ptb.splits['train'])) == (10_000, 929_589)
    splits = {k: v if k == 'train' else v[:4000] for k, v in ptb.splits.items()}
    return dataclasses.replace(ptb, splits=splits)

  monkeypatch.setattr(language_model, 'load_text_dataset', load_with_short_eval_splits)
  final = train_and_evaluate(config, str(tmp_path / 'w'))
  assert final['num_params'] > 10_000 * 32  # the 10k PTB vocabulary reached the head
  assert 100 < final['test/perplexity'] < 2000  # well below uniform (10k) after 20 steps


@pytest.mark.parametrize('head', ['adaptive', 'sampled', 'hierarchical'])
def test_ptb_head_configs_build_and_trace(head):
  from softmax_jax.heads import HEADS  # pylint: disable=g-import-not-at-top
  from softmax_jax.models.lm import build_language_model  # pylint: disable=g-import-not-at-top
  _, config = _ptb_config(head)
  if config.head.name not in HEADS:
    pytest.skip(f'head {config.head.name!r} is not registered in softmax_jax.heads.HEADS yet')
  counts = np.maximum(50_000 // np.arange(1, 10_001), 1)  # Zipf-like, non-increasing
  model = build_language_model(config.model, config.head, 10_000, counts)
  assert model.head.num_classes == 10_000 and model.head.class_counts == tuple(int(c) for c in counts)
  x = jax.ShapeDtypeStruct((2, 20), np.int32)
  carry = model.initial_carry(2)
  variables = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t, t, carry=carry, train=False), x)
  rngs = {'dropout': jax.random.PRNGKey(1), 'sample': jax.random.PRNGKey(2)}
  loss, _ = jax.eval_shape(lambda v, t: model.apply(v, t, t, carry=carry, train=True, rngs=rngs), variables, x)
  assert loss.shape == (2, 20)



@pytest.mark.parametrize('parallel', ['jit', 'pmap'])
def test_runs_under_the_hot_path_transfer_guard(tmp_path, monkeypatch, parallel):
  # On an accelerator, 'disallow_explicit' fails any read between sync points; the CPU backend
  # never reports host transfers (its arrays live in host memory), so there this only checks that
  # every read of the loop happens outside the guarded region. tests/train/runner_test.py checks
  # with recording metrics that the loop reads only at log, evaluation and checkpoint steps.
  from softmax_jax.train import runner  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runner, 'TRANSFER_GUARD', 'disallow_explicit')
  config = small_config(num_steps=12, log_every=5, eval_every=6, checkpoint_every=10,
                        num_devices=8, parallel=parallel)
  final = train_and_evaluate(config, str(tmp_path), dataset=markov_dataset())
  assert final['test/perplexity'] < V
