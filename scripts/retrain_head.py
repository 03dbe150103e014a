r"""Classifier re-training (cRT, Kang 2020) of a trained classifier run: a new head on frozen features.

  python scripts/retrain_head.py --workdir=workdirs/lt/ce_0 --sampling=class --seed=0
  python scripts/retrain_head.py --workdir=workdirs/lt/ce_0 --sampling=smote --k_neighbors=5

Loads the run (`train.load_trained`), computes its backbone's features of the real training
examples (synthetic ones of an input-space SMOTE run left out), balances them with `--sampling`
('instance': as they are; 'class': random oversampling with replacement; 'smote': SMOTE in
feature space; `softmax_jax.retrain.balance_features`), trains a fresh head of the run's config on
them (`retrain.retrain_head`: Adam, cosine decay, plain cross-entropy) and prints the original
head's and the new head's metrics on validation and test (balanced accuracy, many / medium / few
accuracy, NLL, ECE). Writes them to `<out>/retrain_<sampling>_<seed>.json` (`--out` defaults to
the workdir). `--steps` and `--learning_rate` are to be chosen on the validation split.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from softmax_jax import retrain  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
COLUMNS = ('balanced_accuracy', 'many_accuracy', 'medium_accuracy', 'few_accuracy', 'nll', 'ece')


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A trained classifier run of scripts/train.py.', required=True)
  flags.DEFINE_enum('sampling', 'class', list(retrain.SAMPLINGS), 'How the features are balanced.')
  flags.DEFINE_integer('seed', 0, 'Seed of the balancing and of the new head (init and batches).')
  flags.DEFINE_integer('steps', 3000, 'Optimizer steps of the new head (3000 and lr 1e-3: chosen on '
                       'the validation split of Fashion-MNIST-LT CE seed 0, WORKSPACE.md).')
  flags.DEFINE_float('learning_rate', 1e-3, 'Peak Adam learning rate (cosine decay to 0).')
  flags.DEFINE_integer('batch_size', 512, 'Training batch size of the new head.')
  flags.DEFINE_integer('k_neighbors', 5, "SMOTE's k (--sampling=smote).")
  flags.DEFINE_integer('eval_batch_size', 512, 'Batch size of feature extraction and evaluation.')
  flags.DEFINE_string('out', None, 'Output folder (default: --workdir).')


def _cell(value):
  return '-' if value is None else f'{value:.4f}'


def main(argv):
  del argv
  if not os.path.isdir(FLAGS.workdir):
    raise app.UsageError(f'--workdir: {FLAGS.workdir!r} does not exist.')
  from softmax_jax.train import load_trained  # pylint: disable=g-import-not-at-top (heavy)
  config, dataset, model, variables = load_trained(FLAGS.workdir)
  if hasattr(dataset, 'vocab'):
    raise app.UsageError(f'--workdir: {FLAGS.workdir!r} is a language model; cRT takes classifiers.')
  b = FLAGS.eval_batch_size
  train = dataset.splits['train']
  n_real = len(train) - int(getattr(dataset, 'num_synthetic', 0))  # an input-space SMOTE run's
  counts = dataset.class_counts if config.data.imbalance_ratio > 1 else None
  start = time.perf_counter()
  feats = retrain.features(model, variables, dataset.normalize(train.images[:n_real]), batch_size=b)
  x, y = retrain.balance_features(feats, train.labels[:n_real], sampling=FLAGS.sampling,
                                  seed=FLAGS.seed, k_neighbors=FLAGS.k_neighbors)
  new = retrain.retrain_head(model, variables, x, y, steps=FLAGS.steps, batch_size=FLAGS.batch_size,
                             learning_rate=FLAGS.learning_rate, seed=FLAGS.seed)
  seconds = time.perf_counter() - start
  rows = {}
  for name, v in (('original', variables), (f'cRT {FLAGS.sampling}', new)):
    for split in ('validation', 'test'):
      rows[(name, split)] = retrain.evaluate(model, v, dataset, split, batch_size=b, class_counts=counts)

  print(f'{FLAGS.workdir}: {n_real} real training features [{feats.shape[1]}] -> {len(y)} '
        f'({FLAGS.sampling}), {FLAGS.steps} steps at lr {FLAGS.learning_rate:g}, {seconds:.1f} s')
  print('| head | split | ' + ' | '.join(COLUMNS) + ' |')
  print('|---|---|' + '---|' * len(COLUMNS))
  for (name, split), m in rows.items():
    print(f'| {name} | {split} | ' + ' | '.join(_cell(m.get(c)) for c in COLUMNS) + ' |')
  out = FLAGS.out or FLAGS.workdir
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, f'retrain_{FLAGS.sampling}_{FLAGS.seed}.json')
  result = {'workdir': FLAGS.workdir, 'sampling': FLAGS.sampling, 'seed': FLAGS.seed,
            'steps': FLAGS.steps, 'learning_rate': FLAGS.learning_rate,
            'batch_size': FLAGS.batch_size, 'k_neighbors': FLAGS.k_neighbors,
            'train_real': int(n_real), 'train_balanced': int(len(y)),
            'class_counts': None if counts is None else np.asarray(counts).tolist(),
            'seconds': seconds,
            'original': {s: rows[('original', s)] for s in ('validation', 'test')},
            'retrained': {s: rows[(f'cRT {FLAGS.sampling}', s)] for s in ('validation', 'test')}}
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'Wrote {path}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
