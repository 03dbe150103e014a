"""sigsoftmax, the mixture of softmaxes (exact and streamed) and linear_logsumexp.

Against float64 NumPy references written from the papers (Kanai et al. 2018, Yang et al. 2018),
the streamed loss against autodiff of the materialized one in float64, `check_grads`, the
identities M = 1 == one softmax, masks and -inf, bfloat16, the NaN rule, `ignore_index`, chex
variants, vmap, compile-only memory (no `[N, M, K]` buffer) and the argument errors.
"""

from absl.testing import parameterized
import chex
import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from softmax_jax import ops

N, M, D, K = 4, 3, 5, 7  # examples, components, context width, classes
CHUNK = 3  # K = 7: two chunks of 3 and a tail of 1


def _data(seed=0, lead=(N,), dtype=np.float32):
  rng = np.random.default_rng(seed)
  c = np.tanh(rng.normal(size=(*lead, M, D)) * 2).astype(dtype)
  prior = rng.normal(size=(*lead, M)).astype(dtype)
  w = (rng.normal(size=(D, K)) * 1.5).astype(dtype)
  b = rng.normal(size=K).astype(dtype)
  y = rng.integers(0, K, size=lead).astype(np.int32)
  return c, prior, w, b, y


MASK = np.array([True, True, False, True, True, False, True])


def _f64(x):
  return np.asarray(x, np.float64)


def _ref_scores(z, mask=None, sig=False):
  """float64 scores: masked and -inf -> -inf; sigsoftmax: z + log(sigmoid(z))."""
  z = _f64(z)
  keep = z != -np.inf
  if mask is not None:
    keep = keep & mask
  with np.errstate(invalid='ignore', over='ignore'):
    u = z - np.logaddexp(0.0, -z) if sig else z
  return np.where(keep, u, -np.inf)


def _ref_log_softmax(u):
  with np.errstate(divide='ignore', invalid='ignore'):
    lse = special.logsumexp(u, axis=-1, keepdims=True)
    return np.where(np.isneginf(lse), -np.inf, u - lse)


def _ref_mixture(z, prior, mask=None, sig=False):
  """[..., K] = logsumexp_m(log_softmax(prior)_m + log_softmax(scores(z_m)))."""
  joint = _ref_log_softmax(_f64(prior))[..., None] + _ref_log_softmax(_ref_scores(z, mask, sig))
  with np.errstate(divide='ignore'):
    return special.logsumexp(joint, axis=-2)


def _ref_loss(c, prior, w, b, y, mask=None, sig=False):
  z = np.einsum('...md,dk->...mk', _f64(c), _f64(w)) + (0.0 if b is None else _f64(b))
  lp = _ref_mixture(z, prior, mask, sig)
  return -np.take_along_axis(lp, np.asarray(y)[..., None], -1)[..., 0]


def _materialized(c, prior, w, b, y, where=None, sig=False):
  z = jnp.einsum('...md,dk->...mk', c, w) + (0.0 if b is None else b)
  lp = ops.mixture_log_softmax(z, prior, where=where, sigsoftmax=sig)
  return -jnp.take_along_axis(lp, jnp.asarray(y)[..., None], -1)[..., 0]


@pytest.mark.parametrize('sig', [False, True])
@pytest.mark.parametrize('masked', [False, True])
def test_sigsoftmax_and_mixture_match_reference(sig, masked):
  c, prior, w, b, _ = _data()
  z = np.einsum('nmd,dk->nmk', c, w) + b
  where = MASK if masked else None
  got = ops.mixture_log_softmax(z, prior, where=where, sigsoftmax=sig)
  np.testing.assert_allclose(got, _ref_mixture(z, prior, where, sig), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(special.logsumexp(_f64(got), axis=-1), 0.0, atol=1e-5)
  if masked:
    assert np.all(np.isneginf(np.asarray(got)[:, ~MASK]))
  if sig:
    np.testing.assert_allclose(ops.log_sigsoftmax(z, where=where), _ref_log_softmax(
        _ref_scores(z, where, True)), rtol=1e-5, atol=1e-5)
    p = np.asarray(ops.sigsoftmax(z, where=where), np.float64)
    want = np.exp(_f64(z)) / (1 + np.exp(-_f64(z))) * (1 if where is None else where)
    np.testing.assert_allclose(p, want / want.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_one_component_is_one_softmax():
  c, prior, w, b, _ = _data()
  z = np.einsum('nmd,dk->nmk', c, w)[:, :1] + b
  got = jax.jit(lambda z, p: [ops.mixture_log_softmax(z, p, sigsoftmax=s) for s in (False, True)])
  single = jax.jit(lambda z: [ops.log_softmax(z), ops.log_sigsoftmax(z)])
  np.testing.assert_allclose(got(z, prior[:, :1]), single(z[:, 0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('sig, chunk, bias, masked', [(False, 16, False, False),
                                                       (True, CHUNK, True, True)])
def test_streamed_equals_materialized_float64(sig, chunk, bias, masked):
  """Loss and gradients (contexts, prior, w, bias) of the stream == autodiff of [N, M, K]."""
  with jax.enable_x64(True):
    c, prior, w, b, y = _data(1, lead=(2, 3), dtype=np.float64)
    b = b if bias else None
    where = MASK if masked else None
    y = np.where(MASK[y] | (not masked), y, 0)  # labels on kept classes (a masked label: below)
    ct = np.random.default_rng(2).normal(size=y.shape)
    streamed = lambda *a: ops.mixture_cross_entropy(*a[:3], y, bias=a[3], where=where,
                                                    sigsoftmax=sig, chunk_size=chunk)
    full = lambda *a: _materialized(*a, y, where=where, sig=sig)
    argnums = (0, 1, 2, 3) if bias else (0, 1, 2)
    vg = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * ct), argnums))(
        c, prior, w, b)
    (l1, g1), (l0, g0) = vg(streamed), vg(full)
    np.testing.assert_allclose(streamed(c, prior, w, b), _ref_loss(c, prior, w, b, y, where, sig),
                               rtol=1e-12)
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    for a, r in zip(g1, g0):
      np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)


def test_check_grads_float64():
  sig = True  # the plain softmax's gradient is the same code with du/dz = 1
  with jax.enable_x64(True):
    c, prior, w, b, y = _data(3, dtype=np.float64)
    f = lambda c, p, w, b: ops.mixture_cross_entropy(c, p, w, y, bias=b, sigsoftmax=sig,
                                                     chunk_size=CHUNK)
    check_grads(jax.jit(f), (c, prior, w, b), order=1, modes=['rev'])  # custom VJP: rev only
    g = lambda x, w, b: ops.linear_logsumexp(x, w, bias=b, sigsoftmax=sig, chunk_size=CHUNK)
    check_grads(jax.jit(g), (c, w, b), order=1, modes=['rev'])


@pytest.mark.parametrize('sig', [False, True])
def test_linear_logsumexp_matches_reference(sig):
  c, _, w, b, _ = _data(4)
  u = _ref_scores(np.einsum('nmd,dk->nmk', _f64(c), _f64(w)) + _f64(b), MASK, sig)
  got = ops.linear_logsumexp(c, w, bias=b, where=MASK, sigsoftmax=sig, chunk_size=CHUNK)
  assert got.shape == (N, M) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, special.logsumexp(u, axis=-1), rtol=1e-5)
  none = ops.linear_logsumexp(c, w, where=np.zeros(K, bool), chunk_size=CHUNK)
  assert np.all(np.isneginf(np.asarray(none)))  # a fully masked row


@pytest.mark.parametrize('sig', [False, True])
def test_masks_and_minus_inf_give_finite_gradients(sig):
  """-inf logits (in every component or only in some), a class mask, -inf bias entries, a label
  on a masked class (+inf loss, zero gradient): no NaN anywhere."""
  c, prior, w, b, y = _data(5)
  z = np.einsum('nmd,dk->nmk', c, w) + b
  z[:, :, 2] = -np.inf  # class 2 in every component
  z[:, 0, 4] = -np.inf  # class 4 in component 0 only
  lp = ops.mixture_log_softmax(z, prior, sigsoftmax=sig)
  np.testing.assert_allclose(lp, _ref_mixture(z, prior, sig=sig), rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda z, p: jnp.sum(jnp.where(jnp.isfinite(lp), ops.mixture_log_softmax(
      z, p, sigsoftmax=sig), 0.0)), (0, 1)))(z, prior)
  chex.assert_tree_all_finite(grads)
  assert np.all(np.asarray(grads[0])[:, :, 2] == 0) and np.all(np.asarray(grads[0])[:, 0, 4] == 0)
  b_inf = b.copy()
  b_inf[5] = -np.inf
  y = np.where(MASK[y], y, 0)
  y[0] = 2  # masked by `where`: +inf loss, zero gradient
  f = jax.jit(lambda c, p, w, b: ops.mixture_cross_entropy(c, p, w, y, bias=b, where=MASK,
                                                           sigsoftmax=sig, chunk_size=CHUNK))
  loss = f(c, prior, w, b_inf)
  assert np.isposinf(loss[0]) and np.all(np.isfinite(loss[1:]))
  np.testing.assert_allclose(loss[1:], _ref_loss(c, prior, w, b_inf, y, MASK, sig)[1:], rtol=1e-5)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), (0, 1, 2, 3)))(c, prior, w, b_inf)  # inf
  chex.assert_tree_all_finite(grads)
  assert np.all(np.asarray(grads[0][0]) == 0) and np.all(np.asarray(grads[2])[:, ~MASK] == 0)
  assert np.all(np.asarray(grads[3])[~MASK] == 0) and np.asarray(grads[3])[5] == 0


def test_bfloat16_is_float32_accumulated_and_finite():
  """(sigsoftmax; the plain streamed head's bfloat16 run is in the head contract's test)"""
  sig = True
  c, prior, w, b, y = _data(6)
  big = lambda a: a * 30.0  # logits of magnitude ~100: exp overflows unless shifted
  args = (c, prior, big(w), b)
  f = jax.jit(lambda *a: ops.mixture_cross_entropy(*a[:3], y, bias=a[3], sigsoftmax=sig,
                                                    chunk_size=CHUNK))
  bf = [jnp.asarray(a, jnp.bfloat16) for a in args]
  loss, grads = jax.jit(jax.value_and_grad(lambda *a: f(*a).sum(), (0, 1, 2, 3)))(*bf)
  assert loss.dtype == jnp.float32 and [g.dtype for g in grads] == [jnp.bfloat16] * 4
  chex.assert_tree_all_finite((loss, grads))
  ref = _ref_loss(*[_f64(a) for a in bf], y, sig=sig)
  np.testing.assert_allclose(f(*bf), ref, rtol=2e-2, atol=2e-2)
  lp = ops.mixture_log_softmax(jnp.einsum('nmd,dk->nmk', bf[0], bf[2]), bf[1], sigsoftmax=sig)
  assert lp.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(lp, np.float32)))


def test_nan_rule_and_ignore_index():
  """A NaN context or prior logit: that example NaN (loss, gradient), the others unchanged; an
  ignored example (label = ignore_index) is not read: loss 0, gradient 0, also with a NaN.
  (sigsoftmax, whose transform guards what it does not read; the plain streamed head's NaN
  propagation is in the head contract's test)"""
  sig = True
  c, prior, w, b, y = _data(7)

  def make(ignore_index):
    f = lambda c, p, y: ops.mixture_cross_entropy(c, p, w, y, bias=b, sigsoftmax=sig,
                                                  chunk_size=CHUNK, ignore_index=ignore_index)
    return jax.jit(lambda c, p, y: (f(c, p, y), jax.grad(lambda c, p: f(c, p, y).sum(), (0, 1))(
        c, p)))

  run, run_ignoring = make(None), make(-1)
  clean, (gc, gp) = run(c, prior, y)
  others = lambda a, i=1: np.delete(np.asarray(a), i, 0)
  for cn, pn in ((c.copy(), prior), (c, prior.copy())):
    (cn if cn is not c else pn)[1, ...] = np.nan
    loss, (dc, dp) = run(cn, pn, y)
    assert np.isnan(loss[1]) and np.isnan(np.asarray(dc[1])).any()
    np.testing.assert_allclose(others(loss), others(clean), rtol=1e-6)
    np.testing.assert_allclose(others(dc), others(gc), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(others(dp), others(gp), rtol=1e-5, atol=1e-7)
    z = np.einsum('nmd,dk->nmk', cn, w) + b
    lp = np.asarray(ops.mixture_log_softmax(z, pn, sigsoftmax=sig))
    assert np.all(np.isnan(lp[1])) and np.all(np.isfinite(others(lp)))
  cn = c.copy()
  cn[2] = np.nan
  yi = np.where(np.arange(N) == 2, -1, y).astype(np.int32)
  loss, (dc, dp) = run_ignoring(cn, prior, yi)
  assert loss[2] == 0 and np.all(np.asarray(dc[2]) == 0) and np.all(np.asarray(dp[2]) == 0)
  np.testing.assert_allclose(others(loss, 2), others(clean, 2), rtol=1e-6)
  np.testing.assert_allclose(others(dc, 2), others(gc, 2), rtol=1e-5, atol=1e-7)
  z = np.einsum('nmd,dk->nmk', c, w) + b  # a NaN in a masked class is not read
  z[:, :, 2] = np.nan
  np.testing.assert_allclose(ops.mixture_log_softmax(z, prior, where=MASK, sigsoftmax=sig),
                             _ref_mixture(np.where(MASK, z, 0.0), prior, MASK, sig), rtol=1e-5,
                             atol=1e-5)


def test_out_of_range_labels():
  c, prior, w, _, y = _data(8)
  bad = np.where(np.arange(N) == 1, K, y).astype(np.int32)
  with pytest.raises(ValueError, match=r'`labels` must lie in \[0, 7\); got 7 at position \(1,\)'):
    ops.mixture_cross_entropy(c, prior, w, bad)
  loss = jax.jit(lambda y: ops.mixture_cross_entropy(c, prior, w, y, chunk_size=CHUNK))(bad)
  assert np.isnan(loss[1]) and np.all(np.isfinite(np.delete(loss, 1)))  # traced: NaN, no clip


def _case_args():
  c, prior, w, b, y = _data(9)
  z = np.einsum('nmd,dk->nmk', c, w) + b
  return dict(
      sigsoftmax=(lambda z: ops.sigsoftmax(z, where=MASK), (z[:, 0],),
                  lambda z: np.exp(_ref_log_softmax(_ref_scores(z, MASK, True)))),
      log_sigsoftmax=(lambda z: ops.log_sigsoftmax(z, where=MASK), (z[:, 0],),
                      lambda z: _ref_log_softmax(_ref_scores(z, MASK, True))),
      mixture_log_softmax=(lambda z, p: ops.mixture_log_softmax(z, p, where=MASK, sigsoftmax=True),
                           (z, prior), lambda z, p: _ref_mixture(z, p, MASK, True)),
      mixture_cross_entropy=(
          lambda c, p, y: ops.mixture_cross_entropy(c, p, w, y, bias=b, where=MASK,
                                                    chunk_size=CHUNK),
          (c, prior, np.where(MASK[y], y, 0).astype(np.int32)),
          lambda c, p, y: _ref_loss(c, p, w, b, y, MASK)),
      linear_logsumexp=(
          lambda c: ops.linear_logsumexp(c, w, bias=b, sigsoftmax=True, chunk_size=CHUNK), (c,),
          lambda c: special.logsumexp(_ref_scores(np.einsum('nmd,dk->nmk', _f64(c), _f64(w))
                                                  + _f64(b), sig=True), axis=-1)))


CASES = _case_args()


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
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(*args), f(*args), rtol=1e-6, atol=1e-6)


def test_no_n_m_k_buffer():
  """Compile only (memory is deterministic): the streamed value_and_grad holds no [N, M, K]."""
  n, m, d = 256, 5, 64

  def temp(k):
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    f = lambda c, p, w, y: ops.mixture_cross_entropy(c, p, w, y, chunk_size=512).mean()
    return jax.jit(jax.value_and_grad(f, (0, 1, 2))).lower(
        s(n, m, d), s(n, m), s(d, k), jax.ShapeDtypeStruct((n,), jnp.int32)
    ).compile().memory_analysis().temp_size_in_bytes

  assert temp(80_000) < 0.02 * n * m * 80_000 * 4  # (the benchmark shows it flat in K)


@pytest.mark.parametrize('call, msg', [
    (lambda c, p, w, y: ops.mixture_cross_entropy(c[0], p, w, y),
     r'`prior_logits` must have shape contexts.shape\[:-1\] = \(3,\); got shape \(4, 3\)'),
    (lambda c, p, w, y: ops.mixture_cross_entropy(c[..., :4], p, w, y),
     r'`contexts` must have shape \[\.\.\., M, d\] with d = w.shape\[0\] = 5; got shape \(4, 3, 4\)'),
    (lambda c, p, w, y: ops.mixture_cross_entropy(c, p, w[None], y),
     r'`w` must have shape \[d, K\] \(rank 2\); got shape \(1, 5, 7\)'),
    (lambda c, p, w, y: ops.mixture_cross_entropy(c, p, w, y[:3]),
     r'`labels` must have shape prior_logits.shape\[:-1\] = \(4,\); got shape \(3,\)'),
    (lambda c, p, w, y: ops.mixture_cross_entropy(c, p.astype(np.int32), w, y),
     r'`prior_logits` must be a float array \[\.\.\., M\]; got dtype int32'),
    (lambda c, p, w, y: ops.mixture_cross_entropy(c, p, w, y, bias=np.zeros(6, np.float32)),
     r'`bias` must have shape \[K\] = \(7,\); got shape \(6,\)'),
    (lambda c, p, w, y: ops.mixture_cross_entropy(c, p, w, y, where=np.ones(7)),
     r'`where` must be a bool mask of classes; got dtype float'),
    (lambda c, p, w, y: ops.mixture_cross_entropy(c, p, w, y, chunk_size=0),
     r'`chunk_size` must be None or a positive int; got 0'),
    (lambda c, p, w, y: ops.mixture_log_softmax(c[:, 0, 0], p[:, 0]),
     r'`logits` must have shape \[\.\.\., M, K\] \(rank >= 2\); got shape \(4,\)'),
    (lambda c, p, w, y: ops.mixture_log_softmax(c, p[:, :2]),
     r'`prior_logits` must have shape logits.shape\[:-1\] = \(4, 3\); got shape \(4, 2\)'),
    (lambda c, p, w, y: ops.mixture_log_softmax(c, p, where=np.ones((2, 5), bool)),
     r'`where` must broadcast to the shape of `output \[\.\.\., K\]` \(4, 5\); got shape \(2, 5\)'),
    (lambda c, p, w, y: ops.sigsoftmax(c.astype(np.int32)[..., :0]),
     r'`logits` must have shape \[\.\.\., num_classes\] with num_classes >= 1'),
    (lambda c, p, w, y: ops.linear_logsumexp(c, w.T),
     r'`x` must have shape \[\.\.\., d\] with d = w.shape\[0\] = 7; got shape \(4, 3, 5\)'),
])
def test_bad_arguments(call, msg):
  c, prior, w, _, y = _data()
  for run in (call, jax.jit(call)):  # static checks: the same under jit
    with pytest.raises(ValueError, match=msg):
      run(c, prior, w, y)
