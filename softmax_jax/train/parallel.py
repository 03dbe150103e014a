"""Two data-parallel drivers over one step function: jit over a Mesh (default) and pmap.

Both take host batches `[B, ...]` with B divisible by the number of devices, hold the
state replicated, and return host-readable metrics, so the loop does not know which runs.
`augment` ({'crop_padding', 'flip'}, i.e. `config.augment`) reaches the step as `model`, `tx` and
`schedule` do. Under pmap the augmentation (as dropout) draws from per-device keys, so with it a
pmap run is not the same as a jit run; jit runs agree across device counts.
"""

import functools
from typing import Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from softmax_jax.train.step import train_step


def _devices(num_devices: int):
  devices = jax.local_devices()
  if num_devices > len(devices):
    raise ValueError(f'config.num_devices={num_devices} but only {len(devices)} local devices exist.')
  return devices[:num_devices] if num_devices > 0 else devices


def check_divisible(batch_size: int, n: int, key: str) -> None:
  if batch_size % n:
    raise ValueError(f'config.{key}={batch_size} must be divisible by the number of devices ({n}).')


def log_prob_step(variables, images, *, model):
  """`[B, K]` log-probabilities of `images: [B, ...]` (the evaluation step of both drivers)."""
  return model.apply(variables, images, method='log_prob')


class JitDriver:
  """`jax.jit` over a 1-D Mesh: the batch is split on axis 'data', the state is replicated."""

  def __init__(self, model, tx, schedule, num_devices: int = 0, *,
               augment: Optional[Mapping[str, object]] = None):
    self.devices = _devices(num_devices)
    self.augment = dict(augment or {})
    mesh = Mesh(np.array(self.devices), ('data',))
    self.replicated = NamedSharding(mesh, P())
    self.sharded = NamedSharding(mesh, P('data'))
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, **self.augment)
    self._step = jax.jit(step, in_shardings=(self.replicated, self.sharded),
                         out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
    self._log_prob = jax.jit(functools.partial(log_prob_step, model=model),
                             in_shardings=(self.replicated, self.sharded), out_shardings=self.sharded)

  def put_state(self, state):
    return jax.device_put(state, self.replicated)

  def get_state(self, state):
    return jax.tree.map(np.asarray, jax.device_get(state))

  def step(self, state, batch):
    return self._step(state, jax.device_put(batch, self.sharded))

  def log_prob(self, state, images):
    variables = {'params': state['params'], **state['model_state']}
    return self._log_prob(variables, jax.device_put(images, self.sharded))


class PmapDriver(JitDriver):
  """`jax.pmap` with `lax.pmean` over axis 'batch': state stacked per device, batch reshaped."""

  def __init__(self, model, tx, schedule, num_devices: int = 0, *,
               augment: Optional[Mapping[str, object]] = None):
    super().__init__(model, tx, schedule, num_devices, augment=augment)  # evaluation reuses the jit path
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, axis_name='batch',
                             **self.augment)
    self._pstep = jax.pmap(step, axis_name='batch', devices=self.devices, donate_argnums=(0,))

  def put_state(self, state):
    # Stacked over devices and placed as the step's pmap places its outputs (an identity pmap over
    # the same axis and devices), so that the first step sees the input sharding of every later
    # one: host arrays, or another axis name, would make the step trace and compile twice.
    n = len(self.devices)
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), state)
    return jax.pmap(lambda s: s, axis_name='batch', devices=self.devices)(stacked)

  def get_state(self, state):
    return jax.tree.map(lambda x: np.asarray(x[0]), jax.device_get(state))

  def _shard(self, x):
    return x.reshape(len(self.devices), x.shape[0] // len(self.devices), *x.shape[1:])

  def step(self, state, batch):
    state, metrics = self._pstep(state, jax.tree.map(self._shard, batch))
    return state, jax.tree.map(lambda m: m[0], metrics)

  def log_prob(self, state, images):
    variables = jax.tree.map(lambda x: x[0], {'params': state['params'], **state['model_state']})
    return self._log_prob(variables, jax.device_put(images, self.sharded))


DRIVERS = {'jit': JitDriver, 'pmap': PmapDriver}
