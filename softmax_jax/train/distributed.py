"""Multi-host runs over JAX's multi-controller runtime (`jax.distributed`), one process per host.

Every process runs the same program (`scripts/train.py` with the same flags, plus its own
`--process_id`); `initialize` connects it to the coordinator (process 0's `host:port`), after
which `jax.devices()` lists every process's devices and a `jax.sharding.Mesh` over them spans
the cluster (train/parallel.py). With no arguments `initialize` asks JAX to detect the cluster
from the environment (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes; `jax.distributed`'s
own detection) and does nothing, a single-process run, when there is none.

An unreachable coordinator: `jax.distributed.initialize` aborts the whole process (a C++
check failure, SIGABRT, no Python exception) when its connection deadline passes. So before
calling it, a process other than the coordinator polls the coordinator's TCP port for up to
`timeout_s` and raises `CoordinatorUnreachable` naming the address if nothing listens there.
"""

import socket
import time
from typing import Optional

from absl import logging
import jax

# Seconds a process waits for the coordinator (and the other processes) to come up.
DEFAULT_TIMEOUT_S = 300


class CoordinatorUnreachable(ConnectionError):
  """Nothing listened at the coordinator's address within the timeout."""


def _detected_cluster() -> Optional[str]:
  """The name of the cluster environment `jax.distributed.initialize()` would detect, or None."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if env.is_env_present():
        return env.__name__
  except Exception:  # pylint: disable=broad-except  (a JAX without the private registry)
    pass
  return None


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once a TCP connection to `address` ('host:port') succeeds; polls for `timeout_s`.

  Raises:
    ValueError: `address` is not 'host:port'.
    CoordinatorUnreachable: no connection within `timeout_s`; names the address and the last error.
  """
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit():
    raise ValueError(f"coordinator_address must be 'host:port', got {address!r}.")
  deadline, last = time.monotonic() + timeout_s, None
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      raise CoordinatorUnreachable(
          f'Cannot reach the coordinator at {address} within {timeout_s:g} s ({last}). Is process 0 '
          'running, started with the same --coordinator_address, and is the port open between the '
          'hosts?')
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=min(1.0, left)):
        return
    except OSError as e:
      last = f'{type(e).__name__}: {e}'
      time.sleep(min(0.25, max(deadline - time.monotonic(), 0)))


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
  """Joins this process to a multi-process JAX run; a no-op for a single-process run.

  Call it before anything touches a JAX backend (the first `jax.devices()` or array).

  Args:
    coordinator_address: 'host:port' of process 0 (which serves there); None: detect the cluster
      from the environment (TPU pod slice, SLURM, ...) and, if there is none, stay single-process.
    num_processes: the number of processes (given with the address).
    process_id: this process's index in [0, num_processes) (given with the address).
    timeout_s: the most seconds to wait for the coordinator and the other processes.

  Returns:
    True if `jax.distributed` was initialized (by this call or earlier), False for a
    single-process run.

  Raises:
    ValueError: only some of the three arguments are given, or bad values.
    CoordinatorUnreachable: a process other than 0 cannot connect to `coordinator_address`
      within `timeout_s`; names the address.
  """
  given = [x is not None for x in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError('Give all of --coordinator_address, --num_processes and --process_id (or none '
                     f'of them, to detect a cluster); got coordinator_address={coordinator_address!r}, '
                     f'num_processes={num_processes!r}, process_id={process_id!r}.')
  if not timeout_s > 0:
    raise ValueError(f'timeout_s must be > 0, got {timeout_s!r}.')
  if jax.distributed.is_initialized():
    return True
  timeout = max(int(timeout_s + 0.999), 1)
  if coordinator_address is None:
    cluster = _detected_cluster()
    if cluster is None:
      return False
    logging.info('Initializing jax.distributed from the %s environment.', cluster)
    jax.distributed.initialize(initialization_timeout=timeout)
  else:
    if int(num_processes) < 1 or not 0 <= int(process_id) < int(num_processes):
      raise ValueError(f'need num_processes >= 1 and 0 <= process_id < num_processes, got '
                       f'num_processes={num_processes!r}, process_id={process_id!r}.')
    if int(process_id) != 0:  # process 0 serves the address; the others must reach it
      wait_for_coordinator(coordinator_address, timeout_s)
    jax.distributed.initialize(coordinator_address, int(num_processes), int(process_id),
                               initialization_timeout=timeout)
  logging.info('jax.distributed: process %d of %d, %d local and %d global devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def is_primary() -> bool:
  """True on process 0, the one that writes metrics, figures, config and console output."""
  return jax.process_index() == 0

