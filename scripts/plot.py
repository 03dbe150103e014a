r"""Plots a workdir's metrics.jsonl: training loss, gradient norms, learning rate, validation accuracy.

  python scripts/plot.py --workdir=workdirs/digits            # writes workdirs/digits/curves.png
"""

import json
import os

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

flags.DEFINE_string('workdir', None, 'A workdir written by scripts/train.py.', required=True)
flags.DEFINE_string('out', None, 'Output PNG (default: WORKDIR/curves.png).')


def _series(rows, key):
  pairs = [(r['step'], r[key]) for r in rows if key in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def main(argv):
  del argv
  with open(os.path.join(flags.FLAGS.workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  layer_keys = sorted({k for r in rows for k in r if k.startswith('train/grad_norm/')})
  fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
  axes[0].plot(*_series(rows, 'train/loss'), label='train loss')
  axes[0].plot(*_series(rows, 'validation/nll'), 'o-', label='validation NLL')
  axes[0].set_yscale('log')
  axes[1].plot(*_series(rows, 'train/grad_norm'), 'k', lw=2, label='global')
  for key in layer_keys:
    axes[1].plot(*_series(rows, key), lw=1, label=key[len('train/grad_norm/'):])
  axes[1].set_yscale('log')
  axes[2].plot(*_series(rows, 'train/learning_rate'))
  axes[3].plot(*_series(rows, 'validation/accuracy'), 'o-', label='validation')
  axes[3].plot(*_series(rows, 'test/accuracy'), 's', label='test (final)')
  for ax, title in zip(axes, ['loss', 'gradient norm (before clipping)', 'learning rate', 'accuracy']):
    ax.set_title(title)
    ax.set_xlabel('step')
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  out = flags.FLAGS.out or os.path.join(flags.FLAGS.workdir, 'curves.png')
  fig.savefig(out, dpi=110)
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
