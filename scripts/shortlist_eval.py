r"""Shortlist (index-table) decoding of a trained LM: recall of the true next token and perplexity vs S.

  python scripts/shortlist_eval.py --workdir=workdirs/ptb/dense --sizes=100,1000,2000,5000
  python scripts/shortlist_eval.py --workdir=/tmp/ptb_dense --split=test --successors=100

Two kinds of table:
  frequent S          one table for every position: the S most frequent train words (ids 0..S-1:
                      the vocabulary is sorted by train count), read through
                      `DenseSoftmax.shortlist_log_prob` (only the S shortlisted columns of the
                      output layer are read);
  frequent S + succ   per position: those S words and the `--successors` most frequent train
                      successors of the current input word (a bigram index table; repeats are
                      padding), so S + successors entries at most; restricted on the host from the
                      full log-probabilities in float64 (the same distribution: the normalizer
                      cancels; a per-position table would gather [S, d] columns per token).
For each, over the split (state carried, as the trainer evaluates): recall (the fraction of
next tokens in the table), the perplexity of the restricted model on the covered tokens, and the
full model's perplexity on the same tokens (the restriction can only raise each covered token's
probability); plus the full model's perplexity on all tokens. Prints a markdown table and writes
shortlist.json and shortlist.png (recall and perplexity against S) to `--out` (default: the workdir).
"""

import json
import math
import os
import sys

from absl import app
from absl import flags
import jax
import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from softmax_jax.data.text import lm_eval_batches  # pylint: disable=g-import-not-at-top
from softmax_jax.train import load_trained  # pylint: disable=g-import-not-at-top


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A language-model workdir with a DenseSoftmax head.', required=True)
  flags.DEFINE_string('split', 'test', 'Split to evaluate.')
  flags.DEFINE_list('sizes', ['100', '500', '1000', '2000', '5000'], 'Shortlist sizes S.')
  flags.DEFINE_integer('successors', 100, 'Per-word successor table width (0: frequent tables only).')
  flags.DEFINE_string('out', None, 'Output folder (default: the workdir).')


def successor_table(stream: np.ndarray, num_classes: int, width: int) -> np.ndarray:
  """`[K, width]` int32: for each word, its `width` most frequent train successors (ties by id;
  rows padded with the most frequent words overall, which a union with a frequent table drops)."""
  pairs = stream[:-1].astype(np.int64) * num_classes + stream[1:]
  uniq, counts = np.unique(pairs, return_counts=True)
  prev, nxt = uniq // num_classes, uniq % num_classes
  order = np.lexsort((nxt, -counts, prev))  # by word, then count descending, then id
  prev, nxt = prev[order], nxt[order]
  table = np.tile(np.arange(width, dtype=np.int32), (num_classes, 1))
  starts = np.searchsorted(prev, np.arange(num_classes))
  ends = np.searchsorted(prev, np.arange(num_classes), side='right')
  for w in np.nonzero(ends > starts)[0]:
    succ = nxt[starts[w]:min(ends[w], starts[w] + width)]
    rest = np.setdiff1d(np.arange(2 * width), succ)[:width - len(succ)]  # distinct fillers
    table[w] = np.concatenate([succ, rest]).astype(np.int32)
  return table


def evaluate(workdir: str, *, split: str, sizes, successors: int):
  """Rows {table, S, entries, recall, ppl_restricted, ppl_full_same_tokens} and the full ppl."""
  config, dataset, model, variables = load_trained(workdir)
  if config.head.name != 'dense':
    raise ValueError(f'{workdir}: head {config.head.name!r}; shortlist decoding needs the dense head.')
  k, b, t = dataset.num_classes, config.eval_batch_size, config.data.seq_len
  table = successor_table(dataset.splits['train'], k, successors) if successors else None
  sizes = [int(s) for s in sizes if int(s) < k]
  full_fn = jax.jit(lambda v, x, c: model.apply(v, x, c, method='log_prob'))
  short_fn = jax.jit(lambda v, x, c, ids, keep: model.apply(v, x, c, ids, where=keep,
                                                           method='shortlist_log_prob'))
  tables = [('frequent', s) for s in sizes] + ([('frequent+succ', s) for s in sizes] if successors else [])
  acc = {key: dict(covered=0, nll=0.0, nll_full=0.0) for key in tables}
  carry, total, nll_all = model.initial_carry(b), 0, 0.0
  for batch in lm_eval_batches(dataset.splits[split], b, t):
    x, y, m = batch['inputs'], batch['targets'], batch['mask']
    log_p, new_carry = full_fn(variables, x, carry)
    label_lp = np.take_along_axis(np.asarray(log_p), y[..., None], -1)[..., 0]
    nll_all += -label_lp[m].sum()
    total += int(m.sum())
    for kind, s in tables:
      ids = np.arange(s, dtype=np.int32)
      if kind == 'frequent':
        lp = np.asarray(short_fn(variables, x, carry, ids, None)[0])
        pos = np.where(y < s, y, 0)
        hit = (y < s) & m
      else:  # the same restriction, from the full log-probabilities (exact: the normalizer cancels)
        succ = table[x]  # [B, T, width]
        ids = np.concatenate([np.broadcast_to(ids, (*x.shape, s)), succ], -1)
        keep = np.concatenate([np.ones((*x.shape, s), bool), succ >= s], -1)
        sub = np.where(keep, np.take_along_axis(np.asarray(log_p, np.float64), ids, -1), -np.inf)
        top = sub.max(-1, keepdims=True)
        lp = sub - top - np.log(np.exp(sub - top).sum(-1, keepdims=True))
        match = (ids == y[..., None]) & keep
        hit = match.any(-1) & m
        pos = match.argmax(-1)
      a = acc[(kind, s)]
      a['covered'] += int(hit.sum())
      a['nll'] += -np.take_along_axis(lp, pos[..., None], -1)[..., 0][hit].sum()
      a['nll_full'] += -label_lp[hit].sum()
    carry = new_carry
  rows = []
  for (kind, s), a in acc.items():
    n = max(a['covered'], 1)
    rows.append(dict(table=kind, S=s, entries=s + (successors if kind != 'frequent' else 0),
                     recall=a['covered'] / total, ppl_restricted=math.exp(a['nll'] / n),
                     ppl_full_same_tokens=math.exp(a['nll_full'] / n)))
  return rows, math.exp(nll_all / total), total


def table_md(rows, full_ppl: float, tokens: int) -> str:
  lines = [f'full softmax over all {tokens} tokens: perplexity {full_ppl:.2f}', '',
           '| table | S | entries | recall | ppl restricted (covered) | ppl full (same tokens) |',
           '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['table']} | {r['S']} | {r['entries']} | {r['recall']:.4f} | "
                 f"{r['ppl_restricted']:.2f} | {r['ppl_full_same_tokens']:.2f} |")
  return '\n'.join(lines)


def plot(rows, path: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for i, kind in enumerate(dict.fromkeys(r['table'] for r in rows)):
    sel = [r for r in rows if r['table'] == kind]
    axes[0].plot([r['S'] for r in sel], [r['recall'] for r in sel], 'o-', color=f'C{i}', label=kind)
    axes[1].plot([r['S'] for r in sel], [r['ppl_restricted'] for r in sel], 'o-', color=f'C{i}',
                 label=f'{kind}: restricted')
    axes[1].plot([r['S'] for r in sel], [r['ppl_full_same_tokens'] for r in sel], 'o--',
                 color=f'C{i}', alpha=0.5, label=f'{kind}: full, same tokens')
  axes[0].set(xscale='log', xlabel='S (frequent words in the table)', ylabel='recall of the next token')
  axes[1].set(xscale='log', xlabel='S', ylabel='perplexity on covered tokens')
  for ax in axes:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  rows, full_ppl, tokens = evaluate(f.workdir, split=f.split, sizes=f.sizes, successors=f.successors)
  out = f.out or f.workdir
  os.makedirs(out, exist_ok=True)
  print(table_md(rows, full_ppl, tokens))
  with open(os.path.join(out, 'shortlist.json'), 'w') as fh:
    json.dump(dict(rows=rows, full_ppl=full_ppl, tokens=tokens, split=f.split), fh, indent=1)
  plot(rows, os.path.join(out, 'shortlist.png'))
  print(f'wrote {out}/shortlist.json and shortlist.png')


if __name__ == '__main__':
  define_flags()
  app.run(main)
