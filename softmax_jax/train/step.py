"""The one train step, shared by every task and both data-parallel drivers."""

from typing import Dict, Optional, Tuple

import chex
import jax
import optax

from softmax_jax.train import sparse
from softmax_jax.train.state import TrainState, layer_grad_norms


def check_updated_state(state, params, model_state) -> None:
  """The update keeps the structure, shapes and dtypes of the parameters and model state (static)."""
  chex.assert_trees_all_equal_shapes_and_dtypes(
      params, state['params'], custom_message='the update changed the parameters\' shapes or dtypes')
  chex.assert_trees_all_equal_structs(
      model_state, state['model_state'], custom_message='the forward pass changed the model state\'s '
      'structure (mutable collections must be the ones model.init returned)')


def norms_before_update(grads: chex.ArrayTree) -> Tuple[chex.ArrayTree, Dict[str, chex.Array]]:
  """`(grads, layer_grad_norms(grads))`, on CPU behind an optimization barrier, so that the
  optimizer update runs after the norms are taken.

  Left to itself, XLA:CPU interleaves the norms' small reductions with the update's fusions, so the
  gradients outlive the update: in four interleaved comparisons on a Zen 3 core the digits MLP step
  with the norms first was 0-11% faster, and an undonated step no longer keeps its gradients as
  temporaries (WORKSPACE, issue 15, ninth session). Other backends keep their own schedule
  (unmeasured there: no barrier).
  """
  def barrier(grads, norms):
    return jax.lax.optimization_barrier((grads, norms))
  return jax.lax.platform_dependent(grads, layer_grad_norms(grads), cpu=barrier,
                                    default=lambda grads, norms: (grads, norms))


def train_step(state: TrainState, batch, *, task, tx, schedule, axis_name: Optional[str] = None):
  """One optimizer step on `task.loss`, the mean per-example (or per-token) loss of `batch`.

  With `axis_name` (pmap), the batch is this device's shard and the loss, gradients and model
  state are averaged with `lax.pmean` (per-row state such as an LM's carry stays per device);
  under jit over a mesh the batch is global and XLA inserts the reduction. Per-step randomness
  is `fold_in(rng, step)` (and the device index under pmap), which the task splits.

  Row-sparse updates (`config.optimizer.sparse_output`, `train/sparse.py`): when `tx` asks for
  them and the model's head has a `row_loss`, the head's table gets its gradient as
  `(row_ids, row_grads)` (under pmap all-gathered from the devices, duplicates summed) and `tx`
  updates only those rows (lazily); the gradient norms are the dense ones.

  Mutable model collections (`state['model_state']`, e.g. BatchNorm's 'batch_stats') are updated
  by the forward pass. Under jit over a mesh BatchNorm normalizes with the statistics of the
  global batch (XLA reduces across devices), so any device count gives the same result; under
  pmap each device normalizes with its own shard's statistics and the updated running averages
  are `pmean`ed (the mean of per-device variances, not the global variance).

  Args:
    state: the train state (see `state.TrainState`; a task may add keys, e.g. 'carry').
    batch: the task's batch (this device's shard under pmap).
    task: a task of `train.task.TASKS`: `task.loss(params, state, batch, rng) -> (loss, updates)`,
      `updates` the new values of state keys other than params (at least 'model_state').
    tx: the optax transformation (a `sparse.SparseOutputTransformation` from `make_optimizer`).
    schedule: the learning-rate schedule (logged only).
    axis_name: the pmap axis, or None under jit.

  Returns:
    `(new_state, metrics)`, metrics {'loss', 'learning_rate', 'grad_norm', 'grad_norm/<layer>'}
    (the gradient norms before clipping), all on device.
  """
  task.check_batch(batch)
  rng = jax.random.fold_in(state['rng'], state['step'])
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  plan = sparse.plan_rows(tx, task.loss, state['params'], state, batch, rng)
  if plan is None:
    loss_fn = lambda params: task.loss(params, state, batch, rng)
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  else:  # row-sparse: the table's gradient is (row_ids, row_grads), never [rows, d]
    (loss, updates), grads, rows = sparse.value_and_row_grad(task.loss, plan, state['params'],
                                                             state, batch, rng)
  model_state = updates['model_state']
  if axis_name is not None:
    loss, grads, model_state = jax.lax.pmean((loss, grads, model_state), axis_name)
  if plan is None:
    grads, norms = norms_before_update(grads)
    opt_updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], opt_updates)
  else:
    if axis_name is not None:
      rows = sparse.all_gather_rows(rows, axis_name, plan)
    params, opt_state, grads = sparse.apply_row_updates(tx, grads, rows, state['opt_state'],
                                                        state['params'], plan)
    norms = layer_grad_norms(grads)
  check_updated_state(state, params, model_state)
  metrics = dict(loss=loss, learning_rate=schedule(state['step']), **norms)
  new_state = {**state, **updates, 'step': state['step'] + 1, 'params': params,
               'model_state': model_state, 'opt_state': opt_state}
  return new_state, metrics
