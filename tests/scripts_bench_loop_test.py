"""scripts/bench_loop.py (`benchmark.py --suite=loop`): the hand-written loops train what the trainer
trains (same first steps), and a tiny digits run of the suite gives every way a rate and a table."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
import bench_loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from softmax_jax.data.text import TextDataset  # pylint: disable=g-import-not-at-top,wrong-import-position
from softmax_jax.train.state import make_optimizer  # pylint: disable=g-import-not-at-top,wrong-import-position
from softmax_jax.train.step import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position
from softmax_jax.train.task import build_task  # pylint: disable=g-import-not-at-top,wrong-import-position


def _trainer_steps(config, dataset, batches):
  """`(losses, params)` of the trainer's own step function over `batches`, from its initial state."""
  task = build_task(config, dataset)
  schedule, tx = make_optimizer(config.optimizer, config.num_steps)
  state = jax.tree.map(jnp.asarray, task.init_state(tx))
  step = jax.jit(lambda s, b: train_step(s, b, task=task, tx=tx, schedule=schedule))
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return losses, state['params']


def _hand_steps(init, step, xs, ys, n):
  state, losses = init(), []
  for _ in range(n):
    state, loss = step(state, xs, ys)
    losses.append(float(loss))
  return losses, state['params']


def _assert_same(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), got[1], want[1])


def test_classifier_loop_takes_the_trainers_steps():
  config = bench_loop.bench_config(bench_loop.MODELS['digits'], 2)
  dataset, note = bench_loop.load('digits', config)
  assert note == '' and len(dataset.splits['test']) == min(360, config.eval_batch_size)
  init, step, xs, ys = bench_loop.classifier_loop(config, dataset)
  assert xs.shape == (len(dataset.splits['train']) // 128, 128, 8, 8, 1) and ys.shape == xs.shape[:2]
  hand = _hand_steps(init, step, xs, ys, 3)
  ours = _trainer_steps(config, dataset, [{'image': xs[i], 'label': ys[i]} for i in range(3)])
  _assert_same(hand, ours)
  assert hand[0][0] != hand[0][2]  # it trains (dropout and updates change the loss)


def test_lm_loop_takes_the_trainers_steps_and_carries_the_state():
  rng = np.random.default_rng(0)
  vocab = ('<eos>', '<unk>') + tuple(f'w{i}' for i in range(48))
  splits = {s: rng.integers(0, 50, n).astype(np.int32) for s, n in
            (('train', 2 * 20 * 20 + 1), ('validation', 300), ('test', 300))}
  dataset = TextDataset('ptb', vocab, np.bincount(splits['train'], minlength=50), splits)
  config = bench_loop.bench_config(bench_loop.MODELS['ptb'], 2)
  init, step, xs, ys = bench_loop.lm_loop(config, dataset)
  assert xs.shape == ys.shape == (20, 40)
  hand = _hand_steps(init, step, xs, ys, 3)  # windows 0, 1, then 0 again with a fresh state
  window = lambda x, i: x[:, 20 * i:20 * (i + 1)]
  ours = _trainer_steps(config, dataset, [{'inputs': window(xs, i), 'targets': window(ys, i)}
                                          for i in (0, 1, 0)])
  _assert_same(hand, ours)


def test_fashion_without_idx_files_uses_random_images_of_its_shape(tmp_path):
  config = bench_loop.bench_config(bench_loop.MODELS['fashion_mnist'], 1).unlock()
  config.data.source_dir = str(tmp_path)  # no IDX files here
  dataset, note = bench_loop.fashion_dataset(config)
  assert 'IDX files absent' in note
  assert dataset.input_shape == (28, 28, 1) and dataset.num_classes == 10
  assert dataset.splits['train'].images.shape == (54_000, 28, 28, 1)


def test_ratios_pair_the_runs_of_a_round():
  rows = [dict(way='ours', runs=[9.0, 2.0, 4.0]), dict(way='hand-written', runs=[10.0, 2.0, 8.0])]
  bench_loop.add_ratios(rows)
  assert rows[0]['ratio'] == pytest.approx(0.9)  # median of 0.9, 1.0, 0.5 (medians: 4 / 8 = 0.5)
  assert rows[0]['best_ratio'] == pytest.approx(0.9) and rows[0]['steps_per_s'] == 4.0
  assert rows[1]['ratio'] == rows[1]['best_ratio'] == 1.0 and rows[1]['best'] == 10.0


def test_tiny_digits_suite_times_every_way(monkeypatch):
  monkeypatch.setitem(bench_loop.PRESETS, 'tiny', dict(digits=3))
  rows = bench_loop.loop_suite('tiny', repeats=1)
  assert [r['way'] for r in rows] == list(bench_loop.WAYS)
  for r in rows:
    assert r['model'] == 'digits' and r['steps'] == 3 and len(r['runs']) == 1, r
    assert np.isfinite(r['steps_per_s']) and r['steps_per_s'] > 0, r
  assert rows[-1]['ratio'] == 1.0 and np.isfinite(rows[-1]['loss'])
  assert rows[0]['ratio'] == pytest.approx(rows[0]['runs'][0] / rows[-1]['runs'][0])
  table = bench_loop.table(rows)
  assert table.count('\n') == len(rows) + 1 and '| digits | ours log=1 | 3 x 1 |' in table
  assert rows[0]['best_ratio'] == pytest.approx(rows[0]['best'] / rows[-1]['best'])


def test_host_bound_digits_is_the_digits_mlp_with_16_units():
  config = bench_loop.bench_config(bench_loop.MODELS['digits_16'], 2,
                                   overrides=bench_loop.OVERRIDES['digits_16'])
  assert tuple(config.model.hidden) == (16,) and config.num_steps == 3
  assert tuple(bench_loop.bench_config(bench_loop.MODELS['digits'], 2).model.hidden) == (512, 512)
  assert all('digits_16' in p for p in bench_loop.PRESETS.values())
