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

A preset's `mos_timed_max_k` caps the K at which the two MoS rows are timed (the CPU presets:
50k; a MoS step costs M times a dense one); above it they are compiled for their memory only.
"""

import functools

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import bench_utils

PRESETS = {
    'cpu': dict(K=[10_000, 50_000, 200_000], N=2048, d=512, mos_timed_max_k=50_000),
    'cpu_target': dict(K=[200_000], N=2048, d=512, mos_timed_max_k=50_000),
    'cpu_small': dict(K=[10_000], N=2048, d=512, mos_timed_max_k=50_000),
    'gpu': dict(K=[10_000, 50_000, 200_000, 1_000_000], N=8192, d=1024),
}
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
