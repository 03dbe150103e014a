r"""Embedding geometry and open-set verification of trained runs; writes what scripts/plot.py draws.

  python scripts/geometry.py --workdir=workdirs/margins/arcface_open
  python scripts/geometry.py --workdir=workdirs/margins/softmax_open,workdirs/margins/arcface_open

For each workdir (its latest checkpoint) it embeds the test split with the backbone and reports
  - angles (degrees) of unit embeddings: mean intra-class angle to the class centre, minimum and
    mean angle between class centres;
  - closed-set verification on test pairs of the trained classes (LFW protocol, 10 folds);
  - open-set verification when the run was trained on `data.classes`: every pair of test images of
    the held-out classes is scored by cosine; accuracy (10-fold threshold) and TAR at FAR=--far.
It writes WORKDIR/geometry.json and WORKDIR/embeddings.npz (and, for 2-D features, their scatter plot
to the run's TensorBoard as images/features), and prints a markdown table row per
workdir.
"""

import json
import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np
import tensorboardX

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from softmax_jax import data  # pylint: disable=g-import-not-at-top
from softmax_jax import geometry  # pylint: disable=g-import-not-at-top
from softmax_jax.train import load_trained  # pylint: disable=g-import-not-at-top
from softmax_jax.train import writer  # pylint: disable=g-import-not-at-top
from softmax_jax.train.loop import quiet_libraries  # pylint: disable=g-import-not-at-top

flags.DEFINE_list('workdir', None, 'Workdirs of scripts/train.py (comma-separated).', required=True)
flags.DEFINE_integer('max_pairs', 2_000_000, 'Pairs sampled for closed-set verification.')
flags.DEFINE_float('far', 1e-2, 'False accept rate at which TAR is reported.')
flags.DEFINE_integer('batch_size', 1000, 'Embedding batch size.')


def embed(model, variables, dataset, images: np.ndarray, batch_size: int) -> np.ndarray:
  """Backbone features `[n, d]` float32 of uint8 `images` normalized with `dataset`'s statistics.

  `variables` is `load_trained`'s: {'params', ...} with any mutable collections (batch_stats).
  """
  fn = jax.jit(lambda v, x: model.apply(v, x, method='features'))
  out = [np.asarray(fn(variables, dataset.normalize(images[i:i + batch_size])))
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out).astype(np.float32)


def verification(emb, labels, *, max_pairs, far):
  scores, same = geometry.pair_scores(emb, labels, max_pairs=max_pairs, seed=0)
  acc = geometry.verification_accuracy(scores, same, num_folds=10, seed=0)
  tar, threshold = geometry.tar_at_far(scores, same, far=far)
  return {'accuracy': acc['mean'], 'accuracy_std': acc['std'], 'tar': tar, 'threshold': threshold,
          'far': far, 'pairs': int(len(scores)), 'positive_pairs': int(same.sum())}


def analyse(workdir: str):
  """Computes and writes geometry.json and embeddings.npz of one workdir; returns the dict."""
  config, dataset, model, variables = load_trained(workdir)
  head = config.head.to_dict()
  title = head.get('kind', 'softmax') if head['name'] == 'margin' else 'softmax'
  if head.get('margin') is not None:
    title += f" m={head['margin']:g}"
  test = dataset.splits['test']
  emb = embed(model, variables, dataset, test.images, flags.FLAGS.batch_size)
  result = {'title': title, 'embedding_dim': int(emb.shape[1]),
            'angles': geometry.angular_statistics(emb, test.labels, dataset.num_classes),
            'closed_set': verification(emb, test.labels, max_pairs=flags.FLAGS.max_pairs,
                                       far=flags.FLAGS.far)}
  final = os.path.join(workdir, 'final_metrics.json')
  if os.path.exists(final):
    with open(final) as f:
      result['test_accuracy'] = json.load(f)['test/accuracy']
  arrays = dict(embeddings=emb, labels=test.labels, title=np.array(title),
                class_names=np.array(dataset.class_names or [str(k) for k in range(dataset.num_classes)]))
  classes = config.data.get('classes')
  if classes:
    full = data.load_dataset(dict(config.data.to_dict(), classes=None))
    held = sorted(set(range(full.num_classes)) - {int(c) for c in classes})
    keep = np.isin(full.splits['test'].labels, held)
    held_emb = embed(model, variables, dataset, full.splits['test'].images[keep], flags.FLAGS.batch_size)
    held_labels = full.splits['test'].labels[keep]
    result['held_out_classes'] = held
    result['open_set'] = verification(held_emb, held_labels, max_pairs=None, far=flags.FLAGS.far)
    arrays.update(heldout_embeddings=held_emb, heldout_labels=held_labels)
  with open(os.path.join(workdir, 'geometry.json'), 'w') as f:
    json.dump(result, f, indent=2)
  np.savez_compressed(os.path.join(workdir, 'embeddings.npz'), **arrays)
  if emb.shape[1] == 2:  # the learned features beside the run's curves in TensorBoard
    with tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard')) as tb:
      tb.add_image('images/features', writer.features_image(emb, test.labels), config.num_steps,
                   dataformats='HWC')
  return result


def table_row(workdir: str, r) -> str:
  a, c, o = r['angles'], r['closed_set'], r.get('open_set')
  cells = [r['title'], os.path.basename(workdir), str(r['embedding_dim']),
           f"{100 * r.get('test_accuracy', float('nan')):.2f}", f"{a['mean_intra_angle']:.1f}",
           f"{a['min_inter_center_angle']:.1f}", f"{100 * c['accuracy']:.2f}", f"{100 * c['tar']:.2f}"]
  if o:
    cells += [f"{100 * o['accuracy']:.2f} ± {100 * o['accuracy_std']:.2f}", f"{100 * o['tar']:.2f}"]
  else:
    cells += ['-', '-']
  return '| ' + ' | '.join(cells) + ' |'


def main(argv):
  del argv
  quiet_libraries()  # orbax logs ~20 INFO lines per checkpoint it reads
  rows = [table_row(w, analyse(w)) for w in flags.FLAGS.workdir]
  far = flags.FLAGS.far
  print('| head | workdir | dim | test acc % | intra angle ° | min centre angle ° | '
        f'closed-set verif. % | closed-set TAR@FAR={far:g} % | open-set verif. % | '
        f'open-set TAR@FAR={far:g} % |')
  print('|' + '---|' * 10)
  print('\n'.join(rows))


if __name__ == '__main__':
  app.run(main)
