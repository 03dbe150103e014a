r"""Tunes any config of scripts/train.py with Optuna: a table of the trials and the best command.

  python scripts/sweep.py --config=configs/digits.py --sweep_dir=/tmp/sweep \
      --space='optimizer.learning_rate=[1e-3,3e-3];model.dropout=[0.0,0.2]' --sampler=grid
  python scripts/sweep.py --config=configs/ptb.py --sweep_dir=workdirs/ptb_sweep --num_trials=20 \
      --space='optimizer.learning_rate=loguniform(1e-4,1e-2);optimizer.clip_global_norm=[0.25,1.0]' \
      --sampler=tpe --pruner=median --config.num_steps=2000
  python scripts/sweep.py --config=configs/digits.py --sweep_dir=/tmp/sweep --space=@space.txt ...

--space: config overrides, `KEY=SPEC` items separated by ';' (or newlines in an @FILE; '#'
comments): loguniform(low,high), uniform(low,high), int(low,high) (both ends included),
choice(v1,v2,...) or [v1,v2,...] (values as --config.KEY takes them, e.g. head.name=[dense,adaptive]).
--sampler: grid (every key a choice; --num_trials defaults to the grid's size), random or tpe,
seeded by --seed. --pruner: none, median (MedianPruner after --n_startup_trials finished trials)
or asha (SuccessiveHalvingPruner), on the validation --metric the loop logs at each evaluation.
Any --config.KEY=VALUE flag is passed to every trial unchanged.

Each trial runs `scripts/train.py --config=... --workdir=<sweep_dir>/trial_<n> --config.KEY=VALUE...`
as a subprocess (--parallel of them at a time), its output in <workdir>/train.log; a pruned trial
is stopped with SIGTERM (the trainer checkpoints the step it reached). The study is kept in
<sweep_dir>/optuna.journal: rerun the same command (with a larger --num_trials to add trials) and
the sweep continues; finished trials stay, a trial that was running when the sweep was stopped is
rerun with the same parameters in its workdir and resumes from its checkpoint. A rerun with another
config, space, metric or sampler is refused.

Prints a line per trial and, at the end, a markdown table of every trial sorted by the validation
metric (also <sweep_dir>/results.md), the best config as a scripts/train.py command, and the best
trial's test metrics (reported only; never used for choosing); <sweep_dir>/best.json holds them.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from softmax_jax import sweep  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
_FIXED = []  # the --config.KEY=VALUE flags, taken out of argv before absl parses it


def define_flags() -> None:
  flags.DEFINE_string('config', os.path.join('configs', 'digits.py'),
                      'Config file[:ARG] of scripts/train.py.')
  flags.DEFINE_string('sweep_dir', None, 'Study, trial workdirs, results.md, best.json.', required=True)
  flags.DEFINE_string('space', None, 'Search space (see above), or @FILE.', required=True)
  flags.DEFINE_enum('sampler', 'tpe', list(sweep.SAMPLERS), 'Optuna sampler.')
  flags.DEFINE_enum('pruner', 'none', list(sweep.PRUNERS), 'Optuna pruner.')
  flags.DEFINE_integer('num_trials', None, 'Trials in all, earlier runs of this sweep included '
                       '(default: the grid size for --sampler=grid).')
  flags.DEFINE_integer('seed', 0, 'Seed of the sampler.')
  flags.DEFINE_string('metric', None, 'Validation metric to choose on (default: validation/accuracy, '
                      'or validation/perplexity for language models).')
  flags.DEFINE_enum('direction', None, ['maximize', 'minimize'], 'Default: from the metric name.')
  flags.DEFINE_integer('parallel', 1, 'Trials at a time.', lower_bound=1)
  flags.DEFINE_integer('n_startup_trials', 2, 'Median pruner: finished trials before it prunes.',
                       lower_bound=0)


def split_fixed(argv):
  """`(argv without its --config.KEY=VALUE flags, those flags)`."""
  kept, fixed = [], []
  for a in argv:
    (fixed if a.startswith(('--config.', '-config.')) else kept).append(a)
  bad = [a for a in fixed if '=' not in a]
  if bad:
    sys.exit(f'error: write {bad[0]}=VALUE (with "=").')
  return kept, ['--' + a.lstrip('-') for a in fixed]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    sweep.run_sweep(sweep_dir=FLAGS.sweep_dir, config_spec=FLAGS.config,
                    space=sweep.parse_space(FLAGS.space), fixed=_FIXED, sampler=FLAGS.sampler,
                    pruner=FLAGS.pruner, num_trials=FLAGS.num_trials, seed=FLAGS.seed,
                    metric=FLAGS.metric, direction=FLAGS.direction, parallel=FLAGS.parallel,
                    n_startup_trials=FLAGS.n_startup_trials)
  except sweep.SweepError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  sys.argv, _FIXED[:] = split_fixed(sys.argv)
  define_flags()
  app.run(main)
