"""The workdir's guards: one run at a time (a lock), and the config it was created with.

* `WorkdirLock`: an exclusive `fcntl.flock` on `workdir/.lock` for the whole run; the file names
  the holder (pid, host, start time, command), so a second run fails naming it. The kernel drops
  the lock when its process dies, even by SIGKILL: there are no stale locks to clean up.
* `check_config` / `record_config`: `config.json` holds the config the workdir's checkpoints were
  trained with. A restart whose config changes anything outside `HARMLESS` (the model, the head,
  the data, the seed, the batch size, the optimizer's kind) is refused with a diff of those keys,
  before anything in the workdir is touched; harmless changes (learning rate, logging, more steps,
  the devices and their `config.mesh`, ...) are logged, appended to `config_changes.jsonl`, and
  then `config.json` is rewritten. A workdir without a checkpoint takes any config (nothing
  trained there yet).
"""

import json
import os
import socket
import sys
import time
from typing import Dict, Optional, Tuple

from absl import logging
import jax

from softmax_jax.train.config import base_config

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # Windows: no advisory locks
  fcntl = None

# Keys a resumed run may change (dotted; a trailing '.' covers a whole sub-config). Everything
# else, new keys included, must equal the workdir's config.
HARMLESS = ('optimizer.', 'augment.', 'num_steps', 'log_every', 'eval_every', 'checkpoint_every',
            'max_checkpoints', 'eval_batch_size', 'parallel', 'num_devices', 'progress',
            'data.data_dir', 'data.source_dir',  # where the data is, not what: see data/builders.py
            # How the devices are laid out: None is the key 'mesh', a dict its keys 'mesh.data' and
            # 'mesh.model'. Checkpoints hold the gathered host state, placed anew on any mesh.
            'mesh', 'mesh.')
NOT_HARMLESS = ('optimizer.name',)  # adamw and sgd keep different optimizer states

_MISSING = '<absent>'


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked: busy, another config, or no intact checkpoint."""


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds an exclusive lock on `workdir` (see the module docstring).

  Raises (on enter):
    WorkdirError: another process holds the lock; names its pid, host, start time and command.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), '.lock')
    self._file = None

  def __enter__(self) -> 'WorkdirLock':
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    f = open(self.path, 'a+')
    if fcntl is not None:
      try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or '(it has not written its name yet)'
        f.close()
        raise WorkdirError(
            f'Workdir {os.path.dirname(self.path)} is in use by another run: {holder}. Wait for it '
            'to finish (or stop it: it checkpoints on SIGINT/SIGTERM), or pass another --workdir.'
        ) from None
      except OSError as e:  # a filesystem without flock (some network mounts): run unguarded
        logging.warning('Cannot lock %s (%s); two runs on this workdir would not be detected.',
                        self.path, e)
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on host {socket.gethostname()}, since '
            f'{time.strftime("%Y-%m-%d %H:%M:%S")}, command: {" ".join(sys.argv) or "?"}\n')
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      self._file.close()  # closing releases the flock; the file stays (deleting it would race)
      self._file = None


def _flatten(tree, prefix: str = '') -> Dict[str, object]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _as_json(config) -> Dict[str, object]:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _harmless(key: str) -> bool:
  if key in NOT_HARMLESS:
    return False
  return any(key == h or (h.endswith('.') and key.startswith(h)) for h in HARMLESS)


def config_diff(old: Dict[str, object], new: Dict[str, object]) -> Dict[str, Tuple[object, object]]:
  """`{dotted key: (old value, new value)}` of the keys that differ between two JSON configs."""
  old, new = _flatten(old), _flatten(new)
  return {k: (old.get(k, _MISSING), new.get(k, _MISSING)) for k in sorted(set(old) | set(new))
          if old.get(k, _MISSING) != new.get(k, _MISSING)}


def _describe(diff) -> str:
  return '\n'.join(f'  config.{k}: {o!r} (workdir) -> {n!r} (now)' for k, (o, n) in diff.items())


def check_config(config, workdir: str) -> Dict[str, Tuple[object, object]]:
  """Compares `config` with `workdir/config.json` (if any) without writing anything.

  Args:
    config: the config of this run.
    workdir: the run's workdir.

  Returns:
    the harmless changes, `{dotted key: (old, new)}` ({} for a new workdir).

  Raises:
    WorkdirError: the config changes a key outside `HARMLESS` of a workdir that has checkpoints
      (without one there is nothing to protect); shows the diff of those keys and says how to
      resume or to start fresh elsewhere.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      old = json.load(f)
  except ValueError as e:  # written by a version that did not write it atomically
    logging.warning('%s is unreadable (%s): the config cannot be compared; it is rewritten.', path, e)
    return {}
  defaults = _flatten(_as_json(base_config()))
  # A key the workdir's config lacks was added to the schema later: its default is what ran.
  diff = {k: (o, n) for k, (o, n) in config_diff(old, _as_json(config)).items()
          if not (o == _MISSING and k in defaults and n == defaults[k])}
  refused = {k: v for k, v in diff.items() if not _harmless(k)}
  checkpoints = os.path.join(workdir, 'checkpoints')
  if refused and not any(n.isdigit() for n in (os.listdir(checkpoints) if os.path.isdir(checkpoints) else ())):
    logging.warning('Workdir %s has no checkpoint yet: starting over with the new config.', workdir)
    return diff  # nothing trained to protect
  if refused:
    raise WorkdirError(
        f'Workdir {workdir} was created with another config: this run changes\n{_describe(refused)}\n'
        'Its checkpoints hold that model, head and data, so it cannot resume with these. To '
        f'resume it, rerun with the config in {path}; to train this config from scratch, pass '
        'another --workdir.')
  return diff


def record_config(config, workdir: str, changes, start_step: int) -> None:
  """Writes `workdir/config.json` (atomically), after `check_config` and a successful restore.

  Harmless `changes` are logged and appended to `workdir/config_changes.jsonl` with the step they
  apply from. In a multi-process run only process 0 writes.
  """
  if jax.process_index() != 0:
    return
  if changes:
    logging.warning('Resuming %s from step %d with changed settings:\n%s', workdir, start_step,
                    _describe(changes))
    with open(os.path.join(workdir, 'config_changes.jsonl'), 'a') as f:
      f.write(json.dumps({'step': start_step, 'time': time.strftime('%Y-%m-%d %H:%M:%S'),
                          'changes': {k: list(v) for k, v in changes.items()}}) + '\n')
  atomic_write(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2, sort_keys=True))


def check_steps(config, start_step: int, checkpoint: Optional[str]) -> None:
  """Raises WorkdirError if `config.num_steps` is below the step the run resumes from."""
  if start_step > config.num_steps:
    raise WorkdirError(
        f'config.num_steps={config.num_steps} is below the step of the latest checkpoint, '
        f'{checkpoint} (step {start_step}): this workdir already trained longer. Pass '
        f'--config.num_steps={start_step} (or more) to resume it, or another --workdir to train '
        f'{config.num_steps} steps from scratch.')


def atomic_write(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: never a half-written file."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
