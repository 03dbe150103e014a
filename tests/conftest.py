"""Test session setup: 8 fake CPU devices before JAX starts, float64 available for references."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles far more than it computes (XLA's compile is ~60% of tests/ops/softmax_test.py's
# time), so it compiles cheaply: XLA:CPU's LLVM backend at -O0 (about a third faster:
# tests/ops/adaptive_test.py 108 s -> 77 s) and XLA:CPU's classic elemental fusion emitters instead
# of the newer MLIR ones (tests/ops/softmax_test.py 62 s -> 37 s, tests/heads/dense_test.py 93 s ->
# 60 s, one Zen 3 core, 2026-12-03; WORKSPACE: CI time). Numerics are XLA's either way (no
# fast-math). Flags already in XLA_FLAGS are kept; tests that start subprocesses pass them on with
# the `xla_flags` fixture below.
COMPILE_FLAGS = {'xla_backend_optimization_level': '0', 'xla_cpu_use_fusion_emitters': 'false'}
for _flag, _value in COMPILE_FLAGS.items():
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_flag}={_value}").strip()

import chex  # pylint: disable=g-import-not-at-top,wrong-import-position

# Must happen before jax initializes its backends: the data-parallel tests and the chex
# `with_device`/pmap variants need 8 devices.
chex.set_n_cpu_devices(8)

import atexit  # pylint: disable=g-import-not-at-top,wrong-import-position
import re  # pylint: disable=g-import-not-at-top,wrong-import-position
import shutil  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Many tests compile the same computations (a head's step under each chex variant, one model in
# several trainer tests): a compilation cache private to this session serves the repeats. It
# starts empty and is deleted at exit, so no run depends on another (WORKSPACE: CI time).
_CACHE = tempfile.mkdtemp(prefix='softmax_jax_test_xla_cache_')
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


# With `--dist=loadfile` xdist hands out whole test files, by default the files with the most tests
# first; the few-test files that run for a minute or two (subprocesses, notebooks, two-process
# runs) then came last, where one worker ran them alone while the other idled: CI on 2026-12-03
# spent its last 5 minutes on its last 3% of tests (WORKSPACE, CI time). So pyproject passes
# --no-loadscope-reorder and the files run in this order: the slow ones below first, longest first
# (seconds in one process: `pytest -n 0 --durations=0` on a Zen 3 core, 2026-12-03; configs_devices
# and mesh_test from the 2026-12-02 CI notes), then the others by test count, as xdist would order
# them. Tests within a file keep their order.
SLOW_FILES = {
    'tests/configs_devices_test.py': 170,
    'tests/train/multihost_test.py': 134,
    'tests/notebook_test.py': 83,
    'tests/train/mesh_test.py': 50,
    'tests/scripts_bench_heads_test.py': 42,
    'tests/scripts_bench_fused_test.py': 40,
    'tests/retrain_test.py': 35,
    'tests/scripts_bench_loop_test.py': 34,
    'tests/scripts_console_test.py': 32,
    'tests/scripts_sweep_test.py': 27,
    'tests/scripts_diagnose_test.py': 25,
    'tests/scripts_geometry_test.py': 22,
    'tests/scripts_rank_demo_test.py': 19,
}


def pytest_collection_modifyitems(config, items):
  del config
  files = [item.nodeid.split('::')[0] for item in items]
  counts = {f: files.count(f) for f in set(files)}
  order = {id(item): (-SLOW_FILES.get(f, 0), -counts[f]) for item, f in zip(items, files)}
  items.sort(key=lambda item: order[id(item)])


@pytest.fixture(scope='session')
def xla_flags():
  """`xla_flags(n)`: XLA_FLAGS for a subprocess, this session's (the compile flags above) with
  `n` fake CPU devices instead of 8, or none set when `n` is 0 (one device)."""
  def flags(n: int) -> str:
    rest = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
    return ' '.join(([f'--xla_force_host_platform_device_count={n}'] if n else []) + rest.split())
  return flags
