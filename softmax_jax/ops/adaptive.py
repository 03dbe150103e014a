"""Adaptive softmax (Grave et al. 2017) with PyTorch's `nn.AdaptiveLogSoftmaxWithLoss` semantics.

Classes are ids sorted by frequency. `cutoffs = (c_0 < ... < c_{n-1})` split them into the
shortlist `[0, c_0)` and n tail clusters `[c_i, c_{i+1})` (`c_n = K`). The head `[d, c_0 + n]`
scores the shortlist and, at index `c_0 + i`, cluster i; tail i is `x @ P_i @ O_i` with
`P_i: [d, d // div_value**(i+1)]`, `O_i: [h_i, c_{i+1} - c_i]`, no biases, and
`log p(k) = log p_head(cluster i) + log p_i(k | cluster i)` for k in cluster i.

Routing (the training loss). PyTorch evaluates tail i only on the rows whose label is in cluster i,
with data-dependent shapes. Under `jit` shapes are static, so `adaptive_softmax_loss` gathers those
rows into a buffer of static capacity C (`jnp.nonzero(mask, size=C)`, padding rows are zeros and
dropped again on the scatter), computes `[C, cluster_size]` logits only for them, and scatters the
within-cluster log-probs back. C comes from a static ladder of rungs `ceil(f * N)` for
`f in capacity_fractions` plus 0 (no row: the tail is skipped) and N (all rows: always exact);
`lax.switch` on the actual count picks the smallest rung that fits, so the result is always exact
and the cost follows the data (only the taken branch runs, forward and backward). The padding
costs at most the gap to the next rung (<= 1/3 of the rows above 1/8).

Under `vmap` (over a leading axis of `[n, d]` blocks) the routing is kept: the rung is chosen from
the largest count of the batch, which is unbatched (a `custom_vmap` rule, `_max_over_vmap`), so the
switch stays a switch and its one branch runs vmapped, each block gathering that many rows.
Gradients under `vmap` (per-example or summed) go through the same rule. A vmap over single rows
(`[d]` features) cannot route: each row is its own block of one, and a tail runs on every row as
soon as one row of the batch needs it; route such batches by calling the op on `[N, d]`.

Checks (`_checks`): shapes, ranks and dtypes of every argument always, also under `jit`/`vmap`;
labels in [0, K) only when concrete (traced out-of-range labels give a NaN loss). A NaN feature
gives its example a NaN loss and NaN log-probabilities; `ignore_index` as in `cross_entropy`: the
NaN rule and `ignore_index` of the package docstring.

Measured (CPU, 2 cores, N=2048, d=512, K=200000, cutoffs (2000, 10000, 50000), div 4, labels
log-uniform p(k) = log((k+2)/(k+1))/log(K+1), so 62% in the shortlist and 11-13% per tail;
forward+backward under jit, float32): `scripts/benchmark.py --suite=heads`, rows `adaptive`,
`adaptive all` (capacity_fractions=None) and `adaptive vmapped`, recorded in WORKSPACE.md ("Large-output heads").

`adaptive_predict` routes the same way: rows whose head argmax is the shortlist are done (see
the comment there); only the others evaluate the tails.
"""

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.ops.fused import linear_cross_entropy
from softmax_jax.ops.sampled import log_uniform_probs  # pylint: disable=unused-import (re-export)
from softmax_jax.ops import _checks

DEFAULT_CAPACITY_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4)


def check_cutoffs(cutoffs, num_classes: int) -> tuple:
  """Validates PyTorch-style cutoffs: a non-empty, strictly increasing tuple of ints in [1, K-1].

  Args:
    cutoffs: sequence of ints, the first id of each tail cluster (K itself is not included).
    num_classes: K.

  Returns:
    the cutoffs as a tuple of Python ints.
  """
  need = f'a non-empty, strictly increasing sequence of integers in [1, num_classes - 1 = {num_classes - 1}]'
  try:
    got = tuple(cutoffs)
  except TypeError:
    raise ValueError(f'`cutoffs` must be {need}; got {cutoffs!r}.') from None
  ok = bool(got) and all(
      isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in got)
  if ok:
    got = tuple(int(c) for c in got)
    ok = (all(b > a for a, b in zip(got, got[1:])) and got[0] >= 1 and got[-1] <= num_classes - 1)
  if not ok:
    raise ValueError(f'`cutoffs` must be {need}; got {cutoffs!r}.')
  return got


def tail_hidden_sizes(d: int, num_clusters: int, div_value: float) -> tuple:
  """Tail projection widths `h_i = floor(d / div_value**(i+1))` (PyTorch's rule), all >= 1."""
  if not (isinstance(div_value, (int, float, np.number)) and div_value > 0):
    raise ValueError(f'`div_value` must be a number > 0; got {div_value!r}.')
  sizes = tuple(int(d // (div_value ** (i + 1))) for i in range(num_clusters))
  if sizes and sizes[-1] < 1:
    raise ValueError(
        f'`div_value`={div_value} is too large for features of width d={d} with {num_clusters} '
        f'tail clusters: tail widths d // div_value**(i+1) = {sizes} must all be >= 1; need '
        f'div_value**{num_clusters} <= d (or fewer cutoffs).')
  return sizes


def adaptive_cutoffs(class_counts, *, head_mass: float = 0.8, growth: float = 4.0,
                     max_clusters: int = 4) -> tuple:
  """Cutoffs for `[K]` class counts (or probabilities) given in class-id order.

  Rule: the shortlist is the smallest id prefix `[0, c_0)` holding `head_mass` of the counts
  (Grave et al. 2017, §4-5: the head holds the frequent words, small enough to be fast and covering
  most of the mass); tail clusters then grow geometrically, `c_{i+1} = ceil(growth * c_i)`, which
  on a Zipf vocabulary gives each cluster about the same mass `log(growth) / log(K)`. A cutoff is
  added only while at most `max_clusters` clusters exist and at least half as many classes remain
  after it as the cluster it closes has; the last cluster takes the rest. `c_0` is clamped to [1, K - 1], so
  any K >= 2 gets valid cutoffs (a single cluster for small K). Adaptive softmax assumes ids sorted
  by decreasing frequency; the rule works in id order either way.

  Args:
    class_counts: `[K]` counts or probabilities >= 0 with a positive sum, K >= 2.
    head_mass: fraction in (0, 1] of the mass the shortlist covers.
    growth: size ratio > 1 of consecutive cutoffs.
    max_clusters: the most tail clusters, >= 1.

  Returns:
    a tuple of ints valid for `check_cutoffs(..., K)`.

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> ops.adaptive_cutoffs(np.array([500, 200, 100, 50, 20, 10, 5, 5, 2, 1, 1, 1]))
    (3,)
  """
  counts = np.asarray(class_counts, np.float64)
  if counts.ndim != 1 or counts.size < 2:
    raise ValueError(f'`class_counts` must be [num_classes] with num_classes >= 2; got shape '
                     f'{counts.shape}.')
  if not (np.all(np.isfinite(counts)) and np.all(counts >= 0) and counts.sum() > 0):
    raise ValueError('`class_counts` must be finite, >= 0 and not all zero.')
  if not 0 < head_mass <= 1:
    raise ValueError(f'`head_mass` must be in (0, 1]; got {head_mass}.')
  if not growth > 1:
    raise ValueError(f'`growth` must be > 1; got {growth}.')
  if not (isinstance(max_clusters, int) and max_clusters >= 1):
    raise ValueError(f'`max_clusters` must be an int >= 1; got {max_clusters!r}.')
  k = counts.size
  cum = np.cumsum(counts) / counts.sum()
  first = int(np.searchsorted(cum, head_mass * (1 - 1e-12), side='left')) + 1
  cutoffs = [min(max(first, 1), k - 1)]
  while len(cutoffs) < max_clusters:
    c = cutoffs[-1]
    nxt = max(math.ceil(growth * c), c + 1)
    if 2 * (k - nxt) < nxt - c:
      break
    cutoffs.append(nxt)
  return tuple(cutoffs)


def _check(features, head_kernel, tail_kernels, cutoffs, head_bias):
  """Checks shapes; returns (features, cutoffs tuple, K)."""
  features = jnp.asarray(features)
  _checks.rank_at_least(features, 1, 'features', '[..., d]')
  _checks.dtype(features, float, 'features', 'be a float array [..., d]')
  d = features.shape[-1]
  try:
    tails = [tuple(t) for t in tail_kernels]
  except TypeError:
    raise ValueError('`tail_kernels` must be a sequence of (projection [d, h_i], output '
                     f'[h_i, cluster_size_i]) pairs; got {type(tail_kernels)}.') from None
  if not tails or any(len(t) != 2 for t in tails):
    raise ValueError('`tail_kernels` must be a non-empty sequence of (projection, output) pairs.')
  last = jnp.shape(tails[-1][1])
  k = (cutoffs[-1] if len(cutoffs) else 0) + (last[-1] if len(last) == 2 else 0)
  cutoffs = check_cutoffs(cutoffs, k)
  n = len(cutoffs)
  if len(tails) != n:
    raise ValueError(f'`tail_kernels` must hold one pair per cutoff ({n}); got {len(tails)}.')
  ctx = f' (cutoffs={cutoffs}, num_classes={k})'
  _checks.shape(head_kernel, (d, cutoffs[0] + n), 'head_kernel', '[d, c_0 + n]' + ctx)
  if head_bias is not None:
    _checks.shape(head_bias, (cutoffs[0] + n,), 'head_bias', '[c_0 + n]' + ctx)
  bounds = cutoffs + (k,)
  for i, (proj, out) in enumerate(tails):
    h = max(jnp.shape(proj)[-1] if jnp.ndim(proj) == 2 else -1, 1)
    _checks.shape(proj, (d, h), f'tail_kernels[{i}][0]', f'[d, h_{i}]')
    _checks.shape(out, (h, bounds[i + 1] - bounds[i]), f'tail_kernels[{i}][1]',
                  f'[h_{i}, c_{i + 1} - c_{i}]' + ctx)
  return features, cutoffs, k


def _mm(a, b):
  """`a @ b` in a's dtype, accumulated in float32 (float64 stays float64)."""
  acc = jnp.promote_types(a.dtype, jnp.float32)
  return jnp.matmul(a, b.astype(a.dtype), preferred_element_type=acc)


def _head_log_prob(x, head_kernel, head_bias):
  z = _mm(x, head_kernel)
  return jax.nn.log_softmax(z if head_bias is None else z + head_bias.astype(z.dtype), axis=-1)


def _tail_logits(x, proj, out):
  return _mm(_mm(x, proj).astype(x.dtype), out)  # [rows, cluster_size], float32 for 16-bit x


def _rungs(n: int, fractions) -> tuple:
  """Static capacities `(0, ..., n)`: 0 skips, n is all rows."""
  return tuple(sorted({0, n} | {min(n, math.ceil(f * n)) for f in fractions}))


@jax.custom_batching.custom_vmap
def _max_over_vmap(count):
  """`count` itself; under `vmap`, the largest count of the batch, unbatched (see `_switch_on_count`)."""
  return count


@_max_over_vmap.def_vmap
def _max_over_vmap_rule(axis_size, in_batched, count):
  del axis_size
  if not in_batched[0]:
    return count, False
  return _max_over_vmap(jnp.max(count, axis=0)), False  # called again: an enclosing vmap reduces too


def _switch_on_count(mask, fractions, make_branch, *operands):
  """`lax.switch` over the capacity rungs: branch `make_branch(cap)` gets the smallest cap >= count.

  Every rung >= the count gives the same (exact) result, so under `vmap` the rung is chosen from the
  largest count of the batch (`_max_over_vmap`): the index stays unbatched, the switch stays a switch
  whose taken branch runs vmapped, and each example gathers that many rows. (A batched index would
  turn the switch into a select that computes every rung.)
  """
  rungs = _rungs(mask.shape[0], fractions)
  count = _max_over_vmap(jnp.sum(mask, dtype=jnp.int32))
  index = jnp.sum(jnp.asarray(rungs[:-1]) < count, dtype=jnp.int32)
  return jax.lax.switch(index, [make_branch(c) for c in rungs], *operands)


def _gather(mask, cap, *arrays):
  """`(rows [cap], *row slices [cap, ...])`: the first `cap` masked rows; padding reads zeros and
  has the out-of-range row index N, so a `mode='drop'` scatter ignores it."""
  rows = jnp.nonzero(mask, size=cap, fill_value=mask.shape[0])[0]
  return (rows,) + tuple(jnp.take(a, rows, axis=0, mode='fill', fill_value=0) for a in arrays)


def _routed(mask, base, inputs, fn, fractions):
  """`where(mask, fn(*inputs), base)` row-wise, evaluating `fn` only on (about) the masked rows.

  `fn` maps `[C, ...]` row slices of `inputs` to `[C]` values. Not for differentiation (see
  `_routed_tail_log_p`).
  """
  n = mask.shape[0]
  if fractions is None or n == 0:
    return jnp.where(mask, fn(*inputs), base) if n else base

  def make_branch(cap):
    def run(mask, base, *inputs):
      if cap == 0:
        return base
      rows, *sub = _gather(mask, cap, *inputs)
      return base.at[rows].set(fn(*sub).astype(base.dtype), mode='drop')
    return run

  return _switch_on_count(mask, fractions, make_branch, mask, base, *inputs)


def _tail_log_p(xs, rel, proj, out):
  """`[C]` within-cluster `log p_i(rel)` of feature rows `xs: [C, d]`.

  Streamed over the cluster's classes by `linear_cross_entropy`: a tail's output layer is a thin
  product (`h_i` = 8 for the last of (2000, 10000, 50000) at d=512) into up to 150,000 classes, so
  the `[C, size]` logits cost memory traffic, not arithmetic. `benchmark.py --suite=heads` at
  K=200k, N=2048, d=512 (CPU): the adaptive step went from 29.6x to 69.8x faster than dense and
  its compiled temporary memory from 2379 to 156 MiB (WORKSPACE.md).
  """
  h = _mm(xs, proj).astype(xs.dtype)
  rel = jnp.clip(rel, 0, out.shape[-1] - 1)  # rows outside the cluster are masked by the caller
  return -linear_cross_entropy(h, out.astype(h.dtype), rel, reduction='none')


# Why a custom VJP: reverse-mode AD of `lax.switch` makes the forward switch return the residuals of
# *every* branch (zeros from the branches not taken), so each step would allocate and fill buffers
# like `[N, cluster_size]` for all rungs; measured, that made some ladders as slow as no routing.
# Here the forward saves only its inputs and the backward is one more switch whose branch recomputes
# the gathered tail and applies its VJP (one extra tail forward, on the routed rows only).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _routed_tail_log_p(fractions, x, proj, out, mask, rel):
  """`[N]`: `log p_i(rel)` on the rows of `mask`, 0 elsewhere."""
  base = jnp.zeros(x.shape[:1], jnp.promote_types(x.dtype, jnp.float32))
  return _routed(mask, base, (x, rel), lambda xs, r: _tail_log_p(xs, r, proj, out), fractions)


def _routed_tail_fwd(fractions, x, proj, out, mask, rel):
  return _routed_tail_log_p(fractions, x, proj, out, mask, rel), (x, proj, out, mask, rel)


def _routed_tail_bwd(fractions, residuals, g):
  x, proj, out, mask, rel = residuals

  def make_branch(cap):
    def run(x, proj, out, mask, rel, g):
      if cap == 0:
        return jnp.zeros_like(x), jnp.zeros_like(proj), jnp.zeros_like(out)
      rows, xs, rs, gs = _gather(mask, cap, x, rel, g)  # padding rows have g = 0: no gradient
      _, vjp = jax.vjp(lambda xs, p, o: _tail_log_p(xs, rs, p, o), xs, proj, out)
      gxs, gp, go = vjp(gs)
      return jnp.zeros_like(x).at[rows].set(gxs, mode='drop'), gp, go
    return run

  gx, gp, go = _switch_on_count(mask, fractions, make_branch, x, proj, out, mask, rel, g)
  return gx, gp, go, None, None


_routed_tail_log_p.defvjp(_routed_tail_fwd, _routed_tail_bwd)


def adaptive_log_softmax(features, head_kernel, tail_kernels, *, cutoffs, head_bias=None):
  """Exact normalized log-probabilities of the adaptive softmax over all K classes.

  `log p(k) = head_lp[k]` for `k < c_0`, else `head_lp[c_0 + i] + log_softmax(x P_i O_i)[k - c_i]`
  for k in cluster i (PyTorch's `AdaptiveLogSoftmaxWithLoss.log_prob`). Every tail runs on every row.
  Reference: Grave et al., "Efficient softmax approximation for GPUs", ICML 2017.

  Args:
    features: [..., d] float; 16-bit floats are multiplied in their dtype, accumulated in float32.
    head_kernel: [d, c_0 + n] (shortlist logits, then one logit per cluster).
    tail_kernels: n pairs `(P_i [d, h_i], O_i [h_i, c_{i+1} - c_i])`; K = c_{n-1} + O_{n-1}.shape[1].
    cutoffs: n ints, strictly increasing in [1, K - 1] (K is not included, as in PyTorch).
    head_bias: optional [c_0 + n].

  Returns:
    [..., K] float32 log-probabilities (float64 for float64 features).

  Raises:
    ValueError (`ArgumentError`): a shape, rank or dtype that does not fit (always, also under
      `jit`).

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> x = np.sin(np.arange(8.0)).reshape(2, 4)
    >>> head = np.cos(np.arange(12.0)).reshape(4, 2 + 1)
    >>> tails = [(np.ones((4, 2)), np.sin(np.arange(6.0)).reshape(2, 3))]
    >>> lp = ops.adaptive_log_softmax(x, head, tails, cutoffs=(2,))
    >>> lp.shape, bool(np.allclose(ops.logsumexp(lp), 0.0, atol=1e-5))
    ((2, 5), True)
  """
  features, cutoffs, k = _check(features, head_kernel, tail_kernels, cutoffs, head_bias)
  lead, s = features.shape[:-1], cutoffs[0]
  x = features.reshape(-1, features.shape[-1])
  head_lp = _head_log_prob(x, head_kernel, head_bias)
  parts = [head_lp[:, :s]]
  for i, (proj, out) in enumerate(tail_kernels):
    parts.append(head_lp[:, s + i, None] + jax.nn.log_softmax(_tail_logits(x, proj, out), axis=-1))
  return jnp.concatenate(parts, axis=-1).reshape(lead + (k,))


def adaptive_softmax_loss(features, labels, head_kernel, tail_kernels, *, cutoffs, head_bias=None,
                          capacity_fractions: Optional[Sequence[float]] = DEFAULT_CAPACITY_FRACTIONS,
                          ignore_index: Optional[int] = None):
  """Per-example adaptive softmax loss `-log p(label)`, evaluating each tail only where needed.

  Equal to `-adaptive_log_softmax(...)[..., label]` (PyTorch's `-forward(...).output`). The head
  runs on every row; tail i runs on a static-capacity gather of the rows whose label is in
  cluster i (see the module docstring). Labels outside [0, K) give NaN; an example whose label is
  `ignore_index` gets loss 0 and gradient 0 and is routed to no tail.

  Args:
    features: [..., d] float; 16-bit floats are multiplied in their dtype, accumulated in float32.
    labels: [...] int in [0, K), or `ignore_index`.
    head_kernel, tail_kernels, cutoffs, head_bias: as in `adaptive_log_softmax`.
    capacity_fractions: static fractions of the rows giving the capacity rungs (0 and all rows are
      always added); None evaluates every tail on every row (no gathers).
    ignore_index: None or an int (PyTorch's), the label of examples to ignore.

  Returns:
    [...] float32 per-example loss (float64 for float64 features).

  Raises:
    ValueError (`ArgumentError`): a shape, rank or dtype that does not fit or an `ignore_index`
      that is not None or an int (always, also under `jit`); with concrete labels, a label
      (other than `ignore_index`) outside [0, K) (traced ones give NaN instead).

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> x = np.sin(np.arange(8.0)).reshape(2, 4)
    >>> head = np.cos(np.arange(12.0)).reshape(4, 2 + 1)
    >>> tails = [(np.ones((4, 2)), np.sin(np.arange(6.0)).reshape(2, 3))]
    >>> y = jnp.array([0, 4])
    >>> loss = ops.adaptive_softmax_loss(x, y, head, tails, cutoffs=(2,))
    >>> lp = ops.adaptive_log_softmax(x, head, tails, cutoffs=(2,))
    >>> bool(np.allclose(loss, -lp[np.arange(2), y], atol=1e-5))
    True
  """
  features, cutoffs, k = _check(features, head_kernel, tail_kernels, cutoffs, head_bias)
  lead, s = features.shape[:-1], cutoffs[0]
  labels, ignored = _checks.labels_or_ignored(labels, k, lead, ignore_index, 'features')
  x, y = features.reshape(-1, features.shape[-1]), labels.reshape(-1).astype(jnp.int32)
  if ignored is not None:  # Not read (no NaN leaks) and routed to no tail: features 0, label 0.
    ignored = ignored.reshape(-1)
    x, y = jnp.where(ignored[:, None], jnp.zeros((), x.dtype), x), jnp.where(ignored, 0, y)
  head_lp = _head_log_prob(x, head_kernel, head_bias)
  cluster = sum((y >= c).astype(jnp.int32) for c in cutoffs)  # 0: shortlist, i + 1: tail i.
  head_index = jnp.clip(jnp.where(cluster == 0, y, s + cluster - 1), 0, head_lp.shape[-1] - 1)
  log_p = jnp.take_along_axis(head_lp, head_index[:, None], axis=-1)[:, 0]
  for i, (proj, out) in enumerate(tail_kernels):
    mask, rel = cluster == i + 1, y - cutoffs[i]
    if capacity_fractions is None or x.shape[0] == 0:
      log_p = log_p + jnp.where(mask, _tail_log_p(x, rel, proj, out), 0)
    else:
      log_p = log_p + _routed_tail_log_p(tuple(capacity_fractions), x, proj, out, mask, rel)
  loss = jnp.where((y >= 0) & (y < k), -log_p, jnp.nan)
  if ignored is not None:
    loss = jnp.where(ignored, jnp.zeros_like(loss), loss)
  return loss.reshape(lead)


def adaptive_predict(features, head_kernel, tail_kernels, *, cutoffs, head_bias=None,
                     capacity_fractions: Optional[Sequence[float]] = DEFAULT_CAPACITY_FRACTIONS):
  """Most probable class `argmax(adaptive_log_softmax(...), -1)`, tails only where needed.

  Args:
    features, head_kernel, tail_kernels, cutoffs, head_bias: as in `adaptive_log_softmax`.
    capacity_fractions: as in `adaptive_softmax_loss`.

  Returns:
    [...] int32 class ids.

  Raises:
    ValueError (`ArgumentError`): a shape, rank or dtype that does not fit (always, also under
      `jit`).

  Example:
    >>> import numpy as np
    >>> from softmax_jax import ops
    >>> x = np.sin(np.arange(8.0)).reshape(2, 4)
    >>> head = np.cos(np.arange(12.0)).reshape(4, 2 + 1)
    >>> tails = [(np.ones((4, 2)), np.sin(np.arange(6.0)).reshape(2, 3))]
    >>> pred = ops.adaptive_predict(x, head, tails, cutoffs=(2,))
    >>> lp = ops.adaptive_log_softmax(x, head, tails, cutoffs=(2,))
    >>> pred.tolist() == lp.argmax(-1).tolist()
    True
  """
  features, cutoffs, _ = _check(features, head_kernel, tail_kernels, cutoffs, head_bias)
  lead, s = features.shape[:-1], cutoffs[0]
  x = features.reshape(-1, features.shape[-1])
  head_lp = _head_log_prob(x, head_kernel, head_bias)
  best = jnp.argmax(head_lp, axis=-1).astype(jnp.int32)
  # A row whose head argmax is a shortlist class s' is done: every tail class k of cluster i has
  # log p(k) = head_lp[c_0 + i] + log p_i(k) <= head_lp[c_0 + i] <= head_lp[s'] (log p_i <= 0,
  # also in floating point: z - max(z) <= 0 and the log of a sum >= 1 is >= 0), and a tie goes to
  # s' because it has the smaller id, as in argmax. Only rows whose head argmax is a cluster need
  # the tails, and then all of them (another cluster's best class may beat the argmax cluster's).

  def full_argmax(xs, lp):
    value, index = jnp.max(lp[:, :s], axis=-1), jnp.argmax(lp[:, :s], axis=-1).astype(jnp.int32)
    for i, (proj, out) in enumerate(tail_kernels):
      v = lp[:, s + i, None] + jax.nn.log_softmax(_tail_logits(xs, proj, out), axis=-1)
      vi = jnp.max(v, axis=-1)
      better = vi > value  # strict: ties keep the smaller id, as argmax over the full row does
      value = jnp.where(better, vi, value)
      index = jnp.where(better, jnp.argmax(v, axis=-1).astype(jnp.int32) + cutoffs[i], index)
    return index

  best = _routed(best >= s, best, (x, head_lp), full_argmax, capacity_fractions)
  return best.reshape(lead)
