"""Checkpointer: a train state round-trips; checkpoints from before 'model_state' still restore."""

import numpy as np
import pytest

from softmax_jax.train.checkpoint import Checkpointer


def _state(value, **extra):
  return dict(step=np.asarray(value, np.int32), params={'w': np.full((3,), value, np.float32)}, **extra)


def test_round_trip_with_model_state(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  saved = _state(3, model_state={'batch_stats': {'mean': np.arange(4, dtype=np.float32)}})
  ckpt.save(3, saved)
  restored, step = ckpt.restore_latest(_state(0, model_state={'batch_stats': {'mean': np.zeros(4, np.float32)}}))
  assert step == 3
  np.testing.assert_array_equal(restored['model_state']['batch_stats']['mean'], np.arange(4))
  ckpt.close()


def test_checkpoint_without_model_state_restores_into_an_empty_one(tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(5, _state(5))  # as written before the state had 'model_state'
  restored, step = ckpt.restore_latest(_state(0, model_state={}))
  assert step == 5 and restored['model_state'] == {}
  np.testing.assert_array_equal(restored['params']['w'], [5, 5, 5])
  with pytest.raises(ValueError):  # a model that has batch statistics cannot start from it
    ckpt.restore_latest(_state(0, model_state={'batch_stats': {'mean': np.zeros(4, np.float32)}}))
  ckpt.close()

