"""Row-sparse gradients and lazy updates (train/sparse.py, issue 23) against the dense step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from softmax_jax.heads.dense import DenseSoftmax
from softmax_jax.heads.hierarchical import HierarchicalSoftmax
from softmax_jax.heads.sampled import SampledSoftmax
from softmax_jax.train import sparse
from softmax_jax.train import step as step_lib
from softmax_jax.train.checkpoint import Checkpointer
from softmax_jax.train.config import base_config
from softmax_jax.train.parallel import JitDriver, PmapDriver
from softmax_jax.train.state import layer_grad_norms, make_optimizer
from softmax_jax.train.step import train_step

K, B, D_IN = 40, 16, 5


class _Model(nn.Module):
  head: nn.Module
  dim: int = 8

  @nn.compact
  def __call__(self, x, y, *, train):
    return self.head(nn.Dense(self.dim)(x), y, train=train)


class _Task:
  """The trainer's task interface, reduced to a linear backbone on fixed random data."""
  row_state_keys = ()
  resident = None
  batch_sizes = {'batch_size': B}

  def __init__(self, head, dim=8):
    self.model = _Model(head, dim)

  def check_batch(self, batch):
    del batch

  def loss(self, params, state, batch, rng):
    del state
    losses = self.model.apply({'params': params}, batch['x'], batch['y'], train=True,
                              rngs={'sample': rng})
    return jnp.mean(losses), {'model_state': {}}


def _optimizer(sparse_output, name='sgd', momentum=0.0, weight_decay=0.0, clip=0.0, lr=0.5):
  c = ml_collections.ConfigDict(base_config().optimizer.to_dict())
  c.update(name=name, momentum=momentum, weight_decay=weight_decay, sparse_output=sparse_output,
           warmup_steps=0, schedule='constant', learning_rate=lr, clip_global_norm=clip)
  return make_optimizer(c, 100)


@functools.lru_cache(maxsize=None)
def _data(seed):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(B, D_IN)).astype(np.float32), rng.integers(0, K, B).astype(np.int32)


def _batch(seed=1):
  x, y = _data(seed)
  return dict(x=x, y=y)


def _state(task, tx):
  b = _batch()
  params = task.model.init({'params': jax.random.PRNGKey(2), 'sample': jax.random.PRNGKey(3)},
                           b['x'], b['y'], train=False)['params']
  return dict(step=jnp.zeros((), jnp.int32), params=params, model_state={},
              opt_state=tx.init(params), rng=jax.random.PRNGKey(4))


def _train(head, sparse_output, steps, **opt):
  schedule, tx = _optimizer(sparse_output, **opt)
  task = _Task(head)
  state = _state(task, tx)
  step = jax.jit(functools.partial(train_step, task=task, tx=tx, schedule=schedule))
  losses, norms = [], []
  for i in range(steps):
    state, metrics = step(state, _batch(i % 3))
    losses.append(metrics['loss'])
    norms.append(metrics['grad_norm'])
  return state, np.asarray(losses), np.asarray(norms)


HEADS = {'sampled': SampledSoftmax(num_classes=K, num_sampled=6),
         'hierarchical': HierarchicalSoftmax(num_classes=K)}


@pytest.mark.parametrize('head,clip', [('sampled', 0.0), ('hierarchical', 0.05)])
def test_sparse_sgd_equals_dense(head, clip):
  """20 SGD steps: same parameters, losses and gradient norms (clipping counts the rows)."""
  dense, dense_losses, dense_norms = _train(HEADS[head], False, 20, clip=clip)
  rows, row_losses, row_norms = _train(HEADS[head], True, 20, clip=clip)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               dense['params'], rows['params'])
  np.testing.assert_allclose(row_losses, dense_losses, rtol=1e-5)
  np.testing.assert_allclose(row_norms, dense_norms, rtol=1e-5)
  assert not np.allclose(dense['params']['head']['bias'], 0)  # it trained


def test_auto_turns_on_only_where_exact_and_large():
  """Auto: sparse for SGD without momentum or decay (equal to dense) on a table of at least
  AUTO_MIN_ROWS rows; dense otherwise. True: sparse (lazy) for every optimizer."""
  big = sparse.AUTO_MIN_ROWS
  for k, opt, on in [(big, dict(), True), (big, dict(momentum=0.9), False),
                     (big, dict(weight_decay=1e-4), False), (big, dict(name='adamw'), False),
                     (K, dict(), False)]:
    task = _Task(SampledSoftmax(num_classes=k, num_sampled=6))
    _, tx = _optimizer(None, **opt)
    state = jax.eval_shape(lambda: _state(task, tx))  # pylint: disable=cell-var-from-loop
    plan = sparse.plan_rows(tx, task.loss, state['params'], state, _batch(), state['rng'])
    assert (plan is not None) == on, (k, opt)
    _, forced = _optimizer(True, **opt)
    plan = sparse.plan_rows(forced, task.loss, state['params'], state, _batch(), state['rng'])
    assert plan == sparse.RowPlan(('head', 'embedding'), k, B + 6, 8, 'SampledSoftmax')
  # A balanced tree over 2^15 classes: paths of 15 nodes. 16 labels touch at most 240 of the
  # 32767 rows (sparse); 2048 labels up to 30720 of them (dense: no faster).
  task = _Task(HierarchicalSoftmax(num_classes=2 * big, tree='balanced'))
  _, tx = _optimizer(None)
  state = jax.eval_shape(lambda: _state(task, tx))
  for n, on in [(B, True), (2048, False)]:
    batch = dict(x=jax.ShapeDtypeStruct((n, D_IN), jnp.float32),
                 y=jax.ShapeDtypeStruct((n,), jnp.int32))
    plan = sparse.plan_rows(tx, task.loss, state['params'], state, batch, state['rng'])
    assert (plan is not None) == on, n
    assert plan is None or plan.num_touched == B * 15


def _lazy_adam_reference(table, steps, lr, b1, b2, eps, wd):
  """float64 LazyAdam (TF LazyAdam / torch SparseAdam + decoupled decay on touched rows)."""
  w, m, v = (np.asarray(table, np.float64), np.zeros(table.shape), np.zeros(table.shape))
  for t, (ids, grads) in enumerate(steps, start=1):
    g = np.zeros_like(w)
    np.add.at(g, ids, grads)
    rows = np.unique(ids)
    m[rows] = b1 * m[rows] + (1 - b1) * g[rows]
    v[rows] = b2 * v[rows] + (1 - b2) * g[rows] ** 2
    m_hat, v_hat = m[rows] / (1 - b1 ** t), v[rows] / (1 - b2 ** t)
    w[rows] -= lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * w[rows])
  return w, m, v


def test_lazy_adamw_matches_float64_reference():
  """Untouched rows (and moments) unchanged; touched rows are AdamW with per-row moments and
  bias correction by the global step; duplicate ids are summed before the update."""
  lr, wd, n, d = 0.1, 0.05, 12, 3
  schedule, tx = _optimizer(True, name='adamw', weight_decay=wd, lr=lr)
  del schedule
  rng = np.random.default_rng(0)
  table = rng.normal(size=(n, d)).astype(np.float32)
  params = {'head': {'embedding': jnp.asarray(table)}, 'w': jnp.ones(2)}
  opt_state = tx.init(params)
  plan = sparse.RowPlan(('head', 'embedding'), n, 5, d, 'SampledSoftmax')
  steps = [(np.array([1, 4, 4, 7, 1]), rng.normal(size=(5, d))),
           (np.array([2, 4, 9, 9, 9]), rng.normal(size=(5, d))),
           (np.array([11, 0, 4, 3, 1]), rng.normal(size=(5, d)))]
  update = jax.jit(lambda g, rows, s, p: sparse.apply_row_updates(tx, g, rows, s, p, plan)[:2])
  for ids, grads in steps:
    rows = sparse.sum_duplicates(jnp.asarray(ids, jnp.int32), jnp.asarray(grads, jnp.float32), n)
    assert int(np.sum(np.asarray(rows[0]) < n)) == len(set(ids))  # distinct ids, padded with n
    params, opt_state = update({'w': jnp.zeros(2)}, rows, opt_state, params)
  w, m, v = _lazy_adam_reference(table, steps, lr, 0.9, 0.999, 1e-8, wd)
  np.testing.assert_allclose(params['head']['embedding'], w, rtol=2e-5, atol=2e-6)
  adam = opt_state[-1][0]  # chain(adamw) -> (ScaleByAdamState, decay, lr)
  np.testing.assert_allclose(adam.mu['head']['embedding'], m, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(adam.nu['head']['embedding'], v, rtol=2e-5, atol=1e-9)
  untouched = [5, 6, 8, 10]
  np.testing.assert_array_equal(np.asarray(params['head']['embedding'])[untouched], table[untouched])
  assert int(adam.count) == 3
  # The dense leaf got zero gradients: AdamW's decay alone moved it.
  np.testing.assert_allclose(params['w'], np.ones(2) * (1 - lr * wd) ** 3, rtol=1e-6)


def _temp_bytes(k, sparse_output):
  schedule, tx = _optimizer(sparse_output)
  task = _Task(SampledSoftmax(num_classes=k, num_sampled=8), dim=64)
  state = jax.eval_shape(lambda: _state(task, tx))
  step = jax.jit(functools.partial(train_step, task=task, tx=tx, schedule=schedule))
  compiled = step.lower(state, jax.eval_shape(_batch)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_step_temporaries_do_not_grow_with_num_classes(monkeypatch):
  """The sparse step has no [K, d] gradient: from K=1k to K=16k (d=64: a [K, d] float32 table
  is 4 MB there) its temporaries grow by O(K) (the sampler's, the bias gradient), far less than
  a table. The dense step's gradient is a table: on CPU, with the norms taken before the update
  (`step.norms_before_update`), XLA writes this undonated step's update over the gradient's buffer,
  so it is no temporary;
  with the norms taken after the update it outlives it and is one table more."""
  small, large = 1000, 16000
  table = large * 64 * 4
  sparse_large = _temp_bytes(large, True)
  assert sparse_large - _temp_bytes(small, True) < table // 8, (sparse_large, table)
  assert _temp_bytes(large, False) - sparse_large < table // 2
  monkeypatch.setattr(step_lib, 'norms_before_update', lambda grads: (grads, layer_grad_norms(grads)))
  assert _temp_bytes(large, False) - sparse_large >= table // 2  # the measure sees a table


def test_jit_and_pmap_equal_on_8_devices():
  """Lazy AdamW on the hierarchical head (no sampling: both drivers see the same loss)."""
  assert jax.device_count() == 8
  results = []
  for driver_cls in (JitDriver, PmapDriver):
    schedule, tx = _optimizer(True, name='adamw', weight_decay=0.01, lr=0.05)
    task = _Task(HierarchicalSoftmax(num_classes=K))
    driver = driver_cls(task, tx, schedule)
    state = driver.put_state(jax.tree.map(np.asarray, _state(task, tx)))
    for i in range(3):
      state, _ = driver.step(state, driver.put_batch(jax.tree.map(np.asarray, _batch(i))))
    results.append(driver.get_state(state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), *results)


def test_checkpoint_resume_of_lazy_state(tmp_path):
  """2 + (save, restore) + 2 lazy AdamW steps equal 4 straight ones (the moments are saved)."""
  head = HEADS['hierarchical']
  schedule, tx = _optimizer(True, name='adamw', weight_decay=0.01, lr=0.05)
  task = _Task(head)
  step = jax.jit(functools.partial(train_step, task=task, tx=tx, schedule=schedule))
  straight = resumed = _state(task, tx)
  for i in range(4):
    straight, _ = step(straight, _batch(i))
  for i in range(2):
    resumed, _ = step(resumed, _batch(i))
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(2, jax.tree.map(np.asarray, resumed))
  resumed, at = ckpt.restore_latest(jax.tree.map(np.asarray, _state(task, tx)))
  ckpt.close()
  assert at == 2
  for i in range(2, 4):
    resumed, _ = step(resumed, _batch(i))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), straight, resumed)


def test_bad_arguments():
  schedule, tx = _optimizer(True, name='adamw')
  task = _Task(DenseSoftmax(num_classes=K))
  state = _state(task, tx)
  with pytest.raises(ValueError, match=r"config.optimizer.sparse_output=True with optimizer "
                     r"'adamw', but DenseSoftmax has no row-sparse training loss"):
    train_step(state, _batch(), task=task, tx=tx, schedule=schedule)
  with pytest.raises(ValueError, match=r'config.optimizer.sparse_output must be None \(auto\), '
                     r"True or False; got 'yes'"):
    _optimizer('yes')
  # Auto falls back to the dense update for a head without a row loss.
  _, tx = _optimizer(None)
  assert sparse.plan_rows(tx, task.loss, state['params'], state, _batch(), state['rng']) is None


class _ReadsTable(nn.Module):
  """A loss that also reads the head's whole table (as distillation's student log_prob does)."""
  head: nn.Module

  @nn.compact
  def __call__(self, x, y, *, train):
    return self.head(x, y, train=train) - self.head.log_prob(x)[:, 0]


def test_a_loss_that_also_reads_the_whole_table_stays_dense():
  task = _Task(SampledSoftmax(num_classes=sparse.AUTO_MIN_ROWS, num_sampled=6))
  task.model = _ReadsTable(task.model.head)
  _, auto = _optimizer(None)
  _, forced = _optimizer(True)
  state = jax.eval_shape(lambda: _state(task, auto))
  args = (task.loss, state['params'], state, _batch(), state['rng'])
  assert sparse.plan_rows(auto, *args) is None
  with pytest.raises(ValueError, match=r'sparse_output=True with optimizer .sgd., but the loss also '
                     r'reads the whole table of SampledSoftmax \(SampledSoftmax.log_prob'):
    sparse.plan_rows(forced, *args)
