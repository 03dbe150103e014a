"""scripts/bench_generate.py (`benchmark.py --suite=generate`): the cpu_small preset through
`benchmark.main` gives every way a rate, a table, a JSON and a plot, and the Transformer's cache and
window decode the same tokens."""

import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'scripts'))
import bench_generate  # pylint: disable=g-import-not-at-top,wrong-import-position
import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_cpu_small_through_benchmark_main(tmp_path, capsys):
  out = str(tmp_path / 'gen')
  benchmark.FLAGS(['benchmark.py', '--suite=generate', '--preset=cpu_small', f'--out={out}',
                   '--repeats=1'])
  try:
    benchmark.main([])
  finally:
    benchmark.FLAGS.unparse_flags()
  with open(out + '.json') as f:
    result = json.load(f)
  p = bench_generate.PRESETS['cpu_small']
  rows = result['rows']
  assert (result['suite'], result['preset']) == ('generate', 'cpu_small')
  assert [(r['B'], r['method'], r['way']) for r in rows] == [
      (b, m, w) for b in p['B'] for m in bench_generate.METHODS for w in bench_generate.WAYS]
  for r in rows:
    assert r['tokens_per_s'] > 0 and r['first_call_s'] > 0, r['way']
    np.testing.assert_allclose(r['tokens_per_s'] * r['ms_per_token'] / 1e3, r['B'])
    tokens = np.asarray(r['tokens'])
    assert tokens.shape == (r['B'], p['N']) and tokens.min() >= 0 and tokens.max() < p['K']
  by = {(r['B'], r['method'], r['way']): r for r in rows}
  for b in p['B']:
    for m in bench_generate.METHODS:
      cache, window = by[b, m, 'transformer, kv cache'], by[b, m, 'transformer, window']
      # The cache and the window decode the same tokens (same weights, prompt and key).
      np.testing.assert_array_equal(cache['tokens'], window['tokens'])
      assert cache['same_as_cache'] == window['same_as_cache'] == 1.0
      assert by[b, m, 'lstm, carry']['same_as_cache'] is None
  # Greedy is not sampling: with a 64-class vocabulary the two differ somewhere.
  assert any(by[b, 'greedy', w]['tokens'] != by[b, 'sample', w]['tokens']
             for b in p['B'] for w in bench_generate.WAYS)
  table = result['markdown']
  assert table.count('\n') == len(rows) + 1 and '| transformer, window | greedy | 2 |' in table
  assert table in capsys.readouterr().out
  assert os.path.getsize(out + '.png') > 10_000
