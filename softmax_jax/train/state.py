"""Train state (a plain dict pytree), optimizer from config, gradient norms."""

from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softmax_jax.train import sparse

# {'step': int32[], 'params', 'model_state', 'opt_state', 'rng': uint32[2]}; 'model_state' holds the
# mutable collections of the model other than 'params' (BatchNorm's 'batch_stats'), {} for most.
TrainState = Dict[str, Any]


def step_schedule(learning_rate: float, warmup_steps: int, boundaries: Sequence[int],
                  decay_factor: float) -> optax.Schedule:
  """Linear warmup from 0, then `lr * decay_factor^k` after the k-th boundary (Cao et al. 2019).

  `lr(s) = lr * s / warmup` for `s < warmup`, else `lr * decay_factor^#{b in boundaries: s >= b}`,
  e.g. Cao's CIFAR schedule: warmup 5 epochs, x0.01 at epochs 160 and 180 of 200.

  Args:
    learning_rate: the peak rate lr.
    warmup_steps: steps of linear warmup (0: none).
    boundaries: steps at which the rate is multiplied by `decay_factor` (from that step on).
    decay_factor: the multiplier, > 0.

  Returns:
    `schedule(step) -> [] float32`.
  """
  bounds = tuple(sorted(int(b) for b in boundaries))

  def schedule(step):
    step = jnp.asarray(step)
    decays = sum((step >= b).astype(jnp.int32) for b in bounds)  # 0 without boundaries
    value = learning_rate * jnp.float32(decay_factor) ** decays
    if warmup_steps <= 0:
      return value
    return jnp.where(step < warmup_steps, learning_rate * step / warmup_steps, value)

  return schedule


def make_optimizer(opt_cfg, num_steps: int) -> Tuple[optax.Schedule, optax.GradientTransformation]:
  """Schedule and optax chain (clipping, then the optimizer) from `config.optimizer`.

  Schedules ('cosine', 'constant', 'step') all start with a linear warmup from 0; 'step' then
  multiplies the rate by `decay_factor` at each fraction `decay_at` of `num_steps` (`step_schedule`).
  The chain comes as a `train.sparse.SparseOutputTransformation` carrying
  `opt_cfg.sparse_output` (row-sparse lazy updates of a sampled or hierarchical head's table,
  decided by the train step; see `train/sparse.py`).
  """
  lr, warmup = opt_cfg.learning_rate, min(opt_cfg.warmup_steps, num_steps)
  if opt_cfg.schedule == 'cosine':
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(num_steps, warmup + 1), end_value=lr * opt_cfg.end_learning_rate_fraction)
  elif opt_cfg.schedule == 'constant':
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  elif opt_cfg.schedule == 'step':
    fractions = [float(f) for f in opt_cfg.decay_at]
    if any(not 0.0 <= f <= 1.0 for f in fractions) or fractions != sorted(set(fractions)):
      raise ValueError(f'config.optimizer.decay_at must be increasing fractions of training in '
                       f'[0, 1], got {tuple(opt_cfg.decay_at)!r}.')
    if not opt_cfg.decay_factor > 0:
      raise ValueError(f'config.optimizer.decay_factor must be > 0, got {opt_cfg.decay_factor!r}.')
    boundaries = [int(round(f * num_steps)) for f in fractions]
    schedule = step_schedule(lr, warmup, boundaries, opt_cfg.decay_factor)
  else:
    raise ValueError(f"config.optimizer.schedule must be 'cosine', 'constant' or 'step', "
                     f'got {opt_cfg.schedule!r}.')
  chain = []
  if opt_cfg.clip_value > 0:
    chain.append(optax.clip(opt_cfg.clip_value))
  if opt_cfg.clip_global_norm > 0:
    chain.append(optax.clip_by_global_norm(opt_cfg.clip_global_norm))
  if opt_cfg.name == 'adamw':
    chain.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay))
  elif opt_cfg.name == 'sgd':
    if opt_cfg.weight_decay > 0:
      chain.append(optax.add_decayed_weights(opt_cfg.weight_decay))
    chain.append(optax.sgd(schedule, momentum=opt_cfg.momentum or None, nesterov=opt_cfg.nesterov))
  else:
    raise ValueError(f"config.optimizer.name must be 'adamw' or 'sgd', got {opt_cfg.name!r}.")
  return schedule, sparse.with_sparse_output(optax.chain(*chain), opt_cfg)


def init_state(model, tx, input_shape, seed: int) -> TrainState:
  """Initial state on host from `model.init` on a dummy batch of two.

  'params' is the 'params' collection; 'model_state' every other collection `model.init` returns
  (e.g. {'batch_stats': ...} for BatchNorm; {} for models without one).
  """
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  images = jnp.zeros((2, *input_shape), jnp.float32)
  labels = jnp.zeros((2,), jnp.int32)
  variables = jax.jit(lambda r: dict(model.init(r, images, labels, train=False)))(init_rng)
  params = variables.pop('params')
  state = dict(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
               opt_state=tx.init(params), rng=train_rng)
  return jax.tree.map(np.asarray, state)


def layer_grad_norms(grads) -> Dict[str, jnp.ndarray]:
  """Global L2 norm and one per layer (the params of each module path, e.g. 'backbone/Dense_0')."""
  squares: Dict[str, jnp.ndarray] = {}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    layer = '/'.join(str(getattr(k, 'key', k)) for k in path[:-1])
    squares[layer] = squares.get(layer, 0.0) + jnp.sum(jnp.square(g.astype(jnp.float32)))
  norms = {f'grad_norm/{k}': jnp.sqrt(v) for k, v in squares.items()}
  norms['grad_norm'] = jnp.sqrt(sum(squares.values()))
  return norms
