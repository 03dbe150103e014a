"""`benchmark.py --suite=decode`: tokens/s of one decoding step against the vocabulary size K.

One step: features `h [B, d]` (float32, d = 512) -> the output layer -> one next token per row,
jitted as a whole (the key is an argument). Tokens/s = B / the median step time. Methods:

  greedy            argmax of `h @ W + b` (the floor: one matmul and a max)
  sample            `ops.sample` from the full softmax (temperature 1)
  top-k sample      `ops.sample(top_k=50)`
  top-p sample      `ops.sample(top_p=0.9)` (a sort of the K logits per row)
  approx top-k      `jax.lax.approx_max_k(z, 50)` then sampling among those 50 (TPU's fast path;
                    on CPU and GPU XLA computes it exactly)
  shortlist S=...   `ops.shortlist_log_softmax` over a shared table of the S most frequent classes
                    (ids 0..S-1 of a frequency-sorted vocabulary), then sampling among them: reads
                    S of the K columns, so O(S d) instead of O(K d), the gather included
  ..., gathered once  the same table's columns gathered before the step (a decoder with a fixed
                    table does it once, before its loop): the step is an [S, d] matmul
  adaptive          the adaptive softmax's exact log-probabilities (`ops.adaptive_log_softmax`,
                    cutoffs K/20 and K/5, tails of width d/4 and d/16) then sampling

The shortlist's recall of the true next token is a property of the data, not of this benchmark:
WORKSPACE reports it on PTB (scripts/shortlist_eval.py).
"""

import statistics
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import bench_utils
from softmax_jax import ops
from softmax_jax.ops import decoding

PRESETS = {
    'cpu': dict(K=[10_000, 50_000, 200_000], B=[1, 64], d=512, S=[1_000, 5_000]),
    'cpu_small': dict(K=[10_000], B=[1, 8], d=128, S=[1_000]),
    'gpu': dict(K=[10_000, 50_000, 200_000, 1_000_000], B=[1, 64], d=1024, S=[1_000, 5_000]),
    'tpu': dict(K=[10_000, 50_000, 200_000], B=[1, 64], d=1024, S=[1_000, 5_000]),
}
TOP_K, TOP_P = 50, 0.9


def _pick(key, log_probs, ids=None):
  """A sampled id per row from `log_probs` [B, n] (mapped through `ids` [n] if given)."""
  j = decoding.sample(key, log_probs)
  return j if ids is None else jnp.take(ids, j)


def methods(k: int, d: int, shortlists):
  """name -> (step(key, h, params) -> [B] int32, params)."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(d, k)) / np.sqrt(d), jnp.float32)
  b = jnp.asarray(-np.log(np.arange(1, k + 1)), jnp.float32)  # Zipf-like: low ids frequent
  dense = dict(w=w, b=b)
  logits = lambda h, p: h @ p['w'] + p['b']
  out = {
      'greedy': (lambda key, h, p: decoding.greedy(logits(h, p)), dense),
      'sample': (lambda key, h, p: decoding.sample(key, logits(h, p)), dense),
      'top-k sample': (lambda key, h, p: decoding.sample(key, logits(h, p), top_k=TOP_K), dense),
      'top-p sample': (lambda key, h, p: decoding.sample(key, logits(h, p), top_p=TOP_P), dense),
  }

  def approx(key, h, p):
    values, ids = jax.lax.approx_max_k(logits(h, p), TOP_K)
    j = decoding.sample(key, values)
    return jnp.take_along_axis(ids, j[:, None], axis=-1)[:, 0]
  out['approx top-k'] = (approx, dense)
  for s in shortlists:
    if s < k:
      ids = jnp.arange(s, dtype=jnp.int32)
      out[f'shortlist S={s}'] = (
          lambda key, h, p, ids=ids: _pick(key, ops.shortlist_log_softmax(h, p['w'], ids, bias=p['b']), ids),
          dense)
      # The same table gathered once (a decoder with a fixed table does it before its loop).
      fixed = dict(w=jnp.take(w, ids, axis=1), b=jnp.take(b, ids), ids=ids)
      out[f'shortlist S={s}, gathered once'] = (
          lambda key, h, p: _pick(key, jax.nn.log_softmax(h @ p['w'] + p['b']), p['ids']), fixed)
  cutoffs = (k // 20, k // 5)
  head = jnp.asarray(rng.normal(size=(d, cutoffs[0] + 2)) / np.sqrt(d), jnp.float32)
  tails = []
  for i, (lo, hi) in enumerate(zip(cutoffs, (cutoffs[1], k))):
    width = max(1, d // 4 ** (i + 1))
    tails.append((jnp.asarray(rng.normal(size=(d, width)) / np.sqrt(d), jnp.float32),
                  jnp.asarray(rng.normal(size=(width, hi - lo)) / np.sqrt(width), jnp.float32)))
  out['adaptive'] = (
      lambda key, h, p: decoding.sample(key, ops.adaptive_log_softmax(
          h, p['head'], p['tails'], cutoffs=cutoffs)), dict(head=head, tails=tuple(tails)))
  return out


def decode_suite(preset_name: str, *, repeats: int, max_load: float = 0.0, wait_s: int = 0,
                 only=None):
  """Rows {K, B, d, method, time_s, tokens_per_s, speedup (vs 'sample'), load}.

  Per (K, B): every method compiled and warmed up, then `repeats` rounds that run each method
  once in turn (a load change falls on all alike); the median step time per method.
  """
  p = PRESETS[preset_name]
  rows = []
  for k in p['K']:
    all_methods = methods(k, p['d'], p['S'])
    for batch in p['B']:
      h = jax.random.normal(jax.random.key(1), (batch, p['d']), jnp.float32)
      run = {}
      for name, (step, params) in all_methods.items():
        if only and name not in only and name != 'sample':
          continue
        fn = jax.jit(step)
        key = jax.random.key(2)
        jax.block_until_ready(fn(key, h, params))
        run[name] = (fn, params, [])
      load = bench_utils.wait_quiet(max_load, wait_s)
      for r in range(repeats):
        key = jax.random.fold_in(jax.random.key(3), r)
        for fn, params, times in run.values():
          start = time.perf_counter()
          jax.block_until_ready(fn(key, h, params))
          times.append(time.perf_counter() - start)
      block = []
      for name, (_, _, times) in run.items():
        t = statistics.median(times)
        block.append(dict(K=k, B=batch, d=p['d'], method=name, time_s=t, tokens_per_s=batch / t,
                          load=load))
      base = next(r for r in block if r['method'] == 'sample')
      for row in block:
        row['speedup'] = base['time_s'] / row['time_s']
        print(table([row]).splitlines()[-1], flush=True)
      rows += block
  return rows


def table(rows) -> str:
  lines = ['| K | B | method | step ms | tokens/s | vs sample | load |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['K']} | {r['B']} | {r['method']} | {r['time_s'] * 1e3:.3f} | "
                 f"{r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | {r['load']:.2f} |")
  return '\n'.join(lines)


def plot(rows, path: str) -> None:
  """Tokens/s against K, one panel per batch size, log scales."""
  batches = sorted({r['B'] for r in rows})
  fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
  for ax, batch in zip(axes[0], batches):
    for i, name in enumerate(dict.fromkeys(r['method'] for r in rows)):
      sel = [r for r in rows if r['method'] == name and r['B'] == batch]
      ax.plot([r['K'] for r in sel], [r['tokens_per_s'] for r in sel], 'o-', color=f'C{i}', label=name)
    ax.set(xlabel='K (classes)', ylabel='tokens/s (median)', xscale='log', yscale='log',
           title=f'one decoding step, batch {batch}, d={rows[0]["d"]}')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
