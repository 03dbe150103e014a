"""Hyper-parameter sweeps over `scripts/train.py` configs through Optuna (`scripts/sweep.py`).

A search space is a set of config overrides, one `KEY=SPEC` per item, items separated by ';' or
newlines (`parse_space`):

  optimizer.learning_rate=loguniform(1e-4,1e-1)   # float, log scale (low, high)
  optimizer.clip_global_norm=uniform(0.25,2.0)     # float, linear scale
  head.div_value=int(2,8)                          # int in [low, high]
  head.name=choice(dense,adaptive)                 # one of the values (any --config text)
  optimizer.clip_global_norm=[0.25,1.0]            # the same as choice(0.25,1.0)

Optuna samples (grid, random, TPE) and prunes (median, successive halving); every trial runs
`scripts/train.py` in its own workdir `<sweep_dir>/trial_<n>` (`run_trial_subprocess`, or
`run_trial_in_process` for tests), reporting the validation metric the loop logs to
`metrics.jsonl` at each evaluation; a pruned trial is stopped with SIGTERM (the trainer
checkpoints the step it reached and exits). The study lives in `<sweep_dir>/optuna.journal`, so
a rerun continues: finished trials are kept, and a trial that was running when the sweep was
killed is rerun with the same parameters in the same workdir (the trainer resumes from its
checkpoints). Choice is on validation only; test metrics are read for the best trial alone.
"""

import ast
import datetime
import fcntl
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import optuna

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TRAIN_PY = os.path.join(_REPO, 'scripts', 'train.py')
SAMPLERS = ('grid', 'random', 'tpe')
PRUNERS = ('none', 'median', 'asha')
_MAXIMIZE = ('accuracy', 'f1', 'auc', 'precision', 'recall')
_MINIMIZE = ('nll', 'perplexity', 'loss', 'ece', 'error')


class SweepError(ValueError):
  """A bad search space, metric or sweep folder; the message says what and how to fix it."""


class Param(NamedTuple):
  """One dimension: `kind` in ('loguniform', 'uniform', 'int', 'choice'); `values` the bounds
  (floats or ints) or, for 'choice', the values as --config text."""
  key: str
  kind: str
  values: Tuple


def _split(text: str, seps: str) -> List[str]:
  """`text` split at `seps` outside (), [] and quotes."""
  parts, depth, quote, cur = [], 0, None, ''
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([':
      depth += 1
    elif ch in ')]':
      depth -= 1
    elif ch in seps and depth == 0:
      parts.append(cur)
      cur = ''
      continue
    cur += ch
  parts.append(cur)
  return [p.strip() for p in parts if p.strip()]


def parse_space(text: str) -> List[Param]:
  """The search space of `text` (syntax in the module docstring); '@FILE' reads it from FILE.

  Args:
    text: items `KEY=SPEC` separated by ';' or newlines; '#' starts a comment.

  Returns:
    The `Param`s in the order given.

  Raises:
    SweepError: an empty space, a repeated key, an unknown SPEC or bad bounds, naming the item.
  """
  if text.startswith('@'):
    with open(text[1:]) as f:
      text = f.read()
  text = '\n'.join(line.split('#', 1)[0] for line in text.splitlines())
  params = []
  for item in _split(text, ';\n'):
    key, eq, spec = item.partition('=')
    key, spec = key.strip().removeprefix('--').removeprefix('config.'), spec.strip()
    if not eq or not key or not spec:
      raise SweepError(f'Search space item {item!r}: expected KEY=SPEC, e.g. '
                       'optimizer.learning_rate=loguniform(1e-4,1e-1).')
    if any(p.key == key for p in params):
      raise SweepError(f'Search space: {key!r} appears twice.')
    if spec.startswith('[') and spec.endswith(']'):
      kind, args = 'choice', spec[1:-1]
    else:
      kind, paren, args = spec.partition('(')
      kind = kind.strip()
      if not paren or not args.endswith(')') or kind not in ('loguniform', 'uniform', 'int', 'choice'):
        raise SweepError(f'Search space item {item!r}: SPEC must be loguniform(a,b), uniform(a,b), '
                         'int(a,b), choice(v1,v2,...) or [v1,v2,...].')
      args = args[:-1]
    values = tuple(_split(args, ','))
    if kind == 'choice':
      if not values:
        raise SweepError(f'Search space item {item!r}: choice() needs at least one value.')
      params.append(Param(key, kind, values))
      continue
    try:
      bounds = tuple((int if kind == 'int' else float)(ast.literal_eval(v)) for v in values)
    except (ValueError, SyntaxError):
      bounds = ()
    if len(bounds) != 2 or not bounds[0] < bounds[1] or (kind == 'loguniform' and bounds[0] <= 0):
      raise SweepError(f'Search space item {item!r}: {kind} needs two numbers low < high'
                       f'{" with low > 0" if kind == "loguniform" else ""}.')
    params.append(Param(key, kind, bounds))
  if not params:
    raise SweepError('The search space is empty: give --space=KEY=SPEC[;KEY=SPEC...], e.g. '
                     "--space='optimizer.learning_rate=loguniform(1e-4,1e-1)'.")
  return params


def _choice_value(text: str):
  """The Optuna value of a choice: the literal if a scalar Optuna stores, else the text."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return value if isinstance(value, (int, float, str, bool)) else text


def suggest(trial: optuna.Trial, space: Sequence[Param]) -> Dict[str, str]:
  """Draws `space` in `trial`; returns {key: --config text}."""
  out = {}
  for p in space:
    if p.kind == 'choice':
      choices = {_choice_value(v): v for v in p.values}
      out[p.key] = choices[trial.suggest_categorical(p.key, list(choices))]
    elif p.kind == 'int':
      out[p.key] = str(trial.suggest_int(p.key, *p.values))
    else:
      out[p.key] = repr(trial.suggest_float(p.key, *p.values, log=p.kind == 'loguniform'))
  return out


def check_space(config_spec: str, fixed: Sequence[str], space: Sequence[Param]) -> None:
  """Raises SweepError unless every key of `space` exists in the config (or, under model./head.,
  is an option of some backbone or head) and the fixed `--config.*` overrides are valid."""
  # pylint: disable=g-import-not-at-top  (jax-heavy; the sweep's parsing stays light)
  import dataclasses
  from softmax_jax.heads import HEADS
  from softmax_jax.models import BACKBONES, LM_BACKBONES
  from softmax_jax.train.config import check_key_path, check_override_args, load_config_file
  try:
    check_override_args(['train.py', f'--config={config_spec}', *fixed], config_spec)
    config = load_config_file(config_spec)
  except ValueError as e:
    raise SweepError(str(e)) from e
  for p in space:
    section, _, rest = p.key.partition('.')
    if section in ('model', 'head') and rest:
      registry = HEADS if section == 'head' else {**BACKBONES, **LM_BACKBONES}
      fields = {f.name for cls in registry.values() for f in dataclasses.fields(cls)} - {'parent'}
      if rest not in fields:
        raise SweepError(f'Unknown config key {p.key!r} in the search space: no {section} takes '
                         f'{rest!r}.')
      continue
    try:
      check_key_path(config, p.key)
    except ValueError as e:
      raise SweepError(f'In the search space: {e}') from e


def default_metric(config_spec: str) -> str:
  """'validation/perplexity' for a language-model config, else 'validation/accuracy'."""
  from softmax_jax.data.text import LM_DATASETS  # pylint: disable=g-import-not-at-top
  from softmax_jax.train.config import load_config_file  # pylint: disable=g-import-not-at-top
  lm = load_config_file(config_spec).data.name in LM_DATASETS
  return 'validation/perplexity' if lm else 'validation/accuracy'


def direction_of(metric: str, direction: Optional[str] = None) -> str:
  """'maximize' or 'minimize' for `metric` (from its name unless `direction` is given).

  Raises:
    SweepError: a metric that is not a validation one (choice is never made on test), or one
      whose direction the name does not tell and `direction` is None.
  """
  if not metric.startswith('validation/'):
    raise SweepError(f'--metric={metric}: trials are compared on a validation metric the loop '
                     'logs (validation/accuracy, validation/nll, validation/perplexity, ...), never '
                     'on test or train metrics.')
  if direction:
    return direction
  name = metric.split('/', 1)[1]
  if name.endswith(_MAXIMIZE):
    return 'maximize'
  if name.endswith(_MINIMIZE):
    return 'minimize'
  raise SweepError(f'--metric={metric}: give --direction=maximize|minimize.')


class _GridSampler(optuna.samplers.GridSampler):
  """GridSampler that also takes a trial rerun by `requeue_stale` (an enqueued trial, without a
  grid id: optuna 5.0's `after_trial` raises KeyError on one when one grid point is left)."""

  def after_trial(self, study, trial, state, values) -> None:
    if 'grid_id' in study._storage.get_trial_system_attrs(trial._trial_id):  # pylint: disable=protected-access
      super().after_trial(study, trial, state, values)
    elif not self._get_unvisited_grid_ids(study):
      study.stop()


def make_sampler(name: str, space: Sequence[Param], seed: int) -> optuna.samplers.BaseSampler:
  """Optuna's GridSampler ('grid': every key a choice), RandomSampler or TPESampler, seeded."""
  if name == 'grid':
    bad = [p.key for p in space if p.kind != 'choice']
    if bad:
      raise SweepError(f'--sampler=grid needs choice(...) or [...] for every key; not for {bad}.')
    return _GridSampler({p.key: [_choice_value(v) for v in p.values] for p in space}, seed=seed)
  if name == 'random':
    return optuna.samplers.RandomSampler(seed=seed)
  if name == 'tpe':
    return optuna.samplers.TPESampler(seed=seed)
  raise SweepError(f'--sampler={name}: choose one of {SAMPLERS}.')


def make_pruner(name: str, *, n_startup_trials: int = 2) -> optuna.pruners.BasePruner:
  """'none', 'median' (MedianPruner after `n_startup_trials`) or 'asha' (SuccessiveHalvingPruner)."""
  if name == 'none':
    return optuna.pruners.NopPruner()
  if name == 'median':
    return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials)
  if name == 'asha':
    return optuna.pruners.SuccessiveHalvingPruner()
  raise SweepError(f'--pruner={name}: choose one of {PRUNERS}.')


# A trial runner: (config_spec, overrides ['--config.k=v', ...], workdir, should_stop) -> exit
# status (0: trained to the end); it calls `should_stop()` while training and, when that returns
# True, stops the run with SIGTERM (the trainer checkpoints and exits with 128 + 15).
Runner = Callable[[str, Sequence[str], str, Callable[[], bool]], int]


def _die_with_parent() -> None:  # Linux: a trial gets SIGTERM when the sweep process dies
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def run_trial_subprocess(config_spec: str, overrides: Sequence[str], workdir: str,
                         should_stop: Callable[[], bool], *, poll_s: float = 0.5) -> int:
  """Runs `python scripts/train.py` for one trial; its output goes to `workdir/train.log`."""
  os.makedirs(workdir, exist_ok=True)
  command = [sys.executable, _TRAIN_PY, f'--config={config_spec}', f'--workdir={workdir}', *overrides]
  with open(os.path.join(workdir, 'train.log'), 'a') as log:
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=_REPO,
                            preexec_fn=_die_with_parent)
    try:
      while proc.poll() is None:
        if should_stop():
          proc.terminate()
          return proc.wait()
        time.sleep(poll_s)
      should_stop()  # the final row
      return proc.returncode
    except BaseException:  # the sweep was interrupted: let the trial checkpoint, then stop
      if proc.poll() is None:
        proc.terminate()
        proc.wait()
      raise


def run_trial_in_process(config_spec: str, overrides: Sequence[str], workdir: str,
                         should_stop: Callable[[], bool], *, poll_s: float = 0.05) -> int:
  """Runs `train_and_evaluate` in this process (main thread only: the trainer's SIGTERM handler
  stops it), for tests: no interpreter start and JAX import per trial."""
  # pylint: disable=g-import-not-at-top
  from softmax_jax.train import TrainingInterrupted, train_and_evaluate
  from softmax_jax.train.config import load_config_file, override_free_form, split_overrides
  config = load_config_file(config_spec)
  kept, free = split_overrides(['train.py', *overrides])
  with config.unlocked():
    for arg in kept[1:]:
      key, _, text = arg[len('--config.'):].partition('=')
      node, *path = key.split('.')[::-1]
      parent = config
      for k in reversed(path):
        parent = parent[k]
      default = parent[node]
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = text
      parent[node] = float(value) if isinstance(default, float) and isinstance(value, int) else value
  override_free_form(config, free)
  running, lock = [True], threading.Lock()
  previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a late SIGTERM is harmless

  def watch():
    while running[0]:
      if should_stop():
        with lock:
          if running[0]:
            os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(poll_s)

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  try:
    train_and_evaluate(config, workdir)
    status = 0
  except TrainingInterrupted as e:
    status = 128 + e.signum
  finally:
    with lock:
      running[0] = False
    watcher.join()
    signal.signal(signal.SIGTERM, previous)
  if status == 0:
    should_stop()  # the final row
  return status


def _steps_reached(workdir: str) -> Optional[int]:
  """The newest checkpoint's step in `workdir` (the step a stopped run reached), or None."""
  try:
    return max((int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()),
               default=None)
  except FileNotFoundError:
    return None


def open_study(sweep_dir: str, *, setup: Dict[str, object], sampler, pruner) -> optuna.Study:
  """The study of `sweep_dir` (created, or loaded from `optuna.journal`); `setup` (config, fixed
  overrides, space, metric, direction, sampler) is stored with it, and a rerun with another
  `setup` is refused: its trials would not be comparable.

  Raises:
    SweepError: `setup` differs from the stored one, naming the keys.
  """
  os.makedirs(sweep_dir, exist_ok=True)
  storage = optuna.storages.JournalStorage(
      optuna.storages.journal.JournalFileBackend(os.path.join(sweep_dir, 'optuna.journal')))
  study = optuna.create_study(study_name='sweep', storage=storage, sampler=sampler, pruner=pruner,
                              direction=setup['direction'], load_if_exists=True)
  stored = study.user_attrs.get('setup')
  if stored is None:
    study.set_user_attr('setup', setup)
  elif stored != setup:
    diff = sorted(k for k in set(stored) | set(setup) if stored.get(k) != setup.get(k))
    raise SweepError(f'{sweep_dir} holds a sweep with another {", ".join(diff)} '
                     f'({ {k: stored.get(k) for k in diff} }); use a new --sweep_dir.')
  return study


def requeue_stale(study: optuna.Study) -> List[int]:
  """Trials left RUNNING by a killed sweep (marked FAIL here) or interrupted (Ctrl-C, SIGTERM)
  are enqueued again with their parameters and workdir, once; returns their numbers."""
  trials = study.get_trials(deepcopy=False)
  resumed = {t.user_attrs.get('resumes') for t in trials}
  out = []
  for t in trials:
    stale = t.state == optuna.trial.TrialState.RUNNING
    if stale:
      study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)  # pylint: disable=protected-access
    if ((stale or t.user_attrs.get('interrupted')) and t.number not in resumed
        and 'workdir' in t.user_attrs):
      study.enqueue_trial(t.params, user_attrs={'workdir': t.user_attrs['workdir'], 'resumes': t.number})
      out.append(t.number)
  return out


def counted(study: optuna.Study) -> int:
  """Finished trials that count towards --num_trials (not those rerun by `requeue_stale`)."""
  trials = study.get_trials(deepcopy=False)
  resumed = {t.user_attrs.get('resumes') for t in trials}
  return sum(t.state.is_finished() and t.number not in resumed and not t.user_attrs.get('interrupted')
             for t in trials)


def make_objective(*, sweep_dir: str, config_spec: str, fixed: Sequence[str], space: Sequence[Param],
                   metric: str, runner: Runner):
  """The Optuna objective: one training run, reported at each evaluation, pruned by SIGTERM."""

  def objective(trial: optuna.Trial) -> float:
    values = suggest(trial, space)
    workdir = trial.user_attrs.get('workdir') or os.path.join(sweep_dir, f'trial_{trial.number}')
    trial.set_user_attr('workdir', workdir)
    overrides = [f'--config.{k}={v}' for k, v in values.items()]
    seen, stopped, error = [0], [False], []

    def should_stop() -> bool:
      try:
        with open(os.path.join(workdir, 'metrics.jsonl')) as f:
          rows = [json.loads(line) for line in f if line.strip()]
      except (FileNotFoundError, ValueError):  # not yet written; a line cut short
        return False
      evals = [r for r in rows if any(k.startswith('validation/') for k in r)]
      for row in evals[seen[0]:]:
        if row.get(metric, math.nan) is None:  # diverged: logged as null
          continue
        if metric not in row:
          error.append(SweepError(
              f'--metric={metric}: the loop does not log it; it logs '
              f'{sorted(k for k in row if k.startswith("validation/"))}.'))
          stopped[0] = True
          return True
        trial.report(float(row[metric]), int(row['step']))
        if trial.should_prune():  # after each report: pruners compare at that step
          stopped[0] = True
          break
      seen[0] = len(evals)
      return stopped[0]

    try:
      status = runner(config_spec, [*fixed, *overrides], workdir, should_stop)
    except KeyboardInterrupt:
      trial.set_user_attr('interrupted', True)
      raise
    except Exception as e:  # pylint: disable=broad-except  (the trial fails, the sweep goes on)
      trial.set_user_attr('error', f'{type(e).__name__}: {e}'[:500])
      return math.nan
    finally:
      trial.set_user_attr('steps', _steps_reached(workdir))
    if error:
      raise error[0]
    if stopped[0]:
      raise optuna.TrialPruned()
    if status != 0:
      trial.set_user_attr('error', f'scripts/train.py exited with {status}; see {workdir}/train.log')
      return math.nan
    with open(os.path.join(workdir, 'final_metrics.json')) as f:
      final = json.load(f)
    if final.get(metric) is None:
      if metric not in final:
        raise SweepError(f'--metric={metric}: the loop does not log it; it logs '
                         f'{sorted(k for k in final if k.startswith("validation/"))}.')
      return math.nan
    return float(final[metric])

  return objective


def _wall(t) -> float:
  """Seconds from a trial's start to its end (or to now, while it runs)."""
  end = t.datetime_complete or datetime.datetime.now()
  return (end - t.datetime_start).total_seconds() if t.datetime_start else float('nan')


def results(study: optuna.Study) -> List[Dict[str, object]]:
  """Every trial as {trial, state, params, value, steps, wall_s, workdir}, best first (trials
  without a value last); a rerun trial is listed once, under its last try."""
  trials = study.get_trials(deepcopy=False)
  resumed = {t.user_attrs.get('resumes') for t in trials}
  rows = []
  for t in trials:
    if t.number in resumed:
      continue
    value = t.value if t.state == optuna.trial.TrialState.COMPLETE else None
    if value is None and t.intermediate_values:  # pruned: its last validation value
      value = t.intermediate_values[max(t.intermediate_values)]
    wall = _wall(t) if t.datetime_complete and t.datetime_start else None
    rows.append(dict(trial=t.number, state=t.state.name.lower(), params=dict(t.params),
                     value=None if value is None or math.isnan(value) else value,
                     steps=t.user_attrs.get('steps'), wall_s=wall, workdir=t.user_attrs.get('workdir'),
                     error=t.user_attrs.get('error')))
  sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
  rank = {'complete': 0, 'pruned': 1}
  rows.sort(key=lambda r: (r['value'] is None, rank.get(r['state'], 2),
                           sign * r['value'] if r['value'] is not None else 0, r['trial']))
  return rows


def table(rows: Sequence[Dict[str, object]], space: Sequence[Param], metric: str) -> str:
  """`rows` as a markdown table: trial, state, one column per key, the metric, steps, wall time."""
  keys = [p.key for p in space]
  def fmt(v):
    return '-' if v is None else f'{v:.4g}' if isinstance(v, float) else str(v)
  lines = [f'| trial | state | {" | ".join(keys)} | {metric} | steps | wall s |',
           '|' + '---|' * (len(keys) + 5)]
  for r in rows:
    cells = [r['trial'], r['state'], *[r['params'].get(k) for k in keys], r['value'], r['steps'],
             None if r['wall_s'] is None else round(r['wall_s'], 1)]
    lines.append('| ' + ' | '.join(fmt(c) for c in cells) + ' |')
  return '\n'.join(lines)


def best_command(config_spec: str, fixed: Sequence[str], params: Dict[str, str], workdir: str) -> str:
  """The `scripts/train.py` command line that trains the best config in `workdir`."""
  return shlex.join(['python', 'scripts/train.py', f'--config={config_spec}', f'--workdir={workdir}',
                     *fixed, *[f'--config.{k}={v}' for k, v in params.items()]])


def _text(space: Sequence[Param], params: Dict[str, object]) -> Dict[str, str]:
  """Optuna's values of `params` as --config text (a choice keeps the text it was given as)."""
  out = {}
  for p in space:
    if p.key in params:
      value = params[p.key]
      if p.kind == 'choice':
        out[p.key] = {_choice_value(v): v for v in p.values}.get(value, str(value))
      else:
        out[p.key] = repr(value) if isinstance(value, float) else str(value)
  return out


class SweepLock:
  """An exclusive lock on `<sweep_dir>/sweep.lock` (two sweeps on one folder would collide)."""

  def __init__(self, sweep_dir: str):
    os.makedirs(sweep_dir, exist_ok=True)
    self.path = os.path.join(sweep_dir, 'sweep.lock')

  def __enter__(self):
    self._file = open(self.path, 'w')
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      self._file.close()
      raise SweepError(f'Another sweep is running in {os.path.dirname(self.path)}.') from e
    return self

  def __exit__(self, *exc):
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


def run_sweep(*, sweep_dir: str, config_spec: str, space: Sequence[Param], fixed: Sequence[str] = (),
              sampler: str = 'tpe', pruner: str = 'none', num_trials: Optional[int] = None,
              seed: int = 0, metric: Optional[str] = None, direction: Optional[str] = None,
              parallel: int = 1, runner: Optional[Runner] = None, n_startup_trials: int = 2,
              log: Callable[[str], None] = print) -> Dict[str, object]:
  """Runs (or continues) the sweep in `sweep_dir`; writes results.md and best.json there.

  Args:
    sweep_dir: the study (optuna.journal), one workdir per trial, results.md, best.json.
    config_spec: `--config` of scripts/train.py, 'path[:arg]'.
    space: `parse_space(...)`.
    fixed: `--config.KEY=VALUE` overrides of every trial.
    sampler: 'grid', 'random' or 'tpe'.
    pruner: 'none', 'median' or 'asha'.
    num_trials: trials in all, those of earlier runs of this sweep included; default: the grid's
      size for 'grid', else required.
    seed: the sampler's seed.
    metric: a 'validation/...' key the loop logs; default `default_metric(config_spec)`.
    direction: 'maximize' or 'minimize'; default from the metric's name.
    parallel: trials at a time (threads, each driving one subprocess).
    runner: `run_trial_subprocess` (default) or `run_trial_in_process` (parallel=1 only).
    n_startup_trials: the median pruner prunes only after this many trials have finished.
    log: where the progress lines go.

  Returns:
    best.json's contents: {'trial', 'params', 'metric', 'value', 'workdir', 'command', 'test'}
    ('test': the best trial's test metrics, from its final_metrics.json), and 'rows'.

  Raises:
    SweepError: a bad space, metric, sampler, pruner or sweep folder (see their checks); a metric
      the loop does not log (found at the first evaluation).
  """
  runner = runner or run_trial_subprocess
  if parallel > 1 and runner is run_trial_in_process:
    raise SweepError('run_trial_in_process runs one trial at a time: parallel must be 1.')
  metric = metric or default_metric(config_spec)
  direction = direction_of(metric, direction)
  check_space(config_spec, fixed, space)
  if num_trials is None:
    if sampler != 'grid':
      raise SweepError(f'--sampler={sampler}: give --num_trials.')
    num_trials = math.prod(len(p.values) for p in space)
  setup = dict(config=config_spec, fixed=list(fixed), space=[list(p[:2]) + [list(p.values)] for p in space],
               metric=metric, direction=direction, sampler=sampler, seed=seed)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  with SweepLock(sweep_dir):
    study = open_study(sweep_dir, setup=setup, sampler=make_sampler(sampler, space, seed),
                       pruner=make_pruner(pruner, n_startup_trials=n_startup_trials))
    rerun = requeue_stale(study)
    if rerun:
      log(f'Rerunning trials {rerun} (stopped by the last run of this sweep) in their workdirs.')
    todo = num_trials - counted(study)
    if todo > 0:
      start = time.time()

      def progress(study_, t):
        done = counted(study_)
        value = t.value if t.value is not None and not math.isnan(t.value) else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        shown = '-' if value is None else f'{value:.4f}'
        extra = f' ({t.user_attrs["error"]})' if t.user_attrs.get('error') else ''
        log(f'trial {done}/{num_trials} #{t.number} {t.state.name.lower()}: '
            f'{" ".join(f"{k}={v}" for k, v in _text(space, t.params).items())} -> {metric}={shown} '
            f'at step {t.user_attrs.get("steps")} ({_wall(t):.0f} s; {time.time() - start:.0f} s into '
            f'this sweep){extra}')

      objective = make_objective(sweep_dir=sweep_dir, config_spec=config_spec, fixed=fixed, space=space,
                                 metric=metric, runner=runner)
      study.optimize(objective, n_trials=todo, n_jobs=parallel, callbacks=[progress])
    rows = results(study)
    text = table(rows, space, metric)
    best = next((r for r in rows if r['state'] == 'complete' and r['value'] is not None), None)
    out = dict(metric=metric, direction=direction, rows=rows)
    if best is not None:
      params = _text(space, best['params'])
      with open(os.path.join(best['workdir'], 'final_metrics.json')) as f:
        final = json.load(f)
      out.update(trial=best['trial'], params=params, value=best['value'], workdir=best['workdir'],
                 command=best_command(config_spec, fixed, params, os.path.join(sweep_dir, 'best')),
                 test={k: v for k, v in final.items() if k.startswith('test/')})
      text += (f'\n\nBest: trial {best["trial"]}, {metric} = {best["value"]:.4f} (chosen on validation)'
               f'\n\n    {out["command"]}\n\nIts test metrics (reported, never used for choosing): '
               + ', '.join(f'{k} = {v:.4f}' for k, v in sorted(out['test'].items()) if v is not None))
    else:
      text += '\n\nNo trial completed.'
    with open(os.path.join(sweep_dir, 'results.md'), 'w') as f:
      f.write(text + '\n')
    with open(os.path.join(sweep_dir, 'best.json'), 'w') as f:
      json.dump({k: v for k, v in out.items() if k != 'rows'}, f, indent=2)
    log(text)
  return out
