"""Vocabulary-parallel cross-entropy, log-softmax, predict and eval stats on 8 fake CPU devices.

Meshes ('data', 'model') 2 x 4 and 1 x 8 (tests/conftest.py makes the 8 devices). Loss, the
gradients w.r.t. features, kernel and bias, log_softmax and predict against a float64 NumPy
reference of the unsharded layer (`lse(x W + b) - z_y`, `dz = softmax - onehot`), float32 and
bfloat16, plain and fused, with `ignore_index`; the NaN rule; compile-only memory (no `[N, K]`
buffer on a device); the argument errors (K not divisible by the model axis, a mesh without the
axes, bad ranks, labels out of range). One jit of loss + grads + log_softmax + predict per case.
The sampled losses over a `[K, d]` table sharded on its rows (sampled softmax, NCE, negative
sampling) against the unsharded `ops.sampled_softmax_loss` & co. with the same sample (an
accidental hit, a repeated label, a repeated sample id, an ignored example), loss and gradients,
and against float64 NumPy; their argument errors.
"""

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from softmax_jax import ops
from softmax_jax.ops import _checks
from softmax_jax.ops import vocab_parallel as vp

N, D, K = 8, 6, 24  # examples, features, classes (K / 8 = 3 per shard at M = 8)
IGNORE = -1


def _mesh(data, model):
  return jax.make_mesh((data, model), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)


def _data(dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(N, D)) * 1.5).astype(np.float32)
  w = rng.normal(size=(D, K)).astype(np.float32)
  b = rng.normal(size=K).astype(np.float32)
  y = rng.integers(0, K, size=N).astype(np.int32)
  y[3] = IGNORE
  return tuple(jnp.asarray(a, dtype) for a in (x, w, b)) + (jnp.asarray(y),)


def _reference(x, w, b, y, k=K):
  """float64 loss [N], dx, dw, db of sum(loss), log_softmax [N, k], argmax [N] (k classes)."""
  x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
  y = np.asarray(y)
  keep = y != IGNORE
  z = x @ w + b
  log_p = z - special.logsumexp(z, axis=1, keepdims=True)
  yy = np.where(keep, y, 0)
  loss = np.where(keep, -log_p[np.arange(N), yy], 0.0)
  dz = (np.exp(log_p) - np.eye(k)[yy]) * keep[:, None]
  return loss, dz @ w.T, x.T @ dz, dz.sum(0), log_p, z.argmax(1)


@pytest.mark.parametrize('shape,dtype,fused', [
    ((2, 4), jnp.float32, False), ((1, 8), jnp.float32, True),
    ((2, 4), jnp.bfloat16, True), ((1, 8), jnp.bfloat16, False)])
def test_matches_unsharded(shape, dtype, fused):
  mesh = _mesh(*shape)
  x, w, b, y = _data(dtype)

  @jax.jit
  def run(x, w, b):
    def total(x, w, b):
      loss = vp.sharded_dense_loss(mesh, x, w, y, bias=b, ignore_index=IGNORE, fused=fused,
                                   chunk_size=2)  # K/M = 6 or 3: whole chunks and a tail
      return loss.sum(), loss
    (_, loss), grads = jax.value_and_grad(total, (0, 1, 2), has_aux=True)(x, w, b)
    log_p = vp.sharded_dense_log_softmax(mesh, x, w, bias=b)
    pred = vp.sharded_dense_predict(mesh, x, w, bias=b)
    return loss, grads, log_p, pred

  loss, (dx, dw, db), log_p, pred = run(x, w, b)
  r_loss, r_dx, r_dw, r_db, r_log_p, r_pred = _reference(x, w, b, y)
  tol = dict(rtol=2e-2, atol=3e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  assert loss.dtype == jnp.float32 and log_p.dtype == jnp.float32
  assert (dx.dtype, dw.dtype, db.dtype) == (dtype,) * 3
  np.testing.assert_allclose(np.asarray(loss), r_loss, **tol)
  assert np.asarray(loss)[3] == 0.0 and not np.asarray(dx)[3].any()  # ignored: 0, no gradient
  for got, want in ((dx, r_dx), (dw, r_dw), (db, r_db), (log_p, r_log_p)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **tol)
  np.testing.assert_array_equal(np.asarray(pred), r_pred)
  assert pred.dtype == jnp.int32
  # Each device holds its [N / D, K / M] block of the log-probabilities, never [N, K].
  assert log_p.sharding.shard_shape(log_p.shape) == (N // shape[0], K // shape[1])


@pytest.mark.parametrize('fused', [False, True])
def test_shards_of_padded_classes_only_give_finite_gradients(fused):
  """K = 10 real classes padded to 16 with -inf bias (`pad_classes_to`) over M = 8: shards 5-7
  hold padded classes only. Loss and gradients equal the unpadded float64 reference; the padded
  columns get zero gradient, never NaN (an all -inf shard's logsumexp is -inf, its gradient 0)."""
  x, w, b, y = _data(jnp.float32, seed=3)
  real = 10
  y = jnp.where(y == IGNORE, IGNORE, y % real)
  b = b.at[real:].set(-jnp.inf)
  mesh = _mesh(1, 8)

  @jax.jit
  def run(x, w, b):
    f = lambda x, w, b: vp.sharded_dense_loss(mesh, x, w, y, bias=b, ignore_index=IGNORE,
                                              fused=fused, chunk_size=2).sum()
    return jax.value_and_grad(f, (0, 1, 2))(x, w, b)

  loss, (dx, dw, db) = run(x, w, b)
  ref_loss, ref_dx, ref_dw, ref_db, _, _ = _reference(x, w[:, :real], b[:real], y, real)
  np.testing.assert_allclose(loss, ref_loss.sum(), rtol=1e-5)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw[:, :real], ref_dw, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(db[:real], ref_db, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(dw[:, real:], 0)
  np.testing.assert_array_equal(db[real:], 0)


def test_eval_stats_ties_and_nan_rule():
  """Eval stats against float64 (two temperatures, the rank, a log prior); argmax ties take the
  lowest id across shards; a NaN row."""
  mesh = _mesh(2, 4)
  x, w, b, y = _data(jnp.float32, seed=1)
  y = jnp.where(y == IGNORE, 0, y)
  x = x.at[5].set(jnp.nan)
  w = w.at[:, 20].set(w[:, 2])  # classes 2 and 20 (shards 0 and 3) tie for every example
  b = b.at[20].set(b[2]).at[2].add(10.0).at[20].add(10.0)  # ... and win
  prior = jnp.asarray(np.random.default_rng(2).normal(size=K), jnp.float32)
  ts = (1.0, 2.5)

  def stats(x, w, b, y, prior):
    out = vp.vocab_parallel_eval_stats(x, w, y, bias=b, temperatures=ts, log_prior=prior)
    out['loss'] = vp.vocab_parallel_cross_entropy(x, w, y, bias=b, fused=True)
    return out

  specs = (P('data', None), P(None, 'model'), P('model'), P('data'), P('model'))
  got = jax.jit(jax.shard_map(stats, mesh=mesh, in_specs=specs, out_specs=P('data')))(
      x, w, b, y, prior)
  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
  ok = np.arange(N) != 5
  rows = np.arange(N)
  yy = np.asarray(y)
  for prefix, s in (('', z), ('adjusted_', z - np.asarray(prior, np.float64))):
    for g, t in enumerate(ts):
      log_p = s / t - special.logsumexp(s / t, axis=1, keepdims=True)
      np.testing.assert_allclose(np.asarray(got[prefix + 'label_log_prob'])[ok, g],
                                 log_p[rows, yy][ok], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(np.asarray(got[prefix + 'confidence'])[ok, g],
                                 np.exp(log_p.max(1))[ok], rtol=1e-5)
    rank = ((s > s[rows, yy][:, None]) & (np.arange(K) != yy[:, None])).sum(1)
    np.testing.assert_array_equal(np.asarray(got[prefix + 'label_rank'])[ok], rank[ok])
    assert np.isnan(np.asarray(got[prefix + 'label_log_prob'])[5]).all()
    assert np.isnan(np.asarray(got[prefix + 'confidence'])[5]).all()
  log_p = z - special.logsumexp(z, axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(got['loss'])[ok], -log_p[rows, yy][ok], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got['prediction'])[ok], 2)  # lowest id of the tie
  assert np.isnan(np.asarray(got['loss'])[5])  # the NaN row: NaN, others unaffected


def test_compiled_memory_has_no_full_logits():
  """The compiled loss+grad step holds less than one [N, K] float32 buffer per device."""
  mesh = _mesh(1, 8)
  n, k = 16, 8 * 512
  x = jax.ShapeDtypeStruct((n, D), jnp.float32)
  w = jax.ShapeDtypeStruct((D, k), jnp.float32)
  y = jax.ShapeDtypeStruct((n,), jnp.int32)
  for fused in (False, True):
    step = jax.jit(jax.grad(lambda x, w, y: vp.sharded_dense_loss(
        mesh, x, w, y, fused=fused, chunk_size=128).sum(), (0, 1)))
    mem = step.lower(x, w, y).compile().memory_analysis()
    assert mem.temp_size_in_bytes < n * k * 4 / 2, (fused, mem.temp_size_in_bytes)


def test_bad_arguments():
  mesh = _mesh(1, 8)
  x, w, b, y = _data(jnp.float32)
  y = jnp.where(y == IGNORE, 0, y)
  with pytest.raises(ValueError, match=r'K = 20 .*\'model\' = 8|\'model\' = 8.*K = 20'):
    vp.sharded_dense_loss(mesh, x, w[:, :20], y)
  with pytest.raises(ValueError, match='`mesh` must have an axis'):
    vp.sharded_dense_loss(jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,)), x, w, y)
  with pytest.raises(_checks.ArgumentError, match='`labels` must lie in'):
    vp.sharded_dense_loss(mesh, x, w, y.at[0].set(K))
  with pytest.raises(ValueError, match='`features` must have shape'):
    vp.sharded_dense_loss(mesh, x[None], w, y)
  with pytest.raises(ValueError, match='`kernel` must have shape'):
    vp.sharded_dense_loss(mesh, x, w[:-1], y)


# ---- sampled losses over a [K, d] table sharded on its rows ------------------------------------

S = 6  # samples: an accidental hit of example 0, a repeated id, both halves of the classes


def _sampled_data(dtype, seed=4):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(N, D)) * 1.5).astype(np.float32)
  table = rng.normal(size=(K, D)).astype(np.float32)
  b = rng.normal(size=K).astype(np.float32)
  y = rng.integers(0, K, size=N).astype(np.int32)
  y[2] = y[1]  # a repeated label
  y[3] = IGNORE
  sampled = np.array([y[0], 5, 17, 5, 23, 0], np.int32)  # y[0]: an accidental hit; 5 twice
  true_count = rng.uniform(0.2, 2.0, size=N).astype(np.float32)
  sampled_count = rng.uniform(0.2, 2.0, size=S).astype(np.float32)
  values = tuple(jnp.asarray(a) for a in (sampled, true_count, sampled_count))
  return tuple(jnp.asarray(a, dtype) for a in (x, table, b)) + (jnp.asarray(y), values)


UNSHARDED = {'sampled_softmax': ops.sampled_softmax_loss, 'nce': ops.nce_loss,
             'negative_sampling': ops.negative_sampling_loss}


@pytest.mark.parametrize('shape,dtype,loss', [
    ((2, 4), jnp.float32, 'sampled_softmax'), ((1, 8), jnp.float32, 'sampled_softmax'),
    ((2, 4), jnp.bfloat16, 'sampled_softmax'), ((1, 8), jnp.float32, 'nce'),
    ((2, 4), jnp.float32, 'negative_sampling')])
def test_sampled_matches_unsharded(shape, dtype, loss):
  """Loss and gradients (features, table, bias) equal the unsharded op with the same sample;
  the table's gradient stays split on the model axis."""
  mesh = _mesh(*shape)
  x, table, b, y, values = _sampled_data(dtype)
  if loss == 'negative_sampling':
    values = values[0]  # no log-Q correction: the ids alone
  kw = dict(ignore_index=IGNORE, remove_accidental_hits=True)

  def grads(fn):
    def total(x, t, b):
      out = fn(x, t, b)
      return out.sum(), out
    return jax.jit(jax.value_and_grad(total, (0, 1, 2), has_aux=True))(x, table, b)

  (_, got), got_grads = grads(lambda x, t, b: vp.sharded_sampled_loss(
      mesh, x, t, y, values, loss=loss, bias=b, **kw))
  (_, want), want_grads = grads(lambda x, t, b: UNSHARDED[loss](x, t, y, values, bias=b, **kw))
  tol = dict(rtol=2e-2, atol=3e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tol)
  assert np.asarray(got)[3] == 0.0 and np.all(np.isfinite(np.asarray(got)))
  for g, w in zip(got_grads, want_grads):
    assert g.dtype == dtype
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), **tol)
  d_table = got_grads[1]
  assert d_table.sharding.shard_shape(d_table.shape) == (K // shape[1], D)
  # The accidental hit is removed: the label's row of example 0 gets no 'negative' gradient from
  # it (checked against the op), and rows neither labels nor sampled get none at all.
  touched = set(np.asarray(y).tolist()) | set(np.asarray(values[0] if isinstance(values, tuple)
                                                          else values).tolist())
  untouched = [k for k in range(K) if k not in touched]
  assert untouched and not np.asarray(d_table, np.float32)[untouched].any()


def test_sampled_softmax_float64_reference():
  """The sampled softmax loss against float64 NumPy: `log(e^z0 + sum_kept e^zj) - z0`."""
  mesh = _mesh(2, 4)
  x, table, b, y, (sampled, tc, sc) = _sampled_data(jnp.float32, seed=6)
  y = jnp.where(y == IGNORE, 7, y)
  got = vp.sharded_sampled_loss(mesh, x, table, y, (sampled, tc, sc), bias=b)
  x64, t64, b64 = (np.asarray(a, np.float64) for a in (x, table, b))
  yy, ss = np.asarray(y), np.asarray(sampled)
  z = x64 @ t64.T + b64
  z0 = z[np.arange(N), yy] - np.log(np.asarray(tc, np.float64))
  zs = z[:, ss] - np.log(np.asarray(sc, np.float64))
  zs = np.where(ss[None, :] == yy[:, None], -np.inf, zs)
  want = special.logsumexp(np.concatenate([z0[:, None], zs], 1), axis=1) - z0
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_sampled_bad_arguments():
  mesh = _mesh(1, 8)
  x, table, b, y, values = _sampled_data(jnp.float32)
  y = jnp.where(y == IGNORE, 0, y)
  with pytest.raises(ValueError, match=r"`table` must have K divisible by .*'model' = 8; got K = 20"):
    vp.sharded_sampled_loss(mesh, x, table[:20], y, values)
  with pytest.raises(_checks.ArgumentError, match='`sampled_values.sampled` must lie in'):
    vp.sharded_sampled_loss(mesh, x, table, y, (values[0].at[1].set(K),) + values[1:])
  with pytest.raises(_checks.ArgumentError, match='`labels` must lie in'):
    vp.sharded_sampled_loss(mesh, x, table, y.at[0].set(K), values)
  with pytest.raises(ValueError, match='`table` must have shape'):
    vp.sharded_sampled_loss(mesh, x, table[:, :-1], y, values)
  with pytest.raises(ValueError, match='`loss` must be one of'):
    vp.sharded_sampled_loss(mesh, x, table, y, values, loss='hinge')
  with pytest.raises(ValueError, match='expected counts'):
    vp.sharded_sampled_loss(mesh, x, table, y, values[0])
