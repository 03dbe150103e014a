"""scripts/benchmark.py --suite=fused on a tiny sub-grid: every method runs and agrees, table, JSON, plot."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fused_suite_on_a_sub_grid_writes_rows_sweep_and_plot(tmp_path):
  out = str(tmp_path / 'fused')
  subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'benchmark.py'), '--suite=fused',
                  '--preset=cpu_small', '--K=1000', '--N=64', '--d=16', '--dtype=float32,bfloat16',
                  '--time', '--repeats=1', '--max_load=0', '--chunk_size=256',
                  '--token_chunk_size=32', f'--out={out}'],
                 check=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=600)
  with open(out + '.json') as f:
    result = json.load(f)
  rows = result['rows']
  assert {(r['dtype'], r['N'], r['d'], r['K']) for r in rows} == {
      (dt, 64, 16, 1000) for dt in ('float32', 'bfloat16')}
  methods = [r['method'] for r in rows if r['dtype'] == 'float32']
  assert methods[:4] == ['naive optax', 'naive ops', 'fused mean', 'fused none']
  for r in rows:
    assert r['time_s'] > 0 and r['temp_mib'] > 0 and 'rel_err_vs' not in r, r
    if r['method'] == 'naive optax':
      assert r['mem_ratio'] == r['time_ratio'] == 1.0
    if r['dtype'] == 'float32' and r['method'] == 'naive optax':
      assert 'rel_err' not in r  # the reference itself
    elif r['dtype'] == 'float32':  # loss and gradients equal the naive optax loss's
      assert r['rel_err'] < 1e-5, r
    else:  # bfloat16: every row, naive included, against the naive loss in float32
      assert 0 < r['rel_err'] < 5e-2, r
  assert result['chunks'] == {'chunk_size': 256, 'token_chunk_size': 32}
  sweep = result['sweep']  # a sub-grid sweeps at its largest K and its d
  assert {(r['K'], r['d']) for r in sweep} == {(1000, 16)}
  assert [r['N'] for r in sweep if 'naive_mib' in r] == [1024, 2048, 4096, 8192]
  assert result['markdown'].count(' | 64 | 16 | ') == len(rows)
  assert os.path.getsize(out + '.png') > 0


def test_a_bad_grid_flag_is_named():
  run = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'benchmark.py'), '--suite=fused',
                        '--N=2048,8k'], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                       capture_output=True, text=True, timeout=300)
  assert run.returncode != 0 and '--N must be positive integers' in run.stderr
