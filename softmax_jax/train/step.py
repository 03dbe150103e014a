"""The one train step, shared by both data-parallel drivers."""

from typing import Optional

import chex
import jax
import jax.numpy as jnp
import optax

from softmax_jax.data.augment import random_crop_flip
from softmax_jax.train.state import TrainState, layer_grad_norms

# Folded into the per-step key for augmentation, so the dropout and sample keys (a split of the
# per-step key) are those of runs without augmentation.
_AUGMENT_STREAM = 1 << 20


def check_classifier_batch(batch) -> None:
  """Static chex checks (shapes, ranks, dtypes; also under jit) of `{'image': [B, ...], 'label': [B] int}`."""
  chex.assert_rank(batch['label'], 1, custom_message="batch['label'] must be [B] class ids")
  chex.assert_type(batch['label'], int, custom_message="batch['label'] must be integer class ids")
  chex.assert_type(batch['image'], float, custom_message="batch['image'] must be float [B, ...]")
  chex.assert_equal_shape_prefix(
      (batch['image'], batch['label']), 1,
      custom_message="batch['image'] [B, ...] and batch['label'] [B] must have the same B")


def check_updated_state(state, params, model_state) -> None:
  """The update keeps the structure, shapes and dtypes of the parameters and model state (static)."""
  chex.assert_trees_all_equal_shapes_and_dtypes(
      params, state['params'], custom_message='the update changed the parameters\' shapes or dtypes')
  chex.assert_trees_all_equal_structs(
      model_state, state['model_state'], custom_message='the forward pass changed the model state\'s '
      'structure (mutable collections must be the ones model.init returned)')


def train_step(state: TrainState, batch, *, model, tx, schedule, axis_name: Optional[str] = None,
               crop_padding: int = 0, flip: bool = False):
  """One optimizer step on the mean per-example loss of `batch` ({'image', 'label'}).

  With `axis_name` (pmap), the batch is this device's shard and gradients and metrics are
  averaged with `lax.pmean`; under jit over a mesh the batch is global and XLA inserts the
  reduction. Per-step randomness is `fold_in(rng, step)` (and the device index under pmap).

  Mutable model collections (`state['model_state']`, e.g. BatchNorm's 'batch_stats') are updated
  by the forward pass. Under jit over a mesh BatchNorm normalizes with the statistics of the
  global batch (XLA reduces across devices), so any device count gives the same result; under
  pmap each device normalizes with its own shard's statistics and the updated running averages
  are `pmean`ed (the mean of per-device variances, not the global variance).

  Args:
    state: the train state (see `state.TrainState`).
    batch: `{'image': [B, H, W, C] float, 'label': [B] int}` (this device's shard under pmap).
    model: the `Classifier`.
    tx: the optax transformation.
    schedule: the learning-rate schedule (logged only).
    axis_name: the pmap axis, or None under jit.
    crop_padding: > 0: random crop of the zero-padded images (`data.augment.random_crop_flip`).
    flip: random horizontal flips.

  Returns:
    `(new_state, metrics)`, metrics {'loss', 'learning_rate', 'grad_norm', 'grad_norm/<layer>'}.
  """
  check_classifier_batch(batch)
  rng = jax.random.fold_in(state['rng'], state['step'])
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  dropout_rng, sample_rng = jax.random.split(rng)
  images = batch['image']
  if crop_padding or flip:
    images = random_crop_flip(jax.random.fold_in(rng, _AUGMENT_STREAM), images, padding=crop_padding,
                              flip=flip)
  model_state = state['model_state']

  def loss_fn(params):
    kwargs = dict(train=True, step=state['step'], rngs={'dropout': dropout_rng, 'sample': sample_rng})
    variables = {'params': params, **model_state}
    if model_state:
      losses, new_model_state = model.apply(variables, images, batch['label'], mutable=list(model_state),
                                            **kwargs)
    else:
      losses, new_model_state = model.apply(variables, images, batch['label'], **kwargs), model_state
    return jnp.mean(losses.astype(jnp.float32)), dict(new_model_state)

  (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  if axis_name is not None:
    loss, grads, model_state = jax.lax.pmean((loss, grads, model_state), axis_name)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  check_updated_state(state, params, model_state)
  metrics = dict(loss=loss, learning_rate=schedule(state['step']), **layer_grad_norms(grads))
  new_state = dict(step=state['step'] + 1, params=params, model_state=model_state, opt_state=opt_state,
                   rng=state['rng'])
  return new_state, metrics
