"""Cheap-first cascades (softmax_jax/cascade.py, scripts/cascade.py) against brute force."""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import cascade

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train'))
import distill_test  # pylint: disable=g-import-not-at-top,wrong-import-position
import loop_test  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_confidence_stats_match_numpy_and_nan_rows_never_pass():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 5)) * 3
  z[2, 1] = -np.inf  # a class at probability 0 (a sparse head's)
  lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  lp[4, 3] = np.nan
  got = {k: np.asarray(v) for k, v in cascade.confidence_stats(jnp.asarray(lp, jnp.float32)).items()}
  p = np.sort(np.exp(lp), -1)[:, ::-1]
  ok = np.arange(6) != 4
  np.testing.assert_array_equal(got['prediction'][ok], np.argmax(lp, -1)[ok])
  np.testing.assert_allclose(got['max_prob'][ok], p[ok, 0], rtol=1e-5)
  np.testing.assert_allclose(got['margin'][ok], (p[:, 0] - p[:, 1])[ok], rtol=1e-5, atol=1e-7)
  plogp = np.where(np.exp(lp) > 0, np.exp(lp) * np.nan_to_num(lp, neginf=0.0), 0.0).sum(-1)
  np.testing.assert_allclose(got['entropy'][ok], plogp[ok], rtol=1e-5, atol=1e-6)
  assert np.all(np.isnan([got[k][4] for k in ('margin', 'entropy')]))
  stats = [dict(got, label=np.zeros(6, np.int32))] * 2
  for kind in cascade.CONFIDENCES:
    assert cascade.evaluate(stats, [1.0, 2.0], -np.inf, confidence=kind)['answered_by'][4] == 1


def _brute(stats, costs, t, kind):
  by, acc, cost = [], 0, 0.0
  for j in range(len(stats[0]['label'])):
    i = next((i for i in range(len(stats) - 1) if stats[i][kind][j] >= t), len(stats) - 1)
    by.append(i)
    acc += stats[i]['prediction'][j] == stats[0]['label'][j]
    cost += sum(costs[:i + 1])
  n = len(by)
  return acc / n, cost / n, np.bincount(by, minlength=len(stats)) / n


@pytest.mark.parametrize('kind', cascade.CONFIDENCES)
def test_evaluate_and_curve_equal_brute_force_for_three_stages(kind):
  rng = np.random.default_rng(1)
  n, labels = 300, rng.integers(0, 4, 300)
  stats = [{'label': labels, 'prediction': np.where(rng.random(n) < acc, labels, (labels + 1) % 4),
            'max_prob': rng.random(n), 'margin': rng.random(n), 'entropy': -rng.random(n)}
           for acc in (0.6, 0.8, 0.95)]
  costs = [0.05, 0.2, 1.0]
  for t in (-np.inf, 0.3, 0.7, np.inf, float(stats[0][kind][5])):
    e = cascade.evaluate(stats, costs, t, confidence=kind)
    acc, cost, fractions = _brute(stats, costs, t, kind)
    assert e['accuracy'] == pytest.approx(acc) and e['cost'] == pytest.approx(cost)
    np.testing.assert_allclose(e['fractions'], fractions)
  points = cascade.curve(stats, costs, confidence=kind, num=50)
  assert points[0]['cost'] == pytest.approx(costs[0])  # -inf: stage 1 answers all
  assert points[0]['accuracy'] == pytest.approx(np.mean(stats[0]['prediction'] == labels))
  assert points[-1]['cost'] == pytest.approx(sum(costs))  # +inf: every example reaches the last
  assert points[-1]['accuracy'] == pytest.approx(np.mean(stats[2]['prediction'] == labels))
  assert [p['cost'] for p in points] == sorted(p['cost'] for p in points)


def test_choose_threshold_by_target_and_by_budget():
  points = [{'threshold': t, 'accuracy': a, 'cost': c}
            for t, a, c in [(0.1, 0.80, 0.1), (0.5, 0.90, 0.3), (0.7, 0.93, 0.5), (0.9, 0.92, 0.8)]]
  assert cascade.choose_threshold(points, target_accuracy=0.91)['threshold'] == 0.7  # cheapest >= 0.91
  assert cascade.choose_threshold(points, target_accuracy=0.99)['threshold'] == 0.7  # none: most accurate
  assert cascade.choose_threshold(points, budget=0.4)['threshold'] == 0.5
  assert cascade.choose_threshold(points, budget=0.05)['threshold'] == 0.1  # none: cheapest
  with pytest.raises(ValueError, match='exactly one of target_accuracy and budget'):
    cascade.choose_threshold(points)
  with pytest.raises(ValueError, match="confidence must be one of.*'top'"):
    cascade.evaluate([{'label': np.zeros(1)}] * 2, [1, 1], 0.5, confidence='top')


def test_script_on_two_digits_runs_writes_table_json_and_plot(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  small = distill_test.untrained_run(loop_test.small_config(data_dir, **{'model.hidden': (8,)}),
                                     str(tmp_path / 'small'))
  big = distill_test.untrained_run(loop_test.small_config(data_dir, **{'model.hidden': (64, 64)}),
                                   str(tmp_path / 'big'))
  cmd = [sys.executable, os.path.join(REPO, 'scripts', 'cascade.py'), f'--workdirs={small},{big}',
         '--repeats=1', '--batch_size=128', f'--out={tmp_path}']
  out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
  assert '| 2 |' in out and 'Cascade on test: accuracy' in out
  with open(tmp_path / 'cascade.json') as f:
    result = json.load(f)
  flops = [c['flops'] for c in result['stage_costs']]
  assert 0 < flops[0] < flops[1]  # the small MLP is the cheap one
  assert sum(result['test_fractions']) == pytest.approx(1.0)
  assert os.path.getsize(tmp_path / 'cascade.png') > 0


def test_bad_log_probs_and_script_flags_are_named():
  with pytest.raises(AssertionError, match='must be \\[B, K\\]'):
    cascade.confidence_stats(jnp.zeros((4,)))
  with pytest.raises(AssertionError, match='K >= 2'):
    cascade.confidence_stats(jnp.zeros((4, 1)))
  script = os.path.join(REPO, 'scripts', 'cascade.py')
  for flag, match in (('--target=1.5', r'--target is an accuracy in \(0, 1\]; got 1.5'),
                      ('--budget=0', r'--budget is a fraction > 0.*got 0.0')):
    bad = subprocess.run([sys.executable, script, '--workdirs=a,b', flag], capture_output=True,
                         text=True, cwd=REPO)
    assert bad.returncode != 0 and re.search(match, bad.stderr + bad.stdout), bad.stderr[-500:]


def test_stages_on_other_data_are_refused():
  a = {'label': np.array([0, 1, 2])}
  cascade.check_same_examples([a, {'label': np.array([0, 1, 2])}], ['a', 'b'], 'test')
  for other in ({'label': np.array([0, 1])}, {'label': np.array([0, 2, 1])}):
    with pytest.raises(ValueError, match=r"test split of 'b' is not that of 'a'.*same data"):
      cascade.check_same_examples([a, other], ['a', 'b'], 'test')
