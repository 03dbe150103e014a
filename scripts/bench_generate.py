"""`benchmark.py --suite=generate`: tokens/s of whole-sequence generation (`decode.generate`).

A `LanguageModel` with a dense head over K classes (random initial weights: speed does not depend
on training), a prompt of P random tokens per row, N new tokens, one `decode.generate` call per
sequence batch (one `jax.jit` of a `lax.scan` over the new tokens, the prompt read included).
Ways to generate (issue 18):

  transformer, kv cache   `TransformerLM` through its key/value cache (`kv_cache=True`): the prompt
                          read one token a step into the cache, then one token a step, O(max_len)
                          attention per token
  transformer, window     the same model and weights, `kv_cache=False`: every step reruns the
                          causal pass over the window of min(max_len, P + N) tokens, O(T) per token
  lstm, carry             an `LSTMLM` of about the same size (embedding and hidden = d_model, the
                          same number of layers): the prompt read once, then one token a step
                          with its carry

each with 'greedy' and 'sample' (temperature 1, no truncation), at each batch size B.
Columns: tokens/s = B * N / the median call time over `repeats` runs (all rows of the batch
count); ms/token = the median call time / N (one decoding step for the whole batch, the prompt's
share included); first call s = the first call's wall time, compile included; params (M);
'same as cache' = the fraction of the window rows' tokens equal to the kv-cache rows' of the same
B and method (the same key: 1.00 when both decode the same tokens; float rounding may flip a near
tie and the rest of the row then diverges); load = the 1-minute load when timing started.

Per batch size: every way compiled and run once, then `repeats` rounds that run each once in turn
(a load change falls on all alike); the median per way.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import bench_utils
from softmax_jax import decode
from softmax_jax.models import lm as lm_lib

# K classes; the Transformer (d_model, layers, heads, mlp, max_len) and the LSTM (embedding and
# hidden d_model, the same layers); B batch sizes; P prompt tokens; N new tokens.
PRESETS = {
    'cpu': dict(K=10_000, d_model=256, num_layers=2, num_heads=4, mlp_dim=1024, max_len=256,
                B=[1, 16], P=16, N=100),
    'cpu_small': dict(K=64, d_model=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=16,
                      B=[2], P=3, N=8),
    'gpu': dict(K=32_000, d_model=512, num_layers=6, num_heads=8, mlp_dim=2048, max_len=1024,
                B=[1, 16], P=64, N=512),
    'tpu': dict(K=32_000, d_model=512, num_layers=6, num_heads=8, mlp_dim=2048, max_len=1024,
                B=[1, 16], P=64, N=512),
}
METHODS = ('greedy', 'sample')
WAYS = ('transformer, kv cache', 'transformer, window', 'lstm, carry')


def models(p):
  """`{'transformer': (model, variables), 'lstm': (model, variables)}` for preset `p`."""
  configs = {
      'transformer': dict(name='transformer', d_model=p['d_model'], num_layers=p['num_layers'],
                          num_heads=p['num_heads'], mlp_dim=p['mlp_dim'], max_len=p['max_len'],
                          dropout=0.0),
      'lstm': dict(name='lstm', embed_dim=p['d_model'], hidden=p['d_model'],
                   num_layers=p['num_layers'], dropout=0.0),
  }
  out = {}
  x = jnp.zeros((1, 2), jnp.int32)
  for i, (name, cfg) in enumerate(configs.items()):
    model = lm_lib.build_language_model(cfg, {'name': 'dense'}, p['K'])
    init = jax.jit(lambda k, model=model: model.init(k, x, x, carry=None, train=False))
    out[name] = (model, init(jax.random.key(i)))
  return out


def _params_m(variables) -> float:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables['params'])) / 1e6


def generate_suite(preset_name: str, *, repeats: int, max_load: float = 0.0, wait_s: int = 0):
  """Rows {way, model, method, B, K, max_len, P, N, params_m, time_s, tokens_per_s, ms_per_token,
  first_call_s, same_as_cache, load, tokens} (`tokens`: the first call's [B, N] ids, a list).

  Args:
    preset_name: a key of `PRESETS`.
    repeats: timed calls per way after the first one; the median is reported.
    max_load, wait_s: wait (up to `wait_s`) for a 1-minute load below `max_load` before timing
      each batch size (0: start at once).
  """
  p = PRESETS[preset_name]
  built = models(p)
  rng = np.random.default_rng(0)
  rows = []
  for batch in p['B']:
    prompt = jnp.asarray(rng.integers(0, p['K'], (batch, p['P'])), jnp.int32)
    key = jax.random.key(1)
    run = {}
    for method in METHODS:
      for way in WAYS:
        model, variables = built[way.split(',')[0]]
        call = (lambda model=model, variables=variables, method=method, kv=way != 'transformer, window':
                jax.block_until_ready(decode.generate(
                    model, variables, prompt, key=key, method=method, max_new_tokens=p['N'],
                    temperature=1.0, kv_cache=kv)))
        start = time.perf_counter()
        tokens = np.asarray(call())
        first = time.perf_counter() - start
        run[way, method] = (call, [], dict(
            way=way, model=way.split(',')[0], method=method, B=batch, K=p['K'], max_len=p['max_len'],
            P=p['P'], N=p['N'], params_m=_params_m(variables), first_call_s=first,
            tokens=tokens.tolist()))
        print(f'compiled {way} {method} B={batch}: {first:.1f} s', flush=True)
    load = bench_utils.wait_quiet(max_load, wait_s)
    for _ in range(repeats):
      for call, times, _ in run.values():
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    for (way, method), (_, times, row) in run.items():
      t = statistics.median(times)
      cached = np.asarray(run['transformer, kv cache', method][2]['tokens'])
      same = (float(np.mean(np.asarray(row['tokens']) == cached))
              if way.startswith('transformer') else None)
      row.update(time_s=t, tokens_per_s=batch * p['N'] / t, ms_per_token=t / p['N'] * 1e3,
                 same_as_cache=same, load=load)
      rows.append(row)
      print(table([row]).splitlines()[-1], flush=True)
  return rows


def table(rows) -> str:
  lines = ['| way | method | B | K | max_len | P + N | params (M) | tokens/s | ms/token | '
           'first call s | same as cache | load |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    same = '-' if r['same_as_cache'] is None else f"{r['same_as_cache']:.2f}"
    lines.append(f"| {r['way']} | {r['method']} | {r['B']} | {r['K']} | {r['max_len']} | "
                 f"{r['P']} + {r['N']} | {r['params_m']:.3g} | {r['tokens_per_s']:.1f} | "
                 f"{r['ms_per_token']:.2f} | {r['first_call_s']:.1f} | {same} | {r['load']:.2f} |")
  return '\n'.join(lines)


def plot(rows, path: str) -> None:
  """Tokens/s as bars: one panel per batch size, a group per method, a bar per way; log scale."""
  batches = sorted({r['B'] for r in rows})
  fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
  width = 0.8 / len(WAYS)
  for ax, batch in zip(axes[0], batches):
    for i, way in enumerate(WAYS):
      sel = {r['method']: r['tokens_per_s'] for r in rows if r['way'] == way and r['B'] == batch}
      xs = [j + (i - (len(WAYS) - 1) / 2) * width for j, m in enumerate(METHODS) if m in sel]
      ax.bar(xs, [sel[m] for m in METHODS if m in sel], width, color=f'C{i}', label=way)
    r0 = rows[0]
    ax.set(xticks=range(len(METHODS)), xticklabels=METHODS, ylabel='tokens/s (median)',
           yscale='log', title=f"batch {batch}, K={r0['K']}, {r0['P']} + {r0['N']} tokens")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
