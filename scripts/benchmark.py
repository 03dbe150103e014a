r"""Benchmarks: compiled temporary memory (deterministic) and median wall time (needs a quiet box).

Suites (`--suite`):
  fused  `linear_cross_entropy` (reduction='mean', and 'none' then .mean()) against the naive
         loss (optax's, the ratios' baseline, and `ops.cross_entropy`) of `x @ w + b` and, when
         installed, the PyPI package `jax-cce` (w as [K, d], no bias); value_and_grad of the
         mean loss w.r.t. x, w, b. `rel err`: max |diff| / max |naive| over loss and gradients,
         against the naive optax loss in float32 on the same input values (bfloat16 included).
         'fused mean'/'fused none' use the op's own chunks, tuned on this machine before timing
         (SOFTMAX_JAX_CACHE_DIR, SOFTMAX_JAX_AUTOTUNE=0: see linear_cross_entropy); cpu_target
         adds the untuned 4096/256 rows. Methods are timed in interleaved rounds; the output
         starts with the CPU model and vector extensions.

  python scripts/benchmark.py --suite=fused --preset=cpu_target   # the must-show point, ~5 min
  python scripts/benchmark.py --suite=fused --preset=cpu_small    # a smoke run, ~2 min
  python scripts/benchmark.py --suite=fused --preset=cpu          # the grid: memory only, ~1 min
  python scripts/benchmark.py --suite=fused --preset=cpu --time   # ... and time (see WORKSPACE.md)
  python scripts/benchmark.py --suite=fused --preset=cpu --time --K=256000 --N=8192  # a sub-grid
  python scripts/benchmark.py --suite=fused --preset=gpu          # K=256k, N=8192, d=2048 bf16

  heads  one training step (value_and_grad of the mean loss w.r.t. head parameters and features) of
         each large-output head against DenseSoftmax, Zipf labels (scripts/bench_heads.py).

  python scripts/benchmark.py --suite=heads --preset=cpu          # K in {10k, 50k, 200k}, N=2048, d=512
  python scripts/benchmark.py --suite=heads --preset=cpu_target   # K=200k only
  python scripts/benchmark.py --suite=heads --preset=cpu --K=4000,16000 --N=256 --d=64  # a sub-grid
         With --train_steps (default), also the full training step (optimizer included) of the
         sampled and hierarchical heads with dense against row-sparse updates (issue 23) at the
         preset's train_K (cpu: 50k, 200k; --K overrides it too).
  taskset -c 1 python scripts/benchmark.py --suite=heads --preset=cpu --heads=sampled,hierarchical --repeats=3

  peers  our sampled-softmax step (loss and gradient) beside TF's `tf.nn.sampled_softmax_loss` when
         TensorFlow is importable (an optional peer, not a requirement: otherwise skipped with a
         note), at the heads preset's train_K (scripts/bench_heads.py `peers_suite`).
  taskset -c 1 python scripts/benchmark.py --suite=peers --preset=cpu

  ce     `ops.cross_entropy` of given logits [N, K] against optax's (and the formulation before
         issue 15): value_and_grad w.r.t. the logits, float32 (`--dtype` to change)
         (scripts/bench_ce.py).

  taskset -c 1 python scripts/benchmark.py --suite=ce --preset=cpu  # K in {10k, 50k, 200k}, N=2048

  loop   steps/s of our trainer (`train_and_evaluate`, log_every large and 1) against a minimal
         hand-written Flax + optax loop: digits MLP, Fashion-MNIST CNN, PTB small LSTM, and a
         16-unit digits MLP whose step is short enough to show the per-step host work
         (scripts/bench_loop.py).

  taskset -c 1 python scripts/benchmark.py --suite=loop --preset=cpu  # ~10 min on one quiet core

  decode tokens/s of one decoding step (features -> output layer -> a token) against K, batch 1
         and 64: greedy, sampling (plain, top-k, top-p), approx top-k, shortlist softmax
         (S in {1k, 5k}) and the adaptive head (scripts/bench_decode.py).

  taskset -c 1 python scripts/benchmark.py --suite=decode --preset=cpu  # K in {10k, 50k, 200k}

  generate  tokens/s, ms per token and first-call (compile) seconds of whole-sequence generation
         (`decode.generate`, greedy and sample, batch 1 and 16): the Transformer through its
         key/value cache, the same Transformer rerunning its window each token, and an LSTM of
         about its size (scripts/bench_generate.py).

  taskset -c 1 python scripts/benchmark.py --suite=generate --preset=cpu  # K=10k, 16 + 100 tokens, ~8 min

  scale  per-device parameter, argument and temporary memory (compiled `memory_analysis()`) of
         the vocabulary-parallel output layer's loss + grad step (`ops/vocab_parallel.py`,
         plain and fused) for K in {200k, 500k, 1M, 4M}, d=512, N=2048, on 1 x M fake devices,
         M in {1, 2, 4, 8}; points that fit `max_run_gib` are also timed (indicative only)
         (scripts/bench_scale.py; it asks XLA for 8 fake CPU devices before JAX starts).

  taskset -c 1 python scripts/benchmark.py --suite=scale --preset=cpu

Presets: `--preset=auto` picks `cpu`, `gpu` or `tpu` from `jax.default_backend()` (`resolve_preset`).
Every suite has the three; `tpu` (sizes for one TPU v5e chip, 16 GiB of HBM: Colab's TPU runtime)
is `PRESETS['tpu']` for the fused suite and `TPU_PRESETS` for the others, whose modules get it as
their `PRESETS['tpu']` when they have none (`add_tpu_presets`).

  python scripts/benchmark.py --suite=heads --preset=auto         # on a Colab TPU: the tpu sizes

Writes OUT.json and (but for `loop`) OUT.png (`--out`, default bench_out/SUITE_PRESET, the preset
resolved) and prints markdown tables.
Timing starts at once; every row records the 1-minute load it ran under (the `load` column).
To time on a quiet machine, `--max_load=1.3` waits (up to `--wait_s`) for the load to fall
below it before each point (default 0: never waits).
"""

import datetime
import functools
import json
import os
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

import bench_ce  # pylint: disable=g-import-not-at-top
import bench_decode  # pylint: disable=g-import-not-at-top
import bench_generate  # pylint: disable=g-import-not-at-top
import bench_heads  # pylint: disable=g-import-not-at-top
import bench_loop  # pylint: disable=g-import-not-at-top
import bench_scale  # pylint: disable=g-import-not-at-top
import bench_utils  # pylint: disable=g-import-not-at-top
from softmax_jax import ops  # pylint: disable=g-import-not-at-top
from softmax_jax.ops import fused  # pylint: disable=g-import-not-at-top

flags.DEFINE_enum('suite', 'fused', ['fused', 'heads', 'peers', 'ce', 'loop', 'decode', 'generate',
                                     'scale'],
                  'Which suite (see the docstring).')
flags.DEFINE_list('heads', None, 'heads suite: only these heads (default: all), e.g. dense,adaptive.')
flags.DEFINE_boolean('train_steps', True, 'heads suite: also time the full training step with dense '
                     'and row-sparse updates (sampled, hierarchical; the preset\'s train_K).')
flags.DEFINE_enum('preset', 'cpu_target', ['auto', 'cpu', 'cpu_small', 'cpu_target', 'gpu', 'tpu'],
                  'Grid; auto: cpu, gpu or tpu from jax.default_backend().')
flags.DEFINE_list('dtype', None, 'Override the preset dtypes, e.g. float32,bfloat16.')
flags.DEFINE_list('K', None, 'fused and heads suites: override the preset vocabulary sizes, e.g. 256000.')
flags.DEFINE_list('N', None, 'fused and heads suites: override the preset token counts, e.g. 2048,8192 '
                  '(heads: one value).')
flags.DEFINE_list('d', None, 'fused and heads suites: override the preset feature sizes, e.g. 512 '
                  '(heads: one value).')
for _name in ('K', 'N', 'd'):
  flags.register_validator(
      _name, lambda v: v is None or all(s.isdigit() and int(s) > 0 for s in v),
      message=f'--{_name} must be positive integers separated by commas, e.g. 2048,8192.')
flags.DEFINE_string('out', None, 'Output prefix (default bench_out/SUITE_PRESET).')
flags.DEFINE_boolean('time', None, 'Time the runs (default: all presets but cpu).')
flags.DEFINE_integer('repeats', 5, 'Timed runs after one warm-up; the median is reported.')
flags.DEFINE_integer('chunk_size', None, 'Vocabulary chunk of the fused op (default: its own).')
flags.DEFINE_integer('token_chunk_size', None, 'Token chunk of the fused op (default: its own).')
flags.DEFINE_float('max_run_gib', None, 'Compile only (no run) above this much memory '
                   '(default: 12 on CPU presets, 60 on gpu).')
flags.DEFINE_float('max_load', 0.0, 'Wait (up to --wait_s) for a 1-minute load below this '
                   'before timing each point; 0 (default): start at once, the load is still '
                   'printed beside each row.')
flags.DEFINE_integer('wait_s', 900, 'Longest wait for a quiet machine per point, seconds (only with --max_load).')
FLAGS = flags.FLAGS
MiB = bench_utils.MiB

CPU = dict(time=True, max_run_gib=12.0, variants=[])
PRESETS = {  # grid; timed by default; memory sweep (K, d); extra chunk settings to time
    'cpu': dict(CPU, K=[32_000, 128_000, 256_000], N=[2048, 8192], d=[512, 1024],
                dtypes=['float32', 'bfloat16'], time=False, sweep=(200_000, 512)),
    'cpu_small': dict(CPU, K=[32_000], N=[2048], d=[512], dtypes=['float32', 'bfloat16'],
                      sweep=(32_000, 512)),
    'cpu_target': dict(CPU, K=[200_000], N=[2048], d=[512], dtypes=['float32'],
                       sweep=(200_000, 512),
                       variants=[dict(chunk_size=4096, token_chunk_size=256)]),  # untuned
    'gpu': dict(K=[256_000], N=[8192], d=[2048], dtypes=['bfloat16'], time=True,
                max_run_gib=60.0, sweep=(256_000, 2048),
                variants=[dict(chunk_size=c, token_chunk_size=t)
                          for c, t in ((8192, 512), (16384, 1024), (32768, 2048))]),
    # One TPU v5e chip (16 GiB of HBM; Colab's TPU runtime): bfloat16, rows above 12 GiB compile only.
    'tpu': dict(K=[32_000, 128_000, 256_000], N=[4096], d=[1024], dtypes=['bfloat16'], time=True,
                max_run_gib=12.0, sweep=(128_000, 1024),
                variants=[dict(chunk_size=8192, token_chunk_size=512)]),
}
# jax.default_backend() -> preset of --preset=auto.
BACKEND_PRESETS = {'cpu': 'cpu', 'gpu': 'gpu', 'cuda': 'gpu', 'rocm': 'gpu', 'tpu': 'tpu'}
# The 'tpu' sizes of the suites whose module has no 'tpu' preset: the gpu grids cut to fit 16 GiB
# (heads: N 8192 -> 4096, d 1024, K up to 200k: dense's logits and their gradient in
# float32, about 6 GiB; ce: the same K and N; loop: the gpu preset's steps).
TPU_PRESETS = {
    'heads': dict(K=[10_000, 50_000, 200_000], N=4096, d=1024),
    'ce': dict(K=[10_000, 50_000, 200_000], N=4096),
    'loop': dict(digits=2000, fashion_mnist=1000, ptb=1000, digits_16=2000),
}
SUITE_MODULES = {'heads': bench_heads, 'ce': bench_ce, 'loop': bench_loop, 'decode': bench_decode,
                 'generate': bench_generate, 'scale': bench_scale}


def add_tpu_presets() -> None:
  """Gives each suite module whose `PRESETS` lacks 'tpu' the sizes of `TPU_PRESETS`."""
  for suite, sizes in TPU_PRESETS.items():
    SUITE_MODULES[suite].PRESETS.setdefault('tpu', sizes)


add_tpu_presets()


def resolve_preset(preset: str, backend=None) -> str:
  """`preset`, or for 'auto' the preset of `backend` (default `jax.default_backend()`).

  Raises:
    ValueError: 'auto' on a backend with no preset, naming the presets to pass instead.
  """
  if preset != 'auto':
    return preset
  backend = backend or jax.default_backend()
  if backend not in BACKEND_PRESETS:
    raise ValueError(f'--preset=auto: no preset for the backend {backend!r}; pass one of '
                     f'{sorted(PRESETS)}.')
  return BACKEND_PRESETS[backend]


def _wait_quiet():
  return bench_utils.wait_quiet(FLAGS.max_load, FLAGS.wait_s)


def _compile(fn, *args):
  return bench_utils.compile_fn(fn, *args)


def _rel_err(got, want):
  """max |got - want| / max |want| over the loss and each gradient."""
  pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want))
  return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)))
                   / (float(jnp.max(jnp.abs(r.astype(jnp.float32)))) or 1.0)) for g, r in pairs)


# ---------------------------------------------------------------- suite: fused


UNTUNED = dict(chunk_size=4096, token_chunk_size=256)  # the op's chunks when not tuned


def _tune(points, chunks):
  """Tunes the op's chunk sizes for each (dtype, N, d, K) now, so no timed row pays for it.

  Returns rows {dtype, N, d, K, reduction, chunk_size, token_chunk_size, tune_s}; none when
  both chunk sizes are given or tuning is off (SOFTMAX_JAX_AUTOTUNE=0).
  """
  rows = []
  if len(chunks) == 2 or os.environ.get('SOFTMAX_JAX_AUTOTUNE', '1') == '0':
    return rows
  for dtype, n, d, k in points:
    for reduction in ('mean', 'none'):
      start = time.perf_counter()
      c, b = fused.tuned_chunk_sizes(n, d, k, dtype=dtype, reduction=reduction)
      rows.append(dict(dtype=jnp.dtype(dtype).name, N=n, d=d, K=k, reduction=reduction,
                       chunk_size=chunks.get('chunk_size', c),
                       token_chunk_size=chunks.get('token_chunk_size', b),
                       tune_s=time.perf_counter() - start))
      print(f"tuned {reduction} {rows[-1]['dtype']} N={n} d={d} K={k}: chunk_size={c}, "
            f"token_chunk_size={b} ({rows[-1]['tune_s']:.1f} s, cached after)", flush=True)
  return rows


def _fused_methods(chunks, variants):
  """name -> (loss(x, w_or_wT, b, labels), differentiated argnums, uses w.T)."""
  lce = functools.partial(ops.linear_cross_entropy, **chunks)
  optax_ce = optax.softmax_cross_entropy_with_integer_labels
  methods = {  # the first is the baseline of the ratios: the "naive optax loss"
      'naive optax': (lambda x, w, b, l: optax_ce(x @ w + b, l).mean(), (0, 1, 2), False),
      'naive ops': (lambda x, w, b, l: ops.cross_entropy(x @ w + b, l).mean(), (0, 1, 2), False),
      'fused mean': (lambda x, w, b, l: lce(x, w, l, bias=b, reduction='mean'), (0, 1, 2),
                     False),
      'fused none': (lambda x, w, b, l: lce(x, w, l, bias=b).mean(), (0, 1, 2), False),
  }
  for v in variants:
    f = functools.partial(ops.linear_cross_entropy, **v)
    tag = f"C={v['chunk_size']}, B={v['token_chunk_size']}"
    methods[f'fused mean {tag}'] = (
        lambda x, w, b, l, f=f: f(x, w, l, bias=b, reduction='mean'), (0, 1, 2), False)
    methods[f'fused none {tag}'] = (
        lambda x, w, b, l, f=f: f(x, w, l, bias=b).mean(), (0, 1, 2), False)
  try:
    import jax_cce  # pylint: disable=g-import-not-at-top
    methods['jax-cce'] = (lambda x, wt, b, l: jax_cce.linear_cross_entropy(x, wt, l), (0, 1),
                          True)  # w as [K, d], no bias
  except ImportError:
    pass
  return methods


def _float32_reference(loss, args, max_run_gib):
  """value_and_grad of `loss` on `args` upcast to float32 (same values), or None if too big to run."""
  f32 = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
  compiled, temp, io = _compile(jax.value_and_grad(loss, (0, 1, 2)), *f32)
  return compiled(*f32) if (temp + io) / 2**30 <= max_run_gib else None


def _fused_point(n, d, k, dtype, methods, timed, max_run_gib):
  """One (N, d, K, dtype): every method's memory; time and error if `timed`.

  rel err is against the naive optax loss in float32 on the same input values (for float32
  inputs: the naive optax row itself); where that does not fit in `max_run_gib`, against the
  first method that ran, named in 'rel_err_vs'. Timing: one warm-up per method (which gives
  the error), then `--repeats` rounds that run every method once in turn, so a shared box's
  changing load falls on all methods alike; the median of the rounds.
  """
  rows, runs = [], {}
  for name, (loss, argnums, transposed) in methods.items():
    spec = [jax.ShapeDtypeStruct(s, dt) for s, dt in (
        ((n, d), dtype), ((k, d) if transposed else (d, k), dtype), ((k,), dtype),
        ((n,), jnp.int32))]
    compiled, temp, io = _compile(jax.value_and_grad(loss, argnums), *spec)
    rows.append(dict(dtype=jnp.dtype(dtype).name, N=n, d=d, K=k, method=name,
                     temp_mib=temp / MiB))
    if timed and (temp + io) / 2**30 <= max_run_gib:
      runs[name] = (compiled, transposed, rows[-1])
  if runs:
    keys = jax.random.split(jax.random.key(0), 3)
    args = [jax.random.normal(keys[0], (n, d), dtype),
            (jax.random.normal(keys[1], (d, k)) / np.sqrt(d)).astype(dtype),
            jnp.zeros(k, dtype), jax.random.randint(keys[2], (n,), 0, k)]
    ref, ref_name = None, None
    if jnp.dtype(dtype) != jnp.float32:
      ref = _float32_reference(methods['naive optax'][0], args, max_run_gib)
      ref_name = None if ref is None else 'naive optax float32'
    call = lambda compiled, transposed: compiled(
        args[0], args[1].T.copy() if transposed else args[1], *args[2:])
    for name, (compiled, transposed, row) in runs.items():  # warm-up and error
      value, grads = jax.block_until_ready(call(compiled, transposed))
      if transposed:  # compare dw in [d, K]; jax-cce has no bias
        grads = (grads[0], grads[1].T)
      if ref is None:
        ref, ref_name = (value, grads), name
      else:
        row['rel_err'] = _rel_err((value, grads), (ref[0], ref[1][:len(grads)]))
        if ref_name not in ('naive optax', 'naive optax float32'):
          row['rel_err_vs'] = ref_name
      del value, grads
    del ref
    load, times = _wait_quiet(), {name: [] for name in runs}
    for _ in range(FLAGS.repeats):
      for name, (compiled, transposed, _) in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(call(compiled, transposed))
        times[name].append(time.perf_counter() - start)
    for name, (_, _, row) in runs.items():
      row['time_s'], row['load'] = float(np.median(times[name])), load
  naive = rows[0]
  for row in rows:
    row['mem_ratio'] = row['temp_mib'] / naive['temp_mib']
    if 'time_s' in row and 'time_s' in naive:
      row['time_ratio'] = row['time_s'] / naive['time_s']
  return rows


def _fused_sweep(k, d, dtype, chunks):
  """Compile-only temporary memory vs N and chunk sizes at fixed K, d."""
  lce = ops.linear_cross_entropy
  base = {k: chunks.get(k, v) for k, v in UNTUNED.items()}  # memory only: never tuned
  points = [dict(base, N=n, naive=True) for n in (1024, 2048, 4096, 8192)]
  points += [dict(base, N=2048, chunk_size=c) for c in (1024, 2048, 8192, 16384)]
  points += [dict(base, N=2048, token_chunk_size=t) for t in (64, 128, 512)]
  rows = []
  for p in points:
    n = p.pop('N')
    spec = [jax.ShapeDtypeStruct(s, dt) for s, dt in
            (((n, d), dtype), ((d, k), dtype), ((k,), dtype), ((n,), jnp.int32))]
    kw = dict(chunk_size=p['chunk_size'], token_chunk_size=p['token_chunk_size'])
    temp = lambda f: _compile(jax.value_and_grad(f, (0, 1, 2)), *spec)[1] / MiB
    row = dict(N=n, **kw, K=k, d=d, dtype=jnp.dtype(dtype).name, logits_mib=n * k * 4 / MiB,
               mean_mib=temp(lambda x, w, b, l: lce(x, w, l, bias=b, reduction='mean', **kw)),
               none_mib=temp(lambda x, w, b, l: lce(x, w, l, bias=b, **kw).mean()))
    if p.get('naive'):
      row['naive_mib'] = temp(lambda x, w, b, l: optax.softmax_cross_entropy_with_integer_labels(
          x @ w + b, l).mean())
    rows.append(row)
  return rows


def _fmt(v, f):
  return '' if v is None else f.format(v)


def _fused_table(rows):
  lines = ['| dtype | N | d | K | method | temp MiB | vs optax | time s | vs optax | rel err | load |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['dtype']} | {r['N']} | {r['d']} | {r['K']} | {r['method']} | "
                 f"{r['temp_mib']:.1f} | {r['mem_ratio']:.3f} | {_fmt(r.get('time_s'), '{:.3f}')} | "
                 f"{_fmt(r.get('time_ratio'), '{:.2f}')} | {_fmt(r.get('rel_err'), '{:.1e}')}"
                 f"{_fmt(r.get('rel_err_vs'), ' (vs {})')} | "
                 f"{_fmt(r.get('load'), '{:.2f}')} |")
  return '\n'.join(lines)


def _sweep_table(sweep):
  lines = [f"Compile-only temporary memory vs N and chunk sizes, K={sweep[0]['K']}, "
           f"d={sweep[0]['d']}, {sweep[0]['dtype']}:", '',
           '| N | chunk_size | token_chunk_size | N*K*4 MiB | naive optax MiB | fused mean MiB | '
           'fused none MiB |', '|---|---|---|---|---|---|---|']
  for r in sweep:
    lines.append(f"| {r['N']} | {r['chunk_size']} | {r['token_chunk_size']} | "
                 f"{r['logits_mib']:.0f} | {_fmt(r.get('naive_mib'), '{:.0f}')} | "
                 f"{r['mean_mib']:.1f} | {r['none_mib']:.1f} |")
  return '\n'.join(lines)


def _tuned_table(tuned):
  lines = ["Chunk sizes of the rows 'fused mean' / 'fused none' (chunk_size=None: tuned on this "
           'machine before timing, ops/_autotune.py):', '',
           '| dtype | N | d | K | reduction | chunk_size | token_chunk_size | tuning s |',
           '|---|---|---|---|---|---|---|---|']
  for r in tuned:
    lines.append(f"| {r['dtype']} | {r['N']} | {r['d']} | {r['K']} | {r['reduction']} | "
                 f"{r['chunk_size']} | {r['token_chunk_size']} | {r['tune_s']:.1f} |")
  return '\n'.join(lines)


def _fused_plot(rows, sweep, path):
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
  d0, dt0 = rows[0]['d'], rows[0]['dtype']
  color = {m: f'C{i}' for i, m in enumerate(dict.fromkeys(r['method'] for r in rows))}
  for method in color:
    for n, style in zip(sorted({r['N'] for r in rows}), ('o-', 's--', '^:')):
      sel = [r for r in rows if r['method'] == method and r['N'] == n and r['d'] == d0
             and r['dtype'] == dt0]
      kw = dict(color=color[method], label=f'{method}, N={n}')
      axes[0].plot([r['K'] for r in sel], [r['temp_mib'] for r in sel], style, **kw)
      timed = [r for r in sel if 'time_s' in r]
      if timed:
        axes[1].plot([r['K'] for r in timed], [r['time_s'] for r in timed], style, **kw)
  axes[0].set(xlabel='K', ylabel='temporary MiB', yscale='log', title=f'memory, d={d0} {dt0}')
  axes[1].set(xlabel='K', ylabel='seconds (median)', title='value_and_grad time')
  by_n = [r for r in sweep if 'naive_mib' in r]
  for key, label in (('naive_mib', 'naive optax'), ('mean_mib', 'fused mean'),
                     ('none_mib', 'fused none')):
    axes[2].plot([r['N'] for r in by_n], [r[key] for r in by_n], 'o-', label=label,
                 color=color.get(label))
  axes[2].set(xlabel='N', ylabel='temporary MiB', xscale='log', yscale='log',
              title=f"memory vs N, K={sweep[0]['K']}, d={sweep[0]['d']} {sweep[0]['dtype']}")
  for ax in axes:
    if ax.lines:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def fused_suite(preset_name, out):
  preset = PRESETS[preset_name]
  chunks = {k: v for k, v in (('chunk_size', FLAGS.chunk_size),
                              ('token_chunk_size', FLAGS.token_chunk_size)) if v}
  timed = preset['time'] if FLAGS.time is None else FLAGS.time
  max_run_gib = FLAGS.max_run_gib or preset['max_run_gib']
  methods = _fused_methods(chunks, preset['variants'])
  dtypes = FLAGS.dtype or preset['dtypes']
  grid = {key: [int(v) for v in FLAGS[key].value] if FLAGS[key].value else preset[key]
          for key in ('K', 'N', 'd')}
  if not timed:  # compile-only memory at the untuned chunks (tuning would time candidates)
    os.environ['SOFTMAX_JAX_AUTOTUNE'] = '0'
  machine = bench_utils.describe_machine()
  print(machine, flush=True)
  tuned = _tune([(dt, n, d, k) for dt in dtypes for d in grid['d'] for n in grid['N']
                 for k in grid['K']], chunks)
  rows = []
  for dtype in dtypes:
    for d in grid['d']:
      for n in grid['N']:
        for k in grid['K']:
          rows += _fused_point(n, d, k, jnp.dtype(dtype), methods, timed, max_run_gib)
          print(_fused_table(rows[-len(methods):]), flush=True)
  sweep_k, sweep_d = preset['sweep']
  if FLAGS.K or FLAGS.d:  # a sub-grid: sweep at its largest K and first d
    sweep_k, sweep_d = max(grid['K']), grid['d'][0]
  sweep = _fused_sweep(sweep_k, sweep_d, jnp.dtype(dtypes[0]), chunks)
  table = machine + '\n\n' + _fused_table(rows) + '\n\n' + _sweep_table(sweep)
  if tuned:
    table += '\n\n' + _tuned_table(tuned)
  if jax.default_backend() == 'gpu':
    table += ('\n\nFor comparison, Cut Cross-Entropy paper (Wijmans et al. 2024), A100, '
              'loss + gradient memory: baseline 28 GB -> CCE 1.1 GB.')
  print(table)
  _fused_plot(rows, sweep, out + '.png')
  return dict(chunks=chunks, tuned=tuned, cpu=bench_utils.machine(), baseline='optax.softmax_cross_entropy_with_integer_labels(x @ w + b, labels).mean()',
              rows=rows, sweep=sweep, markdown=table)


def _heads_grid(preset_name: str) -> str:
  """`preset_name`, or with --K/--N/--d a copy of it so changed, registered as 'custom'."""
  if not (FLAGS.K or FLAGS.N or FLAGS.d):
    return preset_name
  grid = dict(bench_heads.PRESETS[preset_name])
  if FLAGS.K:
    grid['K'] = grid['train_K'] = [int(k) for k in FLAGS.K]
  for key in ('N', 'd'):
    if FLAGS[key].value:
      if len(FLAGS[key].value) != 1:
        raise app.UsageError(f'--suite=heads takes one --{key}, got {",".join(FLAGS[key].value)}.')
      grid[key] = int(FLAGS[key].value[0])
  bench_heads.PRESETS['custom'] = grid
  return 'custom'


def heads_suite(preset_name, out):
  timed = True if FLAGS.time is None else FLAGS.time
  rows = bench_heads.heads_suite(
      _heads_grid(preset_name), timed=timed, repeats=FLAGS.repeats, max_load=FLAGS.max_load,
      wait_s=FLAGS.wait_s,
      max_run_gib=FLAGS.max_run_gib or PRESETS[preset_name]['max_run_gib'], only=FLAGS.heads)
  table = bench_heads.table(rows)
  print(table)
  bench_heads.plot(rows, out + '.png')
  result = dict(rows=rows, markdown=table, labels='log-uniform (Zipf)', doc=bench_heads.__doc__)
  if FLAGS.train_steps:
    train_rows = bench_heads.train_step_suite(
        _heads_grid(preset_name), repeats=FLAGS.repeats, max_load=FLAGS.max_load,
        wait_s=FLAGS.wait_s, only=FLAGS.heads)
    result.update(train_rows=train_rows, train_markdown=bench_heads.train_table(train_rows))
    print(result['train_markdown'])
  return result


def peers_suite(preset_name, out):
  del out
  rows, note = bench_heads.peers_suite(_heads_grid(preset_name), repeats=FLAGS.repeats,
                                       max_load=FLAGS.max_load, wait_s=FLAGS.wait_s)
  table = bench_heads.peers_table(rows)
  print(table + '\n' + note)
  return dict(rows=rows, markdown=table, note=note, doc=bench_heads.peers_suite.__doc__)


def ce_suite(preset_name, out):
  rows = bench_ce.ce_suite(
      preset_name, dtype=(FLAGS.dtype or ['float32'])[0],
      timed=True if FLAGS.time is None else FLAGS.time, repeats=FLAGS.repeats,
      max_load=FLAGS.max_load, wait_s=FLAGS.wait_s,
      max_run_gib=FLAGS.max_run_gib or PRESETS[preset_name]['max_run_gib'])
  table = bench_ce.table(rows)
  print(table)
  bench_ce.plot(rows, out + '.png')
  return dict(rows=rows, markdown=table, doc=bench_ce.__doc__)


def loop_suite(preset_name, out):
  del out  # no plot
  rows = bench_loop.loop_suite(preset_name, repeats=FLAGS.repeats, max_load=FLAGS.max_load,
                               wait_s=FLAGS.wait_s)
  table = bench_loop.table(rows)
  print(table)
  return dict(rows=rows, markdown=table, doc=bench_loop.__doc__)


def decode_suite(preset_name, out):
  rows = bench_decode.decode_suite(preset_name, repeats=FLAGS.repeats, max_load=FLAGS.max_load,
                                   wait_s=FLAGS.wait_s)
  table = bench_decode.table(rows)
  print(table)
  bench_decode.plot(rows, out + '.png')
  return dict(rows=rows, markdown=table, doc=bench_decode.__doc__)


def generate_suite(preset_name, out):
  rows = bench_generate.generate_suite(preset_name, repeats=FLAGS.repeats,
                                       max_load=FLAGS.max_load, wait_s=FLAGS.wait_s)
  table = bench_generate.table(rows)
  print(table)
  bench_generate.plot(rows, out + '.png')
  return dict(rows=rows, markdown=table, doc=bench_generate.__doc__)


def scale_suite(preset_name, out):
  rows = bench_scale.scale_suite(
      preset_name, repeats=FLAGS.repeats if FLAGS.time is not False else 0,
      max_load=FLAGS.max_load, wait_s=FLAGS.wait_s, max_run_gib=FLAGS.max_run_gib)
  table = bench_scale.table(rows)
  checks = bench_scale.checks(rows)
  print(table + '\n' + json.dumps(checks, indent=1))
  bench_scale.plot(rows, out + '.png')
  return dict(rows=rows, markdown=table, checks=checks, doc=bench_scale.__doc__)


SUITES = {'fused': fused_suite, 'heads': heads_suite, 'peers': peers_suite, 'ce': ce_suite, 'loop': loop_suite,
          'decode': decode_suite, 'generate': generate_suite, 'scale': scale_suite}


def main(argv):
  del argv
  preset = resolve_preset(FLAGS.preset)
  if preset != FLAGS.preset:
    print(f'--preset={FLAGS.preset}: {preset} (backend {jax.default_backend()})', flush=True)
  out = FLAGS.out or os.path.join('bench_out', f'{FLAGS.suite}_{preset}')
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  start, load = time.time(), bench_utils.load()
  result = SUITES[FLAGS.suite](preset, out)
  result.setdefault('cpu', bench_utils.machine())  # CPU model and vector extensions
  result.update(suite=FLAGS.suite, preset=preset, preset_flag=FLAGS.preset,
                backend=jax.default_backend(), date=str(datetime.date.today()),
                device=jax.devices()[0].device_kind, cpus=os.cpu_count(),
                machine=platform.platform(), jax=jax.__version__, load_at_start=load,
                load_at_end=bench_utils.load(), wall_s=time.time() - start)
  with open(out + '.json', 'w') as f:
    json.dump(result, f, indent=1)
  wrote = [f'{out}.json'] + [f'{out}.png'] * os.path.exists(out + '.png')
  print(f'wrote {" and ".join(wrote)} in {time.time() - start:.0f} s')


if __name__ == '__main__':
  app.run(main)
