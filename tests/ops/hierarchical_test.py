"""Hierarchical softmax trees and ops vs independent float64 NumPy references.

The trees are checked for being full binary trees with prefix-free codes; Huffman trees against a
brute-force optimal code (Kraft inequality) and a textbook Huffman cost (the sum of the merged
weights); the log-probs against a top-down float64 walk of the tree, node by node.
"""

import functools
import heapq
import itertools
import math
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from softmax_jax.ops import hierarchical as hs

COUNTS = [50, 30, 30, 12, 9, 9, 4, 1, 1, 0]

def _children(tree):
  """{internal node: {+1/-1: ('node', n) | ('leaf', k)}}; asserts the paths are consistent."""
  paths, codes, mask = (np.asarray(a) for a in tree)
  k = paths.shape[0]
  kids = {}
  for leaf in range(k):
    d = int(mask[leaf].sum())
    assert mask[leaf, :d].all() and not mask[leaf, d:].any(), 'mask must be a prefix'
    assert (paths[leaf, d:] == 0).all() and (codes[leaf, d:] == 0).all(), 'padding must be 0'
    for j in range(d):
      node, code = int(paths[leaf, j]), int(codes[leaf, j])
      assert code in (-1, 1) and 0 <= node < k - 1
      child = ('node', int(paths[leaf, j + 1])) if j + 1 < d else ('leaf', leaf)
      assert kids.setdefault(node, {}).setdefault(code, child) == child, 'two children on a branch'
  return kids


def _assert_full_binary_tree(tree):
  k = tree.paths.shape[0]
  kids = _children(tree)
  assert sorted(kids) == list(range(k - 1)), 'every internal node must be used'
  assert all(sorted(c) == [-1, 1] for c in kids.values()), 'every internal node has 2 children'
  leaves = [c[1] for ch in kids.values() for c in ch.values() if c[0] == 'leaf']
  assert sorted(leaves) == list(range(k))
  roots = set(np.asarray(tree.paths)[:, 0].tolist())
  assert len(roots) == 1
  codewords = {tuple(c[m]) for c, m in zip(np.asarray(tree.codes), np.asarray(tree.mask))}
  assert len(codewords) == k  # Distinct; with the full-tree property above, prefix-free.
  for a, b in itertools.permutations(codewords, 2):
    assert a != b[:len(a)], 'not prefix-free'
  np.testing.assert_allclose(sum(2.0 ** -len(c) for c in codewords), 1.0)  # Kraft equality.


def _textbook_huffman_cost(counts):
  """sum_k n_k depth_k of an optimal code = the sum of all merged weights (CLRS 16.3)."""
  heap = sorted(float(c) for c in counts)
  cost = 0.0
  while len(heap) > 1:
    merged = heapq.heappop(heap) + heapq.heappop(heap)
    cost += merged
    heapq.heappush(heap, merged)
  return cost


def _brute_force_optimal_cost(counts):
  """min sum n_k l_k over integer lengths l_k >= 1 with sum 2^-l_k <= 1 (Kraft)."""
  k = len(counts)
  return min(sum(c * l for c, l in zip(counts, ls))
             for ls in itertools.product(range(1, k), repeat=k) if sum(2.0 ** -l for l in ls) <= 1)


def _ref_log_prob(features, vectors, bias, tree):
  """float64 walk from the root: p(child) = p(node) * sigmoid(+-z_node)."""
  x = np.asarray(features, np.float64)
  z = x @ np.asarray(vectors, np.float64).T + (0 if bias is None else np.asarray(bias, np.float64))
  kids = _children(tree)
  out = np.zeros(x.shape[:-1] + (tree.paths.shape[0],))
  stack = [(int(tree.paths[0, 0]), np.zeros(x.shape[:-1]))]
  while stack:
    node, lp = stack.pop()
    for code, (kind, child) in kids[node].items():
      lp_child = lp - np.logaddexp(0.0, -code * z[..., node])  # log sigmoid(code * z).
      if kind == 'leaf':
        out[..., child] = lp_child
      else:
        stack.append((child, lp_child))
  return out


def _params(k, d, seed=0, scale=1.0, dtype=jnp.float32, lead=(5,)):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=lead + (d,)) * scale, dtype)
  w = jnp.asarray(rng.normal(size=(k - 1, d)), dtype)
  b = jnp.asarray(rng.normal(size=(k - 1,)), dtype)
  y = jnp.asarray(rng.integers(0, k, size=lead), jnp.int32)
  return x, w, b, y


TREES = {
    'huffman': lambda: hs.huffman_tree(COUNTS),
    'huffman_zipf300': lambda: hs.huffman_tree(1e6 / np.arange(1, 301)),
    'balanced7': lambda: hs.balanced_tree(7),
    'balanced64': lambda: hs.balanced_tree(64),
    'balanced2': lambda: hs.balanced_tree(2),
}

@pytest.mark.parametrize('name', list(TREES))
def test_tree_is_full_binary_with_prefix_free_codes(name):
  tree = TREES[name]()
  assert tree.paths.dtype == np.int32 and tree.mask.dtype == bool
  assert tree.paths.shape == tree.codes.shape == tree.mask.shape
  assert tree.paths.shape[1] == tree.depths.max()
  _assert_full_binary_tree(tree)


@pytest.mark.parametrize('counts', [[5, 3, 2, 1, 1], [1, 1, 1, 1, 1, 1], [10, 1, 1, 1, 1, 0],
                                    [7, 7, 6, 6, 5], [100, 1], [3, 2, 2, 2, 1, 1]])
def test_huffman_is_optimal_vs_brute_force(counts):
  tree = hs.huffman_tree(counts)
  cost = float(np.dot(counts, tree.depths))
  assert cost == _brute_force_optimal_cost(counts) == _textbook_huffman_cost(counts)


def test_huffman_cost_matches_textbook_on_larger_counts():
  rng = np.random.default_rng(0)
  for k in [17, 200, 1000]:
    counts = rng.zipf(1.3, size=k) + rng.integers(0, 3, size=k)
    tree = hs.huffman_tree(counts)
    assert float(np.dot(counts, tree.depths)) == _textbook_huffman_cost(counts)
    assert tree.paths.shape[1] == tree.depths.max()
    if k == 200:
      _assert_full_binary_tree(tree)
  # A balanced tree is not optimal for skewed counts: the comparison above can fail.
  counts = [100, 1, 1, 1, 1, 1, 1, 1]
  assert np.dot(counts, hs.balanced_tree(8).depths) > _textbook_huffman_cost(counts)


@pytest.mark.parametrize('k', list(range(2, 34)) + [100, 1000, 1025])
def test_balanced_depth(k):
  tree = hs.balanced_tree(k)
  depth = math.ceil(math.log2(k))
  assert tree.paths.shape[1] == depth
  assert set(tree.depths.tolist()) <= {depth - 1, depth}
  assert np.all(np.diff(tree.depths) >= 0)  # Low ids sit shallower.
  if k <= 33:
    _assert_full_binary_tree(tree)


def test_huffman_is_deterministic_and_cached():
  a = hs.huffman_tree(tuple(COUNTS))
  assert hs.huffman_tree(tuple(COUNTS)) is a
  assert hs.huffman_tree(np.asarray(COUNTS)) is a
  hs._huffman.cache_clear()
  b = hs.huffman_tree(list(COUNTS))
  assert b is not a
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  with pytest.raises(ValueError):  # Read-only: the cached arrays are shared.
    b.paths[0, 0] = 1
  # Frequent classes get short codes; ties resolve the same way every time.
  assert np.all(np.diff(hs.huffman_tree([8, 4, 2, 1, 1]).depths) >= 0)
  np.testing.assert_array_equal(hs.huffman_tree([1] * 8).depths, [3] * 8)


def test_huffman_builds_200k_classes_fast():
  k = 200_000
  p = np.log((np.arange(k) + 2) / (np.arange(k) + 1))
  counts = np.round(1e9 * p / p.sum()).astype(np.int64) + np.arange(k) % 3  # Not a cache hit.
  start = time.perf_counter()
  tree = hs.huffman_tree(counts)
  elapsed = time.perf_counter() - start
  assert elapsed < 10, f'{elapsed:.1f} s'
  assert tree.paths.shape[0] == k and 18 <= tree.paths.shape[1] <= 30
  assert abs(np.dot(p / p.sum(), tree.depths) - 12.4) < 0.2  # ~ entropy in bits.

@pytest.mark.parametrize('name', list(TREES))
@pytest.mark.parametrize('use_bias', [True, False])
def test_log_prob_loss_predict_match_reference(name, use_bias):
  tree = TREES[name]()
  k = tree.paths.shape[0]
  x, w, b, y = _params(k, 6, scale=2.0, lead=(7,))
  b = b if use_bias else None
  ref = _ref_log_prob(x, w, b, tree)
  log_prob = jax.jit(lambda x, w, b: hs.hierarchical_log_prob(x, w, tree, node_bias=b))(x, w, b)
  assert log_prob.dtype == jnp.float32 and log_prob.shape == (7, k)
  np.testing.assert_allclose(log_prob, ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(jax.nn.logsumexp(log_prob, -1), 0.0, atol=1e-5)
  loss = jax.jit(lambda x, y, w, b: hs.hierarchical_loss(x, y, w, tree, node_bias=b))(x, y, w, b)
  np.testing.assert_allclose(loss, -ref[np.arange(7), np.asarray(y)], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(loss, -log_prob[np.arange(7), np.asarray(y)], rtol=1e-5, atol=1e-6)
  pred = hs.hierarchical_predict(x, w, tree, node_bias=b)
  assert pred.dtype == jnp.int32
  np.testing.assert_array_equal(pred, np.argmax(ref, -1))


def test_log_prob_normalized_for_large_random_weights():
  for tree in [hs.huffman_tree(np.arange(1, 501)[::-1] ** 2), hs.balanced_tree(333)]:
    k = tree.paths.shape[0]
    x, w, b, _ = _params(k, 16, seed=3, scale=3.0, lead=(32,))
    lp = hs.hierarchical_log_prob(x, w, tree, node_bias=b)
    assert np.all(np.isfinite(lp))
    np.testing.assert_allclose(jax.nn.logsumexp(lp, -1), 0.0, atol=1e-5)


def test_leading_dims():
  tree = hs.huffman_tree(COUNTS)
  x, w, b, y = _params(len(COUNTS), 4, lead=(2, 3))
  lp, loss = (hs.hierarchical_log_prob(x, w, tree, node_bias=b),
              hs.hierarchical_loss(x, y, w, tree, node_bias=b))
  assert lp.shape == (2, 3, len(COUNTS)) and loss.shape == (2, 3)
  np.testing.assert_allclose(lp, _ref_log_prob(x, w, b, tree), rtol=2e-5, atol=2e-5)
  flat = hs.hierarchical_loss(x.reshape(6, 4), y.reshape(6), w, tree, node_bias=b)
  np.testing.assert_allclose(loss.reshape(6), flat, rtol=1e-6)
  assert hs.hierarchical_predict(x, w, tree).shape == (2, 3)


def test_loss_touches_only_the_label_path():
  tree = hs.huffman_tree(COUNTS)
  k, n, d = len(COUNTS), 3, 4
  x, w, b, _ = _params(k, d, lead=(n,))
  y = jnp.asarray([0, 7, 7], jnp.int32)
  gw, gb = jax.grad(lambda w, b: hs.hierarchical_loss(x, y, w, tree, node_bias=b).sum(),
                    argnums=(0, 1))(w, b)
  on_path = np.zeros(k - 1, bool)
  for label in [0, 7]:
    on_path[tree.paths[label][tree.mask[label]]] = True
  assert np.all(np.abs(np.asarray(gb))[on_path] > 0) and np.all(np.asarray(gb)[~on_path] == 0)
  assert np.all(np.asarray(gw)[~on_path] == 0)
  # No [N, K-1] array anywhere in the compiled training step.
  k, n = 257, 11
  tree = hs.balanced_tree(k)
  x, w, b, y = _params(k, d, lead=(n,))
  step = jax.jit(jax.grad(lambda w, x: hs.hierarchical_loss(x, y, w, tree).sum(), argnums=(0, 1)))
  hlo = step.lower(w, x).compile().as_text()
  assert f'[{n},{k - 1}]' not in hlo and f'[{k - 1},{n}]' not in hlo
  full = jax.jit(lambda w, x: hs.hierarchical_log_prob(x, w, tree)).lower(w, x).compile().as_text()
  assert f'[{n},{k - 1}]' in full  # The check above can fail.


def test_check_grads_float64():
  with jax.enable_x64(True):
    for tree in [hs.huffman_tree(COUNTS), hs.balanced_tree(5)]:
      x, w, b, y = _params(tree.paths.shape[0], 3, seed=1, dtype=jnp.float64, lead=(4,))
      loss = lambda x, w, b: hs.hierarchical_loss(x, y, w, tree, node_bias=b)
      log_prob = lambda x, w, b: hs.hierarchical_log_prob(x, w, tree, node_bias=b)
      assert loss(x, w, b).dtype == jnp.float64 and log_prob(x, w, b).dtype == jnp.float64
      check_grads(jax.jit(loss), (x, w, b), order=1, modes=('rev',))
      check_grads(jax.jit(log_prob), (x, w, b), order=1, modes=('rev',))


def test_bfloat16_is_finite_and_accumulates_in_float32():
  tree = hs.huffman_tree(1e6 / np.arange(1, 301))
  x, w, b, y = _params(300, 32, seed=2, scale=2.0, lead=(16,))
  xb, wb, bb = (a.astype(jnp.bfloat16) for a in (x, w, b))
  loss = hs.hierarchical_loss(xb, y, wb, tree, node_bias=bb)
  lp = hs.hierarchical_log_prob(xb, wb, tree, node_bias=bb)
  assert loss.dtype == jnp.float32 and lp.dtype == jnp.float32
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(lp))
  ref = _ref_log_prob(xb.astype(jnp.float32), wb.astype(jnp.float32), bb.astype(jnp.float32), tree)
  np.testing.assert_allclose(lp, ref, rtol=1e-4, atol=1e-4)  # Only the inputs are rounded.
  np.testing.assert_allclose(loss, -ref[np.arange(16), np.asarray(y)], rtol=1e-4, atol=1e-4)
  grads = jax.grad(lambda w: hs.hierarchical_loss(xb, y, w, tree, node_bias=bb).sum())(wb)
  assert grads.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grads, np.float32)))


def test_out_of_range_labels():
  tree = hs.balanced_tree(5)
  x, w, _, _ = _params(5, 3, lead=(3,))
  y = jnp.asarray([0, 5, -1], jnp.int32)
  with pytest.raises(ValueError, match=r'`labels` must lie in \[0, 5\); got 5'):
    hs.hierarchical_loss(x, y, w, tree)
  loss = jax.jit(lambda y: hs.hierarchical_loss(x, y, w, tree))(y)
  assert np.isfinite(loss[0]) and np.isnan(loss[1]) and np.isnan(loss[2])


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match=r'`class_counts` must have shape \[num_classes\] '
                                       r'\(rank 1\); got shape \(2, 2\)'):
    hs.huffman_tree([[1, 2], [3, 4]])
  with pytest.raises(ValueError, match=r'`class_counts` must have at least 2 classes; got 1'):
    hs.huffman_tree([5])
  with pytest.raises(ValueError, match=r'`class_counts` must be finite and >= 0; got -1 at '
                                       r'class 1'):
    hs.huffman_tree([3, -1, 2])
  with pytest.raises(ValueError, match=r'`class_counts` must be finite and >= 0; got nan'):
    hs.huffman_tree([3.0, np.nan])
  with pytest.raises(ValueError, match=r'`class_counts` must be numbers; got dtype <U1'):
    hs.huffman_tree(['a', 'b'])
  with pytest.raises(ValueError, match=r'`class_counts` must be concrete'):
    jax.jit(hs.huffman_tree)(jnp.ones(3))
  with pytest.raises(ValueError, match=r'`num_classes` must be >= 2; got 1'):
    hs.balanced_tree(1)
  with pytest.raises(ValueError, match=r'`num_classes` must be an int \(concrete, not traced\); '
                                       r'got 4.0'):
    hs.balanced_tree(4.0)
  with pytest.raises(ValueError, match=r'`num_classes` must be an int \(concrete, not traced\)'):
    jax.jit(hs.balanced_tree)(4)
  tree = hs.balanced_tree(6)
  x, w, b, y = _params(6, 4, lead=(3,))
  log_prob = lambda x, w, b=None: hs.hierarchical_log_prob(x, w, tree, node_bias=b)
  loss = lambda x, w, b=None, y=y: hs.hierarchical_loss(x, y, w, tree, node_bias=b)
  static_cases = [  # (function, args, message): raised eagerly and at trace time under jit.
      (log_prob, (x, w.T), r'`node_vectors` must have shape \[K-1, d\] for a tree of K=6 classes '
                           r'and features \[\.\.\., 4\] = \(5, 4\); got shape \(4, 5\)'),
      (log_prob, (x, w.astype(jnp.int32)),
       r'`node_vectors` must be a float array; got dtype int32'),
      (loss, (x, w, jnp.zeros(6)),
       r'`node_bias` must have shape \[K-1\] = \(5,\); got shape \(6,\)'),
      (loss, (x, w, b.astype(jnp.int32)), r'`node_bias` must be a float array'),
      (lambda x, w: loss(x, w, y=y[:2]), (x, w),
       r'`labels` must have shape features.shape\[:-1\] = \(3,\); got shape \(2,\)'),
      (lambda x, w: loss(x, w, y=y.astype(jnp.float32)), (x, w),
       r'`labels` must be integer class indices'),
      (log_prob, (jnp.float32(1.0), w), r'`features` must have shape \[\.\.\., d\] \(rank >= 1\); '
                                        r'got shape \(\)'),
      (log_prob, (x.astype(jnp.int32), w), r'`features` must be a float array; got dtype int32'),
      (lambda x, w: hs.hierarchical_predict(x, w, tree), (x, w[:4]),
       r'`node_vectors` must have shape \[K-1, d\]'),
  ]
  for fn, args, msg in static_cases:
    for run in (fn, jax.jit(fn)):
      with pytest.raises(ValueError, match=msg):
        run(*args)
  bad_trees = [
      ((tree.paths, tree.codes), r'`tree` must be a Tree'),
      (tree._replace(paths=tree.paths[:, :1]), r'`tree.codes` must have shape tree.paths.shape = '
                                               r'\(6, 1\); got shape \(6, 3\)'),
      (tree._replace(mask=tree.mask[:1]), r'`tree.mask` must have shape tree.paths.shape'),
      (tree._replace(paths=tree.paths[0]), r'`tree.paths` must have shape \[K, D\] \(rank 2\)'),
      (tree._replace(paths=tree.paths[:1], codes=tree.codes[:1], mask=tree.mask[:1]),
       r'`tree.paths` must have shape \[K, D\] with K >= 2; got shape \(1, 3\)'),
      (tree._replace(paths=tree.paths.astype(np.float32)), r'`tree.paths` must be integer'),
      (tree._replace(codes=tree.codes.astype(np.float32)), r'`tree.codes` must be integer'),
      (tree._replace(mask=tree.mask.astype(np.int8)), r'`tree.mask` must be a bool mask'),
  ]
  for bad, msg in bad_trees:
    with pytest.raises(ValueError, match=msg):
      hs.hierarchical_log_prob(x, w, bad)
    with pytest.raises(ValueError, match=msg):
      jax.jit(lambda x: hs.hierarchical_log_prob(x, w, bad))(x)
  with pytest.raises(ValueError, match=r'`tree.paths` must be concrete .*functools.partial'):
    jax.jit(hs.hierarchical_loss)(x, y, w, tree)


# ----------------------------------------------------------------------------------------------
# chex variants (jit, no jit, on device), vmap over examples, per-example gradients.


@functools.lru_cache(maxsize=None)
def _hierarchical_fns():
  """log_prob, loss, predict over the Huffman tree of COUNTS (closed over: a tree is static, never
  a traced argument) and the jitted Jacobians of loss and log_prob w.r.t. the features; one set
  of function objects so that jit caches hit across variants."""
  tree = hs.huffman_tree(COUNTS)
  log_prob = lambda x, w, b: hs.hierarchical_log_prob(x, w, tree, node_bias=b)
  loss = lambda x, y, w, b: hs.hierarchical_loss(x, y, w, tree, node_bias=b)
  predict = lambda x, w, b: hs.hierarchical_predict(x, w, tree, node_bias=b)
  return tree, log_prob, loss, predict, jax.jit(jax.jacrev(loss)), jax.jit(jax.jacrev(log_prob))


class HierarchicalVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  def test_ops_match_reference_vmap_and_per_example_gradients(self):
    # A Huffman tree with a zero count: unequal depths, padded paths.
    tree, log_prob, loss, predict, loss_jacobian, log_prob_jacobian = _hierarchical_fns()
    k, n = tree.num_classes, 4
    x, w, b, y = _params(k, 3, seed=5, scale=2.0, lead=(n,))
    ref = _ref_log_prob(x, w, b, tree)
    lp = self.variant(log_prob)(x, w, b)
    nll = self.variant(loss)(x, y, w, b)
    pred = self.variant(predict)(x, w, b)
    np.testing.assert_allclose(lp, ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(nll, -ref[np.arange(n), np.asarray(y)], rtol=2e-5, atol=2e-5)
    assert pred.dtype == jnp.int32
    np.testing.assert_array_equal(pred, np.argmax(ref, -1))
    # vmap over a leading example axis equals the batched call.
    vmapped = lambda f, axes: self.variant(jax.vmap(f, in_axes=axes))
    np.testing.assert_allclose(vmapped(log_prob, (0, None, None))(x, w, b), lp, rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(vmapped(loss, (0, 0, None, None))(x, y, w, b), nll, rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_array_equal(vmapped(predict, (0, None, None))(x, w, b), pred)
    # vmap(grad) w.r.t. the features = the diagonal blocks of the batched Jacobian, which has no
    # cross-example terms; for log_prob, vmap(jacrev) against the [N, K, N, d] Jacobian.
    i = np.arange(n)
    grads = vmapped(jax.grad(loss), (0, 0, None, None))(x, y, w, b)
    jac = np.asarray(loss_jacobian(x, y, w, b))  # [N, N, d]
    np.testing.assert_allclose(grads, jac[i, i], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jac[i[:, None] != i[None, :]], 0)
    assert np.all(np.abs(jac[i, i]).sum(-1) > 0)
    jac_lp = vmapped(jax.jacrev(log_prob), (0, None, None))(x, w, b)  # [N, K, d]
    full = np.asarray(log_prob_jacobian(x, w, b))  # [N, K, N, d]
    np.testing.assert_allclose(jac_lp, full[i, :, i], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(full.transpose(0, 2, 1, 3)[i[:, None] != i[None, :]], 0)
    # The gradient of log p summed over the classes' probabilities is 0 (normalization).
    np.testing.assert_allclose(np.einsum('nk,nkd->nd', np.exp(ref), jac_lp), 0, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  def test_tree_builders_on_concrete_counts(self):
    # Builders are host functions of concrete counts: inside jit (closed over) the tree is a
    # compile-time constant equal to the eager one; traced counts are rejected.
    for name in ('huffman', 'balanced7', 'balanced2'):
      tree = self.variant(TREES[name])()
      chex.assert_trees_all_equal(tree, TREES[name]())
      chex.assert_trees_all_equal_dtypes(tree, TREES[name]())
      _assert_full_binary_tree(hs.Tree(*(np.asarray(a) for a in tree)))
    counts = np.asarray(COUNTS)
    if self.variant.type == chex.ChexVariantType.WITH_JIT:
      with pytest.raises(ValueError, match='`class_counts` must be concrete'):
        self.variant(hs.huffman_tree)(counts)
    else:  # Concrete counts, on the host or on the device.
      chex.assert_trees_all_equal(self.variant(hs.huffman_tree)(counts), TREES['huffman']())
