"""scripts/bench_decode.py (`benchmark.py --suite=decode`): every method decodes, table and plot."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
import bench_decode  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_every_method_decodes_and_the_table_and_plot_are_written(tmp_path, monkeypatch):
  monkeypatch.setitem(bench_decode.PRESETS, 'tiny', dict(K=[400], B=[3], d=8, S=[40]))
  rows = bench_decode.decode_suite('tiny', repeats=1)
  methods = bench_decode.methods(400, 8, [40])
  assert [r['method'] for r in rows] == list(methods)
  assert {r['method']: r['speedup'] for r in rows}['sample'] == 1.0
  assert all(r['tokens_per_s'] > 0 and r['B'] == 3 for r in rows)
  # What each step returns: greedy is the argmax; the shortlist and approx top-k pick ids inside
  # their candidates; every method gives one valid id per row.
  h = jax.random.normal(jax.random.key(0), (3, 8))
  key = jax.random.key(1)
  step, p = methods['greedy']
  np.testing.assert_array_equal(step(key, h, p), jnp.argmax(h @ p['w'] + p['b'], -1))
  for name, (step, p) in methods.items():
    ids = np.asarray(jax.jit(step)(key, h, p))
    assert ids.shape == (3,) and np.all((ids >= 0) & (ids < 400)), name
  for name in ('shortlist S=40', 'shortlist S=40, gathered once'):
    step, p = methods[name]
    assert np.all(np.asarray(jax.jit(step)(key, h, p)) < 40), name

  table = bench_decode.table(rows)
  assert table.count('\n') == len(rows) + 1 and '| 400 | 3 | shortlist S=40 |' in table
  bench_decode.plot(rows, str(tmp_path / 'decode.png'))
  assert os.path.getsize(tmp_path / 'decode.png') > 10_000
