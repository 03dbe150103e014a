"""Test session setup: 8 fake CPU devices before JAX starts, float64 available for references."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import chex  # pylint: disable=g-import-not-at-top,wrong-import-position

# Must happen before jax initializes its backends: the data-parallel tests and the chex
# `with_device`/pmap variants need 8 devices.
chex.set_n_cpu_devices(8)
