"""scripts/diagnose.py on tiny trained runs: a digits MLP (command line) and a Markov-chain LSTM."""

import importlib.util
import json
import os
import subprocess
import sys

from absl import app
import numpy as np
import pytest

from softmax_jax import diagnostics
from softmax_jax.train import base_config, load_trained, train_and_evaluate
from softmax_jax.train import language_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests', 'train'))
from lm_test import markov_dataset  # pylint: disable=g-import-not-at-top,wrong-import-position
from lm_test import small_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def _script():
  path = os.path.join(REPO, 'scripts', 'diagnose.py')
  spec = importlib.util.spec_from_file_location('diagnose', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_digits_run_then_diagnose(tmp_path):
  c = base_config()
  c.data.name = 'digits'
  c.model = dict(name='mlp', hidden=(4,), dropout=0.0)  # features of width 4 < K - 1 = 9
  c.batch_size, c.num_steps, c.num_devices, c.progress = 64, 30, 1, False
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-2, 0
  c.log_every = c.eval_every = c.checkpoint_every = 30
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'diag')
  train_and_evaluate(c, workdir)
  result = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'diagnose.py'),
                           f'--workdir={workdir}', f'--out={out}', '--max_contexts=100',
                           '--unargmaxable=exact', '--bound=-0.2,none'],  # GELU features
                          capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith('| run | head | N |') and lines[1].count('---') == 17, result.stdout
  assert lines[2].startswith('| run | dense | 100 | 10/10 | 4 | 5 | 5 | 9 |'), result.stdout
  assert 'eps = 1.19e-07 (float32)' in result.stdout
  assert 'unargmaxable over -0.2 <= h_i <= inf' in result.stdout
  assert os.path.getsize(os.path.join(out, 'spectra.png')) > 10000
  with open(os.path.join(out, 'diagnostics.json')) as f:
    r = json.load(f)
  assert not os.path.exists(os.path.join(workdir, 'diagnostics.json'))  # --out was honoured

  # Against a recomputation from the checkpoint: the split has more than 100 images, so the
  # script drew 100 of them with --seed=0; draw the same ones.
  config, dataset, model, variables = load_trained(workdir)
  images = dataset.splits['validation'].images
  idx = np.sort(np.random.default_rng(0).choice(len(images), 100, replace=False))
  lp = np.asarray(model.apply(variables, dataset.normalize(images[idx]), method='log_prob'))
  s = np.linalg.svd(lp.astype(np.float64) - lp.mean(axis=1, keepdims=True), compute_uv=False)
  np.testing.assert_allclose(r['singular_values'], s, rtol=1e-4, atol=1e-5 * s[0])
  assert r['rank'] == 5 and s[4] > 1e-3 * s[0] and s[5] < 1e-5 * s[0] and r['gap_index'] == 5
  kernel = np.asarray(variables['params']['head']['kernel'])
  bias = np.asarray(variables['params']['head']['bias'])
  assert r['kernel_rank'] == 4 and r['unargmaxable'] == diagnostics.unargmaxable_classes(
      kernel, bias, method='exact', bound=(-0.2, None)).tolist()
  assert r['bound'] == [-0.2, None]
  feats = np.asarray(model.apply(variables, dataset.normalize(images[idx]), method='features'))
  assert r['anisotropy'] == pytest.approx(diagnostics.anisotropy(feats), abs=1e-6)
  assert r['feature_range'] == pytest.approx([feats.min(), feats.max()], abs=1e-6)
  assert feats.min() >= -0.2  # GELU >= -0.17
  assert config.head.name == 'dense' and r['feature_dim'] == 4


def test_lm_run_then_diagnose(tmp_path, monkeypatch):
  data = markov_dataset()
  monkeypatch.setattr(language_model, 'load_text_dataset', lambda cfg: data)
  workdir = str(tmp_path / 'lm')
  train_and_evaluate(small_config(**{'model.hidden': 6, 'num_steps': 20}), workdir)
  diagnose = _script()
  r = diagnose.analyse(workdir, split='validation', max_contexts=150, max_classes=20, batch_size=64,
                       method='auto')
  assert (r['task'], r['contexts'], r['num_classes'], r['classes_used'], r['feature_dim']) == (
      'language_model', 150, 24, 20, 6)
  assert r['rank'] == 7 and r['gap_index'] == 7  # d + 1 for 20 of the classes; min(150, 19) = 19
  assert r['unargmaxable_exact'] and set(r['unargmaxable']) <= set(range(24))
  head = load_trained(workdir)[3]['params']['head']
  assert r['unargmaxable'] == diagnostics.unargmaxable_classes(
      np.asarray(head['kernel']), np.asarray(head['bias']), method='exact').tolist()
  table = diagnose.table(r)
  assert '| lm | dense | 150 | 20/24 | 6 | 7 | 7 | 19 |' in table
  diagnose.draw(r, str(tmp_path / 'spectra.png'))
  assert os.path.getsize(tmp_path / 'spectra.png') > 10000
  assert r['split'] == 'validation' and 'feature_range' in r
  assert diagnose.parse_bound(None) is None and diagnose.parse_bound(['1.5']) == 1.5
  assert diagnose.parse_bound(['0', 'None']) == (0.0, None)
  with pytest.raises(app.UsageError, match='--bound takes b or low,high'):
    diagnose.parse_bound(['1', '2', '3'])
