"""Checkpointer: a train state round-trips; checkpoints from before 'model_state' still restore.

Broken checkpoints and the fallback to an intact one: tests/train/faults_test.py.
"""

import numpy as np
import optax
import pytest

from softmax_jax.train.checkpoint import Checkpointer
from softmax_jax.train.workdir import WorkdirError


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
  with pytest.raises(WorkdirError, match=r"No intact checkpoint .*step 5: its arrays do not match the "
                     r"model .*lacks: \[\('model_state', 'batch_stats', 'mean'\)\]"):
    # a model that has batch statistics cannot start from it
    ckpt.restore_latest(_state(0, model_state={'batch_stats': {'mean': np.zeros(4, np.float32)}}))
  ckpt.close()


def test_a_clipping_transformation_added_on_resume_keeps_the_optimizer_state(tmp_path):
  # The advice after a divergence (add --config.optimizer.clip_global_norm) puts an empty state
  # in front of adam's in the optax chain: the saved moments must still restore, in their place.
  params = {'w': np.arange(3, dtype=np.float32)}
  adam = optax.chain(optax.adam(1e-3))
  opt_state = adam.update(params, adam.init(params), params)[1]  # non-zero moments
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(4, dict(step=np.asarray(4, np.int32), params=params, opt_state=opt_state))
  clipped = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  restored, step = ckpt.restore_latest(dict(step=np.asarray(0, np.int32), params=params, opt_state=clipped.init(params)))
  assert step == 4
  np.testing.assert_array_equal(restored['opt_state'][1][0].mu['w'], opt_state[0][0].mu['w'])
  np.testing.assert_array_equal(restored['opt_state'][1][0].nu['w'], opt_state[0][0].nu['w'])
  assert int(restored['opt_state'][1][0].count) == 1
  ckpt.close()

