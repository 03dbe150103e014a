"""Chunk sizes of `linear_cross_entropy`, chosen by measurement on the machine that runs it.

`chunks(...)` answers `(chunk_size, token_chunk_size)` for one problem. The answer is looked up
by a key (backend, device kind, CPU model and vector extensions on CPU, jax version, dtype,
reduction, N rounded up to a power of two, d, K): first in memory, then in the JSON file
`$SOFTMAX_JAX_CACHE_DIR/fused_chunks.json` (default `~/.cache/softmax_jax/`); on a miss the
`candidates()` are timed on a scaled-down problem (`scaled()`) and the fastest is stored in
both (with every candidate's time, for audits). No candidate needs more than `MAX_MEMORY` =
1.25 times the work-block memory of the defaults (`block_bytes`): tuning keeps the memory
bounds. The default stays unless another candidate is `MARGIN` = 10% faster (timing noise).
Tuning runs eagerly on random data of the (static) shapes with an ahead-of-time compiled
function, so it also works while `jit`, `grad` or `vmap` trace the caller.

Cost: per candidate one compile and `1 + REPEATS` runs of value_and_grad on the scaled problem
(~`TARGET_FLOPS` floating-point operations a run, at least one whole chunk); after the first
two candidates no more are started once `BUDGET_S` seconds have passed: 2-4 s in all at
N=2048, d=512, K=200k on one core of a loaded 2-core box (where only two or three candidates
run). Problems under `MIN_WORK` multiply-adds (N * d * K) are not tuned (the fixed defaults):
tuning would cost more than it saves.

Deterministic runs: `SOFTMAX_JAX_AUTOTUNE=0` (or `set_autotune(False)`) gives the fixed
defaults `DEFAULT` = (4096, 256) without timing or reading the cache.
"""

import json
import math
import os
import re
import tempfile
import threading
import time
import warnings

import jax
import numpy as np

DEFAULT = (4096, 256)
ENV_AUTOTUNE = 'SOFTMAX_JAX_AUTOTUNE'
ENV_CACHE_DIR = 'SOFTMAX_JAX_CACHE_DIR'
FILE_NAME = 'fused_chunks.json'
MIN_WORK = 2**32  # N * d * K multiply-adds below which the defaults are used untimed
TARGET_FLOPS = 8e9  # flops of one timed run of the scaled problem (~0.05-0.1 s, one CPU core)
BUDGET_S = 3.0  # no new candidate is started after this many seconds (two always run)
REPEATS = 1  # timed runs per candidate after one warm-up; the minimum of all counts
MARGIN = 0.1  # another candidate replaces the default only if this much faster (noise)
MAX_MEMORY = 1.25  # no candidate with more than this times the default's work blocks
VOCAB_CHUNKS = (8192, 2048, 16384, 1024)  # after 4096, in the order they are tried
TOKEN_CHUNKS = (128, 512, 64)  # after 256

_lock = threading.Lock()
_memory = {}
_enabled = None  # None: follow the environment variable


def set_autotune(enabled):
  """True/False: tune or use `DEFAULT`, whatever the environment says; None: follow it."""
  global _enabled
  _enabled = enabled


def autotune_enabled():
  if _enabled is not None:
    return bool(_enabled)
  return os.environ.get(ENV_AUTOTUNE, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def clear_memory():
  """Forgets the in-memory answers (the file stays)."""
  with _lock:
    _memory.clear()


def cache_path():
  root = os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser('~'), '.cache',
                                                       'softmax_jax')
  return os.path.join(root, FILE_NAME)


def xla_max_isa():
  """The ISA cap XLA's CPU code generation was given (`--xla_cpu_max_isa=` in XLA_FLAGS), or None."""
  found = re.findall(r'--xla_cpu_max_isa=(\S+)', os.environ.get('XLA_FLAGS', ''))
  return found[-1].upper() if found else None


def cpu_description():
  """'<CPU model> [avx512f|avx2|...]' from /proc/cpuinfo ('unknown' where there is none).

  With `--xla_cpu_max_isa=X` in XLA_FLAGS, ' xla<=X' is appended: code limited to AVX2 on an
  AVX-512 machine is another machine to the tuner."""
  model, flags = 'unknown', set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        name, _, value = line.partition(':')
        name = name.strip()
        if name == 'model name' and model == 'unknown':
          model = value.strip()
        elif name == 'flags' and not flags:
          flags = set(value.split())
  except OSError:
    pass
  ext = [e for e in ('avx512f', 'avx512_bf16', 'amx_tile', 'avx2', 'fma') if e in flags]
  cap = xla_max_isa()
  return f"{model} [{' '.join(ext) or 'no avx2'}]" + (f' xla<={cap}' if cap else '')


def bucket(n):
  """N rounded up to a power of two: nearby batch sizes share one answer."""
  return 1 << max(0, int(n) - 1).bit_length()


def key(reduction, n, d, k, dtype):
  backend = jax.default_backend()
  kind = jax.devices()[0].device_kind
  if backend == 'cpu':
    kind = f'{kind} {cpu_description()}'
  mode = 'none' if reduction == 'none' else 'reduced'  # 'sum' and 'mean' run the same code
  return (f'{backend}|{kind}|jax {jax.__version__}|{np.dtype(dtype).name}|{mode}|N={bucket(n)}|'
          f'd={d}|K={k}')


def block_bytes(reduction, n, d, k, chunk, token):
  """Bytes of the op's float32 work blocks, the bulk of its temporary memory.

  'none': two [N, chunk] blocks; 'sum'/'mean': one [token, K] block and three
  [token + d, chunk] ones.
  """
  chunk, token = min(chunk, k), min(token, n)
  if reduction == 'none':
    return 4 * 2 * n * chunk
  return 4 * (token * k + 3 * (token + d) * chunk)


def candidates(reduction, n, d, k):
  """(chunk, token chunk) pairs to time, the default first; sizes past N or K collapse.

  A pair whose `block_bytes` exceed `MAX_MEMORY` times the default's is left out: tuning
  trades no memory for time.
  """
  pairs = [DEFAULT] + [(c, DEFAULT[1]) for c in VOCAB_CHUNKS]
  if reduction != 'none':  # 'none' does not use the token chunk
    pairs[2:2] = [(DEFAULT[0], b) for b in TOKEN_CHUNKS]  # the likelier gains first
  limit = MAX_MEMORY * block_bytes(reduction, n, d, k, *DEFAULT)
  out = []
  for c, b in pairs:
    c, b = min(c, k), min(b, n)
    if (c, b) not in out and block_bytes(reduction, n, d, k, c, b) <= limit:
      out.append((c, b))
  return out


def scaled(reduction, n, d, k, chunk, token):
  """`(n', k')` of the timed problem for one candidate: whole blocks of the real shapes.

  'none' times whole vocabulary chunks on N rows cut to about `TARGET_FLOPS` over two chunks
  (at least 256 rows: at d=512, 256 rows for chunk 4096, so its [rows, chunk] blocks are
  smaller than the real ones); 'sum'/'mean' keep K up to `TARGET_FLOPS` (at least four chunks)
  and time whole token blocks. Never above the real sizes.
  """
  per = 8.0 * d  # flops per (row, class): four matrix products of 2 d
  if reduction == 'none':
    n2 = min(n, max(256, int(TARGET_FLOPS / (per * 2 * chunk))))
    k2 = min(k, chunk * max(1, int(TARGET_FLOPS / (per * n2 * chunk))))
    return n2, k2
  k2 = min(k, max(4 * chunk, int(TARGET_FLOPS / (per * 2 * token))))
  n2 = min(n, token * max(1, int(TARGET_FLOPS / (per * k2 * token))))
  return n2, k2


def measure(loss_fn, reduction, n, d, k, dtype, chunk, token):
  """Seconds per (row, class) of value_and_grad of the loss on the scaled problem (min of runs).

  `loss_fn(x, w, labels, reduction=, chunk_size=, token_chunk_size=)`. Compiled ahead of time
  and run on concrete arrays, so it runs (not traces) inside a caller's `jit`.
  """
  n2, k2 = scaled(reduction, n, d, k, chunk, token)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n2, d)).astype(dtype)
  w = (rng.standard_normal((d, k2)) / math.sqrt(d)).astype(dtype)
  labels = rng.integers(0, k2, n2).astype(np.int32)

  def f(x, w, labels):
    out = loss_fn(x, w, labels, reduction=reduction, chunk_size=chunk, token_chunk_size=token)
    return out if reduction != 'none' else out.mean()

  spec = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, w, labels)]
  compiled = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*spec).compile()
  best = math.inf
  for _ in range(1 + REPEATS):
    start = time.perf_counter()
    jax.block_until_ready(compiled(x, w, labels))
    best = min(best, time.perf_counter() - start)
  return best / (n2 * k2)


def tune(reduction, n, d, k, dtype, timer):
  """`(best pair, {pair: seconds})`, timing `candidates` in order within `BUDGET_S`.

  The first candidate (the default) stays unless another is `MARGIN` faster.
  """
  start, seconds = time.perf_counter(), {}
  for pair in candidates(reduction, n, d, k):
    if len(seconds) >= 2 and time.perf_counter() - start > BUDGET_S:
      break
    seconds[pair] = float(timer(reduction, n, d, k, dtype, *pair))
  best = min(seconds, key=seconds.get)
  first = next(iter(seconds))
  if seconds[best] > (1.0 - MARGIN) * seconds[first]:
    best = first
  return best, seconds


def _read(path, warn=True):
  """{key: entry} of the file; an entry is {'chunk_size', 'token_chunk_size', 'timed'?}."""
  try:
    with open(path) as f:
      entries = json.load(f)['entries']
    if not isinstance(entries, dict):
      raise ValueError('"entries" is not an object')
    for entry in entries.values():
      entry['chunk_size'], entry['token_chunk_size'] = (  # ints >= 1 or it is corrupt
          _positive(entry['chunk_size']), _positive(entry['token_chunk_size']))
    return entries
  except FileNotFoundError:
    return {}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    if warn:
      warnings.warn(f'softmax_jax: ignoring the unreadable chunk-size cache {path} ({e!r}); it '
                    'will be rewritten.', RuntimeWarning)
    return {}


def _positive(v):
  if not isinstance(v, int) or isinstance(v, bool) or v < 1:
    raise ValueError(f'a chunk size must be an int >= 1; got {v!r}')
  return v


def _write(path, entries):
  """Atomically replaces the file (a temporary file in the same folder, then os.replace)."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.fused_chunks.', dir=os.path.dirname(path))
    with os.fdopen(fd, 'w') as f:
      json.dump({'version': 1, 'entries': dict(sorted(entries.items()))}, f, indent=1)
    os.replace(tmp, path)
  except OSError as e:
    warnings.warn(f'softmax_jax: could not write the chunk-size cache {path} ({e!r}).',
                  RuntimeWarning)


def chunks(reduction, n, d, k, dtype, loss_fn, *, timer=None):
  """`(chunk_size, token_chunk_size)` for this problem: cached, tuned, or `DEFAULT`.

  `timer(reduction, n, d, k, dtype, chunk, token) -> seconds` (lower is better); default
  `measure` with `loss_fn`. Tests inject a fake one.
  """
  if not autotune_enabled() or n * d * k < MIN_WORK:
    return DEFAULT
  name = key(reduction, n, d, k, dtype)
  with _lock:
    if name in _memory:
      return _memory[name]
    path = cache_path()
    entry = _read(path).get(name)
    if entry is not None:
      _memory[name] = entry['chunk_size'], entry['token_chunk_size']
      return _memory[name]
    timer = timer or (lambda *a: measure(loss_fn, *a))
    best, seconds = tune(reduction, n, d, k, dtype, timer)
    _memory[name] = best
    on_disk = _read(path, warn=False)  # another process may have added entries meanwhile
    on_disk[name] = {'chunk_size': best[0], 'token_chunk_size': best[1],  # timed: for audits
                     'timed': {f'{c}x{b}': t for (c, b), t in seconds.items()}}
    _write(path, on_disk)
    return best
