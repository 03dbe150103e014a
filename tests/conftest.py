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
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
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
# runs, eager chex variants) then came last, where one worker ran them alone while the other idled
# (CI on 2026-12-03 spent its last 3-5 minutes on its last 3% of tests; WORKSPACE, CI time). So
# pyproject passes --no-loadscope-reorder and the files run longest first (the classic longest-
# processing-time rule): tests/durations.json holds each file's seconds (setup, call and teardown
# summed) from a `python -m pytest -q tests --durations=0` run, for the files that took 10 s or
# more; the other files follow by test count, as xdist would order them. Tests within a file keep
# their order. A stale or missing entry costs only balance, never a test.
with open(os.path.join(os.path.dirname(__file__), 'durations.json')) as _f:
  FILE_SECONDS = json.load(_f)


def pytest_collection_modifyitems(config, items):
  del config
  files = [item.nodeid.split('::')[0] for item in items]
  counts = {f: files.count(f) for f in set(files)}
  order = {id(item): (-FILE_SECONDS.get(f, 0), -counts[f]) for item, f in zip(items, files)}
  items.sort(key=lambda item: order[id(item)])


@pytest.fixture(scope='session')
def xla_flags():
  """`xla_flags(n)`: XLA_FLAGS for a subprocess, this session's (the compile flags above) with
  `n` fake CPU devices instead of 8, or none set when `n` is 0 (one device)."""
  def flags(n: int) -> str:
    rest = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
    return ' '.join(([f'--xla_force_host_platform_device_count={n}'] if n else []) + rest.split())
  return flags
