"""scripts/bench_heads.py (`benchmark.py --suite=heads`): Zipf labels, every head steps, table, plot."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
import bench_heads  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_zipf_labels_follow_zipf_probs():
  k, n = 50, 200_000
  p = bench_heads.zipf_probs(k)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
  assert np.all(np.diff(p) < 0)
  labels = bench_heads.zipf_labels(np.random.default_rng(0), n, k)
  assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < k
  freq = np.bincount(labels, minlength=k) / n
  # Binomial standard error per class; 5 sigma over 50 classes fails by chance with p < 3e-5.
  np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n))


def test_every_head_steps_and_the_table_and_plot_are_written(tmp_path, monkeypatch):
  monkeypatch.setitem(bench_heads.PRESETS, 'tiny', dict(K=[3000], N=64, d=32))
  rows = bench_heads.heads_suite('tiny', timed=True, repeats=1, max_load=0, wait_s=0,
                                 max_run_gib=1.0)
  names = [r['head'] for r in rows]
  assert names == list(bench_heads.make_heads(3000))
  by_name = {r['head']: r for r in rows}
  assert by_name['dense']['mem_ratio'] == 1.0 and by_name['dense']['speedup'] == 1.0
  for name, row in by_name.items():
    assert row['time_s'] > 0 and row['temp_mib'] > 0, name
    assert np.isfinite(row['loss']), name
  # Same module and init key, so same params: the fused and the routed losses equal their baselines.
  np.testing.assert_allclose(by_name['dense']['loss'], by_name['dense fused']['loss'], rtol=1e-5)
  np.testing.assert_allclose(by_name['adaptive']['loss'], by_name['adaptive all']['loss'], rtol=1e-5)
  np.testing.assert_allclose(by_name['adaptive']['loss'], by_name['adaptive vmapped']['loss'], rtol=1e-5)
  np.testing.assert_allclose(by_name['mos']['loss'], by_name['mos materialized']['loss'], rtol=1e-5)
  assert by_name['adaptive']['params'] < by_name['dense']['params']
  table = bench_heads.table(rows)
  assert table.count('\n') == len(rows) + 1 and '| 3000 | 64 | 32 | adaptive all |' in table
  bench_heads.plot(rows, str(tmp_path / 'heads.png'))
  assert os.path.getsize(tmp_path / 'heads.png') > 10_000


def test_untimed_rows_have_memory_only(monkeypatch):
  monkeypatch.setitem(bench_heads.PRESETS, 'tiny', dict(K=[2000], N=16, d=8))
  rows = bench_heads.heads_suite('tiny', timed=False, repeats=1, max_load=0, wait_s=0,
                                 max_run_gib=1.0, only=['dense', 'sampled'])
  assert [r['head'] for r in rows] == ['dense', 'sampled']
  assert all('time_s' not in r and 'speedup' not in r and r['temp_mib'] > 0 for r in rows)


def test_train_step_rows_dense_and_sparse_and_peers(monkeypatch):
  monkeypatch.setitem(bench_heads.PRESETS, 'tiny', dict(K=[2000], N=32, d=16, train_K=[2000]))
  rows = bench_heads.train_step_suite('tiny', repeats=1, max_load=0, wait_s=0, optimizers=('sgd',))
  assert [(r['head'], r['updates']) for r in rows] == [
      ('sampled', 'dense'), ('sampled', 'sparse'), ('hierarchical', 'dense'),
      ('hierarchical', 'sparse')]
  for dense, sparse in (rows[:2], rows[2:]):
    # SGD without momentum or decay: the same first step (the loss is before the update).
    np.testing.assert_allclose(sparse['loss'], dense['loss'], rtol=1e-6)
    assert dense['speedup'] == 1.0 and sparse['time_s'] > 0
  assert bench_heads.train_table(rows).count('\n') == len(rows) + 1
  peers, note = bench_heads.peers_suite('tiny', repeats=1, max_load=0, wait_s=0)
  assert [r['framework'] for r in peers[:2]] == ['softmax_jax SampledSoftmax',
                                                 'softmax_jax SampledSoftmax, row-sparse gradient']
  assert all(r['time_s'] > 0 for r in peers)
  assert note
