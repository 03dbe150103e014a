"""No retracing: a run with logging, evaluation and checkpoints traces each step function once.

`chex.assert_max_traces` wraps the one train step and each task's evaluation step that the
drivers jit (or pmap), so an extra trace raises inside the run: the train step traces once; an
LM's evaluation once; a classifier's evaluation once per kind of pass (validation during training,
the final validation over the temperature grid, the test split at the fitted temperature). Each case changes the config in a way that must not
retrace (the log, evaluation and checkpoint intervals, devices, the driver, a sampling head, a
resumed run). The counter is keyed by where the wrapper was made, so it is cleared per run.
"""

import chex
import pytest

from softmax_jax.train import classification
from softmax_jax.train import language_model
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


def _count_traces(monkeypatch, task_module, eval_traces):
  chex.clear_trace_counter()
  monkeypatch.setattr(parallel, 'train_step', chex.assert_max_traces(parallel.train_step, n=1))
  monkeypatch.setattr(task_module, 'eval_step',
                      chex.assert_max_traces(task_module.eval_step, n=eval_traces))


def _done_steps(workdir, key):
  return sorted({r['step'] for r in read_metrics(workdir) if key in r})


@pytest.mark.parametrize('overrides', [
    dict(parallel='jit', num_devices=8),
    dict(parallel='pmap', num_devices=8, log_every=1),
    dict(parallel='jit', num_devices=1, **{'head.name': 'sampled', 'head.num_sampled': 4}),
], ids=['jit8', 'pmap8_log_every_step', 'sampled_head'])
def test_classifier_steps_trace_once(overrides, loop_data_dir, tmp_path, monkeypatch):
  config = loop_test.small_config(loop_data_dir, **{**INTERVALS, **overrides})
  _count_traces(monkeypatch, classification, 3)
  train_and_evaluate(config, str(tmp_path))
  assert _done_steps(str(tmp_path), 'validation/accuracy') == [15, 30, 45, 50]  # evaluation ran
  # A resumed run (a new process in practice) traces once more, and only once.
  chex.clear_trace_counter()
  config.num_steps = 60
  train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize('parallel_', ['jit', 'pmap'])
def test_language_model_steps_trace_once(parallel_, tmp_path, monkeypatch):
  data = lm_test.markov_dataset()
  monkeypatch.setattr(language_model, 'load_text_dataset', lambda cfg: data)
  _count_traces(monkeypatch, language_model, 1)
  config = lm_test.small_config(num_devices=8, parallel=parallel_, **INTERVALS)
  train_and_evaluate(config, str(tmp_path))
  assert _done_steps(str(tmp_path), 'validation/perplexity') == [15, 30, 45, 50]
