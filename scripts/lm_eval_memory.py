r"""Peak host memory of a language model's evaluation pass against the vocabulary size K.

  python scripts/lm_eval_memory.py                            # K in {10k, 50k, 200k}, three heads
  python scripts/lm_eval_memory.py --K=2000,8000 --tokens=2000  # a smoke run

For each (head, K) a fresh subprocess builds the LM task on a synthetic corpus of K word ids
(Zipf-like), places an untrained state on the device and runs the trainer's evaluation of the
validation split (`LanguageModelTask.evaluate`, the pass training and the final evaluation use).
A sampler thread reads the process's resident memory every 2 ms; the table reports the peak
during the first pass (compilation included) minus the resident memory just before it (the
parameters, including the `[d, K]` output layer, are already resident then), and the compiled
evaluation step's temporary buffers (`memory_analysis().temp_size_in_bytes`). On CPU the device's buffers are host memory too, so
the figure counts everything the pass allocates. Heads: 'dense' (`log_prob` of the whole
vocabulary per window, then reduced), 'dense fused' and 'sampled' (evaluation statistics one
vocabulary chunk at a time, `heads/_eval.py`).
"""

import json
import os
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

flags.DEFINE_list('K', ['10000', '50000', '200000'], 'Vocabulary sizes.')
flags.DEFINE_list('heads', ['dense', 'dense fused', 'sampled'], 'Heads to measure.')
flags.DEFINE_integer('tokens', 20_000, 'Validation tokens evaluated.')
flags.DEFINE_integer('batch', 20, 'Evaluation batch rows.')
flags.DEFINE_integer('seq_len', 20, 'Window length T.')
flags.DEFINE_string('child', None, 'Internal: run one measurement, print JSON.')
FLAGS = flags.FLAGS

HEADS = {'dense': dict(name='dense'), 'dense fused': dict(name='dense', fused=True),
         'sampled': dict(name='sampled', num_sampled=64)}


def _rss() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def measure(head: str, k: int, tokens: int, batch: int, seq_len: int) -> dict:
  """One (head, K): {'before_mib', 'peak_delta_mib', 'eval_s'} of one validation pass."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from softmax_jax.data.text import lm_eval_batches  # pylint: disable=g-import-not-at-top
  from softmax_jax.data.text import TextDataset  # pylint: disable=g-import-not-at-top
  from softmax_jax.train import base_config  # pylint: disable=g-import-not-at-top
  from softmax_jax.train.parallel import JitDriver  # pylint: disable=g-import-not-at-top
  from softmax_jax.train.state import make_optimizer  # pylint: disable=g-import-not-at-top
  from softmax_jax.train.task import build_task  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  draw = lambda n: np.minimum(rng.zipf(1.2, n) - 1, k - 1).astype(np.int32)
  train = np.concatenate([np.arange(k, dtype=np.int32), draw(4 * batch * seq_len + 1)])
  splits = {'train': train, 'validation': draw(tokens), 'test': draw(64)}
  counts = np.bincount(train, minlength=k).astype(np.int64)
  data = TextDataset(name='ptb', vocab=tuple(f'w{i}' for i in range(k)), counts=counts, splits=splits)
  c = base_config()
  c.data.name, c.data.seq_len = 'ptb', seq_len
  c.model = dict(name='lstm', embed_dim=32, hidden=32, num_layers=1, dropout=0.0)
  c.head = dict(HEADS[head])
  c.batch_size = c.eval_batch_size = batch
  c.num_devices = 1
  task = build_task(c, data)
  schedule, tx = make_optimizer(c.optimizer, c.num_steps)
  driver = JitDriver(task, tx, schedule, 1)
  state = driver.put_state(task.init_state(tx))
  batch0 = next(iter(lm_eval_batches(splits['validation'], batch, seq_len)))
  compiled = jax.jit(task._eval_step).lower(  # pylint: disable=protected-access
      driver.variables(state), task.model.initial_carry(batch), batch0).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  before, peak, stop = _rss(), [0], threading.Event()

  def sample():
    while not stop.is_set():
      peak[0] = max(peak[0], _rss())
      time.sleep(0.002)

  thread = threading.Thread(target=sample)
  thread.start()
  t0 = time.perf_counter()
  metrics = task.evaluate(driver, state, 'validation')
  seconds = time.perf_counter() - t0
  stop.set()
  thread.join()
  peak[0] = max(peak[0], _rss())
  return dict(head=head, K=k, before_mib=before / 2**20, peak_delta_mib=(peak[0] - before) / 2**20,
              temp_mib=temp / 2**20, eval_s=seconds, perplexity=metrics['validation/perplexity'])


def main(argv):
  del argv
  if FLAGS.child:
    head, k = FLAGS.child.rsplit(':', 1)
    print(json.dumps(measure(head, int(k), FLAGS.tokens, FLAGS.batch, FLAGS.seq_len)))
    return
  rows = []
  for head in FLAGS.heads:
    for k in FLAGS.K:
      out = subprocess.run([sys.executable, __file__, f'--child={head}:{k}', f'--tokens={FLAGS.tokens}',
                            f'--batch={FLAGS.batch}', f'--seq_len={FLAGS.seq_len}'],
                           capture_output=True, text=True, check=True)
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(rows[-1], flush=True)
  print(f'\n{FLAGS.tokens} validation tokens, batch {FLAGS.batch} x {FLAGS.seq_len}\n')
  print('| head | K | resident before (MiB) | evaluation peak over it (MiB) | eval step temp (MiB) | eval s |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['head']} | {r['K']:,} | {r['before_mib']:.0f} | {r['peak_delta_mib']:.1f} | "
          f"{r['temp_mib']:.1f} | {r['eval_s']:.1f} |")


if __name__ == '__main__':
  app.run(main)
