"""`ops.restricted`: top-k and shortlist softmaxes against float64 NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax.ops.restricted import shortlist_log_softmax, topk_log_softmax


def _log_softmax64(z):
  z = np.asarray(z, np.float64)
  m = np.max(z, axis=-1, keepdims=True)
  return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def _topk_ref(z, k):
  """float64: ids of the k largest (stable: lower id first among ties), log-probs, dropped mass."""
  z = np.asarray(z, np.float64)
  ids = np.argsort(-z, axis=-1, kind='stable')[..., :k]
  values = np.take_along_axis(z, ids, -1)
  full = np.exp(_log_softmax64(z))
  outside = np.ones(z.shape, bool)
  np.put_along_axis(outside, ids, False, axis=-1)
  return _log_softmax64(values), ids, np.where(outside, full, 0.0).sum(-1)


def _shortlist_ref(x, w, b, ids):
  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
  if ids.ndim == 1:
    return _log_softmax64(z[..., ids])
  return _log_softmax64(np.take_along_axis(z, ids, -1))


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  def test_topk_matches_reference(self):
    z = np.random.default_rng(0).normal(size=(3, 4, 11)).astype(np.float32) * 3
    log_probs, ids, dropped = self.variant(topk_log_softmax, static_argnums=1)(z, 4)
    want_lp, want_ids, want_dropped = _topk_ref(z, 4)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(log_probs, want_lp, atol=2e-6)
    np.testing.assert_allclose(dropped, want_dropped, atol=2e-6, rtol=1e-5)
    chex.assert_type([log_probs, ids, dropped], [jnp.float32, jnp.int32, jnp.float32])

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  def test_shortlist_matches_reference(self):
    rng = np.random.default_rng(1)
    x, w, b = (rng.normal(size=s).astype(np.float32) for s in ((3, 5), (5, 13), (13,)))
    shared = np.array([7, 0, 12, 3], np.int32)
    per_row = np.stack([rng.permutation(13)[:4] for _ in range(3)]).astype(np.int32)
    for ids in (shared, per_row):
      got = self.variant(lambda x, ids: shortlist_log_softmax(x, w, ids, bias=b))(x, ids)
      np.testing.assert_allclose(got, _shortlist_ref(x, w, b, ids), atol=3e-6)


def test_vmap_equals_the_batched_call():
  rng = np.random.default_rng(2)
  z = rng.normal(size=(6, 9)).astype(np.float32)
  batched = topk_log_softmax(z, 3)
  chex.assert_trees_all_close(jax.vmap(lambda r: topk_log_softmax(r, 3))(z), batched)
  x, w = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(4, 9)).astype(np.float32)
  ids = np.stack([rng.permutation(9)[:5] for _ in range(6)]).astype(np.int32)
  chex.assert_trees_all_close(jax.vmap(lambda a, i: shortlist_log_softmax(a, w, i))(x, ids),
                              shortlist_log_softmax(x, w, ids), atol=1e-6)


def test_identities_k_equals_K_and_full_shortlist_are_the_full_softmax():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(5, 8)).astype(np.float32) * 4
  log_probs, ids, dropped = topk_log_softmax(z, 8)
  np.testing.assert_allclose(np.take_along_axis(log_probs, np.argsort(ids, -1), -1),
                             jax.nn.log_softmax(z), atol=1e-6)
  np.testing.assert_array_equal(dropped, 0.0)  # k = K drops nothing, exactly
  x, w, b = rng.normal(size=(5, 3)), rng.normal(size=(3, 8)), rng.normal(size=(8,))
  x, w, b = (a.astype(np.float32) for a in (x, w, b))
  np.testing.assert_allclose(shortlist_log_softmax(x, w, np.arange(8), bias=b),
                             jax.nn.log_softmax(x @ w + b), atol=2e-6)
  # The dropped mass is the full softmax's mass outside the top k, to float32 round-off even
  # when it is tiny (expm1, not 1 - sum).
  peaked = np.array([[30.0, 0.0, -1.0, -2.0]], np.float32)
  np.testing.assert_allclose(topk_log_softmax(peaked, 1)[2], _topk_ref(peaked, 1)[2], rtol=1e-5)


def test_gradients_equal_those_of_the_restricted_full_computation():
  rng = np.random.default_rng(4)
  x, w, b = (rng.normal(size=s).astype(np.float32) for s in ((4, 3), (3, 10), (10,)))
  ids = np.array([[1, 4, 9], [0, 2, 3], [9, 8, 7], [5, 6, 1]], np.int32)
  cot = rng.normal(size=(4, 3)).astype(np.float32)
  ours = jax.grad(lambda x, w, b: jnp.sum(shortlist_log_softmax(x, w, ids, bias=b) * cot),
                  argnums=(0, 1, 2))(x, w, b)
  full = lambda x, w, b: jax.nn.log_softmax(jnp.take_along_axis(x @ w + b, ids, -1))
  want = jax.grad(lambda x, w, b: jnp.sum(full(x, w, b) * cot), argnums=(0, 1, 2))(x, w, b)
  chex.assert_trees_all_close(ours, want, atol=1e-5)
  z = rng.normal(size=(4, 10)).astype(np.float32)
  g = jax.grad(lambda z: jnp.sum(topk_log_softmax(z, 3)[0] * cot))(z)
  vals, idx = jax.lax.top_k(z, 3)
  g_want = jax.grad(lambda z: jnp.sum(jax.nn.log_softmax(jnp.take_along_axis(z, idx, -1)) * cot))(z)
  np.testing.assert_allclose(g, g_want, atol=1e-6)
  outside = np.ones_like(z, bool)
  np.put_along_axis(outside, np.asarray(idx), False, axis=-1)
  assert np.all(np.asarray(g)[outside] == 0)  # the classes outside the top k get no gradient


def test_masks_padding_nan_and_bfloat16():
  z = np.array([[1.0, 5.0, 3.0, 2.0], [1.0, np.nan, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]], np.float32)
  where = np.array([[True, False, True, True], [True] * 4, [False] * 4])
  log_probs, ids, dropped = topk_log_softmax(z, 2, where=where)
  np.testing.assert_array_equal(ids[0], [2, 3])  # class 1 (the largest) is masked out
  np.testing.assert_allclose(log_probs[0], _log_softmax64([3.0, 2.0]), atol=1e-6)
  np.testing.assert_allclose(dropped[0], 1 - np.exp(_log_softmax64([1.0, 3.0, 2.0]))[1:].sum(), atol=1e-6)
  assert np.all(np.isnan(log_probs[1])) and np.isnan(dropped[1])  # the NaN row, whole
  assert np.all(log_probs[2] == -np.inf) and dropped[2] == 0  # nothing allowed
  # Fewer allowed classes than k: the extra picks get -inf, the rest is normalized.
  lp = topk_log_softmax(z[:1], 3, where=np.array([[False, False, True, True]]))[0]
  np.testing.assert_allclose(lp[0, :2], _log_softmax64([3.0, 2.0]), atol=1e-6)
  assert lp[0, 2] == -np.inf
  # Shortlist padding: not read (a NaN column there leaks nowhere), -inf out.
  rng = np.random.default_rng(5)
  x, w = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(3, 6)).astype(np.float32)
  w_nan = w.copy()
  w_nan[:, 0] = np.nan
  ids, pad = np.array([[1, 2, 0], [3, 4, 5]]), np.array([[True, True, False], [True, True, True]])
  out = shortlist_log_softmax(x, w_nan[:, :], np.where(pad, ids, 0), where=pad)
  np.testing.assert_allclose(out[0, :2], _shortlist_ref(x[:1], w, np.zeros(6), ids[:1, :2])[0], atol=2e-6)
  assert out[0, 2] == -np.inf and np.all(np.isfinite(out[1]))
  x_nan = x.copy()
  x_nan[1, 0] = np.nan
  out = shortlist_log_softmax(x_nan, w, ids)
  assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1]))
  # bfloat16 inputs: float32 out, finite, close.
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  got = shortlist_log_softmax(xb, wb, ids)
  assert got.dtype == jnp.float32 and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, shortlist_log_softmax(x, w, ids), atol=0.05)
  got = topk_log_softmax(jnp.asarray(z[2:], jnp.bfloat16), 2)[0]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, topk_log_softmax(z[2:], 2)[0], atol=1e-6)


@pytest.mark.parametrize('call, match', [
    (lambda: topk_log_softmax(np.zeros((2, 5), np.float32), 0), r'`k` must be a Python int in \[1, num_classes = 5\]; got 0'),
    (lambda: topk_log_softmax(np.zeros((2, 5), np.float32), 6), r'`k` must be a Python int in \[1, num_classes = 5\]; got 6'),
    (lambda: topk_log_softmax(np.zeros((2, 5), np.float32), 2.0), r'`k` must be a Python int'),
    (lambda: topk_log_softmax(np.zeros((2, 5), np.int32), 2), r'`logits` must be a float array'),
    (lambda: shortlist_log_softmax(np.zeros((2, 3)), np.zeros((3, 5)), np.array([1, 5])),
     r'`shortlist_ids` must lie in \[0, 5\); got 5 at position \(1,\)'),
    (lambda: shortlist_log_softmax(np.zeros((2, 3)), np.zeros((3, 5)), np.array([[1, 2], [4, 4]])),
     r'`shortlist_ids` must hold distinct ids in each row .* got 4 repeated in row \(1,\)'),
    (lambda: shortlist_log_softmax(np.zeros((2, 3)), np.zeros((4, 5)), np.array([1])),
     r'`w` must have shape \[d, K\] with d = features.shape\[-1\]'),
    (lambda: shortlist_log_softmax(np.zeros((2, 3)), np.zeros((3, 5)), np.zeros((3, 2), np.int32)),
     r'`shortlist_ids` must have shape \[S\] or \[..., S\] with \[...\] = features.shape\[:-1\] = \(2,\)'),
    (lambda: shortlist_log_softmax(np.zeros((2, 3)), np.zeros((3, 5)), np.array([1.0])),
     r'`shortlist_ids` must be integer class ids'),
    (lambda: shortlist_log_softmax(np.zeros((2, 3)), np.zeros((3, 5)), np.array([1]), bias=np.zeros(4)),
     r'`bias` must have shape \[K\]'),
])
def test_bad_arguments_are_named(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_union_tables_may_repeat_padding_and_sigsoftmax_restricts_like_the_full_op():
  from softmax_jax import ops  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(6)
  x, w, b = (rng.normal(size=s).astype(np.float32) for s in ((2, 3), (3, 7), (7,)))
  # A union of a shared table [0, 1, 2] and per-row successors, whose repeats are marked padding.
  ids = np.array([[0, 1, 2, 5, 1], [0, 1, 2, 2, 6]])
  keep = np.array([[True, True, True, True, False], [True, True, True, False, True]])
  got = shortlist_log_softmax(x, w, ids, bias=b, where=keep)
  for r in range(2):
    cols = ids[r][keep[r]]
    np.testing.assert_allclose(got[r][keep[r]], _shortlist_ref(x[r:r + 1], w, b, cols)[0], atol=2e-6)
  assert np.all(np.asarray(got)[~keep] == -np.inf)
  sig = shortlist_log_softmax(x, w, ids[0, :4], bias=b, sigsoftmax=True)
  full = x @ w + b
  want = ops.log_sigsoftmax(full[:, ids[0, :4]])  # sigsoftmax of the shortlisted logits
  np.testing.assert_allclose(sig, want, atol=2e-6)
