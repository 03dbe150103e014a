"""`benchmark.py --suite=heads`: one training step of each large-output head against DenseSoftmax.

For each K: value_and_grad of the mean training loss w.r.t. the head's parameters and the
features `[N, d]`, labels drawn from the log-uniform (Zipf) law `p(k) = log((k+2)/(k+1)) / log(K+1)`
of a frequency-sorted vocabulary. Reports the median step time, the speed-up over DenseSoftmax
and the compiled temporary memory (`memory_analysis().temp_size_in_bytes`). Heads:

  dense         DenseSoftmax, the baseline: `ops.cross_entropy(x @ W + b)`
  dense fused   DenseSoftmax(fused=True): `ops.linear_cross_entropy`, no [N, K] logits
  adaptive      AdaptiveSoftmax, cutoffs (2000, 10000, 50000) (those below K), div_value 4
  adaptive all  the same with capacity_fractions=None: every tail on every row, no routing
  adaptive vmapped  `adaptive` under `jax.vmap` over VMAP_GROUPS blocks of N / VMAP_GROUPS rows
                (the loss's batching rule keeps the routing: each block gathers the rows of the
                largest block's capacity rung, see ops/adaptive.py)
  sampled       SampledSoftmax, 1024 log-uniform samples without replacement
  hierarchical  HierarchicalSoftmax, Huffman tree of the Zipf class counts
  mos           MixtureOfSoftmaxes, M = MOS_MIXTURES components, context_dim = d, streamed:
                `ops.mixture_cross_entropy` over vocabulary chunks (1024 classes), no [N, M, K]
  mos materialized  the same head with streamed=False: `[N, M, K]` logits, `mixture_log_softmax`

Full training steps (`train_step_suite`, the preset's `train_K`): `train/step.py`'s step, optimizer
included, of the sampled and hierarchical heads over a learned `[d]` feature scale (so the
features get their gradient too), with dense updates (optax on the whole `[K, d]` table) against
row-sparse ones (`config.optimizer.sparse_output`, train/sparse.py: gradient and update of the
touched rows only), for SGD (no momentum or decay: the two are equal) and AdamW (lazy moments).
The state is donated, as the drivers do. `peers_suite` (`--suite=peers`): our sampled step (loss
and gradient w.r.t. the weights, biases and features) beside TF's `tf.nn.sampled_softmax_loss`
when TensorFlow is importable (not a project requirement: otherwise its rows are skipped).

A preset's `mos_timed_max_k` caps the K at which the two MoS rows are timed (the CPU presets:
50k; a MoS step costs M times a dense one); above it they are compiled for their memory only.
"""

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import bench_utils
from softmax_jax.train import sparse

PRESETS = {
    'cpu': dict(K=[10_000, 50_000, 200_000], N=2048, d=512, mos_timed_max_k=50_000,
                train_K=[50_000, 200_000]),
    'cpu_target': dict(K=[200_000], N=2048, d=512, mos_timed_max_k=50_000, train_K=[200_000]),
    'cpu_small': dict(K=[10_000], N=2048, d=512, mos_timed_max_k=50_000, train_K=[10_000]),
    'gpu': dict(K=[10_000, 50_000, 200_000, 1_000_000], N=8192, d=1024,
                train_K=[50_000, 200_000, 1_000_000]),
}
TRAIN_HEADS = ('sampled', 'hierarchical')  # heads with row-sparse updates (train/sparse.py)
TRAIN_OPTIMIZERS = ('sgd', 'adamw')
CUTOFFS = (2000, 10_000, 50_000)
NUM_SAMPLED = 1024
VMAP_GROUPS = 8
VMAPPED = ('adaptive vmapped',)  # rows whose step vmaps the head over VMAP_GROUPS blocks
MOS_MIXTURES = 5
MOS_ROWS = ('mos', 'mos materialized')


def zipf_probs(k: int) -> np.ndarray:
  """`[K]` float64 log-uniform probabilities, non-increasing in the class id."""
  from softmax_jax.ops import log_uniform_probs  # pylint: disable=g-import-not-at-top
  return log_uniform_probs(k)


def zipf_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
  """`[n]` int32 labels from `zipf_probs(k)` by inverting its CDF `log(c + 2) / log(K + 1)`."""
  u = rng.random(n)
  return np.minimum(np.floor(np.exp(u * np.log(k + 1))) - 1, k - 1).astype(np.int32)


def make_heads(k: int):
  """name -> a constructor of the head with K classes (imported late: the fused suite needs none)."""
  from softmax_jax import heads  # pylint: disable=g-import-not-at-top
  counts = tuple(int(c) for c in np.maximum(np.round(zipf_probs(k) * 1e9), 1))
  return {
      'dense': lambda: heads.DenseSoftmax(num_classes=k),
      'dense fused': lambda: heads.DenseSoftmax(num_classes=k, fused=True),
      'adaptive': lambda: heads.AdaptiveSoftmax(
          num_classes=k, cutoffs=tuple(c for c in CUTOFFS if c < k), div_value=4.0),
      'adaptive all': lambda: heads.AdaptiveSoftmax(
          num_classes=k, cutoffs=tuple(c for c in CUTOFFS if c < k), div_value=4.0,
          capacity_fractions=None),
      'adaptive vmapped': lambda: heads.AdaptiveSoftmax(
          num_classes=k, cutoffs=tuple(c for c in CUTOFFS if c < k), div_value=4.0),
      'sampled': lambda: heads.SampledSoftmax(num_classes=k, num_sampled=NUM_SAMPLED,
                                              sampler='log_uniform'),
      'hierarchical': lambda: heads.HierarchicalSoftmax(num_classes=k, tree='huffman',
                                                        class_counts=counts),
      'mos': lambda: heads.MixtureOfSoftmaxes(num_classes=k, num_mixtures=MOS_MIXTURES),
      'mos materialized': lambda: heads.MixtureOfSoftmaxes(
          num_classes=k, num_mixtures=MOS_MIXTURES, streamed=False),
  }


def _step_fn(head, groups: int = 0):
  """value_and_grad of the mean loss; with `groups`, the head is vmapped over that many row blocks."""
  def per_example(params, x, labels, key):
    return head.apply({'params': params}, x, labels, train=True, rngs={'sample': key})

  def loss(params, x, labels, key):
    if groups:
      blocks = (x.reshape(groups, -1, x.shape[-1]), labels.reshape(groups, -1))
      losses = jax.vmap(per_example, in_axes=(None, 0, 0, None))(params, *blocks, key)
    else:
      losses = per_example(params, x, labels, key)
    return jnp.mean(losses.astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=(0, 1))


def heads_suite(preset_name: str, *, timed: bool, repeats: int, max_load: float, wait_s: int,
                max_run_gib: float, only=None):
  """Rows {K, N, d, head, temp_mib, time_s, speedup, mem_ratio, load} for the preset's grid."""
  p = PRESETS[preset_name]
  n, d = p['N'], p['d']
  rng = np.random.default_rng(0)
  rows = []
  for k in p['K']:
    x = jax.random.normal(jax.random.key(1), (n, d), jnp.float32)
    labels = jnp.asarray(zipf_labels(rng, n, k))
    key = jax.random.key(2)
    for name, make in make_heads(k).items():
      if only and name not in only:
        continue
      head = make()
      # jit: only the parameters are kept, so the loss (MoS materialized: [N, M, K]) is not run
      params = jax.jit(functools.partial(head.init, train=True))(
          {'params': jax.random.key(0), 'sample': key}, x, labels)['params']
      fn = _step_fn(head, VMAP_GROUPS if name in VMAPPED else 0)
      compiled, temp, io = bench_utils.compile_fn(fn, params, x, labels, key)
      row = dict(K=k, N=n, d=d, head=name, temp_mib=temp / bench_utils.MiB,
                 params=int(sum(a.size for a in jax.tree.leaves(params))))
      run = timed and not (name in MOS_ROWS and k > p.get('mos_timed_max_k', k))
      if run and (temp + io) / 2**30 <= max_run_gib:
        row['load'] = bench_utils.wait_quiet(max_load, wait_s)
        row['time_s'], (value, _) = bench_utils.time_fn(compiled, (params, x, labels, key), repeats)
        row['loss'] = float(value)
      rows.append(row)
      print(table([row]).splitlines()[-1], flush=True)
      del params, compiled
  for row in rows:
    base = next((r for r in rows if r['K'] == row['K'] and r['head'] == 'dense'), None)
    if base is None:  # --heads without dense: no ratios
      continue
    row['mem_ratio'] = row['temp_mib'] / base['temp_mib']
    if 'time_s' in row and 'time_s' in base:
      row['speedup'] = base['time_s'] / row['time_s']
  return rows


def _fmt(v, f):
  return '' if v is None else f.format(v)


def table(rows) -> str:
  lines = ['| K | N | d | head | params | temp MiB | vs dense | step s | speed-up | loss | load |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['K']} | {r['N']} | {r['d']} | {r['head']} | {r['params']} | "
                 f"{r['temp_mib']:.1f} | {_fmt(r.get('mem_ratio'), '{:.3f}')} | "
                 f"{_fmt(r.get('time_s'), '{:.4f}')} | {_fmt(r.get('speedup'), '{:.1f}x')} | "
                 f"{_fmt(r.get('loss'), '{:.3f}')} | {_fmt(r.get('load'), '{:.2f}')} |")
  return '\n'.join(lines)


def plot(rows, path: str) -> None:
  """Speed-up over dense vs K (left) and temporary memory vs K (right), log scales."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for i, name in enumerate(dict.fromkeys(r['head'] for r in rows)):
    sel = [r for r in rows if r['head'] == name]
    timed = [r for r in sel if 'speedup' in r]
    if timed:
      axes[0].plot([r['K'] for r in timed], [r['speedup'] for r in timed], 'o-', color=f'C{i}',
                   label=name)
    axes[1].plot([r['K'] for r in sel], [r['temp_mib'] for r in sel], 'o-', color=f'C{i}',
                 label=name)
  n, d = rows[0]['N'], rows[0]['d']
  axes[0].set(xlabel='K (classes)', ylabel='speed-up over dense (step time)', xscale='log',
              yscale='log', title=f'forward + backward, N={n}, d={d}')
  axes[1].set(xlabel='K (classes)', ylabel='temporary MiB', xscale='log', yscale='log',
              title='compiled temporary memory')
  for ax in axes:
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


class _FeatureScale:
  """The trainer's task interface over `head(features * scale)`, `scale: [d]` learned."""
  row_state_keys = ()
  resident = None

  def __init__(self, head):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top

    class Model(nn.Module):
      head: nn.Module

      @nn.compact
      def __call__(self, x, labels, *, train):
        scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return self.head(x * scale, labels, train=train)
    self.model = Model(head)

  def check_batch(self, batch):
    del batch

  def loss(self, params, state, batch, rng):
    del state
    losses = self.model.apply({'params': params}, batch['x'], batch['y'], train=True,
                              rngs={'sample': rng})
    return jnp.mean(losses.astype(jnp.float32)), {'model_state': {}}


def _optimizer(name: str, sparse: bool):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from softmax_jax.train.config import base_config  # pylint: disable=g-import-not-at-top
  from softmax_jax.train.state import make_optimizer  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(base_config().optimizer.to_dict())
  c.update(name=name, momentum=0.0, weight_decay=0.0 if name == 'sgd' else 1e-4,
           schedule='constant', warmup_steps=0, learning_rate=0.1, sparse_output=sparse)
  return make_optimizer(c, 1000)


def train_step_suite(preset_name: str, *, repeats: int, max_load: float, wait_s: int,
                     only=None, optimizers=TRAIN_OPTIMIZERS):
  """Rows {K, N, d, head, optimizer, updates, temp_mib, time_s, speedup, loss, load}: the full
  training step (forward, backward, optimizer) with dense and with row-sparse updates."""
  from softmax_jax.train.step import train_step  # pylint: disable=g-import-not-at-top
  p = PRESETS[preset_name]
  n, d = p['N'], p['d']
  rng = np.random.default_rng(0)
  rows = []
  for k in p.get('train_K', p['K']):
    batch = dict(x=jax.random.normal(jax.random.key(1), (n, d), jnp.float32),
                 y=jnp.asarray(zipf_labels(rng, n, k)))
    for name in TRAIN_HEADS:
      if only and name not in only:
        continue
      task = _FeatureScale(make_heads(k)[name]())
      for opt in optimizers:
        for updates in ('dense', 'sparse'):
          schedule, tx = _optimizer(opt, updates == 'sparse')
          step = jax.jit(functools.partial(train_step, task=task, tx=tx, schedule=schedule),
                         donate_argnums=(0,))
          params = jax.jit(functools.partial(task.model.init, train=False))(
              {'params': jax.random.key(0)}, batch['x'], batch['y'])['params']
          state = dict(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                       opt_state=tx.init(params), rng=jax.random.PRNGKey(3))
          compiled = step.lower(state, batch).compile()
          row = dict(K=k, N=n, d=d, head=name, optimizer=opt, updates=updates,
                     temp_mib=compiled.memory_analysis().temp_size_in_bytes / bench_utils.MiB)
          row['load'] = bench_utils.wait_quiet(max_load, wait_s)
          state, metrics = compiled(state, batch)  # warm-up
          jax.block_until_ready(state)
          times = []
          for _ in range(repeats):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
          row['time_s'], row['loss'] = statistics.median(times), float(metrics['loss'])
          rows.append(row)
          print(train_table([row]).splitlines()[-1], flush=True)
          del state, compiled, step
  for row in rows:
    base = next(r for r in rows if (r['K'], r['head'], r['optimizer'], r['updates']) ==
                (row['K'], row['head'], row['optimizer'], 'dense'))
    row['speedup'] = base['time_s'] / row['time_s']
  return rows


def train_table(rows) -> str:
  lines = ['| K | N | d | head | optimizer | updates | temp MiB | step s | speed-up | loss | load |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['K']} | {r['N']} | {r['d']} | {r['head']} | {r['optimizer']} | "
                 f"{r['updates']} | {r['temp_mib']:.1f} | {r['time_s']:.4f} | "
                 f"{_fmt(r.get('speedup'), '{:.1f}x')} | {r['loss']:.3f} | {r['load']:.2f} |")
  return '\n'.join(lines)


def _row_step_fn(head):
  """value_and_grad of the mean loss w.r.t. the bias, the rows `row_delta` and the features,
  through `row_loss` (the table is an argument, not differentiated: no [K, d] gradient), then
  the repeated ids' rows summed (`sum_duplicates`), as the training step does: the gradient is
  `(distinct ids, summed rows)`, more than TF's IndexedSlices, which leave the sum to the apply."""
  def loss(rest, delta, x, labels, key, table):
    losses, ids = head.apply({'params': {'embedding': table, **rest}}, x, labels, delta,
                             method='row_loss', rngs={'sample': key})
    return jnp.mean(losses.astype(jnp.float32)), ids
  grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

  def step(rest, delta, x, labels, key, table):
    (value, ids), (g_rest, g_rows, g_x) = grad(rest, delta, x, labels, key, table)
    return value, sparse.sum_duplicates(ids, g_rows, table.shape[0]), g_rest, g_x
  return step


def peers_suite(preset_name: str, *, repeats: int, max_load: float, wait_s: int):
  """Rows {K, N, d, framework, time_s, load} of one sampled-softmax loss + gradient (w.r.t. the
  weights, biases and features), ours (dense `[K, d]` weight gradient, and row-sparse through
  `row_loss`: `(row_ids, row_grads)`, as TF's IndexedSlices) and TF's `tf.nn.sampled_softmax_loss` (1024 log-uniform
  samples, unique) when TensorFlow is importable; `(rows, note)`, the note saying what was
  skipped. Each framework runs in this process one after the other (TF's threads idle meanwhile)."""
  p = PRESETS[preset_name]
  n, d = p['N'], p['d']
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    tf, note = None, 'tensorflow is not importable here: its rows are skipped (not a requirement).'
  else:
    note = f'tensorflow {tf.__version__}'
  rng = np.random.default_rng(0)
  rows = []
  for k in p.get('train_K', p['K']):
    labels = zipf_labels(rng, n, k)
    x = np.asarray(jax.random.normal(jax.random.key(1), (n, d), jnp.float32))
    head = make_heads(k)['sampled']()
    key = jax.random.key(2)
    params = jax.jit(functools.partial(head.init, train=True))(
        {'params': jax.random.key(0), 'sample': key}, x, labels)['params']
    compiled, _, _ = bench_utils.compile_fn(_step_fn(head), params, x, labels, key)
    load = bench_utils.wait_quiet(max_load, wait_s)
    t, _ = bench_utils.time_fn(compiled, (params, jnp.asarray(x), jnp.asarray(labels), key), repeats)
    rows.append(dict(K=k, N=n, d=d, framework='softmax_jax SampledSoftmax', time_s=t, load=load))
    print(peers_table(rows[-1:]).splitlines()[-1], flush=True)
    # The row-sparse gradient (train/sparse.py's path), TF's IndexedSlices counterpart.
    table, rest = params['embedding'], {'bias': params['bias']}
    delta = jnp.zeros((n + NUM_SAMPLED, d), jnp.float32)  # row_loss's rows: [labels; sample]
    compiled, _, _ = bench_utils.compile_fn(_row_step_fn(head), rest, delta, x, labels, key, table)
    t, _ = bench_utils.time_fn(compiled, (rest, delta, jnp.asarray(x), jnp.asarray(labels), key,
                                          table), repeats)
    rows.append(dict(K=k, N=n, d=d, framework='softmax_jax SampledSoftmax, row-sparse gradient',
                     time_s=t, load=bench_utils.load()))
    print(peers_table(rows[-1:]).splitlines()[-1], flush=True)
    if tf is None:
      continue
    w = tf.Variable(np.asarray(params['embedding']))
    b = tf.Variable(np.asarray(params['bias']))
    xt, yt = tf.constant(x), tf.constant(labels.astype(np.int64)[:, None])

    @tf.function
    def tf_step():
      with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_mean(tf.nn.sampled_softmax_loss(
            w, b, yt, xt, num_sampled=NUM_SAMPLED, num_classes=k, remove_accidental_hits=True))
      return loss, tape.gradient(loss, [w, b, xt])
    tf_step()  # trace and warm up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      loss, grads = tf_step()
      _ = loss.numpy(), [g.values.numpy() if hasattr(g, 'values') else g.numpy() for g in grads]
      times.append(time.perf_counter() - start)
    rows.append(dict(K=k, N=n, d=d, framework=f'tf.nn.sampled_softmax_loss (TF {tf.__version__})',
                     time_s=statistics.median(times), load=bench_utils.load()))
    print(peers_table(rows[-1:]).splitlines()[-1], flush=True)
  return rows, note


def peers_table(rows) -> str:
  lines = ['| K | N | d | framework | step s | load |', '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['K']} | {r['N']} | {r['d']} | {r['framework']} | {r['time_s']:.4f} | "
                 f"{r['load']:.2f} |")
  return '\n'.join(lines)
