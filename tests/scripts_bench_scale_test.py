"""scripts/bench_scale.py (`benchmark.py --suite=scale`): per-device memory falls with M; table, plot."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
import bench_scale  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_memory_falls_with_the_model_axis_and_the_table_and_plot_are_written(tmp_path):
  n, d, k = 32, 16, 8192
  rows = bench_scale.scale_suite('cpu', repeats=1, grid=dict(K=[k], M=[1, 4], d=d, N=n,
                                                             chunk_size=512))
  assert [(r['M'], r['method']) for r in rows] == [(1, 'plain'), (1, 'fused'), (4, 'plain'),
                                                    (4, 'fused')]
  by = {(r['M'], r['method']): r for r in rows}
  for r in rows:  # every point fits: run, finite loss ~ log K for a small random kernel
    assert r['time_s'] > 0 and abs(r['loss'] - 9.0) < 1.0, r
    assert abs(r['param_mib'] - (d + 1) * k // r['M'] * 4 / 2**20) < 1e-9
  # The plain path holds its shard's [N, K/M] logits; per device everything shrinks ~1/M.
  assert by[(1, 'plain')]['temp_mib'] >= n * k * 4 / 2**20
  assert by[(4, 'plain')]['temp_mib'] < n * k * 4 / 2**20 / 1.5  # a shard's logits and gradient
  assert by[(4, 'plain')]['temp_mib'] < by[(1, 'plain')]['temp_mib'] / 3
  for method in ('plain', 'fused'):
    assert by[(4, method)]['total_mib'] < by[(1, method)]['total_mib'] / 2.5, method
  checks = bench_scale.checks(rows)
  assert checks['plain']['shrink_vs_M1'][f'K={k} M=4'] > 2.5
  assert checks['plain']['K4M_M8_le_K500k_M1'] is None  # not in this grid
  table = bench_scale.table(rows)
  assert table.count('\n') == len(rows) + 1 and f'| {k} | 4 | fused |' in table
  bench_scale.plot(rows, str(tmp_path / 'scale.png'))
  assert os.path.getsize(tmp_path / 'scale.png') > 10_000


def test_checks_compare_k4m_at_m8_with_k500k_at_m1():
  rows = [dict(K=500_000, M=1, method='fused', total_mib=1000.0),
          dict(K=4_000_000, M=1, method='fused', total_mib=8000.0),
          dict(K=4_000_000, M=8, method='fused', total_mib=990.0)]
  got = bench_scale.checks(rows)['fused']
  assert got['K4M_M8_le_K500k_M1'] is True
  assert abs(got['shrink_vs_M1']['K=4000000 M=8'] - 8000 / 990) < 1e-9
