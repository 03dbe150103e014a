"""`benchmark.py --suite=scale`: per-device memory of the vocabulary-parallel output layer.

The loss + gradient step of the output layer alone (`ops/vocab_parallel.py`,
`sharded_dense_loss`: value_and_grad of the mean cross-entropy w.r.t. features, kernel and bias)
on a `('data', 'model')` mesh of 1 x M devices, kernel `[d, K]` float32 sharded `P(None,
'model')`, features `[N, d]` (N per data shard), for each K, M and method ('plain': each shard's
`[N, K/M]` logits; 'fused': streamed in `chunk_size` columns). Per device, from the compiled
program's `memory_analysis()` (an SPMD program: the sizes are one device's): parameters (kernel
and bias shard), arguments + outputs (parameters, their gradients, features, labels, loss) and
temporary bytes; their sum is the device's peak bound for the step. Fake CPU devices share one
host's memory, so the big points are compiled only; a point is also run and timed (indicative
only: M fake devices share the host's cores) when M x its per-device bytes stay under
`max_run_gib`. Needs M devices: on CPU it sets `--xla_force_host_platform_device_count=8`
before JAX starts its backend (or say so in XLA_FLAGS).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 taskset -c 1 \\
      python scripts/benchmark.py --suite=scale --preset=cpu
"""

import os
import time

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

import bench_utils  # pylint: disable=g-import-not-at-top
from softmax_jax.ops import vocab_parallel as vp  # pylint: disable=g-import-not-at-top

MiB = bench_utils.MiB
GRID = dict(K=[200_000, 500_000, 1_000_000, 4_000_000], M=[1, 2, 4, 8], d=512, N=2048,
            methods=['plain', 'fused'], chunk_size=4096)
PRESETS = {
    'cpu': dict(GRID, max_run_gib=2.0),
    'cpu_small': dict(GRID, K=[200_000], M=[1, 8], max_run_gib=2.0),
    'cpu_target': dict(GRID, max_run_gib=2.0),
    'gpu': dict(GRID, max_run_gib=100.0),  # one device: M = 1 runs, M > 1 needs M GPUs
    'tpu': dict(GRID, max_run_gib=12.0),
}


def ensure_devices(n: int = 8) -> int:
  """On CPU, asks XLA for `n` fake devices if JAX has not started its backend yet; returns the
  number of devices JAX sees."""
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()
  return len(jax.devices())


def _step(mesh, fused, chunk_size):
  def loss(x, w, b, y):
    return vp.sharded_dense_loss(mesh, x, w, y, bias=b, fused=fused, chunk_size=chunk_size).mean()
  return jax.value_and_grad(loss, (0, 1, 2))


def _inputs(mesh, n, d, k, concrete):
  specs = (P('data', None), P(None, 'model'), P('model'), P('data'))
  shapes = ((n, d, jnp.float32), (d, k, jnp.float32), (k, jnp.float32), (n, jnp.int32))
  shardings = [NamedSharding(mesh, s) for s in specs]
  if not concrete:
    return [jax.ShapeDtypeStruct(s[:-1], s[-1], sharding=sh) for s, sh in zip(shapes, shardings)]
  make = jax.jit(lambda key: (jax.random.normal(key, (n, d)),
                              jax.random.normal(key, (d, k)) * 0.05, jnp.zeros(k),
                              jax.random.randint(key, (n,), 0, k)),
                 out_shardings=tuple(shardings))
  return list(make(jax.random.key(0)))


def scale_suite(preset_name: str, *, repeats: int, max_load: float = 0.0, wait_s: int = 0,
                max_run_gib=None, grid=None):
  """Rows {K, M, method, N, d, param_mib, io_mib, temp_mib, total_mib, compile_s, [time_s, load]}.

  `grid` (a dict like `GRID`) overrides the preset's sizes.
  """
  p = dict(PRESETS[preset_name], **(grid or {}))
  max_run_gib = p['max_run_gib'] if max_run_gib is None else max_run_gib
  n, d = p['N'], p['d']
  have = ensure_devices(max(p['M']))
  rows = []
  for m in p['M']:
    if m > have:
      print(f'M={m}: only {have} devices, skipped', flush=True)
      continue
    mesh = Mesh(np.array(jax.devices()[:m]).reshape(1, m), ('data', 'model'))  # Auto axes
    for k in p['K']:
      if k % m:
        raise ValueError(f'K = {k} is not divisible by M = {m}')
      for method in p['methods']:
        fn = _step(mesh, method == 'fused', p['chunk_size'])
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*_inputs(mesh, n, d, k, False)).compile()
        mem = compiled.memory_analysis()
        row = dict(K=k, M=m, method=method, N=n, d=d,
                   param_mib=(d + 1) * (k // m) * 4 / MiB,
                   io_mib=(mem.argument_size_in_bytes + mem.output_size_in_bytes) / MiB,
                   temp_mib=mem.temp_size_in_bytes / MiB,
                   compile_s=time.perf_counter() - start)
        row['total_mib'] = row['io_mib'] + row['temp_mib']
        if m * row['total_mib'] / 1024 <= max_run_gib and repeats:
          args = _inputs(mesh, n, d, k, True)
          row['load'] = bench_utils.wait_quiet(max_load, wait_s)
          row['time_s'], out = bench_utils.time_fn(compiled, args, repeats)
          row['loss'] = float(out[0])
          del args, out
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
        del compiled
  return rows


def _fmt(v, f):
  return '' if v is None else f.format(v)


def table(rows) -> str:
  lines = ['| K | M | method | params MiB/dev | args+outs MiB/dev | temp MiB/dev | total MiB/dev | '
           'compile s | step s | load |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['K']} | {r['M']} | {r['method']} | {r['param_mib']:.1f} | "
                 f"{r['io_mib']:.1f} | {r['temp_mib']:.1f} | {r['total_mib']:.1f} | "
                 f"{r['compile_s']:.1f} | {_fmt(r.get('time_s'), '{:.3f}')} | "
                 f"{_fmt(r.get('load'), '{:.2f}')} |")
  return '\n'.join(lines)


def checks(rows) -> dict:
  """The must-show comparisons: per-device total at M vs M = 1 (ideal 1/M), and K=4M at M=8
  against K=500k at M=1, per method (None where the grid lacks a point)."""
  by = {(r['K'], r['M'], r['method']): r['total_mib'] for r in rows}
  out = {}
  for method in dict.fromkeys(r['method'] for r in rows):
    ratio = {f"K={r['K']} M={r['M']}": by[(r['K'], 1, method)] / r['total_mib']
             for r in rows if r['method'] == method and (r['K'], 1, method) in by}
    big, small = by.get((4_000_000, 8, method)), by.get((500_000, 1, method))
    out[method] = dict(shrink_vs_M1=ratio, K4M_M8_mib=big, K500k_M1_mib=small,
                       K4M_M8_le_K500k_M1=None if big is None or small is None else big <= small)
  return out


def plot(rows, path: str) -> None:
  """Per-device memory (args + outputs + temp) against K, one line per (method, M), log scales."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, method in enumerate(dict.fromkeys(r['method'] for r in rows)):
    for j, m in enumerate(dict.fromkeys(r['M'] for r in rows)):
      sel = [r for r in rows if r['method'] == method and r['M'] == m]
      ax.plot([r['K'] for r in sel], [r['total_mib'] for r in sel], 'o-' if i == 0 else 's--',
              color=f'C{j}', label=f'{method}, M={m}')
  n, d = rows[0]['N'], rows[0]['d']
  ax.set(xlabel='K (classes)', ylabel='MiB per device (compiled)', xscale='log', yscale='log',
         title=f'vocabulary-parallel loss + grad, N={n}, d={d}')
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
