"""Orbax checkpoints of the host train state; a rerun with the same workdir resumes.

Multi-process runs (`jax.distributed`): every process calls `save` and `restore` with the same
host state (NumPy, identical on every process: train/parallel.py gathers rows split over
processes); orbax synchronizes the processes and process 0 writes the files, and every process
reads them back. Setting aside broken checkpoints is done by process 0 while the others wait.

Saves are synchronous and atomic (orbax writes a temporary folder and renames it), so a SIGKILL
never leaves a half-written step. Restoring takes the newest *intact* checkpoint: one that orbax
reads without error, whose arrays match the template, and whose values are all finite. Each
newer one that is not (a truncated data file, an emptied step folder, a deleted `_METADATA`, NaN
from an older version of this code) is named in a warning with the reason, and, when training,
moved to `<workdir>/broken_checkpoints/` so that the resumed run can write that step again.
"""

import contextlib
import os
import shutil
import sys
from typing import List, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from softmax_jax.train.workdir import WorkdirError


# orbax's messages for a saved tree that differs from the template
_MISMATCH = ('tructure', 'do not match', 'metadata_tree')


class Checkpointer:
  """Saves and restores the host train state under `directory`, keeping the `max_to_keep` newest."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    # One unnamed item, fixed here: left to orbax, the mode is inferred from the first step folder
    # read, and an emptied one would turn every later restore into an error.
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True,
            cleanup_tmp_directories=True),
        item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> Optional[int]:
    return self._mgr.latest_step()

  def path(self, step: Optional[int]) -> str:
    return 'none (no checkpoint saved yet)' if step is None else os.path.join(self.directory, str(step))

  def save(self, step: int, state) -> None:
    self._mgr.save(step, args=ocp.args.StandardSave(state), force=True)
    self._mgr.wait_until_finished()

  def restore(self, step: int, template):
    """The state of checkpoint `step` as NumPy arrays in the structure of `template`.

    A checkpoint whose tree differs from `template` only by leafless nodes restores into it:
    one written before the state had 'model_state' ({} for most models), or before a clipping
    transformation (whose state is empty) joined the optimizer chain.

    Raises:
      Exception: orbax's own error (e.g. ValueError 'OUT_OF_RANGE' for a truncated file,
        FileNotFoundError for a missing `_METADATA`); ValueError if the arrays do not match.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      state = self._mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    except ValueError as error:
      if not any(m in str(error) for m in _MISMATCH):
        raise  # unreadable (e.g. OUT_OF_RANGE): orbax's error is the real one
      try:
        saved = self._mgr.restore(step)  # as written, without a template
      except Exception:  # pylint: disable=broad-except
        raise error from None  # unreadable: orbax's error is the real one
      state = _match(saved, template)
      if isinstance(state, str):
        raise ValueError(f'{error} ({state})') from None
    return jax.tree.map(np.asarray, state)

  def restore_latest(self, template, *, set_aside_broken: bool = False) -> Tuple[object, int]:
    """`(state, step)` from the newest intact checkpoint, or `(template, 0)` when there is none.

    Args:
      template: a host train state of the model being trained (structure, shapes, dtypes).
      set_aside_broken: move the checkpoints newer than the one restored, which failed, to
        `<workdir>/broken_checkpoints/<step>` (a training run, which writes those steps again).

    Raises:
      WorkdirError: checkpoints exist but none is intact; names each and why.
    """
    steps = sorted(self._mgr.all_steps(), reverse=True)
    broken: List[Tuple[int, str]] = []
    for step in steps:
      try:
        with _quiet_cancelled_reads():
          state = self.restore(step, template)
        nonfinite = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(state)
                     if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x))]
        if nonfinite:
          raise FloatingPointError(f'{len(nonfinite)} arrays hold NaN or inf, e.g. {nonfinite[0]}')
      except Exception as e:  # pylint: disable=broad-except
        reason = _reason(e)
        logging.warning('Checkpoint %s is broken: %s. Trying an older one.', self.path(step), reason)
        broken.append((step, reason))
        continue
      if broken:
        logging.warning('Resuming from %s, the newest intact checkpoint; %s', self.path(step),
                        '; '.join(f'{self.path(s)} is broken ({r})' for s, r in broken))
        if set_aside_broken:
          self._set_aside([s for s, _ in broken])
      return state, step
    if broken:
      raise WorkdirError(
          f'No intact checkpoint in {self.directory}: '
          + '; '.join(f'step {s}: {r}' for s, r in broken)
          + f'. To train from scratch, move {os.path.dirname(self.directory)} away or pass another '
          '--workdir.')
    return template, 0

  def _set_aside(self, steps) -> None:
    """Moves `steps` to broken_checkpoints/ (process 0 of a multi-process run; the rest wait)."""
    if jax.process_index() != 0:
      multihost_utils.sync_global_devices('softmax_jax: broken checkpoints set aside')
      self._mgr.reload()
      return
    root = os.path.join(os.path.dirname(self.directory), 'broken_checkpoints')
    os.makedirs(root, exist_ok=True)
    for step in steps:
      target, n = os.path.join(root, str(step)), 1
      while os.path.exists(target):
        target, n = os.path.join(root, f'{step}-{n}'), n + 1
      shutil.move(self.path(step), target)
      logging.warning('Moved the broken checkpoint %s to %s.', self.path(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('softmax_jax: broken checkpoints set aside')
    self._mgr.reload()

  def close(self) -> None:
    self._mgr.close()


@contextlib.contextmanager
def _quiet_cancelled_reads():
  """Drops the 'Event loop is closed' tracebacks of the reads orbax cancels after a failed one.

  Only that RuntimeError, only while restoring; anything else reaches the previous hook.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    sys.unraisablehook = previous


def _reason(error: BaseException) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  if len(text) > 400:
    text = text[:400] + '...'
  if isinstance(error, FloatingPointError):
    return text
  if 'OUT_OF_RANGE' in text or 'DATA_LOSS' in text:
    what = 'a data file is truncated or corrupt'
  elif isinstance(error, FileNotFoundError) and '_METADATA' in text:
    what = 'its _METADATA file is missing'
  elif isinstance(error, KeyError) and 'was not found in the checkpoint' in text:
    what = 'the step folder is empty or incomplete'
  elif any(m in text for m in _MISMATCH):
    what = 'its arrays do not match the model built from the config'
  else:
    what = 'orbax cannot read it'
  return f'{what} ({type(error).__name__}: {text})'


def _normalized(tree):
  """`{path: leaf}` with sequence indices counted over non-empty elements only, and namedtuple
  fields named like dict keys (so a raw orbax tree and a template compare), plus the leaf order."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  present = {}  # parent path -> indices of its sequence elements that hold leaves
  for path, _ in leaves:
    for i, key in enumerate(path):
      if isinstance(key, jax.tree_util.SequenceKey):
        present.setdefault(path[:i], set()).add(key.idx)
  out = []
  for path, leaf in leaves:
    norm = []
    for i, key in enumerate(path):
      if isinstance(key, jax.tree_util.SequenceKey):
        norm.append(sorted(present[path[:i]]).index(key.idx))
      elif isinstance(key, jax.tree_util.DictKey):
        norm.append(str(key.key))
      elif isinstance(key, jax.tree_util.GetAttrKey):
        norm.append(key.name)
      else:
        norm.append(str(key))
    out.append((tuple(norm), leaf))
  return out


def _match(saved, template):
  """`saved` (a raw orbax tree) in the structure of `template`, or a string saying why not."""
  saved_leaves = dict(_normalized(saved))
  template_leaves = _normalized(template)
  names = [p for p, _ in template_leaves]
  if set(names) != set(saved_leaves):
    missing = sorted(set(names) - set(saved_leaves))[:3]
    extra = sorted(set(saved_leaves) - set(names))[:3]
    return f'the model has arrays the checkpoint lacks: {missing or "none"}; and the reverse: {extra or "none"}'
  for name, leaf in template_leaves:
    got = saved_leaves[name]
    if np.shape(got) != np.shape(leaf) or np.asarray(got).dtype != np.asarray(leaf).dtype:
      return (f'{"/".join(map(str, name))} is {np.asarray(got).dtype}{list(np.shape(got))} in the '
              f'checkpoint, {np.asarray(leaf).dtype}{list(np.shape(leaf))} in the model')
  return jax.tree.unflatten(jax.tree.structure(template), [saved_leaves[p] for p in names])
