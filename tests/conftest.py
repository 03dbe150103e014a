"""Test session setup: 8 fake CPU devices before JAX starts, float64 available for references."""

import os

# Must happen before jax initializes its backends: the data-parallel tests need 8 devices.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
