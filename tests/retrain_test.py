"""Classifier re-training (softmax_jax/retrain.py, scripts/retrain_head.py) against references.

Balancing is checked against its definition (float64 brute force: copies of same-class rows;
SMOTE rows on a segment from a real feature to one of its k nearest same-class neighbours),
features against the backbone applied by hand, evaluation against `metrics.classification_metrics`
of the full log-probabilities, and the script's 'original' row against the run's own final metrics.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import metrics
from softmax_jax import retrain
from softmax_jax.heads import DenseSoftmax
from softmax_jax.models import HeadedModel
from softmax_jax.train import base_config, train_and_evaluate
from softmax_jax.train.writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COUNTS = (30, 12, 7)


def _toy(counts=_COUNTS, d=4, seed=0, spread=1.0):
  """Long-tailed features `[N, d]`: one Gaussian blob per class, centres 6 apart on the axes."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int32)
  centres = 6.0 * np.eye(len(counts), d)
  x = centres[labels] + spread * rng.normal(size=(len(labels), d))
  return x.astype(np.float32), labels


@pytest.mark.parametrize('sampling', retrain.SAMPLINGS)
def test_balance_counts_real_rows_first_and_added_rows_by_definition(sampling):
  k, (x, y) = 3, _toy()
  bx, by = retrain.balance_features(x, y, sampling=sampling, seed=1, k_neighbors=k)
  assert bx.dtype == np.float32 and by.dtype == np.int32 and bx.shape[1] == x.shape[1]
  want = list(_COUNTS) if sampling == 'instance' else [max(_COUNTS)] * 3
  assert np.bincount(by).tolist() == want
  np.testing.assert_array_equal(bx[:len(x)], x)  # the real features first, unchanged
  np.testing.assert_array_equal(by[:len(y)], y)
  x64, new, new_y = x.astype(np.float64), bx[len(x):].astype(np.float64), by[len(x):]
  for c in range(3) if sampling != 'instance' else ():
    members, added = x64[y == c], new[new_y == c]
    assert len(added) == max(_COUNTS) - _COUNTS[c]
    if sampling == 'class':  # exact copies of real features of the same class
      dist = np.abs(added[:, None] - members[None]).max(-1).min(-1)
      np.testing.assert_array_equal(dist, 0.0)
      continue
    dist = ((members[:, None] - members[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1)[:, :-1]  # every other member, nearest first
    near = [(i, j) for i in range(len(members)) for j in order[i, :k]]
    assert max((_off_segments(s, members, near) for s in added), default=0.0) < 1e-5
    if c == 2:  # the check can fail: segments to farther members miss some of these rows
      far = [(i, j) for i in range(len(members)) for j in order[i, k:]]
      assert max(_off_segments(s, members, far) for s in added) > 1e-3


def _off_segments(s, members, pairs):
  """Max-norm distance of `s` to the nearest segment members[i] -> members[j] of `pairs` (float64)."""
  best = np.inf
  for i, j in pairs:
    seg = members[j] - members[i]
    lam = np.clip((s - members[i]) @ seg / (seg @ seg), 0.0, 1.0)
    best = min(best, np.abs(members[i] + lam * seg - s).max())
  return best


@pytest.mark.parametrize('sampling', ['class', 'smote'])
def test_balance_is_deterministic_in_the_seed(sampling):
  x, y = _toy()
  a = retrain.balance_features(x, y, sampling=sampling, seed=4)
  b = retrain.balance_features(x, y, sampling=sampling, seed=4)
  c = retrain.balance_features(x, y, sampling=sampling, seed=5)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize('kwargs, match', [
    (dict(sampling='balanced'), r"sampling must be one of \('instance', 'class', 'smote'\), got 'balanced'"),
    (dict(sampling='smote', k_neighbors=7), r'k_neighbors=7 needs at least k \+ 1 = 8 .*class 2 has 7'
                                            r'.*Lower k_neighbors to at most 6'),
    (dict(sampling='smote', k_neighbors=0), r'k_neighbors must be an integer >= 1, got 0'),
    (dict(sampling='class', seed=-1), r'seed must be an integer in \[0, 4294967296\), got -1'),
    (dict(sampling='class', labels=np.zeros(5, np.int32)),
     r'labels must be \[N\] = \(49,\) .*got shape \(5,\)'),
    (dict(sampling='class', features=np.zeros((49,), np.float32)), r'features must be \[N, d\] float'),
    (dict(sampling='class', features=np.full((49, 2), np.nan, np.float32)), r'features must be finite'),
])
def test_bad_balance_arguments_are_named(kwargs, match):
  x, y = _toy()
  kwargs = dict(dict(features=x, labels=y, seed=0), **kwargs)
  with pytest.raises(ValueError, match=match):
    retrain.balance_features(kwargs.pop('features'), kwargs.pop('labels'), **kwargs)


def _model(d=4, num_classes=3, inputs=6):
  model = HeadedModel(backbone=nn.Dense(d), head=DenseSoftmax(num_classes=num_classes))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, inputs)), jnp.zeros((1,), jnp.int32),
                         train=False)
  return model, variables


def test_features_are_the_backbone_of_every_row_despite_padding():
  model, variables = _model()
  images = np.random.default_rng(0).normal(size=(11, 6)).astype(np.float32)
  got = retrain.features(model, variables, images, batch_size=4)  # 4 + 4 + 3 (padded)
  p = variables['params']['backbone']
  want = images.astype(np.float64) @ np.asarray(p['kernel'], np.float64) + np.asarray(p['bias'])
  assert got.shape == (11, 4) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r'images must be \[N, \.\.\.\] float with N >= 1'):
    retrain.features(model, variables, images[:0], batch_size=4)


def test_retraining_on_separable_features_learns_them_and_touches_only_the_head():
  model, variables = _model()
  x, y = _toy(spread=0.5)
  new = retrain.retrain_head(model, variables, x, y, steps=150, batch_size=32, learning_rate=0.05, seed=0)
  head = lambda v, f: model.head.apply({'params': v['params']['head']}, f, method='log_prob')
  assert np.mean(np.argmax(head(new, x), -1) == y) == 1.0
  assert np.mean(np.argmax(head(variables, x), -1) == y) < 0.9  # the initial head did not know them
  same = jax.tree.map(np.array_equal, new['params']['backbone'], variables['params']['backbone'])
  assert all(jax.tree.leaves(same))
  again = retrain.retrain_head(model, variables, x, y, steps=150, batch_size=32, learning_rate=0.05, seed=0)
  other = retrain.retrain_head(model, variables, x, y, steps=150, batch_size=32, learning_rate=0.05, seed=1)
  for a, b, c in zip(*(jax.tree.leaves(v['params']['head']) for v in (new, again, other))):
    np.testing.assert_array_equal(a, b)  # deterministic in the seed
    assert not np.array_equal(a, c)


@pytest.mark.parametrize('kwargs, match', [
    (dict(labels=np.zeros(5, np.int32)), r'labels must be \[N\] = \(49,\) .*got shape \(5,\)'),
    (dict(labels=np.full(49, 3, np.int32)), r'labels must lie in \[0, K = 3\)'),
    (dict(features=np.zeros((49, 7), np.float32)), r'new head DenseSoftmax has parameters .*'
                                                   r'not those of the run'),
    (dict(steps=0), r'steps must be an integer >= 1, got 0'),
    (dict(learning_rate=-1.0), r'learning_rate must be a finite number > 0, got -1.0'),
])
def test_bad_retrain_arguments_are_named(kwargs, match):
  model, variables = _model()
  x, y = _toy()
  kwargs = dict(dict(features=x, labels=y, steps=2, batch_size=8, learning_rate=1e-3, seed=0), **kwargs)
  with pytest.raises(ValueError, match=match):
    retrain.retrain_head(model, variables, kwargs.pop('features'), kwargs.pop('labels'), **kwargs)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A long-tailed digits run (MLP 32, 30 steps; imbalance 10: class counts 179 down to ~18)."""
  root = tmp_path_factory.mktemp('crt')
  c = base_config()
  c.data.update(name='digits', data_dir=str(root / 'tfds'), imbalance_ratio=10.0)
  c.model.hidden = (32,)
  c.head = dict(name='imbalanced', loss='ce')
  c.update_from_flattened_dict({'num_steps': 30, 'batch_size': 64, 'progress': False,
                                'optimizer.warmup_steps': 5, 'optimizer.learning_rate': 3e-3})
  c.log_every = c.eval_every = c.checkpoint_every = 1000
  workdir = str(root / 'run')
  final = train_and_evaluate(c, workdir)
  return workdir, final


def test_evaluate_equals_the_metrics_of_the_full_log_probs_and_the_runs_own(run):
  from softmax_jax.train import load_trained  # pylint: disable=g-import-not-at-top
  workdir, final = run
  _, dataset, model, variables = load_trained(workdir)
  got = retrain.evaluate(model, variables, dataset, 'test', batch_size=100,
                         class_counts=dataset.class_counts, prefix='test/')
  test = dataset.splits['test']
  log_probs = model.apply(variables, dataset.normalize(test.images), method='log_prob')
  want = metrics.classification_metrics(log_probs, test.labels, prefix='test/',
                                        class_counts=dataset.class_counts)
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    if key in final:  # the trainer's final evaluation of the same checkpoint
      assert got[key] == pytest.approx(final[key], rel=1e-5, abs=1e-6), key


def test_script_runs_end_to_end_and_its_original_row_is_the_runs(run, tmp_path):
  workdir, final = run
  cmd = [sys.executable, os.path.join(REPO, 'scripts', 'retrain_head.py'), f'--workdir={workdir}',
         '--sampling=smote', '--seed=3', '--steps=20', '--k_neighbors=3', f'--out={tmp_path}']
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr[-2000:]
  assert '| cRT smote | test |' in out.stdout and '| original | validation |' in out.stdout
  with open(tmp_path / 'retrain_smote_3.json') as f:
    result = json.load(f)
  counts = result['class_counts']
  assert result['train_real'] == sum(counts) and result['train_balanced'] == 10 * max(counts)
  assert result['original']['test']['balanced_accuracy'] == pytest.approx(
      final['test/balanced_accuracy'], abs=1e-6)
  for split in ('validation', 'test'):
    for key in ('balanced_accuracy', 'many_accuracy', 'medium_accuracy', 'nll', 'ece'):
      assert np.isfinite(result['retrained'][split][key]), (split, key)
  bad = subprocess.run(cmd[:2] + ['--workdir=/nonexistent', '--sampling=smote'], capture_output=True,
                       text=True, cwd=REPO)
  assert bad.returncode != 0 and "--workdir: '/nonexistent' does not exist" in bad.stderr + bad.stdout
