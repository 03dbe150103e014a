"""Two data-parallel drivers over the one step function: jit over a Mesh (default) and pmap.

Both serve every task. They take host batches (pytrees of `[B, ...]` arrays, B divisible by the
number of devices; `feed` puts them on the devices ahead of their steps, a resident train split's
index batches 64 steps to an array), hold the state replicated except the task's per-row entries
(`task.row_state_keys`, e.g. an LM's recurrent carry), which are split on the data axis like the
batch, and return the step's metrics on device packed in one float32 vector (`metric_keys` names
its entries; `host_metrics` unpacks a fetched one): the loop fetches them once per log interval.
One output array instead of one per metric matters for small models: on XLA:CPU every output
buffer of a step costs time, and a digits MLP step (~3 ms) with six scalar outputs ran ~7% slower
than with one (WORKSPACE, issue 15).
Under pmap, randomness (dropout, augmentation) draws from per-device keys, so a pmap run with
it is not the same as a jit run; jit runs agree across device counts. Evaluation runs on the jit
path for both drivers.
Row-sparse updates (`config.optimizer.sparse_output`, train/sparse.py) work under both: under
jit the touched rows are those of the global batch and the table stays replicated; under pmap
each device's `(row_ids, row_grads)` are all-gathered and their duplicates summed, so every
device applies the same update to its replica.

Device count (`config.num_devices`, `usable_devices`): the batch sizes are part of the experiment
and are never changed to fit the hardware. With `num_devices=0` (the default) a run uses the most
local devices that divide every batch size: all of them when they do, else fewer, with a logged
warning that names the batch sizes that would use all (e.g. PTB's batch 20 and evaluation batch 10
run on 5 of 8 devices). An explicit `num_devices` that does not divide a batch size is an error
naming `--config.num_devices` values that do and the nearest batch sizes that it divides.

Multi-process runs (`jax.distributed`, train/distributed.py; jit driver only): the Mesh spans
every process's devices (`jax.devices()`), which must divide every batch size. Each process
computes the same global host batch of step s (a deterministic function of (seed, s):
`data.train_indices`, `lm_batches`) and puts only its own rows on its devices, the contiguous
block `[p * B / P, (p + 1) * B / P)` that the mesh assigns to its devices, with
`jax.make_array_from_process_local_data`; so the global batch is the single-process one bit for
bit, and the losses of P processes x D devices equal those of 1 x P * D devices up to the
summation order of the cross-process reductions. This index sampler over the in-memory split
stands in for Grain's: the splits here are small enough for every host to hold (digits, PTB,
the CIFAR family, and the resident train splits gathered on the devices), the position in the
stream is the step, which every checkpoint already holds (so a resume needs no iterator state),
and reading the rows a host does not feed costs only index arithmetic. A corpus too large for
one host would need a per-host reader (Grain's `IndexSampler` with `ShardByJaxProcess` over
array_record files), not a change here. Evaluation batches are split the same way and the
per-example statistics are gathered to every process (`multihost_utils.process_allgather`), so
every example is counted exactly once, padding masked as before. The pmap driver is single-process
only (a clear error otherwise).

Vocabulary parallelism (`config.mesh`, issue 21; jit driver only): `config.mesh = {'data': D,
'model': M}` runs the jit driver on a 2-D `Mesh(devices.reshape(D, M), ('data', 'model'))` (None,
the default: the 1-D 'data' mesh above, nothing changes; `'data': 0` means "the rest", D = the
device count / M). D * M must equal the number of devices the run uses (`config.num_devices`,
0: all local ones; multi-process: all), and D must divide every batch size. The batch and the
per-row state split on 'data'; the dense head's kernel `[d, K_pad]` and bias `[K_pad]` split on
'model' (`P(None, 'model')`, `P('model')`; the sampled head's table `embedding [K, d]` on its
rows, `P('model', None)`), and so do the optimizer-state leaves that mirror them
(momentum, Adam moments: the leaves whose key path ends with the head parameter's path and
whose shape is its shape); every other leaf is replicated. With M > 1 the task builds its head
with `vocab_parallel_axis='model'` (`head_config`; `DenseSoftmax` with the softmax mapping, no
sigsoftmax, no label smoothing, or `SampledSoftmax` with M dividing K; any other head is a clear error naming config.mesh and
config.head.name) and the driver runs the step and evaluation under `jax.set_mesh(mesh)`: the
backbone is plain jit (GSPMD, batch on 'data') and only the output layer runs in a
`jax.shard_map` (the head wraps itself, see heads/dense.py), whose loss, gradients and
evaluation statistics (`eval_stats`) are reduced across the 'model' shards by collectives: no
device forms `[N, K]` nor the full kernel. Checkpoints hold the gathered host state, and
`put_state` places a restored one as it placed the first, so a resume gives the numbers of an
uninterrupted run. Not with the pmap driver, row-sparse updates (`config.optimizer.sparse_output`)
or distillation (clear errors). Multi-process runs with M > 1 are tested with 2 processes x 4
devices (tests/train/multihost_test.py): PTB on {'data': 4, 'model': 2} ('data' across the
processes) and digits resumed on {'data': 1, 'model': 8} (the 'model' axis across them).
"""

import collections
import contextlib
import functools
import itertools
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from softmax_jax.train.step import train_step

# A bound on the computations a loop dispatches ahead. XLA:CPU's client lets a device hold 32
# computations in flight; a multi-device launch past that parks a thread of the client's pool
# (as many threads as devices on a small machine) until one ends, and when the one to end is a
# step whose all-reduce still waits for its last device's thread, the run deadlocks (XLA aborts
# it after 60 s: "Termination timeout for all reduce"). 31 steps ahead never deadlocked, 32
# always (WORKSPACE, CI: the deadlock). The training and evaluation loops wait every IN_FLIGHT
# launches for the one IN_FLIGHT before, so fewer than 2 * IN_FLIGHT are ever in flight.
IN_FLIGHT = 8

# Steps per index table of a resident train split (`JitDriver.feed`): the index batches of this
# many steps reach the devices in one `[B, INDEX_CHUNK]` array, and each step reads its column.
# Per step, the host then passes the same device array (as a hand-written loop passes its data)
# instead of a new host batch: on one Zen 3 core a 16-unit MLP's step took ~215 us either way
# with the indices on the device and ~275 us with a host index batch a step (WORKSPACE, issue 15).
INDEX_CHUNK = 64


def prefetch_to_device(batches: Iterator, put: Callable, size: int = 2) -> Iterator:
  """`put(batch)` for each of `batches`, `size - 1` ahead: the next batch travels while a step runs."""
  queue = collections.deque()
  for batch in batches:
    queue.append(put(batch))
    if len(queue) == size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def step_rows(tables: Mapping[str, jax.Array], step: jax.Array) -> Dict[str, jax.Array]:
  """Column `step % C` of index tables `{key: [B, C, ...]}`: `{key: [B, ...]}` (traced)."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, step % x.shape[1], axis=1,
                                                             keepdims=False), tables)


def bound_in_flight(outputs: List) -> None:
  """Call after appending each launch's output to `outputs`: every `IN_FLIGHT` launches, waits
  until the one `IN_FLIGHT` back is done (a wait, not a transfer: the hot path stays free of
  reads), keeping fewer than `2 * IN_FLIGHT` in flight."""
  n = len(outputs)
  if n > IN_FLIGHT and n % IN_FLIGHT == 0:
    jax.block_until_ready(outputs[n - IN_FLIGHT - 1])


def local_devices(num_devices: int):
  """The first `num_devices` local devices (0: all), or a ValueError naming config.num_devices."""
  devices = jax.local_devices()
  if num_devices > len(devices):
    raise ValueError(f'config.num_devices={num_devices} but only {len(devices)} local devices exist.')
  return devices[:num_devices] if num_devices > 0 else devices


def _divisors(sizes: Iterable[int], at_most: int) -> List[int]:
  """Device counts in [1, at_most] that divide every one of `sizes`, largest first."""
  sizes = list(sizes)
  return [n for n in range(at_most, 0, -1) if all(s % n == 0 for s in sizes)]


def check_divisible(batch_size: int, n: int, key: str, *, available: int = 0) -> None:
  """Raises ValueError unless `n` devices divide `config.<key>` = `batch_size`.

  The message names the nearest batch sizes that `n` divides and the `--config.num_devices`
  values (up to `available` devices, default `n`) that divide `batch_size`.
  """
  if batch_size % n == 0:
    return
  lower, upper = batch_size // n * n, (batch_size // n + 1) * n
  sizes = ' or '.join(f'--config.{key}={b}' for b in (lower, upper) if b > 0)
  counts = ', '.join(str(d) for d in _divisors([batch_size], max(available, n)))
  raise ValueError(
      f'config.{key}={batch_size} must be divisible by the number of devices ({n}): set {sizes} '
      f'to use {n} devices, or --config.num_devices to one of {counts} to keep the batch '
      '(--config.num_devices=0, the default, uses the most devices that divide every batch size).')


def global_devices(num_devices: int, batch_sizes: Mapping[str, int]):
  """Every process's devices (`jax.devices()`), for a multi-process run.

  Raises:
    ValueError: `num_devices` is neither 0 nor the global device count, or the global device
      count does not divide a batch size (a multi-process run uses every device).
  """
  devices = jax.devices()
  if num_devices not in (0, len(devices)):
    raise ValueError(f'config.num_devices={num_devices}, but a run of {jax.process_count()} processes '
                     f'uses all {len(devices)} devices: set --config.num_devices=0.')
  for key, size in batch_sizes.items():
    check_divisible(int(size), len(devices), key)
  return devices


def usable_devices(num_devices: int, batch_sizes: Mapping[str, int]):
  """The local devices a run uses for `batch_sizes` ({config key: size}, e.g. 'batch_size': 20).

  Args:
    num_devices: `config.num_devices`; 0: the most local devices that divide every batch size
      (all when they do; fewer logs a warning naming the batch sizes that would use all);
      > 0: exactly that many, which must divide every batch size.
    batch_sizes: config key -> global batch size (rows split over the devices).

  Returns:
    The first devices of `jax.local_devices()`.

  Raises:
    ValueError: `num_devices` exceeds the local devices, or it does not divide a batch size
      (naming `--config.num_devices` values that do and the nearest batch sizes it divides).
  """
  devices = local_devices(num_devices)
  if num_devices > 0:
    for key, size in batch_sizes.items():
      check_divisible(int(size), len(devices), key, available=len(jax.local_devices()))
    return devices
  n = _divisors([int(s) for s in batch_sizes.values()], len(devices))[0]
  if n < len(devices):
    fits = ' '.join(f'--config.{k}={-(-int(s) // len(devices)) * len(devices)}'
                    for k, s in batch_sizes.items() if int(s) % len(devices))
    logging.warning(
        'Using %d of the %d local devices: %s are divisible by %d devices, not by %d (the batch '
        'is kept: it is part of the experiment). To use all %d, change the batch, e.g. %s; to '
        'silence this, set --config.num_devices=%d.', n, len(devices),
        ', '.join(f'config.{k}={s}' for k, s in batch_sizes.items()), n, len(devices),
        len(devices), fits, n)
  return devices[:n]


MESH_AXES = ('data', 'model')


def mesh_config(config) -> Optional[Dict[str, int]]:
  """`config.mesh` as `{'data': D, 'model': M}` (D = 0: the rest), or None (the 1-D data mesh).

  Raises:
    ValueError: naming config.mesh, unless it is None or a mapping of exactly 'data' and 'model'
      to integers, 'model' >= 1 and 'data' >= 0.
  """
  mesh = None if config is None else config.get('mesh')
  if mesh is None:
    return None
  try:
    mesh = dict(mesh)
  except (TypeError, ValueError):
    mesh = None
  ok = (mesh is not None and sorted(mesh) == sorted(MESH_AXES)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in mesh.values())
        and mesh['model'] >= 1 and mesh['data'] >= 0)
  if not ok:
    raise ValueError(f"config.mesh must be None or {{'data': D, 'model': M}} with integers M >= 1 "
                     f"and D >= 0 (0: the devices left over by M); got {config.get('mesh')!r}.")
  return {k: int(mesh[k]) for k in MESH_AXES}


def model_shards(config) -> int:
  """M, the size of the 'model' axis of `config.mesh` (1 without one)."""
  mesh = mesh_config(config)
  return 1 if mesh is None else mesh['model']


def data_shards(config, num_devices: int) -> int:
  """The size of the 'data' axis for a run on `num_devices` devices: the batch splits over it."""
  return num_devices // model_shards(config)


def head_config(config) -> Mapping:
  """`config.head` as the task builds its head: with `config.mesh`'s 'model' axis M > 1, plus
  `vocab_parallel_axis='model'` (the dense head split on the classes, the sampled head's table on
  its rows). The adaptive, hierarchical, margin, imbalanced and mixture heads are not
  vocabulary-parallel (their class-dependent structure, cutoffs, trees, margins, priors or
  mixture components, would each need its own sharded op).

  Raises:
    ValueError: M > 1 with a head that cannot be vocabulary-parallel (not 'dense' nor 'sampled',
      or a dense head with a sparse mapping, sigsoftmax or label smoothing), row-sparse updates or
      distillation; names config.mesh and the option.
  """
  m = model_shards(config)
  if m == 1:
    return config.head
  head = dict(config.head)
  mesh = f"config.mesh={mesh_config(config)} (a 'model' axis of {m})"
  if head.get('name') not in ('dense', 'sampled'):
    raise ValueError(f"{mesh} needs config.head.name='dense' or 'sampled' (vocabulary parallelism "
                     "splits the dense head's [d, K] kernel, or the sampled head's [K, d] table, "
                     f"on the classes); got config.head.name={head.get('name')!r}. Use a 'model' "
                     'axis of 1 (or config.mesh=None) for other heads.')
  dense_only = (('mapping', 'softmax'), ('sigsoftmax', False), ('label_smoothing', 0.0))
  for key, default in dense_only if head['name'] == 'dense' else ():
    if head.get(key, default) != default:
      raise ValueError(f'{mesh} cannot train config.head.name={head["name"]!r} with '
                       f'config.head.{key}={head[key]!r} (the vocab-parallel ops are the softmax '
                       f'cross-entropy of x @ kernel + bias); set config.head.{key}={default!r} or '
                       "a 'model' axis of 1.")
  if config.optimizer.get('sparse_output'):
    raise ValueError(f'{mesh} cannot be combined with config.optimizer.sparse_output=True '
                     '(row-sparse updates of a replicated table); set it to None or False.')
  distill = config.get('distill')
  if distill is not None and distill.get('teacher_workdir'):
    raise ValueError(f'{mesh} cannot be combined with config.distill.teacher_workdir (distillation '
                     "is not vocabulary-parallel); use a 'model' axis of 1.")
  return head | {'vocab_parallel_axis': 'model'}


def mesh_devices(mesh: Mapping[str, int], devices, batch_sizes: Mapping[str, int],
                 num_devices: int = 0) -> np.ndarray:
  """`devices` as the `[D, M]` array of `config.mesh` (D = 0: len(devices) // M).

  Raises:
    ValueError: D * M differs from the number of devices (naming config.mesh, the product and the
      device count), or D does not divide a batch size.
  """
  n, m = len(devices), mesh['model']
  d = mesh['data'] or n // m
  if d * m != n or d < 1:
    raise ValueError(f"config.mesh={mesh} has {d} x {m} = {d * m} devices, but the run uses {n} "
                     f"devices (config.num_devices={num_devices}; 0: all of them): make 'data' x "
                     f"'model' = {n} (e.g. {{'data': 0, 'model': M}}, 0: the rest, with M dividing "
                     f'{n}), or set --config.num_devices to the product.')
  for key, size in batch_sizes.items():
    if int(size) % d:
      raise ValueError(f"config.{key}={size} must be divisible by the 'data' axis of config.mesh="
                       f"{mesh} ({d} devices): the batch splits over 'data' only.")
  return np.array(devices).reshape(d, m)


def _dict_keys(path) -> Tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def head_param_specs(params) -> Dict[Tuple[str, ...], Tuple[P, tuple]]:
  """`{path: (spec, shape)}` of the head's parameters split on 'model': the dense kernel
  `[d, K_pad]` `P(None, 'model')`, the sampled head's table `embedding [K, d]` `P('model', None)`
  (its rows), the bias `[K_pad]` `P('model')` (found by path: `params['head']`)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params.get('head', {})):
    keys = ('head',) + _dict_keys(path)
    spec = {'kernel': P(None, 'model'), 'embedding': P('model', None),
            'bias': P('model')}.get(keys[-1])
    if spec is not None and len(spec) == np.ndim(leaf):
      out[keys] = (spec, tuple(np.shape(leaf)))
  return out


def _spec_of(path, leaf, specs) -> P:
  """The spec of a params or optimizer-state leaf: a head parameter's when its key path ends
  with that parameter's path and it has its shape (the momentum, the Adam moments), else P()."""
  keys = _dict_keys(path)
  for suffix, (spec, shape) in specs.items():
    if keys[-len(suffix):] == suffix and tuple(np.shape(leaf)) == shape:
      return spec
  return P()


class JitDriver:
  """`jax.jit` over a 1-D Mesh: batch and per-row state split on axis 'data', the rest replicated."""

  def __init__(self, task, tx, schedule, num_devices: int = 0):
    self.multiprocess = jax.process_count() > 1
    self.mesh_shape = mesh_config(getattr(task, 'config', None))
    if self.mesh_shape is None:
      self.devices = (global_devices(num_devices, task.batch_sizes) if self.multiprocess
                      else usable_devices(num_devices, task.batch_sizes))
      mesh = Mesh(np.array(self.devices), ('data',))
    else:  # config.mesh: ('data', 'model'), every device the run uses (no silent fallback)
      if self.multiprocess and num_devices not in (0, len(jax.devices())):
        global_devices(num_devices, {})  # its error
      devices = jax.devices() if self.multiprocess else local_devices(num_devices)
      grid = mesh_devices(self.mesh_shape, devices, task.batch_sizes, num_devices)
      self.devices = list(grid.reshape(-1))
      mesh = Mesh(grid, MESH_AXES)
    self.mesh = mesh
    self.vocab_parallel = self.mesh_shape is not None and self.mesh_shape['model'] > 1
    self.row_keys = tuple(task.row_state_keys)
    self.replicated = NamedSharding(mesh, P())
    self.sharded = NamedSharding(mesh, P('data'))
    self._on_cpu = all(d.platform == 'cpu' for d in self.devices) and not self.multiprocess
    self._train_step = functools.partial(train_step, task=task, tx=tx, schedule=schedule)
    # A resident train split (`task.resident`) is put on the devices once, replicated; the step
    # takes it as a (non-donated) argument and gathers its batch from the `[B]` indices.
    self._gather = task.gather if task.resident is not None else None
    self.resident = None if self._gather is None else self._put(task.resident, self.replicated)
    self._step = None  # jitted on the first put_state, when the state's keys are known
    self._placement = None
    self._eval_fns = {}
    self.metric_keys = None  # the packed metrics' names, set when the step is traced

  def _packed(self, step_fn):
    """`step_fn` returning its metrics as one float32 vector (names in `self.metric_keys`)."""
    def packed(state, *args):
      state, metrics = step_fn(state, *args)
      self.metric_keys = tuple(metrics)  # static: recorded while tracing
      return state, jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in self.metric_keys])
    return packed

  def _put(self, tree, sharding):
    """Host arrays (the same on every process) -> arrays placed by `sharding` (one sharding, or
    a tree of them matching `tree`).

    Single-process: `jax.device_put`. Multi-process: an array split on 'data' from this
    process's rows only (`jax.make_array_from_process_local_data`, see `local_rows`); any other
    (replicated, or a head parameter split on 'model') from each process's copy.
    """
    if not self.multiprocess:
      return jax.device_put(tree, sharding)

    def put(x, s):
      x = np.asarray(x)
      if s is self.sharded:
        rows = self.local_rows(x.shape[0])
        return jax.make_array_from_process_local_data(s, x[rows], x.shape)
      return jax.make_array_from_callback(x.shape, s, lambda index, x=x: x[index])

    if isinstance(sharding, jax.sharding.Sharding):
      return jax.tree.map(lambda x: put(x, sharding), tree)
    return jax.tree.map(put, tree, sharding)

  def local_rows(self, num_rows: int) -> slice:
    """The rows of a `[num_rows, ...]` array split on 'data' that this process's devices hold:
    one contiguous block, `[p * B / P, (p + 1) * B / P)` for process p of P over `jax.devices()`.

    Raises:
      ValueError: the mesh gives this process rows that are not contiguous (a device order
        this driver does not build).
    """
    indices = self.sharded.addressable_devices_indices_map((num_rows,)).values()
    starts = sorted({(i[0].start or 0, num_rows if i[0].stop is None else i[0].stop) for i in indices})
    for (_, stop), (start, _) in zip(starts, starts[1:]):
      if stop != start:
        raise ValueError(f'process {jax.process_index()} holds non-contiguous rows {starts}.')
    return slice(starts[0][0], starts[-1][1])

  def placement(self, state):
    """Per state key, its sharding (a tree of them for 'params' and 'opt_state' with M > 1)."""
    out = {k: self.sharded if k in self.row_keys else self.replicated for k in state}
    if self.vocab_parallel:
      specs = head_param_specs(state['params'])
      if not specs:
        raise ValueError(f"config.mesh={self.mesh_shape} found no head kernel or bias at "
                         "params['head'] to split on 'model'.")
      m = self.mesh_shape['model']
      spec, shape = specs[max(specs)]
      k = shape[tuple(spec).index('model')]  # K_pad, the classes of the kernel (table) and bias
      if k % m:
        raise ValueError(f"config.mesh={self.mesh_shape}: the head's classes K = {k} must divide "
                         f"by the size {m} of the 'model' axis; pad them with "
                         f'--config.head.pad_classes_to={m} (or {m * 128} on TPU; dense head), whose '
                         "padded classes get probability 0, or pick a 'model' axis that divides K.")
      for key in ('params', 'opt_state'):
        out[key] = jax.tree_util.tree_map_with_path(
            lambda path, x: NamedSharding(self.mesh, _spec_of(path, x, specs)), state[key])
    return out

  def _context(self):
    """The mesh context of the steps and evaluation: `jax.set_mesh(mesh)` with M > 1 (the
    vocab-parallel head reads it), else none."""
    return jax.set_mesh(self.mesh) if self.vocab_parallel else contextlib.nullcontext()

  def put_state(self, state):
    placement = self.placement(state)
    self._placement = placement
    if self._step is None:
      def step(state, resident, batch):
        if resident is not None:  # batch: index tables, one column a step (`feed`)
          batch = self._gather(resident, step_rows(batch, state['step']))
        return self._train_step(state, batch)
      self._step = jax.jit(self._packed(step), in_shardings=(placement, self.replicated, self.sharded),
                           out_shardings=(placement, self.replicated), donate_argnums=(0,))
    return {k: self._put(v, placement[k]) for k, v in state.items()}

  def get_state(self, state):
    """The host state (NumPy), the same on every process (rows split on 'data' gathered)."""
    return jax.tree.map(self._host, state)

  @staticmethod
  def _host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  def put_batch(self, batch):
    """One step's host batch on the devices (asynchronously), as `step` takes it: a resident
    split's index batch `{'index': [B]}` as a one-step table `[B, 1]` (see `feed`). On CPU
    devices, the host batch itself: there is no transfer to overlap, and the step's own placement
    of host arrays costs ~2 us where `jax.device_put` costs ~55 us of Python (WORKSPACE, issue 15)."""
    if self._gather is not None:
      batch = jax.tree.map(lambda x: np.asarray(x)[:, None], batch)
    if self._on_cpu:
      return batch
    return self._put(batch, self.sharded)

  def feed(self, batches: Iterator, start_step: int) -> Iterator:
    """What `step` takes, one item a step, from the task's host batches (the first for step
    `start_step + 1`).

    A resident split's index batches are stacked `INDEX_CHUNK` (C) steps to a table `[B, C]`,
    put on the devices once and passed to each of its steps, which reads column
    `state['step'] % C`: the tables begin at multiples of C (the first one of a resumed run is
    padded before `start_step`), and the host does no per-step work for the data. Other batches
    are put on the devices one step ahead (`prefetch_to_device`).
    """
    if self._gather is None:
      yield from prefetch_to_device(batches, self.put_batch)
      return
    c, step = INDEX_CHUNK, start_step
    while True:
      skip = step % c
      got = list(itertools.islice(batches, c - skip))
      if not got:
        return
      rows = got[:1] * skip + got + got[-1:] * (c - skip - len(got))
      table = self._put(jax.tree.map(lambda *x: np.stack([np.asarray(v) for v in x], axis=1), *rows),
                        self.sharded)
      for _ in got:
        yield table
      step += len(got)

  def step(self, state, batch):
    """`(state, metrics)`; `batch` from `put_batch` (or a host batch); metrics stay on device,
    packed: `[len(metric_keys)]` float32."""
    if not self.vocab_parallel:
      return self._step(state, self.resident, batch)
    with self._context():
      return self._step(state, self.resident, batch)

  def host_metrics(self, metrics):
    """Fetched packed metrics `[..., len(metric_keys)]` (one step's, or n steps' stacked) as the
    runner reads them: `{name: [...] array}`."""
    return dict(zip(self.metric_keys, np.moveaxis(np.asarray(metrics), -1, 0)))

  def variables(self, state):
    """`{'params', **model_state}` of `state`, replicated on the mesh (for evaluation)."""
    return {'params': state['params'], **state['model_state']}

  def evaluate(self, fn: Callable, state, batches: Iterable, carry=None) -> List:
    """Host copies of `fn(variables, carry, batch) -> (out, carry)` over `batches`, in order.

    `out` is split on the data axis like the batch (per-example statistics, never `[N, K]`);
    `carry` (None, or per-row state threaded through the pass) likewise. The pass reads nothing
    back until every batch is dispatched (at most `2 * IN_FLIGHT` ahead of the devices): one
    `jax.device_get` at the end (multi-process: one `process_allgather`, so every process gets
    every example's statistics, once).
    """
    if fn not in self._eval_fns:
      placed = self.replicated
      if self.vocab_parallel:  # the params as the step holds them: the head's split on 'model'
        placed = {'params': self._placement['params'],
                  **{k: self.replicated for k in state['model_state']}}
      self._eval_fns[fn] = jax.jit(fn, in_shardings=(placed, self.sharded, self.sharded),
                                   out_shardings=(self.sharded, self.sharded))
    jitted, variables = self._eval_fns[fn], self.variables(state)
    if carry is not None:
      carry = self._put(carry, self.sharded)
    outs = []
    with self._context():
      for batch in batches:
        out, carry = jitted(variables, carry, self._put(batch, self.sharded))
        outs.append(out)
        bound_in_flight(outs)
    if self.multiprocess:
      return jax.tree.map(np.asarray, multihost_utils.process_allgather(outs, tiled=True))
    return jax.device_get(outs)


class PmapDriver(JitDriver):
  """`jax.pmap` with `lax.pmean` over axis 'batch': state stacked per device, batch reshaped.

  Per-row state (`task.row_state_keys`) is split over the devices as the batch rows are.
  """

  def __init__(self, task, tx, schedule, num_devices: int = 0):
    if jax.process_count() > 1:
      raise ValueError(f'config.parallel=\'pmap\' runs on one process, but this run has '
                       f'{jax.process_count()} (jax.distributed): a multi-process run needs '
                       '--config.parallel=jit (the default).')
    if model_shards(getattr(task, 'config', None)) > 1:
      raise ValueError(f"config.parallel='pmap' cannot run config.mesh="
                       f"{mesh_config(task.config)}: vocabulary parallelism (a 'model' axis > 1) "
                       'is jit over a Mesh only; use --config.parallel=jit (the default).')
    super().__init__(task, tx, schedule, num_devices)  # evaluation reuses the jit path
    step = functools.partial(train_step, task=task, tx=tx, schedule=schedule, axis_name='batch')
    self._pstep = jax.pmap(self._packed(step), axis_name='batch', devices=self.devices,
                           donate_argnums=(0,))
    self._stacked = NamedSharding(Mesh(np.array(self.devices), ('batch',)), P('batch'))
    if self._gather is not None:  # the batch is gathered before the step, split on the mesh
      self._gather = jax.jit(self._gather, in_shardings=(self.replicated, self.sharded),
                             out_shardings=self.sharded)

  def _shard(self, x):
    x = x if isinstance(x, jax.Array) else np.asarray(x)  # a device batch stays on the device
    return x.reshape(len(self.devices), x.shape[0] // len(self.devices), *x.shape[1:])

  def put_state(self, state):
    # Stacked over devices and placed as the step's pmap places its outputs (an identity pmap over
    # the same axis and devices), so that the first step sees the input sharding of every later
    # one: host arrays, or another axis name, would make the step trace and compile twice.
    n = len(self.devices)
    stack = lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x)))
    stacked = {k: jax.tree.map(self._shard if k in self.row_keys else stack, v) for k, v in state.items()}
    return jax.pmap(lambda s: s, axis_name='batch', devices=self.devices)(stacked)

  def get_state(self, state):
    host = jax.device_get(state)
    merge = lambda x: np.asarray(x).reshape(-1, *np.shape(x)[2:])
    return {k: jax.tree.map(merge if k in self.row_keys else lambda x: np.asarray(x[0]), v)
            for k, v in host.items()}

  def put_batch(self, batch):
    # As pmap places its own inputs: split on a leading device axis named like the pmap axis.
    if self._gather is not None:
      batch = self._gather(self.resident, batch)
    return jax.device_put(jax.tree.map(self._shard, batch), self._stacked)

  def feed(self, batches: Iterator, start_step: int) -> Iterator:
    """Each step's batch put on the devices (gathered there first for a resident split), one step
    ahead."""
    del start_step
    return prefetch_to_device(batches, self.put_batch)

  def step(self, state, batch):
    """`(state, metrics)`; metrics `[devices, len(metric_keys)]` (rows equal after the pmean)."""
    return self._pstep(state, batch)

  def host_metrics(self, metrics):
    return super().host_metrics(np.asarray(metrics)[..., 0, :])  # `[..., devices, M]`: device 0's

  def variables(self, state):
    return jax.tree.map(lambda x: x[0], super().variables(state))


DRIVERS = {'jit': JitDriver, 'pmap': PmapDriver}
