"""HierarchicalSoftmax: classes are leaves of a binary tree, one logistic unit per internal node.

Training gathers only the label's root-to-leaf path (`ops.hierarchical_loss`, O(D d) per example
instead of O(K d)); `log_prob` is exact and normalized (`ops.hierarchical_log_prob`), `predict`
is its argmax. The tree is NumPy, built on the host once per distinct `(tree, counts)` and cached
(`functools.lru_cache` in `softmax_jax.ops.hierarchical`), so re-tracing never rebuilds it.

Trees:
  'huffman'   Huffman code of `class_counts` (word2vec, fastText): frequent classes get short
              paths; `build_classifier` / the LM builder fill `class_counts` from the training
              data. Without counts the ids are assumed frequency-sorted with log-uniform (Zipf)
              frequencies `p(k) = log((k+2)/(k+1)) / log(K+1)`, as in `log_uniform_sampler`.
  'balanced'  complete binary tree, depth ceil(log2 K) for every class (counts ignored).

Checks: the ranks, shapes and dtypes of `features` and `labels` as every head (chex, eagerly and
under `jit`, see dense.py); `num_classes`, `tree`, `class_counts` and `dtype` on every call (Python
values, so under `jit` too); labels in [0, K) only when concrete (traced out-of-range ones give a
NaN loss).
"""

import functools
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.heads import _checks
from softmax_jax.heads import _eval
from softmax_jax.ops import hierarchical as hs
from softmax_jax.ops.sampled import log_uniform_probs

TREES = ('huffman', 'balanced')


@functools.lru_cache(maxsize=8)
def _zipf_counts(num_classes: int) -> Tuple[float, ...]:
  return tuple(log_uniform_probs(num_classes).tolist())


def build_tree(num_classes: int, tree: str = 'huffman',
               class_counts: Optional[Tuple[int, ...]] = None) -> hs.Tree:
  """The (cached) `ops.hierarchical.Tree` a `HierarchicalSoftmax` with these fields uses."""
  name = 'HierarchicalSoftmax'
  _checks.num_classes(name, num_classes)
  if tree not in TREES:
    raise ValueError(f'{name}: tree must be one of {TREES}; got {tree!r}.')
  if class_counts is not None and np.shape(class_counts) != (num_classes,):
    raise ValueError(f'{name}: class_counts must have num_classes = {num_classes} entries '
                     f'(shape ({num_classes},)); got shape {np.shape(class_counts)}.')
  if tree == 'balanced':
    return hs.balanced_tree(num_classes)
  counts = _zipf_counts(num_classes) if class_counts is None else class_counts
  if not isinstance(counts, tuple):
    counts = tuple(np.asarray(counts).tolist())
  return hs.huffman_tree(counts)


class HierarchicalSoftmax(nn.Module):
  """Hierarchical softmax head (Morin & Bengio 2005; Mikolov et al. 2013).

  `p(k | x) = prod_j sigmoid(code_kj (x . v_{path_kj} + b_{path_kj}))` along k's tree path.

  Attributes:
    num_classes: K.
    tree: 'huffman' (of `class_counts`, default) or 'balanced'.
    class_counts: training counts per class, `[K]` (None: Zipf over frequency-sorted ids).
    use_bias: a learned bias per internal node.
    dtype: computation dtype of the node vectors and features, None or floating (None: the
      features' dtype);
      logits and losses are accumulated in float32.
    node_init: initializer of the `[K-1, d]` node vectors (fan-in d). Zeros (word2vec's and
      fastText's choice) start every class at `2^-depth`, which for a Huffman tree is close
      to the unigram distribution, but gives the backbone no gradient on the first step.

  Params: `node_vectors [K-1, d]` (row n is internal node n; rows, not a `[d, K-1]` kernel,
  because the training step gathers rows), `bias [K-1]` if `use_bias`.
  """
  num_classes: int
  tree: str = 'huffman'
  class_counts: Optional[Tuple[int, ...]] = None
  use_bias: bool = True
  dtype: Any = None
  node_init: Callable = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)
  sparse_param: ClassVar[str] = 'node_vectors'  # the table `row_loss` reads rows of
  row_ids_distinct: ClassVar[bool] = True  # `row_loss`'s ids are distinct (sorted, padded)

  def _tree(self) -> hs.Tree:
    return build_tree(self.num_classes, self.tree, self.class_counts)

  @nn.compact
  def _weights(self, d: int):
    vectors = self.param('node_vectors', self.node_init, (self.num_classes - 1, d),
                          jnp.float32)
    bias = (self.param('bias', nn.initializers.zeros, (self.num_classes - 1,), jnp.float32)
            if self.use_bias else None)
    return vectors, bias

  def _prepare(self, features, labels=None):
    _checks.compute_dtype(type(self).__name__, self.dtype)
    tree = self._tree()  # Checks num_classes, tree and class_counts before the labels' range.
    features, labels = _checks.features_and_labels(type(self).__name__, features, labels,
                                                   num_classes=self.num_classes)
    vectors, bias = self._weights(features.shape[-1])
    dtype = self.dtype or features.dtype
    return tree, features.astype(dtype), labels, vectors.astype(dtype), bias

  def __call__(self, features: jnp.ndarray, labels: jnp.ndarray, *, train: bool = False):
    """Per-example `-log p(label)` `[...]` for `features: [..., d]`, `labels: [...] int`.

    The same path loss in training and evaluation (it is exact); `train` is unused.
    """
    del train
    tree, x, labels, vectors, bias = self._prepare(features, labels)
    return hs.hierarchical_loss(x, labels, vectors, tree, node_bias=bias)

  def row_loss(self, features: jnp.ndarray, labels: jnp.ndarray,
               row_delta: Optional[jnp.ndarray] = None) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """The training loss `__call__(features, labels, train=True)` read from the touched rows only.

    The loss reads the N D node vectors on the labels' paths (N = labels.size, D the depth).
    Their R = min(N D, K - 1) distinct ids are `row_ids` (sorted, padded with K - 1); the loss
    reads `rows = stop_gradient(node_vectors[row_ids]) + row_delta`, so `grad(loss, row_delta)` is the
    gradient of `node_vectors` at `row_ids` with duplicates summed (zero at the padding), and no
    `[K - 1, d]` gradient is formed. Same values and, up to float summation order, the same
    gradients as `ops.hierarchical_loss`; the training step uses it for
    `config.optimizer.sparse_output` (`softmax_jax.train.sparse`).

    Args:
      features: [..., d] float.
      labels: [...] int in [0, K).
      row_delta: [R, d] float32, or None (zeros).

    Returns:
      `(loss [...], row_ids [R] int32)`.
    """
    _checks.compute_dtype(type(self).__name__, self.dtype)
    tree = self._tree()
    features, labels = _checks.features_and_labels(type(self).__name__, features, labels,
                                                   num_classes=self.num_classes)
    vectors, bias = self._weights(features.shape[-1])
    dtype = self.dtype or features.dtype
    x = features.astype(dtype)
    acc = jnp.promote_types(jnp.result_type(x.dtype, dtype), jnp.float32)
    k, rows_k = self.num_classes, self.num_classes - 1
    # As ops.hierarchical_loss: one [K, D] table `code * (node + 1)`, 0 at padding.
    signed = np.where(tree.mask, np.asarray(tree.codes, np.int32) * (np.asarray(tree.paths) + 1), 0)
    in_range = (labels >= 0) & (labels < k)
    entry = jnp.asarray(signed, jnp.int32)[jnp.where(in_range, labels, 0)]  # [..., D]
    node, sign = jnp.maximum(jnp.abs(entry) - 1, 0), jnp.sign(entry).astype(acc)
    row_ids, inverse = jnp.unique(node.reshape(-1), size=min(node.size, rows_k),
                                  fill_value=rows_k, return_inverse=True)
    rows = jax.lax.stop_gradient(jnp.take(vectors, row_ids, axis=0, mode='fill', fill_value=0))
    if row_delta is not None:
      rows = rows + row_delta
    w = jnp.take(rows.astype(dtype), inverse.reshape(node.shape), axis=0)  # [..., D, d]
    z = jnp.einsum('...d,...jd->...j', x, w, preferred_element_type=acc)
    if bias is not None:
      z = z + jnp.take(bias, node).astype(acc)
    nll = -jnp.sum(jnp.where(sign != 0, jax.nn.log_sigmoid(sign * z), 0), -1)
    return jnp.where(in_range, nll, jnp.nan), row_ids.astype(jnp.int32)

  def log_prob(self, features: jnp.ndarray) -> jnp.ndarray:
    """Exact normalized log-probabilities `[..., K]` (logsumexp over the last axis is 0)."""
    tree, x, _, vectors, bias = self._prepare(features)
    return hs.hierarchical_log_prob(x, vectors, tree, node_bias=bias)

  def predict(self, features: jnp.ndarray) -> jnp.ndarray:
    """Most probable class `[...] int32`, `argmax(log_prob(features), -1)` (exact, not greedy)."""
    return jnp.argmax(self.log_prob(features), axis=-1).astype(jnp.int32)

  def eval_stats(self, features: jnp.ndarray, labels: jnp.ndarray, *, temperatures=(1.0,),
                 log_prior=None, chunk_size: Optional[int] = None) -> Dict[str, jnp.ndarray]:
    """Per-example statistics of the exact `log_prob`, `chunk_size` leaves at a time.

    `features: [..., d]`, `labels: [...] int`; keys as `DenseSoftmax.eval_stats` ('prediction',
    'label_rank' `[...]` int32, 'label_log_prob', 'confidence' `[..., G]`, 'adjusted_*' with
    `log_prior: [K]`). The leaves are visited depth first, so a chunk of c consecutive leaves
    touches at most c - 1 + 2D internal nodes: each chunk is one `[..., U] = x @ v[nodes].T`
    product (U <= c + 2D) and a loop of D gathers of `[..., c]`, O(N (c + D)) memory (D, the
    depth, grows as log K: so do U and the host tables, `[K, D]` like the tree's), and the
    work of one `[N, K-1]` product in all. The label's log-probability is its path's
    (`ops.hierarchical_loss`). None: chunks of 2048 leaves.
    """
    tree, x, labels, vectors, bias = self._prepare(features, labels)
    size = min(int(chunk_size or _eval.DEFAULT_CHUNK_SIZE), self.num_classes)
    _checks.integer_at_least(type(self).__name__, 'chunk_size', size, 1, 'leaves per chunk')
    counts = self.class_counts
    counts = counts if counts is None or isinstance(counts, tuple) else tuple(np.asarray(counts).tolist())
    order, nodes, index = _chunk_plan(self.num_classes, self.tree, counts, size)
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32

    def chunk(start, size):
      i = (start + size - 1) // size  # the chunk's number (the last one starts at K - size)
      node = jnp.asarray(nodes)[i]
      z = jnp.einsum('...d,ud->...u', x, jnp.take(vectors, node, axis=0),
                     preferred_element_type=acc)
      if bias is not None:
        z = z + jnp.take(bias, node).astype(acc)
      zero = jnp.zeros(z.shape[:-1] + (1,), acc)
      table = jnp.concatenate([jax.nn.log_sigmoid(-z), jax.nn.log_sigmoid(z), zero], axis=-1)
      where = jnp.asarray(index)[i]  # [size, D] columns of `table`
      # One level at a time (a loop, so one [..., size] block lives, whatever the depth D).
      return jax.lax.fori_loop(0, index.shape[-1], lambda j, out: out + jnp.take(
          table, where[:, j], axis=-1), jnp.zeros(z.shape[:-1] + (size,), acc))

    label = -hs.hierarchical_loss(x, labels, vectors, tree, node_bias=bias)
    return _eval.chunked_eval_stats(chunk, labels, num_classes=self.num_classes, chunk_size=size,
                                    label_scores=label, class_ids=order,
                                    temperatures=temperatures, log_prior=log_prior)


@functools.lru_cache(maxsize=8)
def _chunk_plan(num_classes: int, tree: str, class_counts, size: int):
  """Host tables of `eval_stats` (cached): leaves depth first `order [K]`; per chunk of `size`
  leaves (the last one starting at K - size) its internal nodes `nodes [n, U]` (padded with
  node 0) and, per leaf and level, the column of its branch in the chunk's table
  `[log_sigmoid(-z_nodes), log_sigmoid(z_nodes), 0]`: `index [n, size, D]` (2U at padding)."""
  t = build_tree(num_classes, tree, class_counts)
  k = num_classes
  # No path is a prefix of another, so sorting the codes (-1 before +1) lists leaves depth first.
  order = np.lexsort(np.asarray(t.codes).T[::-1]).astype(np.int32)
  starts = [min(i * size, k - size) for i in range(-(-k // size))]
  per_chunk = [np.unique(t.paths[order[a:a + size]][t.mask[order[a:a + size]]]) for a in starts]
  u = max(len(n) for n in per_chunk)
  nodes = np.zeros((len(starts), u), np.int32)
  index = np.full((len(starts), size, t.paths.shape[1]), 2 * u, np.int32)
  for c, (a, chunk_nodes) in enumerate(zip(starts, per_chunk)):
    nodes[c, :len(chunk_nodes)] = chunk_nodes
    leaves = order[a:a + size]
    local = np.searchsorted(chunk_nodes, t.paths[leaves]) + u * (t.codes[leaves] > 0)
    index[c] = np.where(t.mask[leaves], local, 2 * u)
  for a in (order, nodes, index):
    a.setflags(write=False)
  return order, nodes, index
