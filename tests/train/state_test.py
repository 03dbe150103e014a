"""Optimizer from config (clipping, schedules) and gradient-norm logging against references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softmax_jax.train import base_config
from softmax_jax.train.state import layer_grad_norms, make_optimizer

GRADS = {'backbone': {'Dense_0': {'kernel': jnp.full((3, 2), 2.0), 'bias': jnp.full((2,), -1.0)}},
         'head': {'kernel': jnp.full((2, 4), 0.5), 'bias': jnp.zeros((4,))}}
PARAMS = {'backbone': {'Dense_0': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros((2,))}},
          'head': {'kernel': jnp.ones((2, 4)), 'bias': jnp.zeros((4,))}}


def test_layer_grad_norms_match_numpy():
  norms = layer_grad_norms(GRADS)
  np.testing.assert_allclose(norms['grad_norm/backbone/Dense_0'], np.sqrt(6 * 4 + 2 * 1))
  np.testing.assert_allclose(norms['grad_norm/head'], np.sqrt(8 * 0.25))
  np.testing.assert_allclose(norms['grad_norm'], np.sqrt(26 + 2))


@pytest.mark.parametrize('clip', ['clip_global_norm', 'clip_value'])
def test_clipping_from_config_matches_optax(clip):
  opt = base_config().optimizer
  opt.name, opt.weight_decay, opt.momentum, opt.warmup_steps = 'sgd', 0.0, 0.0, 0
  opt.schedule, opt.learning_rate = 'constant', 1.0
  opt[clip] = 0.5
  _, tx = make_optimizer(opt, num_steps=10)
  updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  ref_tx = optax.clip_by_global_norm(0.5) if clip == 'clip_global_norm' else optax.clip(0.5)
  expected, _ = ref_tx.update(GRADS, ref_tx.init(PARAMS))
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, -b, rtol=1e-6)  # sgd: update = -lr * clipped gradient
  assert float(optax.tree.norm(updates)) < float(optax.tree.norm(GRADS))


def test_warmup_then_cosine_schedule():
  opt = base_config().optimizer
  opt.learning_rate, opt.warmup_steps, opt.end_learning_rate_fraction = 0.1, 10, 0.0
  schedule, _ = make_optimizer(opt, num_steps=110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
                             [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-7)


def test_unknown_optimizer_is_named():
  opt = base_config().optimizer
  opt.name = 'adam_w'
  with pytest.raises(ValueError, match=r"config.optimizer.name must be 'adamw' or 'sgd', got 'adam_w'"):
    make_optimizer(opt, num_steps=10)


def test_step_schedule_warms_up_then_decays_at_fractions_of_training():
  opt = base_config().optimizer
  opt.schedule, opt.learning_rate, opt.warmup_steps = 'step', 0.1, 5
  opt.decay_at, opt.decay_factor = (0.8, 0.9), 0.01  # Cao 2019: epochs 160 and 180 of 200
  schedule, _ = make_optimizer(opt, num_steps=200)
  steps = [0, 1, 4, 5, 159, 160, 179, 180, 199]
  expected = [0.0, 0.02, 0.08, 0.1, 0.1, 1e-3, 1e-3, 1e-5, 1e-5]
  np.testing.assert_allclose([schedule(s) for s in steps], expected, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(jnp.array(steps, jnp.int32)), expected, rtol=1e-6)
  opt.decay_at, opt.warmup_steps = [], 0  # a list, as config.json gives it back; no decay
  schedule, _ = make_optimizer(opt, num_steps=200)
  np.testing.assert_allclose([schedule(0), schedule(199)], [0.1, 0.1])


@pytest.mark.parametrize('key, value, match', [
    ('decay_at', (0.9, 0.8), r'config.optimizer.decay_at must be increasing fractions of training in \[0, 1\], got \(0.9, 0.8\)'),
    ('decay_at', (0.5, 1.5), r'decay_at must be increasing fractions'),
    ('decay_factor', 0.0, r'config.optimizer.decay_factor must be > 0, got 0.0'),
    ('schedule', 'linear', r"schedule must be 'cosine', 'constant' or 'step', got 'linear'"),
])
def test_bad_schedule_options_are_named(key, value, match):
  opt = base_config().optimizer
  opt.schedule = 'step'
  opt[key] = value
  with pytest.raises(ValueError, match=match):
    make_optimizer(opt, num_steps=10)


def test_norms_before_update_keeps_the_gradients_and_orders_the_update_after_the_norms():
  from softmax_jax.train.step import norms_before_update  # pylint: disable=g-import-not-at-top
  grads, norms = jax.jit(norms_before_update)(GRADS)
  chex.assert_trees_all_equal(grads, GRADS)
  expected = layer_grad_norms(GRADS)
  assert norms.keys() == expected.keys()
  for k in expected:
    np.testing.assert_allclose(norms[k], expected[k], rtol=1e-6)
  # On CPU the update is fenced behind the norms; other backends get no barrier.
  for platform, barrier in (('cpu', True), ('cuda', False), ('tpu', False)):
    lowered = jax.jit(norms_before_update).trace(GRADS).lower(lowering_platforms=(platform,))
    assert ('optimization_barrier' in lowered.as_text()) == barrier, platform
