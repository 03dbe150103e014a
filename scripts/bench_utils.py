"""Timing and memory helpers shared by the benchmark suites (no flags: the callers pass them)."""

import os
import platform
import re
import statistics
import time

import jax

MiB = 2**20


def load() -> float:
  """The 1-minute load average."""
  with open('/proc/loadavg') as f:
    return float(f.read().split()[0])


def wait_quiet(max_load: float, wait_s: int) -> float:
  """On CPU, waits (up to `wait_s`) for a 1-minute load below `max_load` (0: never waits).

  Returns the load when timing starts.
  """
  waited = 0
  while jax.default_backend() == 'cpu' and max_load and load() >= max_load and waited < wait_s:
    print(f'load {load():.2f} >= {max_load}: waiting 60 s', flush=True)
    time.sleep(60)
    waited += 60
  return load()


def compile_fn(fn, *args):
  """`(compiled, temp bytes, argument + output bytes)` of `jax.jit(fn)` for `args` (pytrees)."""
  spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
  compiled = jax.jit(fn).lower(*spec).compile()
  mem = compiled.memory_analysis()
  return compiled, mem.temp_size_in_bytes, mem.argument_size_in_bytes + mem.output_size_in_bytes


def time_fn(compiled, args, repeats: int):
  """`(median seconds over `repeats` runs after one warm-up, the warm-up's output)`."""
  out = jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def machine() -> dict:
  """CPU model, vector extensions (AVX2 / AVX-512 / AMX / ...) and cores, for every table."""
  model, flags = platform.processor() or 'unknown', set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        name, _, value = line.partition(':')
        if name.strip() == 'model name' and model in ('unknown', platform.processor()):
          model = value.strip()
        elif name.strip() == 'flags' and not flags:
          flags = set(value.split())
  except OSError:
    pass
  ext = [e for e in ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_tile')
         if e in flags]
  isa = re.findall(r'--xla_cpu_max_isa=(\S+)', os.environ.get('XLA_FLAGS', ''))
  return dict(cpu_model=model, vector_extensions=ext, cores=os.cpu_count(),
              xla_max_isa=isa[-1].upper() if isa else None, load_1min=load())


def describe_machine() -> str:
  """One line for a table's caption: 'CPU: <model>, <extensions>, <cores> cores, load <l>'."""
  m = machine()
  ext = ', '.join(m['vector_extensions']) or 'no AVX2'
  wide = 'AVX-512' if 'avx512f' in m['vector_extensions'] else 'no AVX-512'
  if m['xla_max_isa']:
    wide += f"; XLA code limited to {m['xla_max_isa']} by --xla_cpu_max_isa"
  return (f"CPU: {m['cpu_model']} ({ext}; {wide}), {m['cores']} cores, "
          f"1-min load {m['load_1min']:.2f}")
