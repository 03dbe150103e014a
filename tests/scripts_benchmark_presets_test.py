"""scripts/benchmark.py presets: --preset=auto follows the backend; every suite has cpu, gpu, tpu."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'scripts'))
import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize('backend, preset', [('cpu', 'cpu'), ('gpu', 'gpu'), ('cuda', 'gpu'),
                                             ('tpu', 'tpu')])
def test_auto_follows_the_backend(backend, preset):
  assert benchmark.resolve_preset('auto', backend) == preset
  assert benchmark.resolve_preset('cpu_small', backend) == 'cpu_small'  # an explicit one stays


def test_auto_on_this_machine_and_on_an_unknown_backend():
  assert benchmark.resolve_preset('auto') == 'cpu'  # conftest.py: JAX_PLATFORMS=cpu
  with pytest.raises(ValueError, match=r"no preset for the backend 'metal'; pass one of \["):
    benchmark.resolve_preset('auto', 'metal')


@pytest.mark.parametrize('suite', ['fused', 'heads', 'ce', 'loop', 'decode'])
def test_every_suite_has_the_presets_auto_can_pick(suite):
  presets = benchmark.PRESETS if suite == 'fused' else benchmark.SUITE_MODULES[suite].PRESETS
  assert {'cpu', 'gpu', 'tpu'} <= set(presets)
  flag = benchmark.FLAGS['preset'].parser.enum_values
  assert set(benchmark.BACKEND_PRESETS.values()) <= set(flag) and 'auto' in flag
  assert benchmark.PRESETS['tpu']['max_run_gib'] < 16  # one v5e chip: 16 GiB of HBM


def test_main_runs_the_resolved_preset_and_names_it(tmp_path, monkeypatch, capsys):
  """`main` with --preset=auto on CPU: the suite gets 'cpu'; the output name and JSON say so."""
  seen = []
  monkeypatch.setitem(benchmark.SUITES, 'ce', lambda preset, out: seen.append((preset, out)) or {})
  monkeypatch.chdir(tmp_path)
  benchmark.FLAGS(['benchmark.py', '--suite=ce', '--preset=auto'])
  try:
    benchmark.main([])
  finally:
    benchmark.FLAGS.unparse_flags()
  assert seen == [('cpu', os.path.join('bench_out', 'ce_cpu'))]
  assert '--preset=auto: cpu (backend cpu)' in capsys.readouterr().out
  with open(tmp_path / 'bench_out' / 'ce_cpu.json') as f:
    result = json.load(f)
  assert (result['preset'], result['preset_flag'], result['backend']) == ('cpu', 'auto', 'cpu')


def test_heads_sub_grid_overrides_the_preset(monkeypatch):
  monkeypatch.setitem(benchmark.bench_heads.PRESETS, 'cpu', dict(K=[10_000], N=2048, d=512))
  benchmark.FLAGS(['benchmark.py', '--suite=heads', '--K=4000,16000', '--d=64'])
  try:
    assert benchmark._heads_grid('cpu') == 'custom'  # pylint: disable=protected-access
    assert benchmark.bench_heads.PRESETS['custom'] == dict(K=[4000, 16000], N=2048, d=64,
                                                           train_K=[4000, 16000])  # --K sets both
    benchmark.FLAGS.unparse_flags()
    benchmark.FLAGS(['benchmark.py', '--suite=heads', '--N=128,256'])
    with pytest.raises(benchmark.app.UsageError, match='--suite=heads takes one --N, got 128,256'):
      benchmark._heads_grid('cpu')  # pylint: disable=protected-access
  finally:
    benchmark.FLAGS.unparse_flags()
    benchmark.bench_heads.PRESETS.pop('custom', None)


def test_timing_starts_at_once_by_default_and_waits_only_when_asked(monkeypatch):
  import bench_utils  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  assert flags.FLAGS['max_load'].default == 0.0  # no waiting unless --max_load is given
  sleeps = []
  monkeypatch.setattr(bench_utils.time, 'sleep', sleeps.append)
  monkeypatch.setattr(bench_utils, 'load', lambda: 5.0)  # a busy machine
  assert bench_utils.wait_quiet(0.0, 900) == 5.0 and not sleeps  # the load is still reported
  assert bench_utils.wait_quiet(1.3, 120) == 5.0 and sleeps == [60, 60]  # asked: waits, bounded
