r"""A cheap-first cascade of trained classifiers: accuracy against cost, threshold set on validation.

  python scripts/cascade.py --workdirs=workdirs/fmnist_mlp,workdirs/fmnist_cnn
  python scripts/cascade.py --workdirs=a,b --confidence=margin --target=0.92
  python scripts/cascade.py --workdirs=a,b --budget=0.5

`--workdirs` lists runs of scripts/train.py on the same data, cheapest first (`softmax_jax.cascade`).
The threshold on the first stages' confidence is chosen on the validation split: by default the
cheapest point whose accuracy reaches the last stage's own validation accuracy (`--target` sets
another accuracy); `--budget` instead takes the most accurate point costing at most that fraction
of the last stage's cost. Costs are per example: FLOPs from XLA's cost analysis, or measured
seconds (`--cost=flops|seconds` picks the one the threshold is chosen on).

Prints each stage alone (accuracy, seconds and FLOPs per example) and the cascade at the chosen
threshold on test (accuracy, the fraction each stage answered, mean cost relative to the last
stage, and the wall time of actually running it: the first stage on every test example, the
next on the ones it passed on); writes cascade.json and cascade.png (test accuracy against
relative cost over thresholds, the chosen point marked) to `--out` (default: the last workdir).
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
from softmax_jax import cascade  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list('workdirs', None, 'Trained classifier runs, cheapest first (at least 2).', required=True)
  flags.DEFINE_enum('confidence', 'max_prob', list(cascade.CONFIDENCES), 'What a stage is sure by.')
  flags.DEFINE_float('target', None, 'Validation accuracy to reach (default: the last stage\'s).')
  flags.DEFINE_float('budget', None, 'Instead of --target: the most accurate point at this '
                     'fraction of the last stage\'s cost.')
  flags.DEFINE_enum('cost', 'flops', ['flops', 'seconds'], 'The cost the threshold is chosen on.')
  flags.DEFINE_integer('batch_size', 512, 'Evaluation and timing batch size.')
  flags.DEFINE_integer('repeats', 5, 'Timing: best of this many passes.')
  flags.DEFINE_string('out', None, 'Output folder (default: the last workdir).')


def _wall_seconds(stages, chosen, test_stats, split, batch_size, repeats):
  """Measured seconds to run the cascade on `split` (stage 1 on all, stage i on what reaches it),
  and the last stage alone on all of it: best of `repeats`, after one warm-up pass each."""
  datasets = [s.dataset for s in stages]
  images = [d.normalize(d.splits[split].images) for d in datasets]
  answered_by = cascade.evaluate(test_stats, [0.0] * len(stages), chosen['threshold'],
                                 confidence=FLAGS.confidence)['answered_by']

  def run(i, rows):
    for start in range(0, len(rows), batch_size):
      idx = rows[start:start + batch_size]
      x = images[i][idx]
      if len(idx) < batch_size:  # one compiled shape: pad the last batch
        x = np.concatenate([x, np.zeros((batch_size - len(idx), *x.shape[1:]), x.dtype)])
      jax.block_until_ready(stages[i].stats_fn(stages[i].variables, x))

  everyone = np.arange(len(answered_by))
  reaching = [everyone[answered_by >= i] for i in range(len(stages))]

  def best(fn):
    fn()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return min(times)

  cascade_s = best(lambda: [run(i, rows) for i, rows in enumerate(reaching) if len(rows)])
  last_s = best(lambda: run(len(stages) - 1, everyone))
  return cascade_s, last_s


def main(argv):
  del argv
  if len(FLAGS.workdirs) < 2:
    raise app.UsageError(f'--workdirs needs at least 2 runs, cheapest first; got {FLAGS.workdirs}.')
  if FLAGS.target is not None and FLAGS.budget is not None:
    raise app.UsageError('Give --target or --budget, not both.')
  if FLAGS.target is not None and not 0 < FLAGS.target <= 1:
    raise app.UsageError(f'--target is an accuracy in (0, 1]; got {FLAGS.target}.')
  if FLAGS.budget is not None and not FLAGS.budget > 0:
    raise app.UsageError(f'--budget is a fraction > 0 of the last stage\'s cost; got {FLAGS.budget}.')
  for w in FLAGS.workdirs:
    if not os.path.isdir(w):
      raise app.UsageError(f'--workdirs: {w!r} does not exist.')
  stages = [cascade.Stage(w) for w in FLAGS.workdirs]
  b = FLAGS.batch_size
  val = [s.statistics('validation', b) for s in stages]
  test = [s.statistics('test', b) for s in stages]
  cascade.check_same_examples(val, FLAGS.workdirs, 'validation')
  cascade.check_same_examples(test, FLAGS.workdirs, 'test')
  costs = [s.cost(b, FLAGS.repeats) for s in stages]
  unit = [c[FLAGS.cost] for c in costs]
  rel = [u / unit[-1] for u in unit]  # relative to the last stage
  val_points = cascade.curve(val, rel, confidence=FLAGS.confidence)
  last_val_acc = float(np.mean(val[-1]['prediction'] == val[-1]['label']))
  if FLAGS.budget is not None:
    chosen = cascade.choose_threshold(val_points, budget=FLAGS.budget)
    rule = f'the most accurate point on validation at <= {FLAGS.budget:.2f} of the last stage\'s {FLAGS.cost}'
  else:
    target = last_val_acc if FLAGS.target is None else FLAGS.target
    chosen = cascade.choose_threshold(val_points, target_accuracy=target)
    rule = f'the cheapest point on validation with accuracy >= {target:.4f}'
  at = cascade.evaluate(test, rel, chosen['threshold'], confidence=FLAGS.confidence)
  cascade_s, last_s = _wall_seconds(stages, chosen, test, 'test', b, FLAGS.repeats)

  print(f'| stage | workdir | test accuracy | us / example | MFLOPs / example | answered (cascade) |')
  print('|---|---|---|---|---|---|')
  for i, (s, st, c) in enumerate(zip(stages, test, costs)):
    acc = np.mean(st['prediction'] == st['label'])
    print(f'| {i + 1} | {s.workdir} | {acc:.4f} | {c["seconds"] * 1e6:.2f} | {c["flops"] / 1e6:.3f} | '
          f'{at["fractions"][i]:.3f} |')
  print(f'\nThreshold {chosen["threshold"]:.4g} on {FLAGS.confidence} ({rule}).')
  print(f'Cascade on test: accuracy {at["accuracy"]:.4f} at {at["cost"]:.3f} of the last stage\'s '
        f'{FLAGS.cost}; measured wall time {cascade_s:.3f} s vs {last_s:.3f} s for the last stage '
        f'alone ({cascade_s / last_s:.3f}).')

  test_points = cascade.curve(test, rel, confidence=FLAGS.confidence)
  out = FLAGS.out or FLAGS.workdirs[-1]
  os.makedirs(out, exist_ok=True)
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.plot([p['cost'] for p in test_points], [p['accuracy'] for p in test_points], '-', lw=1.2,
          label=f'cascade over thresholds ({FLAGS.confidence})')
  for i, (st, r) in enumerate(zip(test, rel)):
    ax.plot(r, np.mean(st['prediction'] == st['label']), 's', label=f'stage {i + 1} alone')
  ax.plot(at['cost'], at['accuracy'], 'r*', ms=12, label='threshold chosen on validation')
  ax.set_xlabel(f'mean {FLAGS.cost} per example, relative to the last stage')
  ax.set_ylabel('test accuracy')
  ax.set_title(' -> '.join(os.path.basename(os.path.normpath(w)) for w in FLAGS.workdirs)
               + ' (test split)', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'cascade.png'), dpi=120)
  result = {'workdirs': FLAGS.workdirs, 'confidence': FLAGS.confidence, 'cost': FLAGS.cost,
            'stage_costs': costs, 'threshold': chosen['threshold'], 'rule': rule,
            'validation_point': chosen, 'test_accuracy': at['accuracy'], 'test_relative_cost': at['cost'],
            'test_fractions': at['fractions'].tolist(), 'wall_seconds': cascade_s,
            'last_stage_wall_seconds': last_s,
            'stage_test_accuracy': [float(np.mean(t['prediction'] == t['label'])) for t in test],
            'test_curve': test_points}
  with open(os.path.join(out, 'cascade.json'), 'w') as f:
    json.dump(result, f, indent=2)
  print(f'Wrote {os.path.join(out, "cascade.json")} and cascade.png')


if __name__ == '__main__':
  define_flags()
  app.run(main)
