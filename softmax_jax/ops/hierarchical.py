"""Hierarchical softmax over a binary tree of the classes (Morin & Bengio 2005; word2vec, fastText).

Each of the K classes is a leaf of a binary tree with K - 1 internal nodes; internal node n holds a
vector `v_n` (row n of `node_vectors [K-1, d]`) and a bias `b_n`, and with `z_n = x . v_n + b_n`
the walk from the root takes branch `s = +1` with probability `sigmoid(z_n)` and `s = -1` with
`sigmoid(-z_n)`, so that `log p(k | x) = sum_j log_sigmoid(code[k, j] * z[path[k, j]])` over the
internal nodes on the root-to-leaf path of k. The leaf probabilities sum to 1 by construction.

Trees are NumPy `Tree`s built once on the host and cached: `huffman_tree(class_counts)` (word2vec's
`CreateBinaryTree`, fastText's `buildTree`: frequent classes get short paths, the expected path
length under the count distribution is minimal) or `balanced_tree(num_classes)` (depth
ceil(log2 K)). Paths are padded to the maximum depth D so that shapes are static under `jit`.

Checks: the tree builders are host functions of concrete counts (a traced argument is rejected);
build the tree outside `jit` or from closed-over values. The ops check the shapes and dtypes of
`features`, `node_vectors`, `node_bias`, `labels` and the tree's arrays always, also under
`jit`/`vmap`/`grad`; labels lie in [0, K) is checked only when they are concrete (a traced
out-of-range label gives a NaN loss). The tree itself must be concrete NumPy (close over it or
bind it with `functools.partial`; never pass it as a traced `jit` argument). Failures raise a
ValueError naming the argument. A NaN feature gives its example a NaN loss and NaN
log-probabilities; `hierarchical_loss` takes `ignore_index` as `cross_entropy` does: the NaN rule
and `ignore_index` of the package docstring.

Costs: `hierarchical_loss` gathers only the label's D node vectors, O(N D d), never the
`[N, K-1]` matmul; `hierarchical_log_prob` (evaluation) is one `features @ node_vectors.T`
matmul plus D gathers of `[N, K]`, accumulated level by level (never an `[N, K, D]` array).
A top-down variant (each level gathers only its own nodes, O(N K) gathers in all) measured no
faster on this CPU, where the matmul dominates.

Layout: node vectors are rows, `[K-1, d]` (word2vec's `syn1`, fastText's `wo_`), not a `[d, K-1]`
kernel: the training step gathers and scatter-adds whole contiguous rows. Measured on this CPU
(2 shared cores, K=200000, N=2048, d=512, D=28 random paths, jit forward+backward): rows 0.36 s,
gathering columns of a `[d, K-1]` kernel 0.64 s, transposing it first 0.75 s; the dense softmax
step at the same sizes took 6.4 s.

Measured for the issue's setting (log-uniform labels p(k) = log((k+2)/(k+1)) / log(K+1),
K=200000, N=2048, d=512, float32, this CPU under `jit`): the Huffman tree of counts 1e9 p(k)
builds in 0.8-1.2 s; its maximum depth is D = 21, the mean path length over classes 19.8 and
the expected one under p 12.44 nodes (the entropy of p is 12.42 bits; the balanced tree has depth
18, expected 17.1). Forward+backward of `hierarchical_loss` (with node bias): 0.27 s per step
(compile 0.5 s, 168 MiB temporaries), against 6.4 s for the dense softmax cross-entropy step
(24x); with the two cores shared by other jobs 0.50 s against 15.9 s. `hierarchical_log_prob`
at N=256 takes about 2 s, half of it the `[256, 512] x [512, 200k]` matmul.
"""

import functools
import heapq
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.ops import _checks


class Tree(NamedTuple):
  """A binary tree over K classes, root-to-leaf paths padded to the maximum depth D.

  Attributes:
    paths: [K, D] int32, the internal node ids (0..K-2, rows of `node_vectors`) on the path from
      the root to leaf k, in root-to-leaf order; 0 at padding.
    codes: [K, D] int8, the branch taken at each of those nodes: +1 (probability
      `sigmoid(z_node)`, fastText's `binary = true` child) or -1 (`sigmoid(-z_node)`); 0 at
      padding. word2vec's bit `c` is the opposite convention, `s = 1 - 2c`.
    mask: [K, D] bool, True on the valid (non-padding) entries; `mask.sum(1)` is the depth.

  Example:
    >>> from softmax_jax import ops
    >>> tree = ops.balanced_tree(3)
    >>> type(tree).__name__, tree.paths.shape
    ('Tree', (3, 2))
    >>> tree.mask.sum(1).tolist()
    [1, 2, 2]
    >>> tree.codes.tolist()
    [[1, 0], [-1, -1], [-1, 1]]
  """
  paths: np.ndarray
  codes: np.ndarray
  mask: np.ndarray

  @property
  def num_classes(self) -> int:
    return self.paths.shape[0]

  @property
  def depths(self) -> np.ndarray:
    """[K] int path lengths (code lengths)."""
    return self.mask.sum(1)


def _from_parents(parent, side, node_id, leaf_node):
  """Padded root-to-leaf paths from parent pointers (root: parent -1), vectorized per level."""
  cur = leaf_node.copy()
  ups, sides = [], []
  while True:
    p = parent[cur]
    active = p >= 0
    if not active.any():
      break
    ups.append(np.where(active, node_id[p], 0))
    sides.append(np.where(active, side[cur], 0))
    cur = np.where(active, p, cur)
  ups, sides = np.stack(ups, 1), np.stack(sides, 1)  # [K, D], leaf-to-root.
  depth = (sides != 0).sum(1)
  src = depth[:, None] - 1 - np.arange(ups.shape[1])  # Reverse each row's valid prefix.
  mask = src >= 0
  src = np.maximum(src, 0)
  paths = np.where(mask, np.take_along_axis(ups, src, 1), 0).astype(np.int32)
  codes = np.where(mask, np.take_along_axis(sides, src, 1), 0).astype(np.int8)
  for a in (paths, codes, mask):
    a.setflags(write=False)  # Cached and shared: never mutate.
  return Tree(paths, codes, mask)


@functools.lru_cache(maxsize=16)
def _huffman(counts: tuple) -> Tree:
  k = len(counts)
  heap = [(c, i) for i, c in enumerate(counts)]  # Ties: the older (smaller) node id first.
  heapq.heapify(heap)
  parent = np.full(2 * k - 1, -1, np.int64)
  side = np.zeros(2 * k - 1, np.int8)
  for n in range(k, 2 * k - 1):  # Node n >= k is internal node n - k; the root is K - 2.
    c0, a = heapq.heappop(heap)
    c1, b = heapq.heappop(heap)
    parent[a], parent[b], side[a], side[b] = n, n, -1, 1
    heapq.heappush(heap, (c0 + c1, n))
  node_id = np.arange(2 * k - 1) - k
  return _from_parents(parent, side, node_id, np.arange(k))


def huffman_tree(class_counts) -> Tree:
  """Huffman tree of the class counts, built once per distinct counts (cached).

  Repeatedly merges the two lightest nodes (a heap; ties go to the lower leaf id / older internal
  node, so the tree is deterministic); internal node n is the n-th merge, the root is K - 2. Its
  weighted path length `sum_k n_k depth_k` is minimal over binary trees. As in word2vec and
  fastText, the lighter node of a merge gets code -1 and the heavier +1. K = 200000 builds in
  about a second. The depth is at most about log_phi(sum n / min n) for positive counts (21 for
  200k Zipf classes); adversarial (geometric) counts can make it K - 1, where a balanced tree or
  smoothed counts are the remedy (word2vec caps codes at 40).

  Works on concrete counts only (a host function: NumPy, list or tuple; inside `jit`, close
  over the counts, whose tree is then a compile-time constant).

  Args:
    class_counts: [K] non-negative counts (ints or floats), K >= 2; a tuple is used as the cache
      key directly.

  Returns:
    A `Tree` (read-only arrays shared with the cache).

  Raises:
    ValueError: `class_counts` is traced, not 1-D, has fewer than 2 classes, is not numeric, or
      has a negative or non-finite count (all checked on the concrete counts).

  References:
    Huffman, "A method for the construction of minimum-redundancy codes", Proc. IRE 1952;
    Mikolov et al., "Distributed representations of words and phrases and their
    compositionality", NIPS 2013.

  Example:
    >>> from softmax_jax import ops
    >>> tree = ops.huffman_tree([10, 5, 1, 1])
    >>> tree.mask.sum(1).tolist()
    [1, 2, 3, 3]
  """
  if _checks.is_traced(class_counts):
    raise _checks.ArgumentError('`class_counts` must be concrete (NumPy array, list or tuple) to '
                                'build a tree on the host; got a traced array.')
  key = class_counts if isinstance(class_counts, tuple) else None
  counts = np.asarray(class_counts)
  _checks.rank(counts, 1, 'class_counts', '[num_classes]')
  if counts.size < 2:
    raise _checks.ArgumentError(
        f'`class_counts` must have at least 2 classes; got {counts.size}.')
  if not (np.issubdtype(counts.dtype, np.integer) or np.issubdtype(counts.dtype, np.floating)):
    raise _checks.ArgumentError(f'`class_counts` must be numbers; got dtype {counts.dtype}.')
  bad = np.flatnonzero(~(np.isfinite(counts) & (counts >= 0)))
  if bad.size:
    raise _checks.ArgumentError(f'`class_counts` must be finite and >= 0; got {counts[bad[0]]} '
                                f'at class {bad[0]} ({bad.size} bad in all).')
  return _huffman(key if key is not None else tuple(counts.tolist()))


@functools.lru_cache(maxsize=16)
def _balanced(k: int) -> Tree:
  # Heap layout: internal nodes are positions 0..K-2 (children 2p+1 -> -1, 2p+2 -> +1), leaf k is
  # position K-1+k, so low ids (frequent classes in a frequency-sorted vocabulary) sit shallower.
  pos = np.arange(2 * k - 1)
  parent = np.where(pos > 0, (pos - 1) // 2, -1)
  side = np.where(pos % 2 == 0, 1, -1).astype(np.int8)
  return _from_parents(parent, side, pos, k - 1 + np.arange(k))


def balanced_tree(num_classes: int) -> Tree:
  """Complete binary tree over `num_classes` leaves, depth ceil(log2 K) (cached).

  Internal nodes are numbered breadth-first (root 0); every leaf has depth floor or ceil of
  log2 K, the shallower ones being the lowest class ids. A host function of a concrete K.

  Args:
    num_classes: K >= 2, a Python int.

  Returns:
    A `Tree` (read-only arrays shared with the cache).

  Raises:
    ValueError: `num_classes` is not a Python int (a traced one included) or is < 2.

  Example:
    >>> from softmax_jax import ops
    >>> tree = ops.balanced_tree(4)
    >>> tree.paths.tolist()
    [[0, 1], [0, 1], [0, 2], [0, 2]]
    >>> tree.codes.tolist()
    [[-1, -1], [-1, 1], [1, -1], [1, 1]]
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
    raise _checks.ArgumentError(f'`num_classes` must be an int (concrete, not traced); got '
                                f'{num_classes!r}.')
  if num_classes < 2:
    raise _checks.ArgumentError(f'`num_classes` must be >= 2; got {num_classes}.')
  return _balanced(int(num_classes))


def _check_tree(tree):
  """`tree` is a concrete Tree: paths/codes int and mask bool, all [K, D] with K >= 2. Returns K."""
  if not all(hasattr(tree, f) for f in Tree._fields):
    raise _checks.ArgumentError(
        f'`tree` must be a Tree (huffman_tree / balanced_tree); got {type(tree)}.')
  for field in Tree._fields:
    if _checks.is_traced(getattr(tree, field)):
      raise _checks.ArgumentError(
          f'`tree.{field}` must be concrete (a NumPy array; close over the tree or bind it with '
          'functools.partial instead of passing it as a traced jit argument); got a tracer.')
  paths = tree.paths
  _checks.rank(paths, 2, 'tree.paths', '[K, D]')
  _checks.chex_check(chex.assert_axis_dimension_gteq, paths, 0, 2, name='tree.paths',
                     need='have shape [K, D] with K >= 2', got=f'shape {np.shape(paths)}')
  _checks.dtype(paths, int, 'tree.paths', 'be integer node ids')
  _checks.shape(tree.codes, np.shape(paths), 'tree.codes', 'tree.paths.shape')
  _checks.dtype(tree.codes, int, 'tree.codes', 'be integer branch signs (+1/-1, 0 at padding)')
  _checks.shape(tree.mask, np.shape(paths), 'tree.mask', 'tree.paths.shape')
  _checks.dtype(tree.mask, bool, 'tree.mask', 'be a bool mask')
  return np.shape(paths)[0]


def _check(features, node_vectors, tree, node_bias):
  """Checks shapes and dtypes; returns (x, w, bias, K, compute dtype)."""
  k = _check_tree(tree)
  x, w = jnp.asarray(features), jnp.asarray(node_vectors)
  _checks.rank_at_least(x, 1, 'features', '[..., d]')
  _checks.dtype(x, float, 'features', 'be a float array')
  d = x.shape[-1]
  _checks.shape(w, (k - 1, d), 'node_vectors',
                f'[K-1, d] for a tree of K={k} classes and features [..., {d}]')
  _checks.dtype(w, float, 'node_vectors', 'be a float array')
  if node_bias is not None:
    node_bias = jnp.asarray(node_bias)
    _checks.shape(node_bias, (k - 1,), 'node_bias', '[K-1]')
    _checks.dtype(node_bias, float, 'node_bias', 'be a float array')
  wide = jnp.float64 in (x.dtype, w.dtype)
  return x, w, node_bias, k, jnp.float64 if wide else jnp.float32


def hierarchical_log_prob(features, node_vectors, tree, *, node_bias=None):
  """Exact normalized log-probabilities of all K classes under a tree.

  `log p(k) = sum_j mask[k, j] log_sigmoid(codes[k, j] z[..., paths[k, j]])`,
  `z = features @ node_vectors.T + node_bias`; computed as one matmul, one `[..., 2(K-1)]` table
  of `log_sigmoid(-z), log_sigmoid(z)`, then a loop over the D levels that gathers `[..., K]`
  from it and accumulates (memory O(N K) per level).

  Args:
    features: [..., d] float; 16-bit inputs are multiplied with float32 accumulation.
    node_vectors: [K-1, d] float, row n is internal node n.
    tree: a `Tree` over K classes.
    node_bias: optional [K-1] float.

  Returns:
    [..., K] float32 log-probabilities (float64 for float64 inputs); logsumexp over K is 0.

  Raises:
    ValueError: always, also under `jit`/`vmap`/`grad` (shapes and dtypes): `tree` is not a
      concrete `Tree` with int `paths`/`codes` and bool `mask`, all `[K, D]`, K >= 2;
      `features` is not a float `[..., d]`; `node_vectors` is not a float `[K-1, d]`;
      `node_bias` is not a float `[K-1]`.

  References:
    Morin & Bengio, "Hierarchical probabilistic neural network language model", AISTATS 2005.

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> tree = ops.balanced_tree(4)
    >>> x = np.sin(np.arange(6.0)).reshape(2, 3)
    >>> nodes = np.cos(np.arange(9.0)).reshape(4 - 1, 3)
    >>> lp = ops.hierarchical_log_prob(x, nodes, tree)
    >>> lp.shape, bool(np.allclose(ops.logsumexp(lp), 0.0, atol=1e-5))
    ((2, 4), True)
  """
  x, w, bias, k, acc = _check(features, node_vectors, tree, node_bias)
  z = jnp.einsum('...d,nd->...n', x, w, preferred_element_type=acc)
  if bias is not None:
    z = z + bias.astype(acc)
  zero = jnp.zeros(z.shape[:-1] + (1,), acc)  # Padding gathers this column.
  table = jnp.concatenate([jax.nn.log_sigmoid(-z), jax.nn.log_sigmoid(z), zero], axis=-1)
  index = np.where(tree.mask, tree.paths + (k - 1) * (tree.codes > 0), 2 * (k - 1))
  out = jnp.zeros(z.shape[:-1] + (k,), acc)
  for j in range(index.shape[1]):
    out = out + jnp.take(table, jnp.asarray(index[:, j], jnp.int32), axis=-1)
  return out


def hierarchical_loss(features, labels, node_vectors, tree, *, node_bias=None, ignore_index=None):
  """Per-example negative log-likelihood `-log p(label)` from the label's path alone.

  `loss = -sum_j mask log_sigmoid(code_j (x . v_{path_j} + b_{path_j}))` over the D padded
  entries of the label's path: gathers `[..., D, d]` node vectors and dots them with the
  features, O(N D d) work and memory; the `[N, K-1]` logits are never formed. Equals
  `-hierarchical_log_prob(...)[..., label]`.

  Args:
    features: [..., d] float; 16-bit inputs are multiplied with float32 accumulation.
    labels: [...] int in [0, K) or `ignore_index`, `features.shape[:-1]`.
    node_vectors: [K-1, d] float.
    tree: a `Tree` over K classes.
    node_bias: optional [K-1] float.
    ignore_index: None or an int; examples with this label get loss 0 and gradient 0.

  Returns:
    [...] float32 per-example loss (float64 for float64 inputs).

  Raises:
    ValueError: always, also under `jit`/`vmap`/`grad` (shapes and dtypes): `tree` is not a
      concrete `Tree` with int `paths`/`codes` and bool `mask`, all `[K, D]`, K >= 2;
      `features` is not a float `[..., d]`; `node_vectors` is not a float `[K-1, d]`;
      `node_bias` is not a float `[K-1]`; `labels` is not an integer array of shape
      `features.shape[:-1]`; `ignore_index` is not None or an int. Only on concrete labels: ids
      (other than `ignore_index`) outside [0, K); a traced out-of-range label gives a NaN loss
      for its example.

  References:
    Mikolov et al., "Distributed representations of words and phrases and their
    compositionality", NIPS 2013 (hierarchical softmax with a Huffman tree).

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> tree = ops.huffman_tree([10, 5, 1, 1])
    >>> x = np.sin(np.arange(6.0)).reshape(2, 3)
    >>> nodes = np.cos(np.arange(9.0)).reshape(4 - 1, 3)
    >>> y = jnp.array([0, 3])
    >>> loss = ops.hierarchical_loss(x, y, nodes, tree)
    >>> lp = ops.hierarchical_log_prob(x, nodes, tree)
    >>> bool(np.allclose(loss, -lp[np.arange(2), y], atol=1e-5))
    True
  """
  x, w, bias, k, acc = _check(features, node_vectors, tree, node_bias)
  labels, ignored = _checks.labels_or_ignored(labels, k, x.shape[:-1], ignore_index, 'features')
  if ignored is not None:
    x = jnp.where(ignored[..., None], jnp.zeros((), x.dtype), x)  # Not read: no NaN leaks.
  # One [K, D] table `code * (node + 1)` (0 at padding): a single gather per label, at trace time.
  signed = np.where(tree.mask, np.asarray(tree.codes, np.int32) * (np.asarray(tree.paths) + 1), 0)
  in_range = (labels >= 0) & (labels < k)
  entry = jnp.asarray(signed, jnp.int32)[jnp.where(in_range, labels, 0)]  # [..., D]
  node, sign = jnp.maximum(jnp.abs(entry) - 1, 0), jnp.sign(entry).astype(acc)
  z = jnp.einsum('...d,...jd->...j', x, jnp.take(w, node, axis=0), preferred_element_type=acc)
  if bias is not None:
    z = z + jnp.take(bias, node).astype(acc)
  nll = jnp.where(in_range, -jnp.sum(jnp.where(sign != 0, jax.nn.log_sigmoid(sign * z), 0), -1),
                  jnp.nan)
  return nll if ignored is None else jnp.where(ignored, jnp.zeros_like(nll), nll)


def hierarchical_predict(features, node_vectors, tree, *, node_bias=None):
  """Most probable class `[...] int32`, the exact `argmax` of `hierarchical_log_prob`.

  Greedy descent (the likelier branch at every node) is O(D d) but only approximate; fastText's
  `predict` finds the exact top-k by a depth-first search pruned by the k-th best score so far
  (path log-probabilities only decrease downward). Here all K log-probs are computed.

  Args:
    features: [..., d] float.
    node_vectors: [K-1, d] float.
    tree: a `Tree` over K classes.
    node_bias: optional [K-1] float.

  Returns:
    [...] int32 class ids in [0, K).

  Raises:
    ValueError: as `hierarchical_log_prob` (shapes and dtypes, checked always, also under
      `jit`; there are no values to check).

  References:
    Joulin et al., "Bag of tricks for efficient text classification", EACL 2017 (fastText).

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> tree = ops.balanced_tree(4)
    >>> x = np.sin(np.arange(6.0)).reshape(2, 3)
    >>> nodes = np.cos(np.arange(9.0)).reshape(4 - 1, 3)
    >>> pred = ops.hierarchical_predict(x, nodes, tree)
    >>> pred.tolist() == ops.hierarchical_log_prob(x, nodes, tree).argmax(-1).tolist()
    True
  """
  return jnp.argmax(hierarchical_log_prob(features, node_vectors, tree, node_bias=node_bias),
                    axis=-1).astype(jnp.int32)
