"""sparsemax, entmax15, entmax_bisect and their Fenchel-Young losses (softmax_jax/ops/sparse.py).

Against float64 NumPy references written here from the papers (sparsemax's sorted threshold,
1.5-entmax's sorted closed form, alpha-entmax by a long float64 bisection), the identities
(alpha = 2 is sparsemax, 1.5 is entmax15, alpha -> 1 softmax, sums to 1), the Fenchel-Young
gradient `p - onehot`, `check_grads` in float64, masks, 16-bit inputs, the NaN rule,
`ignore_index`, chex variants, vmap and the argument errors.
"""

from absl.testing import parameterized
import chex
import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax.ops import sparse

N, K = 3, 6
MASK = np.array([True, True, False, True, True, True])
ALPHAS = np.array([1.2, 2.0, 3.0])  # per-example alphas of the N rows


def _logits(seed=0, dtype=np.float32):
  """[N, K], spread wide enough for sparse supports of several sizes, no ties."""
  z = np.random.default_rng(seed).normal(size=(N, K)) * np.array([[0.3], [1.0], [3.0]])
  return z.astype(dtype)


def _rows(z, mask):
  z = np.asarray(z, np.float64)
  keep = np.broadcast_to(np.ones(z.shape[-1], bool) if mask is None else mask, z.shape)
  return z, keep & (z > -np.inf)


def ref_sparsemax(z, mask=None):
  """p = max(z - tau, 0), tau = (sum_{j<=k} z_(j) - 1) / k, k = max{k: 1 + k z_(k) > sum_{j<=k}}."""
  z, keep = _rows(z, mask)
  out = np.zeros_like(z)
  for i in np.ndindex(z.shape[:-1]):
    s = np.sort(z[i][keep[i]])[::-1]
    if not s.size:
      continue
    k = max(k for k in range(1, s.size + 1) if 1 + k * s[k - 1] > s[:k].sum())
    out[i][keep[i]] = np.maximum(z[i][keep[i]] - (s[:k].sum() - 1) / k, 0)
  return out


def ref_entmax15(z, mask=None):
  """p = max(z/2 - tau, 0)^2: for a support of the top k of x = z/2, tau solves
  sum_{j<=k} (x_(j) - tau)^2 = 1; k is the largest with tau <= x_(k)."""
  z, keep = _rows(z, mask)
  out = np.zeros_like(z)
  for i in np.ndindex(z.shape[:-1]):
    x = z[i][keep[i]] / 2
    s = np.sort(x)[::-1]
    best = None
    for k in range(1, s.size + 1):
      m = s[:k].mean()
      disc = 1 / k - ((s[:k] - m) ** 2).mean()
      if disc >= 0 and m - np.sqrt(disc) <= s[k - 1]:
        best = m - np.sqrt(disc)
    if best is not None:
      out[i][keep[i]] = np.maximum(x - best, 0) ** 2
  return out


def ref_entmax(z, alpha, mask=None):
  """alpha-entmax: 200 float64 bisections of tau, sum_k [(a-1) z_k - tau]_+^(1/(a-1)) = 1."""
  z, keep = _rows(z, mask)
  alpha = np.broadcast_to(np.asarray(alpha, np.float64), z.shape[:-1])
  out = np.zeros_like(z)
  for i in np.ndindex(z.shape[:-1]):
    a, x = alpha[i], (alpha[i] - 1) * z[i][keep[i]]
    if not x.size:
      continue
    f = lambda t: (np.maximum(x - t, 0) ** (1 / (a - 1))).sum() - 1
    lo, hi = x.max() - 1, x.max()
    for _ in range(200):
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if f(mid) >= 0 else (lo, mid)
    out[i][keep[i]] = np.maximum(x - lo, 0) ** (1 / (a - 1))
  return out


def ref_loss(p, z, y, alpha):
  """<p, z - z_y> + (1 - sum p^alpha) / (alpha (alpha - 1)) in float64."""
  p, z = np.asarray(p, np.float64), np.asarray(z, np.float64)
  a = np.asarray(alpha, np.float64)
  zy = np.take_along_axis(z, y[..., None], -1)
  pz = np.where(p > 0, p * (z - zy), 0).sum(-1)
  return pz + (1 - (p ** a[..., None]).sum(-1)) / (a * (a - 1))


MAPS = dict(
    sparsemax=(lambda z, w: sparse.sparsemax(z, where=w), ref_sparsemax, 2.0),
    entmax15=(lambda z, w: sparse.entmax15(z, where=w), ref_entmax15, 1.5),
    bisect=(lambda z, w: sparse.entmax_bisect(z, alpha=ALPHAS, where=w),
            lambda z, m=None: ref_entmax(z, ALPHAS, m), ALPHAS),
)
LOSSES = dict(
    sparsemax=(lambda z, y, w: sparse.sparsemax_loss(z, y, where=w)),
    entmax15=(lambda z, y, w: sparse.entmax15_loss(z, y, where=w)),
    bisect=(lambda z, y, w: sparse.entmax_bisect_loss(z, y, alpha=ALPHAS, where=w)),
)
Y = np.array([1, 3, 0], np.int32)


@pytest.mark.parametrize('name', list(MAPS))
def test_maps_and_losses_match_float64_references(name):
  """float64, one compile per map: values, simplex, exact zeros off the support and on masked
  classes, and the loss against the formula; with and without a mask (one shape)."""
  f, ref, alpha = MAPS[name]
  with jax.enable_x64(True):
    z = _logits(1, np.float64)
    z[0, 5] = -np.inf  # a -inf logit is excluded like a mask
    run = jax.jit(lambda z, w: (f(z, w), LOSSES[name](z, Y, w)))
    for mask in (np.ones(K, bool), MASK):
      p, loss = run(z, mask)
      want = ref(z, mask)
      assert p.dtype == jnp.float64
      np.testing.assert_allclose(p, want, rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(np.sum(p, -1), 1, rtol=1e-12)
      assert np.all(np.asarray(p) >= 0) and np.all(np.asarray(p)[want == 0] == 0)
      assert np.all(np.asarray(p)[:, ~mask] == 0) and p[0, 5] == 0
      assert np.sum(want == 0) >= 2  # the data exercise sparsity
      yl = np.where(mask[Y], Y, 0)
      assert np.all(mask[Y]) or np.isinf(loss[~mask[Y]]).all()
      ok = mask[Y]
      np.testing.assert_allclose(loss[ok], ref_loss(want, np.where(np.isinf(z), 0, z), yl,
                                                    np.broadcast_to(alpha, (N,)))[ok], rtol=1e-9,
                                 atol=1e-12)
      assert np.all(np.asarray(loss) >= 0)


@pytest.mark.parametrize('name', ['sparsemax', 'entmax15'])
def test_long_rows_take_the_top_k_path_and_fall_back_to_the_sort_exactly(name):
  """K = 2000 > 4 * sparse._TOP: a short support is found from the top `_TOP` entries; a batch
  with a support of `_TOP` or more sorts whole. Both equal the float64 reference, and the same
  rows give the same values bit for bit whichever path their batch took."""
  f, ref, _ = MAPS[name]
  k = 2000
  assert k > 4 * sparse._TOP  # pylint: disable=protected-access
  rng = np.random.default_rng(3)
  short = rng.normal(size=(2, k)) * 4  # supports of a few classes
  short[1, :7] = -np.inf  # excluded classes, the largest among them
  short[1, 7] = 50.0
  wide = rng.normal(size=(1, k)) * 1e-3  # nearly uniform: the support is (almost) every class
  run = jax.jit(f)
  p_short = np.asarray(run(short.astype(np.float32), None))
  p_both = np.asarray(run(np.concatenate([short, wide]).astype(np.float32), None))
  support = lambda p: np.sum(p > 0, axis=-1)
  assert np.all(support(p_short) < sparse._TOP) and support(p_both)[2] >= sparse._TOP  # pylint: disable=protected-access
  np.testing.assert_array_equal(p_both[:2], p_short)
  want = ref(np.concatenate([short, wide]))
  np.testing.assert_allclose(p_both, want, rtol=2e-5, atol=1e-6)
  assert np.all(p_both[1, :7] == 0) and p_both[1, 7] == 1


def test_identities_float32():
  """alpha = 2 == sparsemax, alpha = 1.5 == entmax15 (per-example alphas too), alpha -> 1 is
  softmax, a dominant logit gives an exact one-hot, and ties split evenly (one compile)."""
  z = _logits(2)
  one = np.array([0.0, 6.0, 1.0, -2.0, 3.8, 0.4], np.float32)  # gap > 2: one-hot for both
  ties = np.array([1.0, 1.0, -3.0, 0.0, -1.0, -2.0], np.float32)

  def run(z):
    bis = lambda a: sparse.entmax_bisect(z, alpha=np.asarray(a, np.float32))
    rows = jnp.stack([z[0], one, ties])
    return (bis([2.0] * N), bis([1.5] * N), bis([2.0, 1.5, 2.0]), bis([1.001] * N),
            bis([1.3] * N), sparse.sparsemax(z), sparse.entmax15(z), sparse.sparsemax(rows),
            sparse.entmax15(rows))

  b2, b15, mixed, b1, b13, sm, e15, sm_rows, e15_rows = jax.jit(run)(z)
  np.testing.assert_allclose(b2, sm, atol=2e-6)
  np.testing.assert_allclose(b15, e15, atol=2e-6)
  np.testing.assert_allclose(mixed[1], e15[1], atol=2e-6)
  np.testing.assert_allclose(np.asarray(mixed)[[0, 2]], np.asarray(sm)[[0, 2]], atol=2e-6)
  soft = jax.nn.softmax(z)
  np.testing.assert_allclose(b1, soft, atol=3e-3)
  assert np.abs(np.asarray(b13) - soft).max() > 1e-2  # the tolerance above is meaningful
  for rows in (sm_rows, e15_rows):
    np.testing.assert_array_equal(rows[1], np.eye(K)[1])
  np.testing.assert_array_equal(sm_rows[2], [0.5, 0.5, 0, 0, 0, 0])
  assert e15_rows[2, 0] == e15_rows[2, 1] and e15_rows[2, 2] == 0


def test_fenchel_young_gradient_and_zero_loss():
  """jax.grad of each loss == map(z) - onehot(y); the loss is >= 0 and exactly 0 where (and
  only where) the map is the one-hot of the label (one compile)."""
  z = _logits(3)
  z[2] = 8.0 * np.eye(K)[Y[2]]  # a gap of 8 > 1 / (alpha - 1) for all alphas: one-hot on Y

  def run(z):
    out = {}
    for name, (f, _, _) in MAPS.items():
      loss, grad = jax.value_and_grad(lambda z, n=name: LOSSES[n](z, Y, None) @ jnp.ones(N))(z)
      out[name] = f(z, None), LOSSES[name](z, Y, None), grad
    return out

  for p, loss, grad in jax.jit(run)(z).values():
    p, loss = np.asarray(p), np.asarray(loss)
    np.testing.assert_allclose(grad, p - np.eye(K)[Y], atol=1e-6)
    np.testing.assert_array_equal(p[2], np.eye(K)[Y[2]])
    np.testing.assert_array_equal(loss == 0, np.all(p == np.eye(K)[Y], -1))
    assert loss[2] == 0 and loss[0] > 0 and np.all(loss >= 0)


def test_check_grads_float64():
  """All six ops in one jitted function (one compile), reverse mode (the transpose of the
  custom JVPs), in the logits and in the per-example alphas, with a mask, away from ties.
  (The losses' second order is the maps' Jacobian, checked here through the maps.)"""
  with jax.enable_x64(True):
    z = _logits(4, np.float64)

    def everything(z, a):
      maps = [sparse.sparsemax(z, where=MASK), sparse.entmax15(z, where=MASK),
              sparse.entmax_bisect(z, alpha=a, where=MASK)]
      losses = [sparse.sparsemax_loss(z, Y, where=MASK), sparse.entmax15_loss(z, Y, where=MASK),
                sparse.entmax_bisect_loss(z, Y, alpha=a, where=MASK)]
      return jnp.concatenate(maps + [jnp.stack(losses, -1)], -1)

    check_grads(jax.jit(everything), (z, np.array([1.3, 1.7, 2.4])), 1, modes=['rev'])


def test_masks_and_fully_masked_rows():
  """Excluded classes get exactly 0 and gradient 0 (a NaN there is not read); a fully masked
  row (2) gives all zeros (gradient 0) and a loss of +inf (gradient 0), like a label on an
  excluded class (row 1); row 0 stays finite."""
  z = _logits(5)
  z[:, 2] = np.nan  # excluded by MASK: not read
  mask = np.broadcast_to(MASK, (N, K)).copy()
  mask[2] = False
  y = np.array([1, 2, 0], np.int32)  # row 1: label on an excluded class
  ct = jnp.arange(N * K, dtype=jnp.float32).reshape(N, K)

  def run(z):
    out = {}
    for name, (f, _, _) in MAPS.items():
      p, vjp = jax.vjp(lambda z, f=f: f(z, mask), z)
      loss, gl = jax.value_and_grad(lambda z, n=name: LOSSES[n](z, y, mask) @ jnp.ones(N))(z)
      out[name] = p, vjp(ct)[0], LOSSES[name](z, y, mask), gl
    return out

  for name, (p, gp, loss, gl) in jax.jit(run)(z).items():
    ref = MAPS[name][1]
    np.testing.assert_allclose(p, ref(np.where(np.isnan(z), 0, z), mask), atol=1e-6)
    assert np.all(np.asarray(p)[~mask] == 0) and np.all(np.asarray(gp)[~mask] == 0)
    np.testing.assert_array_equal(p[2], 0)
    np.testing.assert_array_equal(gp[2], 0)
    assert np.isfinite(loss[0]) and np.all(np.isposinf(loss[1:]))
    assert np.all(np.isfinite(gp)) and np.all(np.isfinite(gl[0]))
    np.testing.assert_array_equal(gl[1:], 0)


def test_half_precision_is_finite_and_close():
  """bfloat16 / float16 in, float32 out, finite and equal to float32 on the same values (the
  PyTorch entmax package gives NaN in half precision)."""
  z = _logits(6) * 4  # wide rows: supports of 1 to K classes
  run = jax.jit(lambda z: [(f(z, None), LOSSES[n](z, Y, None)) for n, (f, _, _) in MAPS.items()])
  for dt in (jnp.bfloat16, jnp.float16):
    zh = jnp.asarray(z, dt)
    want = run(np.asarray(zh, np.float32))
    for (p, loss), (pw, lw) in zip(run(zh), want):
      assert p.dtype == jnp.float32 and loss.dtype == jnp.float32
      assert np.all(np.isfinite(p)) and np.all(np.isfinite(loss))
      np.testing.assert_allclose(p, pw, atol=1e-6)
      np.testing.assert_allclose(loss, lw, rtol=1e-6, atol=1e-6)


def test_nan_rule_and_ignore_index():
  """A NaN logit in row 1: that row's probabilities, loss and gradients NaN, the others unchanged;
  an ignored example (label = ignore_index) is not read: loss 0 and gradient 0, also with a NaN;
  a traced alpha <= 1 or out-of-range label gives NaN for its example only."""
  z = _logits(7)
  zn = z.copy()
  zn[1, 4] = np.nan
  yi = np.array([1, -1, 0], np.int32)
  losses = dict(
      sparsemax=lambda z, y, a: sparse.sparsemax_loss(z, y, ignore_index=-1),
      entmax15=lambda z, y, a: sparse.entmax15_loss(z, y, ignore_index=-1),
      bisect=lambda z, y, a: sparse.entmax_bisect_loss(z, y, alpha=a, ignore_index=-1))
  maps = dict(sparsemax=lambda z, a: sparse.sparsemax(z), entmax15=lambda z, a: sparse.entmax15(z),
              bisect=lambda z, a: sparse.entmax_bisect(z, alpha=a))
  a = np.array([1.5, 1.5, 1.5])
  for name in MAPS:
    def run(z, y, a, name=name):
      p, vjp = jax.vjp(lambda z: maps[name](z, a), z)
      loss, g = jax.value_and_grad(lambda z: losses[name](z, y, a).sum())(z)
      return p, vjp(jnp.ones_like(p))[0], jax.vmap(lambda r, yy: losses[name](r, yy, 1.5))(z, y), g

    run = jax.jit(run)
    p0, gp0, l0, g0 = run(z, Y, a)
    p, gp, l, g = run(zn, Y, a)
    assert np.all(np.isnan(p[1])) and np.all(np.isnan(gp[1])) and np.isnan(l[1])
    assert np.all(np.isnan(g[1]))
    for got, want in ((p, p0), (gp, gp0), (l, l0), (g, g0)):
      np.testing.assert_array_equal(np.delete(np.asarray(got), 1, 0), np.delete(want, 1, 0))
    _, _, l, g = run(zn, yi, a)
    assert l[1] == 0 and np.all(np.asarray(g[1]) == 0)
    np.testing.assert_array_equal(np.delete(np.asarray(l), 1, 0), np.delete(l0, 1, 0))
    if name == 'bisect':
      p, _, _, _ = run(z, Y, np.array([1.5, 1.0, 1.5]))
      assert np.all(np.isnan(p[1])) and np.all(np.isfinite(np.delete(np.asarray(p), 1, 0)))
  bad = np.array([1, K, 0], np.int32)
  loss = jax.jit(lambda y: sparse.sparsemax_loss(z, y))(bad)
  assert np.isnan(loss[1]) and np.all(np.isfinite(np.delete(np.asarray(loss), 1)))


def _cases():
  z = _logits(8)
  out = {}
  for name, (f, ref, alpha) in MAPS.items():
    out[name] = (lambda z, f=f: f(z, MASK), (z,), lambda z, ref=ref: ref(z, MASK))
    out[name + '_loss'] = (
        lambda z, y, n=name: LOSSES[n](z, y, MASK), (z, Y),
        lambda z, y, ref=ref, a=alpha: ref_loss(ref(z, MASK), np.where(MASK, z, 0), y,
                                                np.broadcast_to(a, (N,))))
  return out


CASES = _cases()


class VariantsTest(chex.TestCase):
  """Each op under jit, without jit and on a device, and vmapped over examples."""

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  @parameterized.named_parameters(*[(n, n) for n in CASES])
  def test_variants_match_reference(self, name):
    f, args, ref = CASES[name]
    np.testing.assert_allclose(self.variant(f)(*args), ref(*args), rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(*[(n, n) for n in CASES])
  def test_vmap_equals_batched_call(self, name):
    f, args, _ = CASES[name]
    if name.startswith('bisect'):  # per-example alphas: vmap the scalar-alpha call
      g = lambda a, *r: (sparse.entmax_bisect(r[0], alpha=a, where=MASK) if len(r) == 1 else
                         sparse.entmax_bisect_loss(r[0], r[1], alpha=a, where=MASK))
      np.testing.assert_allclose(jax.jit(jax.vmap(g))(ALPHAS, *args), f(*args), rtol=1e-6,
                                 atol=1e-6)
    else:
      np.testing.assert_allclose(jax.jit(jax.vmap(f))(*args), f(*args), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('call, msg', [
    (lambda z, y: sparse.entmax_bisect(z, alpha=1.0), r'`alpha` must be finite and > 1; got 1.0'),
    (lambda z, y: sparse.entmax_bisect_loss(z, y, alpha=np.array([2.0, 0.5, 2.0])),
     r'`alpha` must be finite and > 1; got \[2.  0.5 2. \]'),
    (lambda z, y: sparse.entmax_bisect(z, alpha=np.ones(2) * 2),
     r'`alpha` must broadcast to the shape of `logits.shape\[:-1\]` \(3,\); got shape \(2,\)'),
    (lambda z, y: sparse.entmax_bisect(z, n_iter=0), r'`n_iter` must be a Python int >= 1; got 0'),
    (lambda z, y: sparse.entmax_bisect_loss(z, y, n_iter=2.5),
     r'`n_iter` must be a Python int >= 1; got 2.5'),
    (lambda z, y: sparse.sparsemax_loss(z, np.array([0, 6, 1])),
     r'`labels` must lie in \[0, 6\); got 6 at position \(1,\)'),
    (lambda z, y: sparse.entmax15_loss(z, np.array([0, -1, 1]), ignore_index=-2),
     r'`labels` must lie in \[0, 6\) or equal `ignore_index` = -2; got -1'),
    (lambda z, y: sparse.entmax15_loss(z, y[:2]),
     r'`labels` must have shape logits.shape\[:-1\] = \(3,\); got shape \(2,\)'),
    (lambda z, y: sparse.sparsemax_loss(z, y.astype(np.float32)),
     r'`labels` must be integer class indices; got dtype float32'),
    (lambda z, y: sparse.entmax15(z, where=np.ones(K)), r'`where` must be a bool mask'),
    (lambda z, y: sparse.sparsemax(z[0, 0]),
     r'`logits` must have shape \[\.\.\., num_classes\] with num_classes >= 1'),
])
def test_bad_arguments(call, msg):
  z = _logits(9)
  with pytest.raises(ValueError, match=msg):
    call(z, Y)
