"""scripts/bench_ce.py (`benchmark.py --suite=ce`): every method steps, the table and the plot."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
import bench_ce  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_every_method_steps_and_the_table_and_plot_are_written(tmp_path, monkeypatch):
  monkeypatch.setitem(bench_ce.PRESETS, 'tiny', dict(K=[3000], N=64))
  rows = bench_ce.ce_suite('tiny', timed=True, repeats=1, max_load=0, wait_s=0, max_run_gib=1.0)
  assert [r['method'] for r in rows] == list(bench_ce.methods(3000))
  by_name = {r['method']: r for r in rows}
  assert by_name['optax']['mem_ratio'] == 1.0 and by_name['optax']['time_ratio'] == 1.0
  for name, row in by_name.items():
    assert row['time_s'] > 0 and row['temp_mib'] >= 0 and row['dtype'] == 'float32', name
  # Same loss and gradient as optax; the old formulation keeps [N, K] buffers, the new none.
  assert by_name['ops']['rel_err'] < 1e-5 and by_name['old']['rel_err'] < 1e-5
  logits_mib = 64 * 3000 * 4 / 2**20
  assert by_name['old']['temp_mib'] >= logits_mib
  assert by_name['ops']['temp_mib'] < 0.1 * logits_mib
  table = bench_ce.table(rows)
  assert table.count('\n') == len(rows) + 1 and '| 3000 | 64 | float32 | ops options |' in table
  bench_ce.plot(rows, str(tmp_path / 'ce.png'))
  assert os.path.getsize(tmp_path / 'ce.png') > 10_000


def test_untimed_rows_have_memory_only(monkeypatch):
  monkeypatch.setitem(bench_ce.PRESETS, 'tiny', dict(K=[500], N=16))
  rows = bench_ce.ce_suite('tiny', dtype='bfloat16', timed=False, repeats=1, max_load=0,
                           wait_s=0, max_run_gib=1.0, only=['ops'])
  assert [r['method'] for r in rows] == ['optax', 'ops']
  assert all('time_s' not in r and 'rel_err' not in r and r['dtype'] == 'bfloat16' for r in rows)
  assert np.isfinite(rows[1]['mem_ratio'])
