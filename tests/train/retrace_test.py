"""No retracing: a run with logging, evaluation and checkpoints traces each step function once.

`chex.assert_max_traces(n=1)` wraps the train and evaluation steps that the drivers jit (or pmap),
so a second trace raises inside the run. Each case changes the config in a way that must not
retrace (the log, evaluation and checkpoint intervals, devices, the driver, a sampling head, a
resumed run). The counter is keyed by where the wrapper was made, so it is cleared per run.
"""

import chex
import pytest

from softmax_jax.train import lm as lm_train
from softmax_jax.train import parallel
from softmax_jax.train import train_and_evaluate
from softmax_jax.train.writer import read_metrics

from tests.train import lm_test
from tests.train import loop_test

# 50 steps; evaluation every 15 (off the log and checkpoint grids), logs every 10, checkpoints every 20.
INTERVALS = dict(num_steps=50, log_every=10, eval_every=15, checkpoint_every=20)


@pytest.fixture(scope='module')
def loop_data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _count_traces(monkeypatch, module, *names):
  chex.clear_trace_counter()
  for name in names:
    monkeypatch.setattr(module, name, chex.assert_max_traces(getattr(module, name), n=1))


def _done_steps(workdir, key):
  return sorted({r['step'] for r in read_metrics(workdir) if key in r})


@pytest.mark.parametrize('overrides', [
    dict(parallel='jit', num_devices=8),
    dict(parallel='pmap', num_devices=8, log_every=1),
    dict(parallel='jit', num_devices=1, **{'head.name': 'sampled', 'head.num_sampled': 4}),
], ids=['jit8', 'pmap8_log_every_step', 'sampled_head'])
def test_classifier_steps_trace_once(overrides, loop_data_dir, tmp_path, monkeypatch):
  config = loop_test.small_config(loop_data_dir, **{**INTERVALS, **overrides})
  _count_traces(monkeypatch, parallel, 'train_step', 'log_prob_step')
  train_and_evaluate(config, str(tmp_path))
  assert _done_steps(str(tmp_path), 'validation/accuracy') == [15, 30, 45, 50]  # evaluation ran
  # A resumed run (a new process in practice) traces once more, and only once.
  chex.clear_trace_counter()
  config.num_steps = 60
  train_and_evaluate(config, str(tmp_path))


def test_language_model_steps_trace_once(tmp_path, monkeypatch):
  data = lm_test.markov_dataset()
  monkeypatch.setattr(lm_train, 'load_text_dataset', lambda cfg: data)
  _count_traces(monkeypatch, lm_train, 'lm_train_step', '_eval_step')
  config = lm_test.small_config(num_devices=8, **INTERVALS)
  train_and_evaluate(config, str(tmp_path))
  assert _done_steps(str(tmp_path), 'validation/perplexity') == [15, 30, 45, 50]
