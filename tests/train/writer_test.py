"""MetricWriter's TensorBoard side (train/writer.py): config text, hparams, images, one value per
tag and step, read back from the event files without TensorFlow; and the loop's use of it."""

import collections
import json
import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from softmax_jax import calibration, metrics
from softmax_jax.train import base_config, train_and_evaluate
from softmax_jax.train.loop import final_row
from softmax_jax.train.writer import (MetricWriter, hparams_of, per_class_f1, read_events,
                                      read_metrics)


def _events(workdir):
  logdir = os.path.join(workdir, 'tensorboard')
  assert all('tfevents' in n for n in os.listdir(logdir)), os.listdir(logdir)  # one run, no sub-runs
  events = list(read_events(logdir))
  counts = collections.Counter((step, tag) for step, tag, _ in events)
  assert [k for k, n in counts.items() if n > 1] == []  # one value per tag and step
  return {(step, tag): kind for step, tag, kind in events}


def test_writer_config_hparams_images_and_one_value_per_tag_and_step(tmp_path, caplog):
  workdir = str(tmp_path)
  rng = np.random.default_rng(0)
  conf = rng.uniform(0.2, 1.0, 300)
  calibration.save_reliability_figure_from_stats(os.path.join(workdir, 'reliability.png'),
                                                 {'test': (conf, rng.random(300) < conf)})
  np.savez(os.path.join(workdir, 'embeddings.npz'), embeddings=rng.normal(size=(50, 2)),
           labels=np.arange(50) % 3)
  writer = MetricWriter(workdir, 0)
  writer.write_config(0, base_config())
  writer.write(3, {'train/loss': 1.0, 'train/examples_per_second': 5.0, 'x/nan': float('nan')})
  with caplog.at_level(logging.WARNING):
    writer.write(3, {'train/loss': 2.0})  # a second value at one step: logged, not written
  assert "'train/loss' was already written at step 3" in caplog.text
  final = {'test/accuracy': 0.5, 'train/examples_per_second': 7.0, 'test/few_accuracy': None}
  writer.write_final(6, final_row(final, 'examples_per_second'))
  writer.write_figures(6, per_class={'f1': [0.5, 1.0, 0.0], 'support': [2, 3, 0]})
  writer.close()
  events = _events(workdir)
  assert events == {
      (3, 'train/loss'): 'scalar', (3, 'train/examples_per_second'): 'scalar',
      (0, 'config/text_summary'): 'text', (0, '_hparams_/session_start_info'): 'hparams',
      (6, 'test/accuracy'): 'scalar', (6, 'train/steady_examples_per_second'): 'scalar',
      (6, '_hparams_/experiment'): 'hparams', (6, '_hparams_/session_end_info'): 'hparams',
      (6, 'images/reliability'): 'image', (6, 'images/features'): 'image',
      (6, 'images/per_class_f1'): 'image'}
  rows = read_metrics(workdir)
  assert rows[0]['train/loss'] == 1.0 and rows[0]['x/nan'] is None
  assert rows[-1] == {'step': 6, 'test/accuracy': 0.5, 'train/steady_examples_per_second': 7.0,
                      'test/few_accuracy': None}
  # A resumed writer purges what the earlier files hold after its start step.
  MetricWriter(workdir, 4).close()
  assert [r['step'] for r in read_metrics(workdir)] == [3, 3]


def test_hparams_are_the_flat_config():
  config = base_config()
  hp = hparams_of(json.loads(config.to_json_best_effort()))
  assert hp['head.name'] == config.head.name and hp['model.name'] == config.model.name
  assert hp['optimizer.learning_rate'] == config.optimizer.learning_rate
  assert hp['batch_size'] == config.batch_size and hp['seed'] == config.seed
  assert hp['progress'] is True and hp['model.hidden'] == str(tuple(config.model.hidden))
  assert 'data.data_dir' not in hp  # None: left out
  assert all(isinstance(v, (str, bool, int, float)) for v in hp.values())


def test_per_class_f1_matches_metrics():
  rng = np.random.default_rng(1)
  labels, pred = rng.integers(0, 5, 200), rng.integers(0, 4, 200)  # class 4 never predicted
  where = rng.random(200) < 0.8
  got = per_class_f1(pred, labels, num_classes=6, where=where)  # class 5: neither
  log_probs = np.log(np.eye(6)[pred] * 0.9 + 0.1 / 6)
  want = metrics.per_class_precision_recall_f1(log_probs, labels, where=where)
  np.testing.assert_allclose(got['f1'], np.asarray(want['f1'], np.float64), rtol=1e-6)
  np.testing.assert_array_equal(got['support'], np.asarray(want['support']))
  assert got['f1'][5] == 0.0 and got['support'][5] == 0


def test_a_run_writes_config_hparams_images_and_each_tag_once(tmp_path):
  config = base_config()
  config.update_from_flattened_dict({
      'data.name': 'mnist', 'model.hidden': (8,), 'model.dropout': 0.0, 'batch_size': 8,
      'eval_batch_size': 16, 'num_steps': 4, 'log_every': 2, 'eval_every': 1000,
      'checkpoint_every': 1000, 'progress': False, 'num_devices': 1})
  workdir = str(tmp_path / 'run')
  with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
    train_and_evaluate(config, workdir)
  events = _events(workdir)  # the last log step's rate and the run's steady rate: two tags
  assert events[(4, 'train/examples_per_second')] == events[(4, 'train/steady_examples_per_second')]
  assert {(0, 'config/text_summary'), (0, '_hparams_/session_start_info'),
          (4, '_hparams_/experiment'), (4, 'images/reliability'), (4, 'images/per_class_f1'),
          (4, 'test/accuracy')} <= set(events)
