"""Row-sparse gradients and lazy optimizer updates for heads with a large table (issue 23).

A head whose training loss reads few rows of a big `[R_total, d]` table (`SampledSoftmax`: the
labels' and the sample's class rows; `HierarchicalSoftmax`: the node vectors on the labels' paths)
has a `row_loss(features, labels, row_delta) -> (loss, row_ids)` method and a `sparse_param`
class attribute (the table's parameter name); `row_ids_distinct = True` says its ids never repeat
(the hierarchical head's sorted node ids), else the step sums repeated ids. With `config.optimizer.sparse_output` on, the
train step (`train/step.py`):

1. finds the head (`plan_rows`: an abstract trace of the task's loss, where a method interceptor
   sees the head's training call; nothing is computed);
2. differentiates the loss with respect to the other parameters and a `[R, d]` zero `row_delta`
   added to the gathered rows, never the table (`value_and_row_grad`): the gradient is
   `(row_ids [R], row_grads [R, d])`, distinct ids padded with the out-of-range id `R_total`
   (zero gradient); no `[R_total, d]` gradient exists. The sampled head reads its rows in TF's
   layout (one row per read, `[labels; sample]`) and the step then sums repeated ids once
   (`sum_duplicates`: a sort and a segment sum of R rows), which is cheaper than the scatter
   that the backward pass of a gather into distinct rows forms (WORKSPACE, issue 23);
3. under pmap gathers every device's rows and sums duplicates again (`all_gather_rows`), so every
   device applies the same update;
4. applies the run's own optax chain (`make_optimizer`) to a *row view* of the parameters
   (`apply_row_updates`): the table leaf of the gradients, the parameters and every parameter-shaped
   optimizer-state leaf (momentum, Adam's moments) is replaced by its `[R, d]` rows, the chain
   updates that view, and the rows are scattered back. This is the lazy form of each optimizer,
   as TF's LazyAdam and PyTorch's SparseAdam: rows that the step does not touch keep their value
   and their moments; Adam's bias correction uses the global step count; momentum and weight
   decay (SGD's added decay, AdamW's decoupled one) act on touched rows only; clipping by global
   norm counts the rows after duplicate summation, so the norm is the dense one.

The optimizer state has the dense structure (the per-row moments are the full `[R_total, d]`
leaves optax makes), so checkpoints and resumption are the dense ones, and a run can switch
between sparse and dense updates on resume. With SGD without momentum and weight decay the
sparse update equals the dense one up to float summation order; `sparse_output=None` (auto)
turns it on there only, for tables of at least `AUTO_MIN_ROWS` rows whose touched-row bound R
is at most half the table (below that size the sort and scatter of the touched ids cost more
than the dense update saves; with R near the table, e.g. a hierarchical head's N D paths at
K=50k, N=2048, the row view is as large as the table and no faster: WORKSPACE, issue 23).

References:
  TF `tf.IndexedSlices` and `tfa.optimizers.LazyAdam`; PyTorch `nn.Embedding(sparse=True)` and
  `torch.optim.SparseAdam`.
"""

from typing import Callable, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

KEY = 'config.optimizer.sparse_output'
AUTO_MIN_ROWS = 16384  # auto: sparse updates only for tables with at least this many rows


class SparseOutputTransformation(NamedTuple):
  """An optax transformation (`init`, `update`) with the sparse-output switch of its config.

  Attributes:
    init: the chain's init (the dense state, also for sparse updates).
    update: the chain's update.
    sparse_output: `config.optimizer.sparse_output`: None (auto), True or False.
    exact: whether the lazy updates equal the dense ones (SGD, no momentum, no weight decay).
    optimizer: the optimizer's name, for messages.
  """
  init: Callable
  update: Callable
  sparse_output: Optional[bool]
  exact: bool
  optimizer: str


def with_sparse_output(tx, opt_cfg) -> SparseOutputTransformation:
  """`tx` with `opt_cfg.sparse_output` (None when absent, e.g. an older config.json).

  Raises:
    ValueError: `sparse_output` is not None, True or False (naming the key).
  """
  value = opt_cfg.get('sparse_output', None)
  if value is not None and not isinstance(value, bool):
    raise ValueError(f'{KEY} must be None (auto), True or False; got {value!r}.')
  exact = opt_cfg.name == 'sgd' and not opt_cfg.momentum and not opt_cfg.weight_decay
  return SparseOutputTransformation(tx.init, tx.update, value, bool(exact), str(opt_cfg.name))


class RowPlan(NamedTuple):
  """What the abstract trace found: the table's path in the params, its rows, R and d."""
  path: Tuple[str, ...]
  num_rows: int
  num_touched: int
  dim: int
  head: str
  distinct: bool = False  # the head's row ids never repeat (no duplicate sum needed)


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _replace(tree, path, value):
  """A copy of nested dict `tree` with the leaf at `path` replaced (removed if value is None)."""
  tree = dict(tree)
  if len(path) == 1:
    if value is None:
      tree.pop(path[0])
    else:
      tree[path[0]] = value
    return tree
  tree[path[0]] = _replace(tree.get(path[0], {}), path[1:], value)
  return tree


def _interceptor(params, box, row_delta=None):
  """Replaces the training call of the head that owns a table leaf of `params` by `row_loss`."""
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    name = getattr(type(module), 'sparse_param', None)
    method = context.method_name
    if name is None or box.get('inside') or not hasattr(module, 'row_loss'):
      if (method == '__call__' and kwargs.get('train') and hasattr(module, 'log_prob')
          and hasattr(module, 'num_classes')):  # a head (not the model around it)
        box.setdefault('heads', []).append(type(module).__name__)
      return next_fun(*args, **kwargs)
    path = tuple(module.path) + (name,)
    try:
      owned = _leaf(params, path) is module.get_variable('params', name)
    except (KeyError, TypeError):
      owned = False
    if not owned:  # another model's head (e.g. a distillation teacher)
      return next_fun(*args, **kwargs)
    if method == '__call__' and kwargs.get('train'):
      if 'ids' in box:
        box.setdefault('reads_table', f'{type(module).__name__}.__call__ twice')
        return next_fun(*args, **kwargs)
      features, labels = (list(args) + [kwargs.get('features'), kwargs.get('labels')])[:2]
      box['inside'] = True
      try:
        loss, ids = module.row_loss(features, labels, row_delta)
      finally:
        box['inside'] = False
      box.update(ids=ids, path=path, head=type(module).__name__,
                 num_rows=module.get_variable('params', name).shape[0], dim=features.shape[-1],
                 distinct=bool(getattr(type(module), 'row_ids_distinct', False)))
      return loss
    if method in ('__call__', 'log_prob', 'logits', 'predict', 'eval_stats'):
      box.setdefault('reads_table', f'{type(module).__name__}.{method}')  # the outermost call
    return next_fun(*args, **kwargs)
  return intercept


def plan_rows(tx, loss_fn: Callable, params, *args) -> Optional[RowPlan]:
  """The row plan of `loss_fn(params, *args)` if sparse updates apply, else None (dense).

  Traces the loss abstractly (`jax.eval_shape`) once per compilation of the step.

  Args:
    tx: the step's transformation; sparse only for a `SparseOutputTransformation` whose
      `sparse_output` is True, or None (auto) with `exact` (SGD without momentum or decay), a
      table of at least `AUTO_MIN_ROWS` rows and at most half of them touched (R).
    loss_fn: the task's `loss(params, state, batch, rng) -> (loss, updates)`.
    params: the parameters.
    *args: the rest of `loss_fn`'s arguments.

  Returns:
    A `RowPlan`, or None.

  Raises:
    ValueError: `sparse_output=True` and the loss has no head with a row-sparse training loss,
      or it also reads the head's full table (e.g. distillation's student `log_prob`); the
      message names the key and the head.
  """
  setting = getattr(tx, 'sparse_output', False)
  if setting is False or (setting is None and not tx.exact):
    return None
  box = {}

  def trace(params, *args):
    with nn.intercept_methods(_interceptor(params, box)):
      return loss_fn(params, *args)
  jax.eval_shape(trace, params, *args)
  problem = None
  if 'ids' not in box:
    heads = ', '.join(sorted(set(box.get('heads', [])))) or 'the model\'s head'
    problem = (f'{heads} has no row-sparse training loss (`row_loss`, `sparse_param`: '
               'SampledSoftmax and HierarchicalSoftmax have one)')
  elif 'reads_table' in box:
    problem = (f'the loss also reads the whole table of {box["head"]} '
               f'({box["reads_table"]}, e.g. distillation), whose gradient would be lost')
  if problem is not None:
    if setting is True:
      raise ValueError(f'{KEY}=True with optimizer {tx.optimizer!r}, but {problem}. Set '
                       f'--{KEY}=False (dense updates) or None (auto).')
    return None
  if setting is None and (box['num_rows'] < AUTO_MIN_ROWS
                         or 2 * box['ids'].shape[0] > box['num_rows']):
    return None
  return RowPlan(box['path'], int(box['num_rows']), int(box['ids'].shape[0]), int(box['dim']),
                 box['head'], box['distinct'])


def value_and_row_grad(loss_fn: Callable, plan: RowPlan, params, *args):
  """`((loss, aux), dense_grads, (row_ids, row_grads))` of `loss_fn(params, *args)`.

  `dense_grads` has every parameter but the table (at `plan.path`); the table's gradient is
  `row_grads [R, d]` at the distinct `row_ids [R]` (padding: `plan.num_rows`, zero gradient):
  the head's rows, repeated ids summed here unless `plan.distinct`.
  """
  table = _leaf(params, plan.path)
  dense = _replace(params, plan.path, None)
  box = {}

  def fn(dense, row_delta):
    full = _replace(dense, plan.path, table)
    with nn.intercept_methods(_interceptor(full, box, row_delta)):
      loss, aux = loss_fn(full, *args)
    return loss, (aux, box['ids'])

  delta = jnp.zeros((plan.num_touched, plan.dim), table.dtype)
  (loss, (aux, ids)), (grads, row_grads) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
      dense, delta)
  if not plan.distinct:
    ids, row_grads = sum_duplicates(ids, row_grads, plan.num_rows)
  return (loss, aux), grads, (ids, row_grads)


def sum_duplicates(row_ids, row_grads, num_rows: int):
  """Distinct ids (sorted, padded with `num_rows`) and their summed gradients, same R."""
  ids, inverse = jnp.unique(row_ids, size=row_ids.shape[0], fill_value=num_rows,
                            return_inverse=True)
  grads = jax.ops.segment_sum(row_grads, inverse.reshape(-1), num_segments=row_ids.shape[0])
  return ids, grads


def all_gather_rows(rows, axis_name: str, plan: RowPlan):
  """Under pmap: every device's `(ids, grads)`, duplicates summed, grads averaged (as `pmean`)."""
  ids, grads = rows
  n = jax.lax.psum(1, axis_name)
  ids = jax.lax.all_gather(ids, axis_name).reshape(-1)
  grads = jax.lax.all_gather(grads, axis_name).reshape(-1, grads.shape[-1]) / n
  return sum_duplicates(ids, grads, plan.num_rows)


def _row_leaves(tree, plan: RowPlan, shape):
  """Flags of the leaves of `tree` (an optimizer state) that hold one row per table row."""
  def is_row(path, leaf):
    keys = tuple(getattr(k, 'key', None) for k in path[-len(plan.path):])
    return keys == plan.path and getattr(leaf, 'shape', None) == shape
  return jax.tree_util.tree_map_with_path(is_row, tree)


def apply_row_updates(tx, grads, rows, opt_state, params, plan: RowPlan):
  """`(new_params, new_opt_state, grads_view)`: `tx` applied lazily to the touched rows.

  `grads` lacks the table; `rows = (row_ids [R], row_grads [R, d])` distinct ids. The chain sees
  the row view (table, gradient and per-row state leaves cut to the R rows; out-of-range ids read
  zeros and are dropped when scattered back). `grads_view` is the gradient tree with the table
  leaf replaced by the row gradients (for gradient norms).
  """
  ids, row_grads = rows
  table = _leaf(params, plan.path)
  take = lambda x: jnp.take(x, ids, axis=0, mode='fill', fill_value=0)
  flags = _row_leaves(opt_state, plan, table.shape)
  state_view = jax.tree.map(lambda f, x: take(x) if f else x, flags, opt_state)
  params_view = _replace(params, plan.path, take(table))
  grads_view = _replace(grads, plan.path, row_grads.astype(table.dtype))
  updates, new_view = tx.update(grads_view, state_view, params_view)
  new_rows = _leaf(updates, plan.path)
  new_params = optax.apply_updates(_replace(params, plan.path, None),
                                   _replace(updates, plan.path, None))
  new_table = table.at[ids].add(new_rows.astype(table.dtype), mode='drop')
  new_params = _replace(new_params, plan.path, new_table)
  new_state = jax.tree.map(lambda f, old, new: old.at[ids].set(new, mode='drop') if f else new,
                           flags, opt_state, new_view)
  return new_params, new_state, grads_view

