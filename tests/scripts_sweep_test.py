"""scripts/sweep.py and softmax_jax/sweep.py: grid sweep, resume, stale trials, pruning, bad input.

The trials run in this process (`run_trial_in_process`: no interpreter start and JAX import per
trial) on digits with a 32-unit MLP and a few steps; one test runs the script end to end.
"""

import json
import os
import subprocess
import sys

import optuna
import pytest

from softmax_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'digits.py')
TINY = ['--config.num_steps=20', '--config.eval_every=10', '--config.log_every=10',
        '--config.checkpoint_every=10', '--config.model.hidden=(32,)', '--config.num_devices=1']


def _validation(workdir, metric='validation/accuracy'):
  """The trial's last logged value of `metric`, read independently of the sweep."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r[metric] for r in rows if metric in r][-1]


def _run(tmp, space, **kwargs):
  lines = []
  kwargs.setdefault('fixed', TINY)
  out = sweep.run_sweep(sweep_dir=str(tmp), config_spec=CONFIG, space=sweep.parse_space(space),
                        runner=sweep.run_trial_in_process, log=lines.append, **kwargs)
  return out, lines


def _study(tmp, sampler=None):
  return optuna.load_study(study_name='sweep', sampler=sampler, storage=optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(os.path.join(tmp, 'optuna.journal'))))


def test_grid_sweep_resumes_and_chooses_on_validation(tmp_path):
  # Seeds only: one compiled program (the test's compilation cache serves the other trials).
  space = 'seed=[0,1,2,3]'
  out, lines = _run(tmp_path, space, sampler='grid', num_trials=2)
  assert [r['state'] for r in out['rows']] == ['complete'] * 2
  assert sum(line.startswith('trial ') for line in lines) == 2
  finals = [os.path.join(tmp_path, f'trial_{n}', 'final_metrics.json') for n in (0, 1)]
  mtimes = [os.stat(f).st_mtime_ns for f in finals]
  # Killed while trial 2 ran: it stays RUNNING in the study, with its params and workdir.
  stale = _study(tmp_path, sweep.make_sampler('grid', sweep.parse_space(space), 0)).ask()
  stale.suggest_categorical('seed', [0, 1, 2, 3])
  stale.set_user_attr('workdir', os.path.join(tmp_path, 'trial_2'))
  out, lines = _run(tmp_path, space, sampler='grid')  # default: the whole grid
  assert 'Rerunning trials [2]' in lines[0]
  assert [os.stat(f).st_mtime_ns for f in finals] == mtimes  # finished trials were not rerun
  rows = out['rows']
  assert sorted(r['trial'] for r in rows) == [0, 1, 3, 4]  # 3 reran 2, 4 took the last point
  assert {r['trial']: os.path.basename(r['workdir']) for r in rows}[3] == 'trial_2'
  assert _study(tmp_path).trials[2].state == optuna.trial.TrialState.FAIL
  assert all(r['state'] == 'complete' and r['steps'] == 20 for r in rows)
  assert sorted(r['params']['seed'] for r in rows) == [0, 1, 2, 3]
  values = {r['trial']: _validation(r['workdir']) for r in rows}
  assert [r['value'] for r in rows] == pytest.approx(sorted(values.values(), reverse=True))
  best = max(values, key=values.get)
  with open(os.path.join(tmp_path, 'best.json')) as f:
    saved = json.load(f)
  assert saved['trial'] == out['trial'] == best
  assert saved['value'] == pytest.approx(values[best])
  with open(os.path.join(saved['workdir'], 'final_metrics.json')) as f:
    assert saved['test']['test/accuracy'] == pytest.approx(json.load(f)['test/accuracy'])
  assert f'--config.seed={saved["params"]["seed"]}' in saved['command']
  with open(os.path.join(tmp_path, 'results.md')) as f:
    md = f.read()
  assert md.count('| complete |') == 4 and f'Best: trial {best},' in md
  with pytest.raises(sweep.SweepError, match='another space'):  # another space: refused
    _run(tmp_path, 'seed=[0]', sampler='grid')


@pytest.mark.parametrize('space, kwargs, match', [
    ('', {}, 'empty'),
    ('optimizer.learnin_rate=[1e-3]', {}, "learnin_rate.*Did you mean 'learning_rate'"),
    ('head.no_such_option=[1]', {}, "no head takes 'no_such_option'"),
    ('optimizer.learning_rate=loguniform(1e-3)', {}, 'two numbers'),
    ('optimizer.learning_rate=normal(0,1)', {}, 'SPEC must be'),
    ('optimizer.learning_rate=loguniform(1e-4,1e-2)', {'sampler': 'grid'}, 'grid needs choice'),
    ('optimizer.learning_rate=[1e-3]', {'metric': 'test/accuracy'}, 'never on test'),
    ('optimizer.learning_rate=[1e-3]', {'metric': 'validation/thing'}, 'give --direction'),
])
def test_bad_input_is_named(tmp_path, space, kwargs, match):
  kwargs = {'sampler': 'random', 'num_trials': 1, **kwargs}
  with pytest.raises(sweep.SweepError, match=match):
    _run(tmp_path, space, **kwargs)
  assert not os.path.exists(os.path.join(tmp_path, 'trial_0'))


def test_metric_the_loop_does_not_log(tmp_path):
  with pytest.raises(sweep.SweepError, match=r"does not log it; it logs \[.*'validation/nll'"):
    _run(tmp_path, 'optimizer.learning_rate=[1e-3]', sampler='random', num_trials=1,
         metric='validation/bogus', direction='minimize')


def test_script_prunes_a_trial_with_sigterm(tmp_path):
  """scripts/sweep.py runs scripts/train.py as a subprocess; the median pruner stops it (SIGTERM:
  the trainer checkpoints the step it reached) against two good trials finished before."""
  space, fixed = 'optimizer.learning_rate=[1e-7]', ['--config.num_steps=5000', *TINY[1:]]
  _run(tmp_path, space, fixed=fixed, sampler='random', num_trials=0)  # the study, no trial
  done = os.path.join(tmp_path, 'done')
  os.makedirs(done)
  with open(os.path.join(done, 'final_metrics.json'), 'w') as f:
    json.dump({'test/accuracy': 0.9}, f)
  for value in (0.9, 0.95):
    _study(tmp_path).add_trial(optuna.trial.create_trial(
        params={'optimizer.learning_rate': 1e-7},
        distributions={'optimizer.learning_rate': optuna.distributions.CategoricalDistribution([1e-7])},
        value=value, intermediate_values={10: value}, user_attrs={'workdir': done, 'steps': 20}))
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'sweep.py'), f'--config={CONFIG}',
       f'--sweep_dir={tmp_path}', f'--space={space}', '--sampler=random', '--pruner=median',
       '--num_trials=3', *fixed], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'trial 3/3 #2 pruned: optimizer.learning_rate=1e-7' in result.stdout
  workdir = os.path.join(tmp_path, 'trial_2')
  steps = max(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())
  assert 10 <= steps < 5000  # stopped early, at a checkpoint
  assert not os.path.exists(os.path.join(workdir, 'final_metrics.json'))
  with open(os.path.join(workdir, 'train.log')) as f:
    assert 'SIGTERM' in f.read()
  assert '| 2 | pruned | 1e-07 |' in result.stdout
  with open(os.path.join(tmp_path, 'best.json')) as f:
    assert json.load(f)['value'] == pytest.approx(0.95)
