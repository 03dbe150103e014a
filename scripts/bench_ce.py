"""`benchmark.py --suite=ce`: `ops.cross_entropy` of given logits against optax's, fwd + bwd.

For each K: value_and_grad of the mean loss w.r.t. the logits `[N, K]` (float32 by default),
uniform random labels. Reports the compiled temporary memory
(`memory_analysis().temp_size_in_bytes`: buffers beside the logits, labels, loss and gradient),
the median wall time (one warm-up, then rounds that run each method in turn), both as ratios
to optax, and the largest error of the loss and gradient against optax's (`rel err`,
max |diff| / max |optax|). Methods:

  optax        `optax.softmax_cross_entropy_with_integer_labels`, the baseline
  ops          `ops.cross_entropy` (a custom_jvp over its row statistics, see ops/_ce.py)
  ops options  `ops.cross_entropy` with where=[K] mask, label_smoothing=0.1, class_weights and
               ignore_index (1 in 16 examples ignored): the cost of every option at once
  old          the formulation before issue 15: plain autodiff through the float32
               `ops.log_softmax` (take the label's entry; a smoothing term would be a mean over
               the row)
"""

import statistics
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import bench_utils
from softmax_jax import ops

PRESETS = {
    'cpu': dict(K=[10_000, 50_000, 200_000], N=2048),
    'cpu_target': dict(K=[200_000], N=2048),
    'cpu_small': dict(K=[10_000], N=2048),
    'gpu': dict(K=[10_000, 50_000, 200_000, 1_000_000], N=8192),
}
IGNORE = -100


def old_cross_entropy(logits, labels):
  """The formulation before issue 15: plain autodiff through log_softmax in float32."""
  x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  log_p = ops.log_softmax(x)
  return -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]


def methods(k: int):
  """name -> loss(logits, labels) -> [N]."""
  w = jnp.linspace(0.5, 2.0, k, dtype=jnp.float32)
  mask = jnp.arange(k) < k - 3
  return {
      'optax': optax.softmax_cross_entropy_with_integer_labels,
      'ops': ops.cross_entropy,
      'ops options': lambda x, y: ops.cross_entropy(
          x, jnp.where(jnp.arange(y.shape[0]) % 16 == 0, IGNORE, y), where=mask,
          label_smoothing=0.1, class_weights=w, ignore_index=IGNORE),
      'old': old_cross_entropy,
  }


def _rel_err(got, want):
  return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
             / (float(jnp.max(jnp.abs(r.astype(jnp.float32)))) or 1.0)
             for g, r in zip(got, want))


def ce_suite(preset_name: str, *, dtype='float32', timed: bool, repeats: int, max_load: float,
             wait_s: int, max_run_gib: float, only=None):
  """Rows {K, N, dtype, method, temp_mib, mem_ratio, time_s, time_ratio, rel_err, load}.

  Timing: one warm-up per method, then `repeats` rounds that run every method once in turn (so
  a load change on a shared machine hits all methods alike); the median per method.
  """
  p = PRESETS[preset_name]
  n, dtype = p['N'], jnp.dtype(dtype)
  rows = []
  for k in p['K']:
    x = (jax.random.normal(jax.random.key(0), (n, k), jnp.float32) * 3).astype(dtype)
    labels = jax.random.randint(jax.random.key(1), (n,), 0, k)
    run, ref, block = {}, None, []
    for name, loss in methods(k).items():
      if only and name not in only and name != 'optax':
        continue
      fn = jax.value_and_grad(lambda x, y, loss=loss: jnp.mean(loss(x, y).astype(jnp.float32)))
      compiled, temp, io = bench_utils.compile_fn(fn, x, labels)
      row = dict(K=k, N=n, dtype=dtype.name, method=name, temp_mib=temp / bench_utils.MiB)
      if timed and (temp + io) / 2**30 <= max_run_gib:
        out = jax.block_until_ready(compiled(x, labels))  # warm-up
        if name == 'optax':
          ref = out
        elif ref is not None and name != 'ops options':  # options change the loss
          row['rel_err'] = _rel_err(out, ref)
        del out
        run[name] = (compiled, [])
      block.append(row)
    del ref
    if run:
      load = bench_utils.wait_quiet(max_load, wait_s)
      for _ in range(repeats):
        for compiled, times in run.values():
          start = time.perf_counter()
          jax.block_until_ready(compiled(x, labels))
          times.append(time.perf_counter() - start)
      for row in block:
        if row['method'] in run:
          row.update(time_s=statistics.median(run[row['method']][1]), load=load)
    for row in block:
      print(table([row]).splitlines()[-1], flush=True)
    rows += block
    del x, run
  for row in rows:
    base = next(r for r in rows if r['K'] == row['K'] and r['method'] == 'optax')
    row['mem_ratio'] = row['temp_mib'] / max(base['temp_mib'], 1e-9)
    if 'time_s' in row and 'time_s' in base:
      row['time_ratio'] = row['time_s'] / base['time_s']
  return rows


def _fmt(v, f):
  return '' if v is None else f.format(v)


def table(rows) -> str:
  lines = ['| K | N | dtype | method | temp MiB | vs optax | fwd+bwd s | vs optax | rel err | load |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['K']} | {r['N']} | {r['dtype']} | {r['method']} | {r['temp_mib']:.2f} | "
                 f"{_fmt(r.get('mem_ratio'), '{:.2f}')} | {_fmt(r.get('time_s'), '{:.4f}')} | "
                 f"{_fmt(r.get('time_ratio'), '{:.3f}')} | {_fmt(r.get('rel_err'), '{:.1e}')} | "
                 f"{_fmt(r.get('load'), '{:.2f}')} |")
  return '\n'.join(lines)


def plot(rows, path: str) -> None:
  """Temporary memory vs K (left) and fwd+bwd time vs K (right), log scales."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for i, name in enumerate(dict.fromkeys(r['method'] for r in rows)):
    sel = [r for r in rows if r['method'] == name]
    axes[0].plot([r['K'] for r in sel], [max(r['temp_mib'], 1e-3) for r in sel], 'o-',
                 color=f'C{i}', label=name)
    timed = [r for r in sel if 'time_s' in r]
    if timed:
      axes[1].plot([r['K'] for r in timed], [r['time_s'] for r in timed], 'o-', color=f'C{i}',
                   label=name)
  n = rows[0]['N']
  axes[0].set(xlabel='K (classes)', ylabel='temporary MiB', xscale='log', yscale='log',
              title=f'compiled temporary memory, N={n}')
  axes[1].set(xlabel='K (classes)', ylabel='seconds (median)', xscale='log', yscale='log',
              title='value_and_grad w.r.t. the logits')
  for ax in axes:
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
