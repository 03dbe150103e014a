r"""Softmax-bottleneck diagnostics of a trained run (softmax_jax.diagnostics): a table, the spectra.

  python scripts/diagnose.py --workdir=/tmp/digits
  python scripts/diagnose.py --workdir=workdirs/ptb/dense --max_contexts=2000 --out=/tmp/ptb_diag

For the run's latest checkpoint (`train.load_trained`) it takes up to `--max_contexts` contexts of
`--split` (images for a classifier; next-token positions for a language model, the split read in
order with the state carried, then sampled), computes their final features and the head's
log-probabilities on the device in batches of `--batch_size`, and reports, in float64 on the host:
  - the rank of the row-centred log-probability matrix [N, K] with its tolerance (default
    `S.max() * max(N, K) * eps(float32)`; `--rtol` for `S.max() * rtol`), the bound d + 1 of a
    softmax over d features with a bias, a few normalized singular values, the index i of the
    largest drop s_i / s_{i+1} (d + 1 for a softmax, also where the tolerance rule, a worst-case
    bound, is too coarse to count every direction) and the effective rank;
  - the output layer's rank and effective rank, for heads with one `[d, K]` class matrix;
  - the anisotropy (mean pairwise cosine) of the features;
  - the classes that can never be the argmax of `h @ W + b` (features anywhere, or in the box
    `--bound`; the observed feature range is printed), for heads whose log-probabilities are a
    softmax of one linear layer of the features (dense, imbalanced, sampled; margin heads with
    their unit class vectors).
Limits: the log-probability matrix is N x K float64 on the host: N * K of a few times 1e7 is fine
(2000 x 10000: 160 MB, an SVD of ~20 s on one core); above `--max_classes` a random subset of the
classes is used (a subset of columns keeps the softmax bound d + 1).
It writes spectra.png and diagnostics.json to `--out` (default: the workdir).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from softmax_jax import diagnostics  # pylint: disable=g-import-not-at-top
from softmax_jax.data.text import lm_eval_batches  # pylint: disable=g-import-not-at-top
from softmax_jax.train import load_trained  # pylint: disable=g-import-not-at-top
from softmax_jax.train.task import task_name  # pylint: disable=g-import-not-at-top



def define_flags() -> None:
  """The command line's flags (defined only when run as a script, so tests can import it)."""
  flags.DEFINE_string('workdir', None, 'A workdir of scripts/train.py.', required=True)
  flags.DEFINE_string('split', 'validation', 'Split whose contexts are used.')
  flags.DEFINE_integer('max_contexts', 2000, 'Contexts N (rows of the log-probability matrix).')
  flags.DEFINE_integer('max_classes', 10000, 'Classes K used for the rank (a random subset above).')
  flags.DEFINE_integer('batch_size', 256, 'Contexts per device call.')
  flags.DEFINE_float('rtol', None, 'Relative rank tolerance S.max() * rtol (default: numpy\'s rule '
                     'with float32 eps).')
  flags.DEFINE_list('bound', None, 'Where features can be, for the unargmaxable check: b (the box '
                    '|h_i| <= b) or low,high with none for an open side (0,none after a ReLU); '
                    'default all of R^d.')
  flags.DEFINE_enum('unargmaxable', 'auto', ['auto', 'exact', 'fast', 'none'],
                    'Method of diagnostics.unargmaxable_classes, or none to skip; auto settles '
                    "fast's candidates by linear programs when there are at most --max_lp.")
  flags.DEFINE_integer('max_lp', 200, 'Most linear programs (one per class, K constraints) that '
                       'auto runs; past it the fast candidates are reported as an upper bound.')
  flags.DEFINE_integer('seed', 0, 'Seed of the context and class subsets.')
  flags.DEFINE_string('out', None, 'Output folder (default: the workdir).')


def _head_log_prob(module, features):
  return module.head.log_prob(features)


def classifier_contexts(config, dataset, model, variables, split, max_contexts, batch_size, seed):
  """Features `[N, d]` of up to N images of `split` (a random subset of a larger split)."""
  del config
  images = dataset.splits[split].images
  if len(images) > max_contexts:
    pick = np.random.default_rng(seed).choice(len(images), max_contexts, replace=False)
    images = images[np.sort(pick)]
  fn = jax.jit(lambda v, x: model.apply(v, x, method='features'))
  feats = [np.asarray(fn(variables, dataset.normalize(images[i:i + batch_size])))
           for i in range(0, len(images), batch_size)]
  return np.concatenate(feats)


def lm_contexts(config, dataset, model, variables, split, max_contexts, batch_size, seed):
  """Features `[N, d]` of N next-token positions of `split`, read in order with the carry.

  The split is read window by window (rows of `config.eval_batch_size`, the state carried) until
  4 N positions are seen or it ends; N of them are drawn at random.
  """
  del batch_size
  b = config.eval_batch_size
  fn = jax.jit(lambda v, x, c: model.apply(v, x, c, method='features'))
  carry, feats, seen = model.initial_carry(b), [], 0
  for batch in lm_eval_batches(dataset.splits[split], b, config.data.seq_len):
    f, carry = fn(variables, batch['inputs'], carry)
    f = np.asarray(f)[batch['mask']]
    feats.append(f)
    seen += len(f)
    if seen >= 4 * max_contexts:
      break
  feats = np.concatenate(feats)
  if len(feats) > max_contexts:
    pick = np.random.default_rng(seed).choice(len(feats), max_contexts, replace=False)
    feats = feats[np.sort(pick)]
  return feats


def output_layer(config, params, num_classes: int, d: int):
  """`(kernel [d', K] or None, bias [K] or None, linear: bool)` of the run's head.

  `linear`: the head's log-probabilities are `log_softmax(h @ kernel + bias)` of the features h (up
  to a positive per-row scale, for cosine heads), so unargmaxable classes are those of the kernel.
  """
  head_cfg = config.head.to_dict()
  name = head_cfg['name']
  p = {k: np.asarray(v, np.float64) for k, v in params.get('head', {}).items()
       if hasattr(v, 'shape')}
  kernel = p.get('kernel')
  bias = p.get('bias')
  if kernel is None and p.get('embedding') is not None and p['embedding'].shape[0] == num_classes:
    kernel = p['embedding'].T  # SampledSoftmax keeps class rows [K, d]
  if kernel is None or kernel.ndim != 2 or kernel.shape[1] != num_classes:
    return None, None, False
  cosine = name == 'margin' or (name == 'imbalanced' and head_cfg.get('loss') == 'ldam')
  if cosine:
    kernel, bias = kernel / np.maximum(np.linalg.norm(kernel, axis=0, keepdims=True), 1e-300), None
  linear = name in ('dense', 'imbalanced', 'sampled', 'margin') and kernel.shape[0] == d
  return kernel, (bias if bias is not None and bias.shape == (num_classes,) else None), linear


def analyse(workdir: str, *, split: str, max_contexts: int, max_classes: int, batch_size: int,
            rtol=None, bound=None, method: str = 'auto', max_lp: int = 200, seed: int = 0):
  """Every diagnostic of one workdir as a JSON-able dict (spectra as lists)."""
  config, dataset, model, variables = load_trained(workdir)
  kind = task_name(config)
  if split not in dataset.splits:
    raise ValueError(f'split={split!r} is not a split of {config.data.name!r}: '
                     f'{sorted(dataset.splits)}.')
  contexts = lm_contexts if kind == 'language_model' else classifier_contexts
  feats = contexts(config, dataset, model, variables, split, max_contexts, batch_size, seed)
  n, d = feats.shape
  k = dataset.num_classes
  cols = (np.sort(np.random.default_rng(seed + 1).choice(k, max_classes, replace=False))
          if k > max_classes else None)
  head_fn = jax.jit(lambda v, f: model.apply(v, f, method=_head_log_prob))
  lp = []
  for i in range(0, n, batch_size):
    x = np.asarray(head_fn(variables, feats[i:i + batch_size]))
    lp.append(x if cols is None else x[:, cols])
  lp = np.concatenate(lp)
  t0 = time.perf_counter()
  rank = diagnostics.log_prob_rank(lp, rtol=rtol)
  out = {'workdir': workdir, 'task': kind, 'head': config.head.to_dict()['name'], 'split': split,
         'contexts': n, 'num_classes': k, 'classes_used': int(lp.shape[1]), 'feature_dim': d,
         'rank': rank['rank'], 'softmax_bound': d + 1, 'tolerance': rank['tolerance'],
         'tolerance_rule': rank['rule'], 'effective_rank': rank['effective_rank'],
         'gap_index': rank['gap_index'],
         'singular_values': rank['singular_values'].tolist(),
         'anisotropy': diagnostics.anisotropy(feats)}
  kernel, bias, linear = output_layer(config, variables['params'], k, d)
  if kernel is not None:
    w = diagnostics.output_layer_spectrum(kernel.astype(np.float32), rtol=rtol)
    out.update(kernel_rank=w['rank'], kernel_effective_rank=w['effective_rank'],
               kernel_singular_values=w['singular_values'].tolist())
  if linear and method != 'none':
    kw = dict(bound=bound, features=feats)
    first = 'fast' if method == 'auto' else method
    ids = diagnostics.unargmaxable_classes(kernel, bias, method=first, **kw)
    exact = method == 'exact' or (method == 'auto' and len(ids) <= max_lp)
    if method == 'auto' and exact and len(ids):
      ids = diagnostics.unargmaxable_classes(kernel, bias, method='exact', classes=ids, **kw)
    # exact: the unargmaxable classes; otherwise candidates, a superset of them.
    out.update(unargmaxable=ids.tolist(), unargmaxable_exact=exact, bound=bound)
  out['feature_range'] = [float(feats.min()), float(feats.max())]
  out['host_seconds'] = time.perf_counter() - t0
  return out


def draw(result, path: str) -> None:
  """spectra.png: normalized singular values of the log-prob matrix and of the output layer."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  s = np.asarray(result['singular_values'])
  ax = axes[0]
  ax.semilogy(np.arange(1, len(s) + 1), s / s[0], '.-', ms=3)
  ax.axhline(result['tolerance'] / s[0], color='r', ls='--', lw=1, label='rank tolerance')
  if result['softmax_bound'] < len(s):
    ax.axvline(result['softmax_bound'], color='k', ls=':', lw=1, label='softmax bound d + 1')
  ax.set_title(f"log-probs [{result['contexts']} x {result['classes_used']}], row-centred: "
               f"rank {result['rank']}")
  ax.set_xlabel('index')
  ax.set_ylabel('s_i / s_1')
  ax.legend(fontsize=8)
  ax = axes[1]
  if 'kernel_singular_values' in result:
    w = np.asarray(result['kernel_singular_values'])
    ax.semilogy(np.arange(1, len(w) + 1), w / w[0], '.-', ms=3)
    ax.set_title(f"output layer: rank {result['kernel_rank']}, "
                 f"effective rank {result['kernel_effective_rank']:.1f}")
  else:
    ax.set_title('no [d, K] output layer')
  ax.set_xlabel('index')
  fig.suptitle(f"{result['workdir']} ({result['head']} head, "
               f"anisotropy {result['anisotropy']:.3f})",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def table(r) -> str:
  """A markdown table of one result."""
  s = np.asarray(r['singular_values']) / r['singular_values'][0]
  b = r['softmax_bound']
  at = lambda i: f'{s[i - 1]:.2e}' if i <= len(s) else '-'
  un = r.get('unargmaxable')
  un_cell = 'n/a' if un is None else (('' if r['unargmaxable_exact'] else '<= ') + f"{len(un)}"
                                      + (f" {un[:10]}" if un else ''))
  cells = [os.path.basename(os.path.normpath(r['workdir'])), r['head'], str(r['contexts']),
           f"{r['classes_used']}/{r['num_classes']}", str(r['feature_dim']), str(r['rank']), str(b),
           str(min(r['contexts'], r['classes_used'] - 1)),
           f"{r['tolerance']:.2e}", f"{r['singular_values'][0]:.3g}", at(b), at(b + 1),
           str(r['gap_index']), f"{r['effective_rank']:.1f}",
           (f"{r['kernel_rank']} / {r['kernel_effective_rank']:.1f}" if 'kernel_rank' in r
            else 'n/a'),
           f"{r['anisotropy']:.3f}", un_cell]
  head = ['run', 'head', 'N', 'K used', 'd', 'rank', 'd+1', 'min(N, K-1)', 'tol', 's_1',
          's_{d+1}/s_1',
          's_{d+2}/s_1', 'largest gap', 'eff. rank', 'W rank / eff.', 'anisotropy', 'unargmaxable']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head),
           '| ' + ' | '.join(cells) + ' |']
  top = ', '.join(f'{v:.3g}' for v in s[:10])
  lines.append(f"\nrank tolerance: {r['tolerance_rule']}; s_i / s_1 for i = 1..10: {top}")
  checked = f"; unargmaxable over {_box_words(r['bound'])}" if 'unargmaxable' in r else ''
  lines.append(f"features in [{r['feature_range'][0]:.3g}, {r['feature_range'][1]:.3g}]{checked}")
  return '\n'.join(lines)


def _box_words(bound) -> str:
  if bound is None:
    return 'all of R^d'
  if np.ndim(bound) == 0:
    return f'|h_i| <= {bound:g}'
  lo, hi = ('-inf' if bound[0] is None else bound[0]), ('inf' if bound[1] is None else bound[1])
  return f'{lo} <= h_i <= {hi}'


def parse_bound(values):
  """`--bound` as `diagnostics.unargmaxable_classes` takes it: None, b, or (low, high)."""
  if not values:
    return None
  try:
    parsed = [None if v.strip().lower() == 'none' else float(v) for v in values]
  except ValueError:
    raise app.UsageError(f'--bound takes b or low,high (none for an open side), got {values}.')
  if len(parsed) == 1 and parsed[0] is not None:
    return parsed[0]
  if len(parsed) == 2:
    return tuple(parsed)
  raise app.UsageError(f'--bound takes b or low,high (none for an open side), got {values}.')


def main(argv):
  del argv
  f = flags.FLAGS
  for key, low in (('max_contexts', 1), ('max_classes', 1), ('batch_size', 1), ('max_lp', 0)):
    if getattr(f, key) < low:
      raise app.UsageError(f'--{key} must be >= {low}, got {getattr(f, key)}.')
  result = analyse(f.workdir, split=f.split, max_contexts=f.max_contexts, max_classes=f.max_classes,
                   batch_size=f.batch_size, rtol=f.rtol, bound=parse_bound(f.bound),
                   method=f.unargmaxable, max_lp=f.max_lp, seed=f.seed)
  out = f.out or f.workdir
  os.makedirs(out, exist_ok=True)
  draw(result, os.path.join(out, 'spectra.png'))
  with open(os.path.join(out, 'diagnostics.json'), 'w') as fh:
    json.dump(result, fh, indent=1)
  print(table(result))
  print(f"wrote {os.path.join(out, 'spectra.png')} and {os.path.join(out, 'diagnostics.json')}")


if __name__ == '__main__':
  define_flags()
  app.run(main)
