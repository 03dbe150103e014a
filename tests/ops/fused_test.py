"""Tests of the fused linear cross-entropy against a float64 NumPy reference."""

import itertools

import jax
import jax.extend
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax.ops import _autotune
from softmax_jax.ops import cross_entropy
from softmax_jax.ops import linear_cross_entropy

# Non-divisible everywhere: 2 * 21 = 42 tokens in chunks of 16, 300 classes in chunks of 64.
LEAD, D, K = (2, 21), 24, 300
CHUNKS = dict(chunk_size=64, token_chunk_size=16)
OPTIONS = dict(label_smoothing=0.1, z_loss=1e-2, logit_soft_cap=4.0)


def _reference(x, w, labels, ct, *, bias=None, logit_offsets=None, ignore_index=None,
               label_smoothing=0.0, z_loss=0.0, logit_soft_cap=None, reduction='none'):
  """float64 loss, lse (0 where ignored) and the gradients of `sum(ct * loss)` (x, w, bias,
  offsets); the ignored rows are sliced out, so NaN features there are never read."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  x2, l, k = x.reshape(-1, x.shape[-1]), np.asarray(labels).reshape(-1), w.shape[1]
  b = 0.0 if bias is None else np.asarray(bias, np.float64)
  o = 0.0 if logit_offsets is None else np.asarray(logit_offsets, np.float64)
  m = l != ignore_index
  x2 = np.where(m[:, None], x2, 0.0)
  z = x2 @ w + b
  dcap = 1.0
  if logit_soft_cap:
    t = np.tanh(z / logit_soft_cap)
    z, dcap = logit_soft_cap * t, 1.0 - t * t
  z = z + o
  lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
  eps, finite = label_smoothing, np.isfinite(z)  # smoothing over classes with a finite logit
  target = (1.0 - eps) * np.eye(k)[np.where(m, l, 0)] + eps * finite / finite.sum(1, keepdims=True)
  loss = np.where(m, lse - (target * np.where(finite, z, 0)).sum(1) + z_loss * lse**2, 0.0)
  rows = np.broadcast_to(np.asarray(ct, np.float64), labels.shape).reshape(-1) * m
  if reduction == 'mean':
    rows = rows / max(m.sum(), 1)
  p = np.exp(z - lse[:, None])  # 0 on -inf logits
  dz = rows[:, None] * (p * (1.0 + 2.0 * z_loss * lse[:, None]) - target)
  dzp = dz * dcap
  grads = (dzp @ w.T).reshape(x.shape), x2.T @ dzp, dzp.sum(0), dz.sum(0)
  if reduction != 'none':
    loss = loss.sum() / (max(m.sum(), 1) if reduction == 'mean' else 1)
  return loss.reshape(labels.shape if reduction == 'none' else ()), np.where(m, lse, 0), grads


def _data(dtype=jnp.float32, lead=LEAD, d=D, k=K, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(*lead, d)), dtype)
  w = jnp.asarray(rng.normal(size=(d, k)) / np.sqrt(d) * 3, dtype)
  bias, offsets = (rng.normal(size=k) for _ in range(2))
  offsets[k - 3:] = -np.inf  # padded vocabulary columns, dropped by their offset
  bias, offsets = jnp.asarray(bias, dtype), jnp.asarray(offsets, dtype)
  labels = jnp.asarray(rng.integers(0, k - 3, lead), jnp.int32)
  where = jnp.asarray(rng.random(lead) > 0.25)
  labels = jnp.where(where, labels, -100)  # padding (ignore_index=-100): features NaN, never read
  x = jnp.where(where[..., None], x, jnp.nan)
  return x, w, labels, bias, offsets, where


def _close(got, want, tol):
  got, want = np.asarray(jnp.asarray(got, jnp.float32), np.float64), np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize('reduction,dtype,options', list(itertools.product(
    ['none', 'sum', 'mean'], [jnp.float32, jnp.bfloat16], [False, True])))
def test_matches_float64_reference(reduction, dtype, options):
  x, w, labels, bias, offsets, where = _data(dtype)
  kw = dict(ignore_index=-100, reduction=reduction, **(OPTIONS if options else {}))
  ct = jnp.asarray(np.random.default_rng(1).normal(size=LEAD) if reduction == 'none' else 1.5)

  def f(x, w, bias, offsets):
    loss, lse = linear_cross_entropy(x, w, labels, bias=bias, logit_offsets=offsets,
                                     return_lse=True, **kw, **CHUNKS)
    return (ct * loss).sum(), (loss, lse)

  (_, (loss, lse)), grads = jax.jit(jax.value_and_grad(f, (0, 1, 2, 3), has_aux=True))(
      x, w, bias, offsets)
  ref_loss, ref_lse, ref_grads = _reference(x, w, labels, ct, bias=bias,
                                            logit_offsets=offsets, **kw)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  assert loss.dtype == lse.dtype == jnp.float32 and loss.shape == ref_loss.shape
  _close(loss, ref_loss, tol)
  _close(lse, ref_lse.reshape(LEAD), tol)
  for g, a, r in zip(grads, (x, w, bias, offsets), ref_grads):
    assert g.dtype == a.dtype and g.shape == a.shape
    _close(g, r.reshape(a.shape), tol)
  assert not np.any(np.asarray(grads[0])[~np.asarray(where)])  # ignored: exactly 0


@pytest.mark.parametrize('reduction', ['none', 'sum', 'mean'])
def test_check_grads_float64(reduction):
  with jax.enable_x64(True):
    x, w, labels, bias, offsets, where = _data(jnp.float64, lead=(9,), d=5, k=13)
    x = jnp.where(where[:, None], x, 0.5)  # finite differences need finite inputs
    f = jax.jit(lambda x, w, b, o: linear_cross_entropy(
        x, w, labels, bias=b, logit_offsets=o, ignore_index=-100, reduction=reduction,
        chunk_size=5, token_chunk_size=4, **OPTIONS))
    check_grads(f, (x, w, bias, offsets), order=1, modes=['rev'])
    g = jax.jit(lambda x, w: linear_cross_entropy(x, w, labels, ignore_index=-100,
                                                  return_lse=True, reduction=reduction,
                                                  chunk_size=5)[1])
    check_grads(g, (x, w), order=1, modes=['rev'])  # through the returned lse


def test_lse_gradient_beside_reduced_loss():
  x, w, labels, *_ = _data(seed=1)
  x, labels = jnp.nan_to_num(x), jnp.maximum(labels, 0)
  def loss(fn, x, w):
    mean, lse = fn(x, w)
    return mean + 1e-2 * (lse**2).mean()
  fused = lambda x, w: linear_cross_entropy(x, w, labels, reduction='mean',
                                            return_lse=True, **CHUNKS)
  want = _reference(x, w, labels, 1.0, reduction='mean', z_loss=1e-2)[2]  # same sum
  got = jax.jit(jax.grad(lambda x, w: loss(fused, x, w), (0, 1)))(x, w)
  for g, r in zip(got, want[:2]):
    _close(g, r.reshape(g.shape), 1e-5)


@pytest.mark.parametrize('reduction', ['none', 'mean'])
def test_equals_cross_entropy_of_logits(reduction):
  """The contract: `cross_entropy(x @ w + bias, labels)`, here with -inf offsets and smoothing."""
  x, w, labels, bias, offsets, _ = _data()
  x, labels = jnp.nan_to_num(x), jnp.maximum(labels, 0)
  kw = dict(label_smoothing=0.1)
  def naive(x, w, b):
    loss = cross_entropy(x @ w + b + offsets, labels, **kw)
    return loss.mean() if reduction == 'mean' else (loss * labels).sum()
  def fused(x, w, b):
    loss = linear_cross_entropy(x, w, labels, bias=b, logit_offsets=offsets,
                                reduction=reduction, **kw, **CHUNKS)
    return loss if reduction == 'mean' else (loss * labels).sum()
  got, want = (jax.jit(jax.value_and_grad(f, (0, 1, 2)))(x, w, bias) for f in (fused, naive))
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _close(g, r, 1e-5)


@pytest.mark.parametrize('reduction', ['mean'])  # 'none' and 'sum': tests/ops/ignore_index_test.py
def test_ignore_index_equals_slicing(reduction):
  """Ignored rows (NaN features here) are as if sliced out: loss 0, gradient 0, no NaN leaks."""
  x, w, labels, _, _, where = _data()
  keep = np.asarray(where)
  f = lambda x, w, l, i: linear_cross_entropy(x, w, l, ignore_index=i, reduction=reduction,
                                              **CHUNKS).sum()
  got = jax.jit(jax.value_and_grad(f, (0, 1)), static_argnums=3)(x, w, labels, -100)
  want = jax.jit(jax.value_and_grad(f, (0, 1)), static_argnums=3)(x[keep], w, labels[keep], None)
  _close(got[0], want[0], 1e-6)
  _close(got[1][0][keep], want[1][0], 1e-6)
  assert not np.any(np.asarray(got[1][0])[~keep])  # padding rows: exactly zero gradient
  _close(got[1][1], want[1][1], 1e-6)
  loss, lse = linear_cross_entropy(x, w, labels, ignore_index=-100, return_lse=True)
  assert not np.any(np.asarray(loss)[~keep]) and not np.any(np.asarray(lse)[~keep])
  assert np.isfinite(np.asarray(loss)).all()


def test_where_is_rejected_with_the_new_name():
  """`where` meant examples here and classes in cross_entropy: one name, one meaning now."""
  x, w, labels, _, _, where = _data()
  with pytest.raises(ValueError, match=r'`where` is not an option of linear_cross_entropy: to '
                     r'ignore examples \(padding\) pass `ignore_index`'):
    linear_cross_entropy(x, w, labels, where=where)


def test_list_labels_and_features():
  x, w, labels, *_ = _data(lead=(4,))
  x, labels = jnp.nan_to_num(x), np.maximum(np.asarray(labels), 0)
  want = cross_entropy(x @ w, labels)
  _close(linear_cross_entropy(np.asarray(x).tolist(), w, labels.tolist()), want, 1e-6)
  _close(linear_cross_entropy(x, w, tuple(labels), reduction='sum'), want.sum(), 1e-6)


@pytest.mark.parametrize('reduction', ['none', 'sum'])  # The reduced one: token-outer passes.
def test_nan_feature_gives_nan_for_its_example_only(reduction):
  x, w, labels, bias, *_ = _data(lead=(5,), seed=2)
  x, labels = jnp.nan_to_num(x), jnp.maximum(labels, 0)
  bad = x.at[2, 3].set(jnp.nan)
  f = jax.jit(lambda x: linear_cross_entropy(x, w, labels, bias=bias, reduction=reduction,
                                             return_lse=True, **CHUNKS))
  loss, lse = f(bad)
  want_loss, want_lse = f(x)
  assert np.isnan(np.asarray(lse)[2]) and np.isnan(np.asarray(loss).reshape(-1)).any()
  np.testing.assert_array_equal(np.delete(np.asarray(lse), 2), np.delete(np.asarray(want_lse), 2))
  if reduction == 'none':
    assert np.isnan(np.asarray(loss)).tolist() == [False, False, True, False, False]
    np.testing.assert_array_equal(np.delete(np.asarray(loss), 2), np.delete(want_loss, 2))


def _count_dots(jaxpr):
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == 'dot_general'
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count_dots(sub)
  return n


@pytest.mark.parametrize('reduction,argnums,dots', [
    ('mean', (0, 1), 3), ('sum', (1,), 2), ('none', (0, 1), 4)])
def test_matrix_products(reduction, argnums, dots):
  x, w, labels, *_ = _data(lead=(64,), k=256)  # divisible: one loop body, no tail
  x, labels = jnp.nan_to_num(x), jnp.maximum(labels, 0)
  f = lambda x, w: linear_cross_entropy(x, w, labels, reduction=reduction, chunk_size=64,
                                        token_chunk_size=16).sum()
  assert _count_dots(jax.make_jaxpr(jax.value_and_grad(f, argnums))(x, w).jaxpr) == dots


@pytest.mark.parametrize('reduction', ['none', 'sum', 'mean'])
def test_no_n_by_k_buffer(reduction):
  n, d, k = 2048, 512, 200_000  # compile only: memory is deterministic, time is not
  x, w = jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, k), jnp.float32)
  labels = jax.ShapeDtypeStruct((n,), jnp.int32)
  naive = lambda x, w, l: (jax.nn.logsumexp(x @ w, -1)
                           - jnp.take_along_axis(x @ w, l[:, None], -1)[:, 0]).mean()
  fused = lambda x, w, l: linear_cross_entropy(x, w, l, reduction=reduction).mean()
  temp = lambda f: jax.jit(jax.value_and_grad(f, (0, 1))).lower(
      x, w, labels).compile().memory_analysis().temp_size_in_bytes
  assert temp(fused) < n * k * 4 / 4
  assert temp(fused) < 0.1 * temp(naive)


def test_out_of_range_labels():
  x, w, *_ = _data(lead=(6,))
  labels = jnp.arange(6) * 7
  bad = labels.at[4].set(K)
  with pytest.raises(ValueError, match=r'`labels` must lie in \[0, 300\); '
                     r'got 300 at position \(4,\)'):
    linear_cross_entropy(x, w, bad)
  with pytest.raises(ValueError, match=r'`labels` must lie in .*got -1 at position \(2,\)'):
    linear_cross_entropy(x, w, labels.at[2].set(-1), reduction='mean')
  with pytest.raises(ValueError, match=r'`labels` must lie in \[0, 300\) or equal `ignore_index` '
                     r'= -1; got 300 at position \(4,\)'):
    linear_cross_entropy(x, w, bad, ignore_index=-1)
  linear_cross_entropy(x, w, bad, ignore_index=K)  # ignored: not range-checked
  for reduction in ['none', 'sum', 'mean']:
    f = jax.jit(lambda x, w, l: linear_cross_entropy(x, w, l, reduction=reduction, **CHUNKS))
    loss, (dx, dw) = jax.jit(jax.value_and_grad(lambda *a: f(*a).sum(), (0, 1)))(x, w, bad)
    assert np.isnan(np.asarray(f(x, w, bad))).any() and np.isnan(loss)
    assert np.isnan(np.asarray(dx[4])).all() and np.isnan(np.asarray(dw)).any()


def test_bad_arguments():
  x, w, labels, bias, *_ = _data(lead=(6,))
  cases = [
      (dict(w=w[None]), r'`w` must have shape \[d, K\] \(rank 2\); got shape \(1, 24, 300\)'),
      (dict(x=x[:, :5]),
       r'`x` must have shape \[\.\.\., d\] with d = w.shape\[0\] = 24; got shape \(6, 5\)'),
      (dict(labels=labels[:5]),
       r'`labels` must have shape x.shape\[:-1\] = \(6,\); got shape \(5,\)'),
      (dict(labels=labels.astype(jnp.float32)), '`labels` must be integer.*got dtype float32'),
      (dict(x=x.astype(jnp.int32), w=w.astype(jnp.int32)), '`x` must be a float.*got dtype int32'),
      (dict(w=w.astype(jnp.int32)), '`w` must be a float.*got dtype int32'),
      (dict(bias=bias[:-1]), r'`bias` must have shape \[K\] = \(300,\); got shape \(299,\)'),
      (dict(bias=bias.astype(jnp.int32)), '`bias` must be a float.*got dtype int32'),
      (dict(logit_offsets=bias[None]), r'`logit_offsets` must have shape .*got shape \(1, 300\)'),
      (dict(where=jnp.ones(6, bool)), r'`where` is not an option.*got a `where` of shape \(6,\)'),
      (dict(ignore_index=1.5), r'`ignore_index` must be None or an int; got 1\.5'),
      (dict(ignore_index=True), r'`ignore_index` must be None or an int; got True'),
      (dict(ignore_index=np.asarray([1, 2])), r'`ignore_index` must be None or an int'),
      (dict(label_smoothing=1.0), r'`label_smoothing` must be in \[0, 1\); got 1.0'),
      (dict(logit_soft_cap=0.0), '`logit_soft_cap` must be None or > 0; got 0.0'),
      (dict(reduction='avg'), "`reduction` must be 'none', 'sum' or 'mean'; got 'avg'"),
      (dict(chunk_size=0), '`chunk_size` must be a positive int; got 0'),
      (dict(token_chunk_size=2.5), '`token_chunk_size` must be a positive int; got 2.5'),
  ]
  for kw, match in cases:
    args = dict(x=x, w=w, labels=labels) | kw
    with pytest.raises(ValueError, match=match):
      linear_cross_entropy(args.pop('x'), args.pop('w'), args.pop('labels'), **args)


def test_default_chunks_are_the_fixed_ones_for_a_small_problem_or_with_tuning_off(monkeypatch,
                                                                                   tmp_path):
  """chunk_size=None / token_chunk_size=None: 4096 / 256 untimed below the tuning threshold
  (this problem) or with SOFTMAX_JAX_AUTOTUNE=0; each None resolves on its own."""
  x, w, labels, bias, *_ = _data(lead=(3, 50), k=5000)
  x, labels = jnp.nan_to_num(x), jnp.maximum(labels, 0)
  f = lambda **kw: jax.value_and_grad(
      lambda x, w: linear_cross_entropy(x, w, labels, bias=bias, reduction='mean', **kw),
      (0, 1))(x, w)
  fixed = f(chunk_size=4096, token_chunk_size=256)
  for kw in ({}, dict(chunk_size=4096), dict(token_chunk_size=256)):
    for a, b in zip(jax.tree.leaves(f(**kw)), jax.tree.leaves(fixed)):
      np.testing.assert_array_equal(a, b)
  other = f(chunk_size=1000, token_chunk_size=64)  # a different blocking: rounding differs
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(fixed)))
  big_x = jax.ShapeDtypeStruct((4096, 512), jnp.float32)  # above the threshold: traced only
  big_w = jax.ShapeDtypeStruct((512, 100_000), jnp.float32)
  trace = lambda: jax.make_jaxpr(lambda x, w: linear_cross_entropy(
      x, w, jnp.zeros(4096, jnp.int32), reduction='mean'))(big_x, big_w)

  def no_timing(*args):
    raise AssertionError(f'timed {args[1:]}')
  monkeypatch.setattr(_autotune, 'measure', no_timing)
  monkeypatch.setenv(_autotune.ENV_CACHE_DIR, str(tmp_path))
  monkeypatch.setenv(_autotune.ENV_AUTOTUNE, '0')
  _autotune.clear_memory()
  trace()  # untimed
  monkeypatch.setenv(_autotune.ENV_AUTOTUNE, '1')
  try:
    with pytest.raises(AssertionError, match='timed'):  # the same call tunes when switched on
      trace()
  finally:
    _autotune.clear_memory()


def test_vmap_and_rank_one_x():
  x, w, labels, *_ = _data(lead=(3, 10))
  x, labels = jnp.nan_to_num(x), jnp.maximum(labels, 0)
  f = lambda x, l: linear_cross_entropy(x, w, l, reduction='mean', **CHUNKS)
  g = lambda x, l: cross_entropy(x @ w, l).mean()
  got, want = (jax.jit(jax.vmap(jax.value_and_grad(h)))(x, labels) for h in (f, g))
  for a, b in zip(got, want):
    _close(a, b, 1e-5)
  _close(linear_cross_entropy(x[0, 0], w, labels[0, 0]), cross_entropy(x[0, 0] @ w, labels[0, 0]),
         1e-6)
