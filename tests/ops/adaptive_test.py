"""Adaptive softmax ops vs a float64 NumPy reference of PyTorch's `nn.AdaptiveLogSoftmaxWithLoss`.

`TorchRef` follows PyTorch's module step by step (forward's per-cluster `nonzero` loop and
`index_copy`, `_get_full_log_prob`, `predict`) with PyTorch's `[out, in]` weights; our kernels are
their transposes.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from softmax_jax.ops import adaptive as A


def _log_softmax(z):
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


class TorchRef:
  """PyTorch's module in float64 NumPy; weights in PyTorch's layout (`Linear.weight: [out, in]`)."""

  def __init__(self, n_classes, cutoffs, head_w, head_b, tail_ws):
    self.cutoffs = list(cutoffs) + [n_classes]
    self.shortlist, self.n_clusters = self.cutoffs[0], len(cutoffs)
    self.head_w, self.head_b, self.tail_ws = head_w, head_b, tail_ws

  def head(self, x):
    z = x @ self.head_w.T
    return z if self.head_b is None else z + self.head_b

  def tail(self, i, x):
    w1, w2 = self.tail_ws[i]
    return (x @ w1.T) @ w2.T

  def forward(self, x, target):  # x: [N, d], target: [N]
    output, gather = np.zeros(len(target)), np.zeros(len(target), np.int64)
    bounds = [0] + self.cutoffs
    for i in range(len(bounds) - 1):
      rows = np.nonzero((target >= bounds[i]) & (target < bounds[i + 1]))[0]
      if rows.size == 0:
        continue
      if i == 0:
        gather[rows] = target[rows]
      else:
        gather[rows] = self.shortlist + i - 1
        lp = _log_softmax(self.tail(i - 1, x[rows]))
        output[rows] = lp[np.arange(rows.size), target[rows] - bounds[i]]
    output += _log_softmax(self.head(x))[np.arange(len(target)), gather]
    return output, -output.mean()

  def log_prob(self, x):
    head_lp = _log_softmax(self.head(x))
    out = np.empty((x.shape[0], self.cutoffs[-1]))
    out[:, :self.shortlist] = head_lp[:, :self.shortlist]
    for i, (lo, hi) in enumerate(zip(self.cutoffs, self.cutoffs[1:])):
      out[:, lo:hi] = _log_softmax(self.tail(i, x)) + head_lp[:, self.shortlist + i, None]
    return out

  def predict(self, x):
    out = np.argmax(self.head(x), axis=1)
    rows = out >= self.shortlist
    if rows.any():
      out[rows] = np.argmax(self.log_prob(x[rows]), axis=1)
    return out


def _params(rng, d, num_classes, cutoffs, div, head_bias=False, cluster_boost=2.5):
  """Our kernels; cluster logits scaled up so that some rows' head argmax is a cluster."""
  n, bounds = len(cutoffs), tuple(cutoffs) + (num_classes,)
  head = rng.normal(size=(d, cutoffs[0] + n)) / np.sqrt(d)
  head[:, cutoffs[0]:] *= cluster_boost
  tails = []
  for i, h in enumerate(A.tail_hidden_sizes(d, n, div)):
    tails.append((rng.normal(size=(d, h)) / np.sqrt(d),
                  rng.normal(size=(h, bounds[i + 1] - bounds[i])) * 3 / np.sqrt(h)))
  bias = rng.normal(size=(cutoffs[0] + n,)) if head_bias else None
  return head, tails, bias


def _ref(num_classes, cutoffs, head, tails, bias):
  return TorchRef(num_classes, cutoffs, np.asarray(head, np.float64).T,
                  None if bias is None else np.asarray(bias, np.float64),
                  [(np.asarray(p, np.float64).T, np.asarray(o, np.float64).T) for p, o in tails])


def _f32(*trees):
  return [jax.tree.map(lambda a: None if a is None else jnp.asarray(a, jnp.float32), t,
                       is_leaf=lambda a: a is None) for t in trees]


CONFIGS = [  # (num_classes, cutoffs, div_value, d, lead shape, head_bias)
    (20, (5,), 4.0, 8, (24,), False),
    (30, (4, 9, 20), 2.0, 16, (2, 12), True),
    (50, (1, 2, 10), 1.5, 6, (3, 4, 5), False),
    (12, (11,), 4.0, 8, (), False),
    (40, (8, 24), 3.0, 13, (33,), True),
]


# The routed path on a two-rung ladder (0, N/2, N): each tail's switch compiles 2 streamed losses
# instead of the default ladder's 9, so a test compiles in a third of the time. The default ladder
# is exercised by test_routed_loss_and_grads_equal_full, test_label_cases_hit_every_rung and
# the first PyTorch config.
SHORT = (0.5,)


@pytest.mark.parametrize('config', CONFIGS)
def test_matches_pytorch_reference(config):
  k, cutoffs, div, d, lead, with_bias = config
  rng = np.random.default_rng(len(lead) + k)
  head, tails, bias = _params(rng, d, k, cutoffs, div, with_bias)
  x = rng.normal(size=lead + (d,)) * 2
  y = rng.integers(0, k, size=lead)
  ref = _ref(k, cutoffs, head, tails, bias)
  xr, yr = x.reshape(-1, d), y.reshape(-1)
  xf, hf, tf, bf = _f32(x, head, tails, bias)
  kw = dict(cutoffs=cutoffs, head_bias=bf)
  log_prob = jax.jit(lambda x: A.adaptive_log_softmax(x, hf, tf, **kw))(xf)
  ladder = A.DEFAULT_CAPACITY_FRACTIONS if config == CONFIGS[0] else SHORT
  loss = jax.jit(lambda x, y: A.adaptive_softmax_loss(x, y, hf, tf, capacity_fractions=ladder, **kw))(
      xf, jnp.asarray(y))
  pred = jax.jit(lambda x: A.adaptive_predict(x, hf, tf, **kw))(xf)
  assert log_prob.shape == lead + (k,) and loss.shape == lead and pred.shape == lead
  assert loss.dtype == jnp.float32 and pred.dtype == jnp.int32
  output, mean_loss = ref.forward(xr, yr)
  np.testing.assert_allclose(np.asarray(log_prob).reshape(-1, k), ref.log_prob(xr), atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(loss).reshape(-1), -output, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.mean(np.asarray(loss, np.float64)), mean_loss, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(pred).reshape(-1), ref.predict(xr))
  np.testing.assert_allclose(jax.nn.logsumexp(log_prob, axis=-1), 0, atol=1e-5)


def test_predict_rows_with_cluster_argmax():
  k, cutoffs, d = 60, (6, 20, 40), 16
  rng = np.random.default_rng(3)
  head, tails, _ = _params(rng, d, k, cutoffs, 2.0, cluster_boost=4.0)
  x = rng.normal(size=(64, d)) * 2
  xf, hf, tf = _f32(x, head, tails)
  head_arg = np.argmax(x @ head, axis=-1)
  full = np.argmax(_ref(k, cutoffs, head, tails, None).log_prob(x), axis=-1)
  # Not vacuous: both kinds of rows, and rows whose best class is outside the argmax cluster.
  cluster_rows = head_arg >= cutoffs[0]
  assert 0 < cluster_rows.sum() < 64
  in_cluster = np.searchsorted(cutoffs, full, side='right') - 1 == head_arg - cutoffs[0]
  assert (cluster_rows & ~in_cluster).any() and (full >= cutoffs[0]).sum() > 5
  log_prob = A.adaptive_log_softmax(xf, hf, tf, cutoffs=cutoffs)
  for fractions in (A.DEFAULT_CAPACITY_FRACTIONS, None, (0.5,)):
    pred = A.adaptive_predict(xf, hf, tf, cutoffs=cutoffs, capacity_fractions=fractions)
    np.testing.assert_array_equal(pred, np.argmax(log_prob, axis=-1))
    np.testing.assert_array_equal(pred, full)


# Routing: N = 64 rows, rungs (0, 2, 4, 8, 12, 16, 24, 32, 48, 64).
N, K, D, CUTOFFS = 64, 40, 8, (8, 16, 28)
RUNGS = A._rungs(N, A.DEFAULT_CAPACITY_FRACTIONS)


def _labels(counts, seed):
  """N labels with `counts[i]` rows in tail i (shuffled), the rest in the shortlist."""
  rng = np.random.default_rng(seed)
  bounds = CUTOFFS + (K,)
  ys = [rng.integers(bounds[i], bounds[i + 1], size=c) for i, c in enumerate(counts)]
  ys.append(rng.integers(0, CUTOFFS[0], size=N - sum(counts)))
  return rng.permutation(np.concatenate(ys)).astype(np.int32)


LABEL_CASES = {  # tail counts -> rungs hit
    'all_in_tail_0': (64, 0, 0), 'all_in_last_tail': (0, 0, 64), 'all_in_shortlist': (0, 0, 0),
    'one_each': (1, 1, 1), 'rung_edges': (2, 3, 4), 'mixed_small': (5, 8, 9),
    'mixed_mid': (12, 13, 16), 'mixed_large': (17, 24, 23), 'over_half': (33, 0, 31),
    'near_all': (49, 15, 0),
}


def test_label_cases_hit_every_rung():
  hit = {int(np.sum(np.asarray(RUNGS[:-1]) < c)) for counts in LABEL_CASES.values() for c in counts}
  assert hit == set(range(len(RUNGS))), (hit, RUNGS)


def test_routed_loss_and_grads_equal_full():
  rng = np.random.default_rng(7)
  head, tails, bias = _f32(*_params(rng, D, K, CUTOFFS, 2.0, head_bias=True))
  x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
  kw = dict(cutoffs=CUTOFFS, head_bias=bias)
  weights = jnp.arange(1.0, N + 1)  # distinct per-row cotangents

  def loss_and_grads(fractions):
    def f(x, y, h, t):
      loss = lambda x, h, t: A.adaptive_softmax_loss(x, y, h, t, capacity_fractions=fractions, **kw)
      return loss(x, h, t), jax.grad(lambda *a: (loss(*a) * weights).sum(), (0, 1, 2))(x, h, t)
    return jax.jit(f)

  routed, every = loss_and_grads(A.DEFAULT_CAPACITY_FRACTIONS), loss_and_grads(None)
  full_log_prob = A.adaptive_log_softmax(x, head, tails, **kw)
  for name, counts in LABEL_CASES.items():  # one compilation, every rung
    y = jnp.asarray(_labels(counts, 11))
    (loss, grads), (loss_every, grads_every) = routed(x, y, head, tails), every(x, y, head, tails)
    full = -jnp.take_along_axis(full_log_prob, y[:, None], -1)[:, 0]
    np.testing.assert_allclose(loss, full, atol=1e-5, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(loss, loss_every, atol=1e-5, rtol=1e-6, err_msg=name)
    # Gradients through the routing equal those of evaluating every tail on every row.
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_every)):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5, err_msg=name)


def test_check_grads_float64_through_several_rungs():
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    head, tails, bias = (jax.tree.map(jnp.asarray, t) for t in _params(rng, 8, 14, (3, 6, 10), 2.0, True))
    x = jnp.asarray(rng.normal(size=(12, 8)))
    # rungs for 12 rows: (0, 1, 2, 3, 5, 6, 9, 12); tail counts 1, 4, 0 take rungs 1, 5 and 0.
    y = jnp.asarray([0, 1, 2, 3, 6, 7, 8, 9, 0, 1, 2, 2])
    assert A._rungs(12, A.DEFAULT_CAPACITY_FRACTIONS) == (0, 1, 2, 3, 5, 6, 9, 12)
    f = jax.jit(lambda x, h, t, b: A.adaptive_softmax_loss(x, y, h, t, cutoffs=(3, 6, 10), head_bias=b))
    assert f(x, head, tails, bias).dtype == jnp.float64
    check_grads(f, (x, head, tails, bias), order=1, modes=['rev'])  # custom VJP: reverse mode only
    g = jax.jit(lambda x, h, t, b: A.adaptive_log_softmax(x, h, t, cutoffs=(3, 6, 10), head_bias=b))
    check_grads(g, (x, head, tails, bias), order=1, modes=['fwd', 'rev'])


def test_out_of_range_labels():
  rng = np.random.default_rng(2)
  head, tails, _ = _f32(*_params(rng, D, K, CUTOFFS, 2.0))
  x = jnp.asarray(rng.normal(size=(16, D)), jnp.float32)
  y = jnp.asarray(rng.integers(0, K, size=(16,)), jnp.int32)
  f = lambda x, y: A.adaptive_softmax_loss(x, y, head, tails, cutoffs=CUTOFFS)
  bad = jax.jit(f)(x, y.at[3].set(K).at[5].set(-1))
  assert np.isnan(bad[3]) and np.isnan(bad[5]) and np.isfinite(np.delete(bad, [3, 5])).all()
  with pytest.raises(ValueError, match=r'labels.*\[0, 40\)'):
    f(x, y.at[3].set(K))


class AdaptiveVariantsTest(chex.TestCase):
  """Each op jitted, not jitted and with device inputs, against PyTorch's module in float64."""

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  def test_ops_match_reference(self):
    k, cutoffs, div, d, lead, with_bias = CONFIGS[1]
    rng = np.random.default_rng(9)
    head, tails, bias = _params(rng, d, k, cutoffs, div, with_bias)
    x, y = rng.normal(size=lead + (d,)) * 2, rng.integers(0, k, size=lead).astype(np.int32)
    ref = _ref(k, cutoffs, head, tails, bias)
    xf, hf, tf, bf = _f32(x, head, tails, bias)
    kw = dict(cutoffs=cutoffs, head_bias=bf)
    loss = self.variant(lambda x, y: A.adaptive_softmax_loss(x, y, hf, tf, capacity_fractions=SHORT,
                                                             **kw))(xf, y)
    log_prob = self.variant(lambda x: A.adaptive_log_softmax(x, hf, tf, **kw))(xf)
    pred = self.variant(lambda x: A.adaptive_predict(x, hf, tf, **kw))(xf)
    chex.assert_shape((loss, pred), lead)
    chex.assert_shape(log_prob, lead + (k,))
    chex.assert_type((loss, log_prob, pred), (jnp.float32, jnp.float32, jnp.int32))
    xr = x.reshape(-1, d)
    np.testing.assert_allclose(np.reshape(loss, -1), -ref.forward(xr, y.reshape(-1))[0], atol=2e-5)
    np.testing.assert_allclose(np.reshape(log_prob, (-1, k)), ref.log_prob(xr), atol=2e-5)
    np.testing.assert_array_equal(np.reshape(pred, -1), ref.predict(xr))


def _blocks(seed, counts_per_block):
  """`[B, N, D]` features and `[B, N]` labels, block b with tail counts `counts_per_block[b]`."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(len(counts_per_block), N, D)), jnp.float32)
  y = jnp.asarray(np.stack([_labels(c, seed + b) for b, c in enumerate(counts_per_block)]))
  return x, y


# Blocks whose counts differ per tail: the largest count of the batch picks each tail's rung.
BLOCK_COUNTS = [LABEL_CASES['one_each'], LABEL_CASES['mixed_large'], LABEL_CASES['all_in_shortlist']]


def _loss_fn(head, tails, bias=None):
  return lambda x, y: A.adaptive_softmax_loss(x, y, head, tails, cutoffs=CUTOFFS, head_bias=bias,
                                              capacity_fractions=SHORT)


def test_vmap_keeps_the_routing_and_equals_the_batched_call():
  rng = np.random.default_rng(2)
  head, tails, bias = _f32(*_params(rng, D, K, CUTOFFS, 2.0, head_bias=True))
  x, y = _blocks(3, BLOCK_COUNTS)
  f = _loss_fn(head, tails, bias)
  batched = jax.jit(f)(x, y)
  np.testing.assert_allclose(jax.jit(jax.vmap(f))(x, y), batched, atol=1e-5, rtol=1e-6)
  nested = jax.jit(jax.vmap(jax.vmap(f)))(x[None], y[None])[0]  # the rule composes
  np.testing.assert_allclose(nested, batched, atol=1e-5, rtol=1e-6)
  rows = jax.jit(jax.vmap(f))(x.reshape(-1, D), y.reshape(-1)).reshape(y.shape)  # blocks of one row
  np.testing.assert_allclose(rows, batched, atol=1e-5, rtol=1e-6)
  # The routing survives vmap: one `cond` per tail (a batched index would make it a select).
  cases = [(jax.vmap(f), (x, y)), (jax.vmap(jax.vmap(f)), (x[None], y[None])),
           (jax.vmap(jax.grad(lambda x, y: f(x, y).sum())), (x, y))]
  for fn, args in cases:
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    assert jaxpr.count('cond[') >= len(CUTOFFS), jaxpr.count('cond[')
  pred = lambda x: A.adaptive_predict(x, head, tails, cutoffs=CUTOFFS, head_bias=bias)
  np.testing.assert_array_equal(jax.jit(jax.vmap(pred))(x), pred(x))
  assert 'cond[' in str(jax.make_jaxpr(jax.vmap(pred))(x))


def test_gradients_under_vmap_equal_per_example_gradients():
  rng = np.random.default_rng(4)
  head, tails, bias = _f32(*_params(rng, D, K, CUTOFFS, 2.0, head_bias=True))
  x, y = _blocks(5, BLOCK_COUNTS)
  weights = jnp.arange(1.0, N + 1) / N  # distinct per-row cotangents

  def block_loss(params, xb, yb):
    return jnp.sum(_loss_fn(*params)(xb, yb) * weights)

  params = (head, tails, bias)
  grad = jax.jit(jax.grad(block_loss, argnums=(0, 1)))  # no vmap: the plain routed gradient
  per_example = jax.jit(jax.vmap(grad, in_axes=(None, 0, 0)))(params, x, y)
  summed = jax.jit(jax.grad(lambda p, x: jnp.sum(jax.vmap(block_loss, (None, 0, 0))(p, x, y)),
                            argnums=(0, 1)))(params, x)
  want = [grad(params, x[b], y[b]) for b in range(len(BLOCK_COUNTS))]
  for b, (want_params, want_x) in enumerate(want):
    chex.assert_trees_all_close(jax.tree.map(lambda g: g[b], per_example), (want_params, want_x),
                                atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(summed[0], jax.tree.map(lambda *g: sum(g), *[w[0] for w in want]),
                              atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(summed[1], jnp.stack([w[1] for w in want]), atol=1e-5, rtol=1e-5)


def test_bfloat16_features_accumulate_in_float32():
  rng = np.random.default_rng(4)
  head, tails, _ = _f32(*_params(rng, 32, K, CUTOFFS, 2.0))
  x = jnp.asarray(rng.normal(size=(N, 32)), jnp.float32)
  y = jnp.asarray(_labels((10, 10, 10), 1))
  out32 = A.adaptive_softmax_loss(x, y, head, tails, cutoffs=CUTOFFS, capacity_fractions=SHORT)
  out16 = A.adaptive_softmax_loss(x.astype(jnp.bfloat16), y, head, tails, cutoffs=CUTOFFS,
                                  capacity_fractions=SHORT)
  lp16 = A.adaptive_log_softmax(x.astype(jnp.bfloat16), head, tails, cutoffs=CUTOFFS)
  assert out16.dtype == jnp.float32 and lp16.dtype == jnp.float32
  assert np.isfinite(out16).all()
  np.testing.assert_allclose(out16, out32, rtol=0.05, atol=0.05)
  np.testing.assert_allclose(jax.nn.logsumexp(lp16, -1), 0, atol=1e-5)
  assert np.abs(np.asarray(out16) - np.asarray(out32)).max() > 0  # the bf16 path really ran


@pytest.mark.parametrize('cutoffs', [(5, 3), (4, 4), (0, 10), (10, 40), (10, 45), (), (2.5,), (True,), 7])
def test_bad_cutoffs_raise(cutoffs):
  with pytest.raises(ValueError, match='cutoffs'):
    A.check_cutoffs(cutoffs, 40)


def test_shape_and_div_value_errors():
  rng = np.random.default_rng(0)
  head, tails, _ = _f32(*_params(rng, D, K, CUTOFFS, 2.0))
  x, y = jnp.zeros((4, D)), jnp.zeros((4,), jnp.int32)
  with pytest.raises(ValueError, match='cutoffs'):
    A.adaptive_log_softmax(x, head, tails, cutoffs=(8, 16, 16))
  with pytest.raises(ValueError, match='head_kernel'):
    A.adaptive_log_softmax(x, head[:, :-1], tails, cutoffs=CUTOFFS)
  with pytest.raises(ValueError, match=r'tail_kernels\[1\]\[1\]'):
    A.adaptive_softmax_loss(x, y, head, [tails[0], (tails[1][0], tails[1][1][:, :3]), tails[2]],
                            cutoffs=CUTOFFS)
  with pytest.raises(ValueError, match='labels'):  # rank mismatch: [4, 1] labels for [4, d]
    A.adaptive_softmax_loss(x, y[:, None], head, tails, cutoffs=CUTOFFS)
  with pytest.raises(ValueError, match='labels'):
    A.adaptive_softmax_loss(x, y.astype(jnp.float32), head, tails, cutoffs=CUTOFFS)
  with pytest.raises(ValueError, match=r'div_value.*too large.*d=8'):
    A.tail_hidden_sizes(8, 2, 4.0)  # 8 // 16 = 0
  with pytest.raises(ValueError, match='div_value'):
    A.tail_hidden_sizes(8, 2, 0.0)
  assert A.tail_hidden_sizes(512, 3, 4.0) == (128, 32, 8)
  assert A.tail_hidden_sizes(10, 2, 1.5) == (6, 4)  # PyTorch: int(10 // 1.5**2) = 4


def _valid(cutoffs, k):
  assert A.check_cutoffs(cutoffs, k) == cutoffs
  return cutoffs


@pytest.mark.parametrize('k', [2, 3, 5, 10, 100, 1000, 10000, 200000])
def test_adaptive_cutoffs_zipf(k):
  p = A.log_uniform_probs(k)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
  cutoffs = _valid(A.adaptive_cutoffs(p), k)
  head_mass = np.cumsum(p)[cutoffs[0] - 1]
  if 1 < cutoffs[0] < k - 1:  # smallest prefix covering 80% of the mass
    assert head_mass >= 0.8 > np.cumsum(p)[cutoffs[0] - 2]
  assert len(cutoffs) <= 4
  if k >= 10000:
    assert len(cutoffs) >= 2 and all(b >= 3 * a for a, b in zip(cutoffs, cutoffs[1:]))


def test_adaptive_cutoffs_various_counts():
  rng = np.random.default_rng(0)
  assert _valid(A.adaptive_cutoffs([5, 5]), 2) == (1,)
  assert _valid(A.adaptive_cutoffs(np.ones(10)), 10) == (8,)
  assert _valid(A.adaptive_cutoffs([100, 0, 0, 0]), 4) == (1,)
  assert _valid(A.adaptive_cutoffs([0, 0, 0, 7]), 4) == (3,)
  for k, mass, growth, most in itertools.product([2, 7, 64, 5000], [0.5, 0.9, 1.0], [2.0, 8.0], [1, 3]):
    counts = np.sort(rng.zipf(1.3, size=k))[::-1]
    cutoffs = _valid(A.adaptive_cutoffs(counts, head_mass=mass, growth=growth, max_clusters=most), k)
    assert len(cutoffs) <= most
    unsorted = _valid(A.adaptive_cutoffs(rng.permutation(counts), head_mass=mass), k)
    assert len(unsorted) >= 1
  for bad in [dict(head_mass=0.0), dict(head_mass=1.5), dict(growth=1.0), dict(max_clusters=0)]:
    with pytest.raises(ValueError, match=next(iter(bad))):
      A.adaptive_cutoffs(np.ones(10), **bad)
  for counts in ([3], np.zeros(5), [1, -1, 2], np.ones((2, 2))):
    with pytest.raises(ValueError, match='class_counts'):
      A.adaptive_cutoffs(counts)
