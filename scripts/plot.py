r"""Plots a workdir's metrics.jsonl (training loss, gradient norms, learning rate, validation
accuracy, or perplexity for a language model), titled with the run's name, or the learned 2-D
features of several workdirs side by side.

  python scripts/plot.py --workdir=workdirs/digits            # writes workdirs/digits/curves.png
  python scripts/plot.py --features=workdirs/softmax,workdirs/arcface   # .../softmax/features.png

`--features` reads `WORKDIR/embeddings.npz` with arrays `embeddings` [n, 2] float, `labels` [n]
int and optionally `class_names` [C] str and `title` (0-d str). Top row: the points, one colour
per class; bottom row: their angles atan2(y, x) after L2 normalization, one histogram per class,
titled with the mean intra-class and minimum inter-center angles (softmax_jax.geometry).
"""

import json
import os
import sys

from absl import app
from absl import flags
import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from softmax_jax import geometry  # pylint: disable=g-import-not-at-top



def define_flags() -> None:
  """The script's flags; defined when run, so importing it (tests) defines nothing global."""
  flags.DEFINE_string('workdir', None, 'A workdir written by scripts/train.py (training curves).')
  flags.DEFINE_list('features', None, 'Comma-separated workdirs holding embeddings.npz with 2-D '
                    'features: one panel each.')
  flags.DEFINE_string('out', None, 'Output PNG (default: WORKDIR/curves.png, or features.png in '
                      'the first --features workdir).')


def _series(rows, key):
  pairs = [(r['step'], r[key]) for r in rows if key in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def run_name(workdir):
  """'NAME (head HEAD, model MODEL)': the workdir's basename and, from config.json, the names."""
  name = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      config = json.load(f)
    parts = [f'{k} {config[k]["name"]}' for k in ('head', 'model', 'data')
             if isinstance(config.get(k), dict) and config[k].get('name')]
    if parts:
      name += f' ({", ".join(parts)})'
  return name


def is_language_model(workdir, rows):
  """True when the rows hold perplexities or config.json names a corpus of data.text."""
  if any('validation/perplexity' in r or 'train/perplexity' in r for r in rows):
    return True
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    name = json.load(f).get('data', {}).get('name')
  from softmax_jax.data.text import LM_DATASETS  # pylint: disable=g-import-not-at-top
  return name in LM_DATASETS


def plot_curves(workdir, out=None):
  """Writes the training-curve figure of `workdir` to `out` (default WORKDIR/curves.png).

  Titled with `run_name`; the last panel is validation accuracy, or for a language model
  (`is_language_model`) validation perplexity on a log scale.
  """
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  layer_keys = sorted({k for r in rows for k in r if k.startswith('train/grad_norm/')})
  lm = is_language_model(workdir, rows)
  fig, axes = plt.subplots(1, 4, figsize=(18, 4.1))
  axes[0].plot(*_series(rows, 'train/loss'), label='train loss')
  axes[0].plot(*_series(rows, 'validation/nll'), 'o-', label='validation NLL')
  axes[0].set_yscale('log')
  axes[1].plot(*_series(rows, 'train/grad_norm'), 'k', lw=2, label='global')
  for key in layer_keys:
    axes[1].plot(*_series(rows, key), lw=1, label=key[len('train/grad_norm/'):])
  axes[1].set_yscale('log')
  axes[2].plot(*_series(rows, 'train/learning_rate'))
  last = 'perplexity' if lm else 'accuracy'
  axes[3].plot(*_series(rows, f'validation/{last}'), 'o-', label='validation')
  axes[3].plot(*_series(rows, f'test/{last}'), 's', label='test (final)')
  if lm:
    axes[3].set_yscale('log')
  for ax, title in zip(axes, ['loss', 'gradient norm (before clipping)', 'learning rate', last]):
    ax.set_title(title)
    ax.set_xlabel('step')
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.suptitle(run_name(workdir))
  fig.tight_layout()
  out = out or os.path.join(workdir, 'curves.png')
  fig.savefig(out, dpi=110)
  print(f'wrote {out}')


def load_features(workdir):
  """Reads WORKDIR/embeddings.npz -> (embeddings [n, 2] float64, labels [n] int, names, title)."""
  path = os.path.join(workdir, 'embeddings.npz')
  with np.load(path) as data:
    x, y = np.asarray(data['embeddings'], np.float64), np.asarray(data['labels'])
    names = [str(c) for c in data['class_names']] if 'class_names' in data else None
    title = str(data['title']) if 'title' in data else None
  if x.ndim != 2 or x.shape[1] != 2:
    raise ValueError(f'{path}: embeddings must be [n, 2] (2-D features), got shape {x.shape}.')
  if y.shape != x.shape[:1] or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
    raise ValueError(f'{path}: labels must be [n] = {x.shape[:1]} ints >= 0, got shape '
                     f'{y.shape} dtype {y.dtype}.')
  return x, y, names, title or os.path.basename(os.path.normpath(workdir))


def _angle_summary(x, y):
  present = np.unique(y)  # angles of the classes present, relabelled 0..C'-1
  try:
    stats = geometry.angular_statistics(x, np.searchsorted(present, y))
  except ValueError:  # e.g. no points, or NaN features
    return 'angles atan2(y, x)'
  return (f"intra {stats['mean_intra_angle']:.1f}\N{DEGREE SIGN}, "
          f"min inter-center {stats['min_inter_center_angle']:.1f}\N{DEGREE SIGN}")


def plot_features(workdirs, out=None):
  """Writes the 2-D feature figure of `workdirs` (one column each) to `out`."""
  panels = [load_features(w) for w in workdirs]
  num_classes = max(int(y.max()) + 1 if y.size else 0 for _, y, _, _ in panels)
  names = [f'class {c}' for c in range(num_classes)]
  for _, _, panel_names, _ in reversed(panels):  # the first workdir's names win
    if panel_names:
      names[:len(panel_names)] = panel_names[:num_classes]
  cmap = plt.get_cmap('tab10')
  colour = lambda c: cmap(c % 10)
  fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels) + 1.2, 7.2),
                           squeeze=False, layout='constrained',
                           gridspec_kw={'height_ratios': [3, 2]})
  bins = np.linspace(-180, 180, 73)  # 5 degrees each
  for (x, y, _, title), top, bottom in zip(panels, axes[0], axes[1]):
    angles = np.degrees(np.arctan2(x[:, 1], x[:, 0]))
    for c in np.unique(y):
      top.scatter(x[y == c, 0], x[y == c, 1], s=3, alpha=0.5, color=colour(c), linewidths=0)
      bottom.hist(angles[y == c], bins=bins, color=colour(c), alpha=0.55, histtype='stepfilled')
    top.axhline(0, color='0.8', lw=0.5, zorder=0)
    top.axvline(0, color='0.8', lw=0.5, zorder=0)
    top.set_aspect('equal', adjustable='datalim')
    top.set_title(title)
    bottom.set_xlim(-180, 180)
    bottom.set_xticks(range(-180, 181, 90))
    bottom.set_xlabel('angle (degrees)')
    bottom.set_ylabel('count')
    bottom.set_title(_angle_summary(x, y), fontsize=9)
  handles = [plt.Line2D([], [], ls='', marker='o', color=colour(c)) for c in range(num_classes)]
  fig.legend(handles, names, loc='outside right upper', ncol=max(1, (num_classes + 24) // 25),
             fontsize=8, frameon=False)
  out = out or os.path.join(workdirs[0], 'features.png')
  fig.savefig(out, dpi=110, bbox_inches='tight')
  print(f'wrote {out}')


def main(argv):
  del argv
  workdir, features = flags.FLAGS.workdir, [w for w in flags.FLAGS.features or [] if w]
  if bool(workdir) == bool(features):
    raise app.UsageError('Pass exactly one of --workdir (training curves) or --features '
                         f'(2-D embeddings), got --workdir={workdir!r} --features={features!r}.')
  if features:
    plot_features(features, flags.FLAGS.out)
  else:
    plot_curves(workdir, flags.FLAGS.out)


if __name__ == '__main__':
  define_flags()
  app.run(main)
