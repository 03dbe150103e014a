"""Test session setup: 8 fake CPU devices before JAX starts, float64 available for references."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles far more than it computes: XLA:CPU's LLVM backend at -O0 compiles about a
# third faster (tests/ops/adaptive_test.py 108 s -> 77 s, tests/train/lm_test.py 52 s -> 38 s;
# WORKSPACE: CI time). Numerics are XLA's either way (no fast-math). A level already in XLA_FLAGS
# is kept; subprocesses started with their own XLA_FLAGS compile as usual.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import chex  # pylint: disable=g-import-not-at-top,wrong-import-position

# Must happen before jax initializes its backends: the data-parallel tests and the chex
# `with_device`/pmap variants need 8 devices.
chex.set_n_cpu_devices(8)

import atexit  # pylint: disable=g-import-not-at-top,wrong-import-position
import shutil  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Many tests compile the same computations (a head's step under each chex variant, one model in
# several trainer tests): a compilation cache private to this session serves the repeats. It
# starts empty and is deleted at exit, so no run depends on another (WORKSPACE: CI time).
_CACHE = tempfile.mkdtemp(prefix='softmax_jax_test_xla_cache_')
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
