"""The one train step, shared by both data-parallel drivers."""

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from softmax_jax.train.state import TrainState, layer_grad_norms


def train_step(state: TrainState, batch, *, model, tx, schedule, axis_name: Optional[str] = None):
  """One optimizer step on the mean per-example loss of `batch` ({'image', 'label'}).

  With `axis_name` (pmap), the batch is this device's shard and gradients and metrics are
  averaged with `lax.pmean`; under jit over a mesh the batch is global and XLA inserts the
  reduction. Per-step randomness is `fold_in(rng, step)` (and the device index under pmap).
  """
  rng = jax.random.fold_in(state['rng'], state['step'])
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  dropout_rng, sample_rng = jax.random.split(rng)

  def loss_fn(params):
    losses = model.apply({'params': params}, batch['image'], batch['label'], train=True,
                         step=state['step'], rngs={'dropout': dropout_rng, 'sample': sample_rng})
    return jnp.mean(losses.astype(jnp.float32))

  loss, grads = jax.value_and_grad(loss_fn)(state['params'])
  if axis_name is not None:
    loss, grads = jax.lax.pmean((loss, grads), axis_name)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  metrics = dict(loss=loss, learning_rate=schedule(state['step']), **layer_grad_norms(grads))
  new_state = dict(step=state['step'] + 1, params=params, opt_state=opt_state, rng=state['rng'])
  return new_state, metrics
