"""Train state (a plain dict pytree), optimizer from config, gradient norms."""

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

TrainState = Dict[str, Any]  # {'step': int32[], 'params', 'opt_state', 'rng': uint32[2]}


def make_optimizer(opt_cfg, num_steps: int) -> Tuple[optax.Schedule, optax.GradientTransformation]:
  """Schedule and optax chain (clipping, then the optimizer) from `config.optimizer`."""
  lr, warmup = opt_cfg.learning_rate, min(opt_cfg.warmup_steps, num_steps)
  if opt_cfg.schedule == 'cosine':
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(num_steps, warmup + 1), end_value=lr * opt_cfg.end_learning_rate_fraction)
  elif opt_cfg.schedule == 'constant':
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  else:
    raise ValueError(f"config.optimizer.schedule must be 'cosine' or 'constant', got {opt_cfg.schedule!r}.")
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
  return schedule, optax.chain(*chain)


def init_state(model, tx, input_shape, seed: int) -> TrainState:
  """Initial state on host: params from `model.init` on a dummy batch of two."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  images = jnp.zeros((2, *input_shape), jnp.float32)
  labels = jnp.zeros((2,), jnp.int32)
  params = jax.jit(lambda r: model.init(r, images, labels, train=False)['params'])(init_rng)
  state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=train_rng)
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
