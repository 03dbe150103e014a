"""Orbax checkpoints of the host train state; a rerun with the same workdir resumes."""

import os
from typing import Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves synchronously (a SIGKILL never leaves a half-written step: orbax renames atomically)."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True,
            cleanup_tmp_directories=True))

  def latest_step(self) -> Optional[int]:
    return self._mgr.latest_step()

  def path(self, step: Optional[int]) -> str:
    return 'none (no checkpoint saved yet)' if step is None else os.path.join(self.directory, str(step))

  def save(self, step: int, state) -> None:
    self._mgr.save(step, args=ocp.args.StandardSave(state), force=True)
    self._mgr.wait_until_finished()

  def restore_latest(self, template) -> Tuple[object, int]:
    """(state, step) from the latest checkpoint, or (template, 0) when there is none.

    Checkpoints written before the train state had 'model_state' restore into a template whose
    'model_state' is {} (models without mutable collections), so older workdirs still resume.
    """
    step = self._mgr.latest_step()
    if step is None:
      return template, 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      state = self._mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    except ValueError:
      if not (isinstance(abstract, dict) and abstract.get('model_state') == {}):
        raise
      older = {k: v for k, v in abstract.items() if k != 'model_state'}
      state = dict(self._mgr.restore(step, args=ocp.args.StandardRestore(older)), model_state={})
    return jax.tree.map(np.asarray, state), step

  def close(self) -> None:
    self._mgr.close()
