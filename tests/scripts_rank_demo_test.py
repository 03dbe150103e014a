"""scripts/rank_demo.py, small: softmax stuck at rank d + 1; MoS above it and closer to P*."""

import importlib.util
import os

from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
  path = os.path.join(REPO, 'scripts', 'rank_demo.py')
  spec = importlib.util.spec_from_file_location('rank_demo', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_softmax_stuck_at_d_plus_one_mos_above_and_closer():
  demo = _script()
  fv = flags.FlagValues()
  demo.define_flags(fv)
  d = 4
  fv(['rank_demo', '--contexts=48', '--classes=200', f'--widths={d}', f'--mos_widths={d}',
      '--mixtures=1,4', '--feature_dim=32', '--steps=1500', '--progress=false'])
  out, target, (soft, control, mos) = demo.report(fv)

  lt = demo.target_log_probs(48, 200, modes=2, mass=0.9, seed=0)
  np.testing.assert_allclose(np.exp(lt).sum(axis=1), 1.0, rtol=1e-12)
  assert np.sum(np.exp(lt) > 0.9 / 200 * 5) == 48 * 2  # two modes a row (Dirichlet(5) weights)
  assert target['rank'] == 48  # full: min(N, K - 1)
  centred = lambda lp: lp - lp.mean(axis=1, keepdims=True)
  for r in (soft, control, mos):  # the reported KL is the KL of the returned log-probabilities
    lp = r['log_probs']
    np.testing.assert_allclose(np.exp(lp).sum(axis=1), 1.0, atol=1e-5)
    assert r['kl'] == np.mean(np.sum(np.exp(lt) * (lt - lp), axis=1))
    assert 0 < r['kl'] < r['kl_half'] * 1.01
    r['s'] = np.linalg.svd(centred(lp), compute_uv=False)
  for r in (soft, control):  # the bottleneck: one softmax, whatever feeds it
    assert r['rank'] == d + 1 and r['s'][d + 1] < 1e-5 * r['s'][0]
  assert mos['rank'] > 4 * (d + 1) and mos['s'][d + 1] > 1e-2 * mos['s'][0]
  assert mos['kl'] < 0.7 * min(soft['kl'], control['kl'])
  assert soft['params'] == 48 * d + d * 200 + 200

  lines = out.splitlines()
  assert lines[0].startswith('target: N=48, K=200, row-centred rank r=48,')
  assert lines[2].startswith('| head | d | M |') and len(lines) == 7
  assert lines[4].startswith(f'| softmax | {d} | - |') and '| 5 | 5 |' in lines[4]
  assert lines[5].startswith(f'| MoS | {d} | 1 |') and '| 5 | 5 |' in lines[5]
  assert lines[6].startswith(f'| MoS | {d} | 4 |') and f"| {mos['rank']} | 5 |" in lines[6]
