"""The softmax family against a float64 NumPy reference, identities, check_grads and its errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from softmax_jax.ops import cross_entropy
from softmax_jax.ops import log_softmax
from softmax_jax.ops import logsumexp
from softmax_jax.ops import soft_cross_entropy
from softmax_jax.ops import softmax

K = 7
DTYPES = [jnp.float32, jnp.bfloat16]
SHAPES = [(K,), (5, K), (2, 3, K)]
PRODUCT = list(itertools.product(DTYPES, SHAPES))


def _ref(x, mask=None):
  """Naive float64 (log_softmax, softmax, logsumexp); masked entries -> -inf, 0."""
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  if mask is not None:
    x = np.where(mask, x, -np.inf)
  m = x.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  s = np.exp(x - m).sum(-1, keepdims=True)
  with np.errstate(divide='ignore', invalid='ignore'):  # Fully masked rows, discarded.
    lse = m + np.log(s)
    log_p = np.where(s > 0, x - lse, -np.inf)
  return log_p, np.exp(log_p), lse[..., 0]


def _ref_ce(x, labels, mask=None, eps=0.0, weights=None):
  log_p, _, _ = _ref(x, mask)
  valid = np.ones(log_p.shape, bool) if mask is None else np.broadcast_to(mask, log_p.shape)
  target = (1 - eps) * np.eye(log_p.shape[-1])[labels] + eps * valid / valid.sum(-1, keepdims=True)
  with np.errstate(invalid='ignore'):  # 0 * -inf on masked classes, discarded by the where.
    loss = -np.sum(np.where(target > 0, target * log_p, 0.0), -1)
  return loss if weights is None else loss * np.asarray(weights, np.float64)[labels]


def _data(shape, dtype, scale=3.0, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape) * scale, dtype)
  labels = jnp.asarray(rng.integers(0, shape[-1], size=shape[:-1]), jnp.int32)
  return x, labels


def _tol(dtype, scale=1.0):
  if dtype == jnp.bfloat16:
    return dict(rtol=1e-2, atol=1e-2 * scale)
  return dict(rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize('dtype,shape', PRODUCT)
@pytest.mark.parametrize('scale', [3.0, 1e4])
def test_matches_float64_reference(dtype, shape, scale):
  x, labels = _data(shape, dtype, scale)
  ref_log_p, ref_p, ref_lse = _ref(x)
  fns = jax.jit(lambda x, y: (log_softmax(x), softmax(x), logsumexp(x), cross_entropy(x, y)))
  log_p, p, lse, ce = fns(x, labels)
  assert (log_p.dtype, p.dtype, lse.dtype, ce.dtype) == (dtype, dtype, dtype, jnp.float32)
  assert log_p.shape == p.shape == shape and lse.shape == ce.shape == shape[:-1]
  np.testing.assert_allclose(np.float64(log_p), ref_log_p, **_tol(dtype, scale))
  np.testing.assert_allclose(np.float64(p), ref_p, **_tol(dtype))
  np.testing.assert_allclose(np.float64(lse), ref_lse, **_tol(dtype, scale))
  # The loss is float32 computed from the (rounded) inputs, so it is tight even for bfloat16.
  np.testing.assert_allclose(ce, _ref_ce(x, np.asarray(labels)), rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize('dtype,shape', PRODUCT)
def test_masked_matches_reference(dtype, shape):
  x, labels = _data(shape, dtype)
  mask = np.random.default_rng(1).random(shape) < 0.6
  mask[..., 0] = True
  labels = jnp.zeros_like(labels)  # Class 0 is always kept.
  log_p, p, lse, ce, sce = jax.jit(lambda x, m, y: (
      log_softmax(x, where=m), softmax(x, where=m), logsumexp(x, where=m),
      cross_entropy(x, y, where=m, label_smoothing=0.2),
      soft_cross_entropy(x, jax.nn.one_hot(y, K), where=m)))(x, mask, labels)
  ref_log_p, ref_p, ref_lse = _ref(x, mask)
  np.testing.assert_array_equal(np.isneginf(np.float64(log_p)), ~mask)
  np.testing.assert_array_equal(np.float64(p)[~mask], 0.0)
  np.testing.assert_allclose(np.float64(log_p)[mask], ref_log_p[mask], **_tol(dtype))
  np.testing.assert_allclose(np.float64(p), ref_p, **_tol(dtype))
  np.testing.assert_allclose(np.float64(lse), ref_lse, **_tol(dtype))
  np.testing.assert_allclose(ce, _ref_ce(x, np.asarray(labels), mask, eps=0.2),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sce, _ref_ce(x, np.asarray(labels), mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype,shape', PRODUCT)
def test_gradient_is_softmax_minus_onehot(dtype, shape):
  x, labels = _data(shape, dtype)
  g_ce = jax.jit(jax.grad(lambda x: cross_entropy(x, labels).sum()))(x)
  g_lse = jax.jit(jax.grad(lambda x: logsumexp(x).astype(jnp.float32).sum()))(x)
  _, ref_p, _ = _ref(x)
  np.testing.assert_allclose(np.float64(g_ce), ref_p - np.eye(K)[np.asarray(labels)], **_tol(dtype))
  np.testing.assert_allclose(np.float64(g_lse), ref_p, **_tol(dtype))


@pytest.mark.parametrize('dtype,shape', PRODUCT)
def test_integer_labels_equal_one_hot_targets(dtype, shape):
  x, labels = _data(shape, dtype)
  mask = np.ones(shape, bool)
  mask[..., -2:] = False
  labels = labels % (K - 2)
  eps = 0.3
  smoothed = (1 - eps) * jax.nn.one_hot(labels, K) + eps * mask / (K - 2)
  out = jax.jit(lambda x, y: (
      cross_entropy(x, y), soft_cross_entropy(x, jax.nn.one_hot(y, K)),
      cross_entropy(x, y, where=mask, label_smoothing=eps),
      soft_cross_entropy(x, smoothed, where=mask)))(x, labels)
  np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out[2], out[3], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out[0], out[2])  # The mask and the smoothing did change the loss.


@pytest.mark.parametrize('shape', SHAPES)
def test_mask_equals_slice(shape):
  x, labels = _data(shape, jnp.float32)
  m = 3
  labels = labels % (K - m)
  mask = np.arange(K) < K - m  # [K], broadcast over the leading dims.
  xs = x[..., :K - m]
  def all_fns(x, where):
    return (softmax(x, where=where), log_softmax(x, where=where), logsumexp(x, where=where),
            cross_entropy(x, labels, where=where, label_smoothing=0.1))
  masked = jax.jit(lambda x: all_fns(x, mask))(x)
  sliced = jax.jit(lambda x: all_fns(x, None))(xs)
  for a, b in zip(masked, sliced):
    a = np.asarray(a)
    np.testing.assert_allclose(a[..., :K - m] if a.shape == shape else a, b, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(masked[0][..., K - m:], 0.0)
  np.testing.assert_array_equal(masked[1][..., K - m:], -np.inf)
  ce = lambda x, where: cross_entropy(x, labels, where=where, label_smoothing=0.1).sum()
  g_masked = jax.jit(jax.grad(lambda x: ce(x, mask)))(x)
  g_sliced = jax.jit(jax.grad(lambda x: ce(x, None)))(xs)
  np.testing.assert_allclose(g_masked[..., :K - m], g_sliced, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(g_masked[..., K - m:], 0.0)


def test_neg_inf_logits_and_fully_masked_rows_give_finite_grads():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, K)), jnp.float32)
  x = x.at[0, :3].set(-jnp.inf).at[2].set(-jnp.inf)  # Row 2: every logit is -inf.
  mask = np.ones((3, K), bool)
  mask[1, 4:] = False
  mask[2] = True
  c = jnp.asarray(np.random.default_rng(3).normal(size=(3, K)), jnp.float32)
  all_masked = np.zeros((3, K), bool)
  forward = jax.jit(lambda x, w: (softmax(x, where=w), log_softmax(x, where=w),
                                   logsumexp(x, where=w)))
  p, log_p, lse = forward(x, mask)
  np.testing.assert_array_equal(p[0, :3], 0.0)
  np.testing.assert_array_equal(p[1, 4:], 0.0)
  np.testing.assert_array_equal(p[2], 0.0)
  np.testing.assert_allclose(p[:2].sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(np.isneginf(log_p), ~np.isfinite(x) | ~mask)
  np.testing.assert_array_equal(lse[2], -np.inf)
  p, log_p, lse = forward(x, all_masked)
  np.testing.assert_array_equal(p, 0.0)
  np.testing.assert_array_equal(log_p, -np.inf)
  np.testing.assert_array_equal(lse, -np.inf)
  labels = jnp.asarray([5, 1, 0])
  t = jnp.asarray(np.eye(K)[[5, 1, 0]])
  losses = {
      'softmax': lambda x, w: (softmax(x, where=w) * c).sum(),
      'logsumexp': lambda x, w: logsumexp(x, where=w).sum(),  # -inf in row 2.
      'log_softmax': lambda x, w: jnp.where(mask, log_softmax(x, where=w), 0).sum(),
      'cross_entropy': lambda x, w: cross_entropy(x[:2], labels[:2], where=w[:2],
                                                  label_smoothing=0.1).sum(),
      'soft_cross_entropy': lambda x, w: soft_cross_entropy(x[:2], t[:2], where=w[:2]).sum(),
  }
  for name, f in losses.items():
    for w in (mask, all_masked):
      g = jax.jit(jax.grad(f))(x, w)
      assert np.all(np.isfinite(g)), (name, g)
      np.testing.assert_array_equal(g[~np.isfinite(x) | ~w], 0.0, err_msg=name)
  # The CE gradient with -inf logits is still softmax - onehot on the finite classes.
  g = jax.jit(jax.grad(lambda x: cross_entropy(x[:2], labels[:2], where=mask[:2]).sum()))(x)
  p = _ref(x, mask)[1]
  np.testing.assert_allclose(g[:2], p[:2] - np.eye(K)[[5, 1]], atol=1e-6)
  # Label smoothing puts no mass on -inf logits: row 0 smooths over its 4 finite classes.
  eps = 0.1
  ce = jax.jit(lambda x, y: cross_entropy(x, y, label_smoothing=eps))(x[:1], labels[:1])
  ref = _ref_ce(x[:1], np.asarray(labels[:1]), np.isfinite(np.asarray(x[:1])), eps=eps)
  np.testing.assert_allclose(ce, ref, rtol=1e-6)


def test_label_on_masked_class_is_inf_with_finite_grad():
  x, _ = _data((2, K), jnp.float32)
  mask = np.ones(K, bool)
  mask[3] = False
  labels = jnp.asarray([3, 0])
  loss = cross_entropy(x, labels, where=mask)
  assert loss[0] == np.inf and np.isfinite(loss[1])
  g = jax.grad(lambda x: cross_entropy(x, labels, where=mask).sum())(x)
  assert np.all(np.isfinite(g))


def test_soft_cross_entropy_zero_target_on_neg_inf_logit():
  x = jnp.asarray([[1.0, -jnp.inf, 0.5, 2.0]])
  t = jnp.asarray([[0.2, 0.0, 0.3, 0.5]])
  loss, (gx, gt) = jax.value_and_grad(lambda x, t: soft_cross_entropy(x, t).sum(), (0, 1))(x, t)
  ref_log_p, ref_p, _ = _ref(x)
  np.testing.assert_allclose(loss, -(0.2 * ref_log_p[0, 0] + 0.3 * ref_log_p[0, 2]
                                     + 0.5 * ref_log_p[0, 3]), rtol=1e-6)
  np.testing.assert_allclose(gx, ref_p - np.asarray(t), atol=1e-6)
  assert np.all(np.isfinite(gt))
  assert soft_cross_entropy(x, jnp.asarray([[0.0, 1.0, 0.0, 0.0]]))[0] == np.inf


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('eps', [0.0, 0.1, 0.5])
def test_label_smoothing_matches_optax(shape, eps):
  x, labels = _data(shape, jnp.float32)
  ours = jax.jit(lambda x, y: cross_entropy(x, y, label_smoothing=eps))(x, labels)
  theirs = optax.softmax_cross_entropy(x, optax.smooth_labels(jax.nn.one_hot(labels, K), eps))
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours, _ref_ce(x, np.asarray(labels), eps=eps), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype,shape', PRODUCT)
def test_class_weights_match_reference(dtype, shape):
  x, labels = _data(shape, dtype)
  w = np.random.default_rng(4).uniform(0.1, 3.0, size=K).astype(np.float32)
  ours = jax.jit(lambda x, y: cross_entropy(x, y, class_weights=w, label_smoothing=0.1))(x, labels)
  np.testing.assert_allclose(ours, _ref_ce(x, np.asarray(labels), eps=0.1, weights=w),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('temperature', [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
  x, _ = _data((4, K), jnp.float32)
  mask = np.arange(K) != 2
  fns = [softmax, log_softmax, logsumexp]
  for f in fns:
    ours = jax.jit(lambda x, t: f(x, where=mask, temperature=t))(x, temperature)  # Traced T.
    static = f(x, where=mask, temperature=temperature)
    ref = f(x / temperature, where=mask)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(static, ref, rtol=1e-6, atol=1e-6)
  ref_log_p, _, _ = _ref(np.asarray(x) / temperature)
  np.testing.assert_allclose(log_softmax(x, temperature=temperature), ref_log_p, rtol=1e-5)


@pytest.mark.parametrize('shape', SHAPES)
def test_bfloat16_accumulates_in_float32(shape):
  x16, labels = _data(shape, jnp.bfloat16, scale=30.0)
  x32 = x16.astype(jnp.float32)  # Same values, exactly.
  t = jax.nn.softmax(jnp.asarray(np.random.default_rng(5).normal(size=shape), jnp.float32))
  for f in (softmax, log_softmax, logsumexp):
    a, b = jax.jit(f)(x16), jax.jit(f)(x32)
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(a), b, rtol=8e-3, atol=8e-3)
  # The losses are float32 computed from the same values, so they agree to float32 precision.
  for f, y in ((cross_entropy, labels), (soft_cross_entropy, t)):
    a, b = jax.jit(f)(x16, y), jax.jit(f)(x32, y)
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_check_grads_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float64)
    mask = np.ones((3, 5), bool)
    mask[0, 1] = mask[2, 4] = False
    labels = jnp.asarray([0, 3, 1])
    w = jnp.asarray(rng.uniform(0.5, 2.0, size=5))
    t = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 5))))
    cases = [
        lambda x: softmax(x, where=mask, temperature=1.5),
        lambda x: jnp.where(mask, log_softmax(x, where=mask), 0.0),
        lambda x: logsumexp(x, where=mask, temperature=0.7),
        lambda x: cross_entropy(x, labels, where=mask, label_smoothing=0.1, class_weights=w),
        lambda x: soft_cross_entropy(x, t),
    ]
    for f in cases:
      assert f(x).dtype == jnp.float64
      check_grads(jax.jit(f), (x,), order=1, modes=('fwd', 'rev'))
    # Second order through the shared core (mask, stop_gradient shift, guarded log).
    check_grads(jax.jit(cases[3]), (x,), order=2, modes=('fwd', 'rev'))
    # Also with respect to the temperature and the soft targets.
    check_grads(jax.jit(lambda tau: softmax(x, temperature=tau)), (1.3,), order=1,
                modes=('fwd', 'rev'))
    check_grads(jax.jit(lambda t: soft_cross_entropy(x, t)), (t,), order=1, modes=('fwd', 'rev'))


def test_zero_temperature_is_the_cold_limit():
  """T = 0 (concrete or traced, scalar or per row) is lim T -> 0+: the argmax, ties split."""
  x = np.asarray([[1.0, 3.0, 3.0, -np.inf], [-2.0, -5.0, -1.0, -3.0], [0.0, -1.0, 0.0, 0.0],
                  [0.5, 2.0, -1.0, 0.0]], np.float32)
  p = np.asarray([[0, .5, .5, 0], [0, 0, 1, 0], [1 / 3, 0, 1 / 3, 1 / 3], [0, 1, 0, 0]])
  with np.errstate(divide='ignore'):
    log_p = np.log(p)
  lse = np.asarray([np.inf, -np.inf, np.log(3), np.inf])  # lim max / T + log(ties)
  t = np.asarray([[0.0], [0.0], [0.0], [0.5]], np.float32)  # Per row: the last row is warm.
  warm = _ref(x[3] / 0.5)
  cases = [(0.0, log_p, lse), (t, np.concatenate([log_p[:3], warm[0][None]]),
                               np.concatenate([lse[:3], [warm[2]]]))]
  for temp, want_log_p, want_lse in cases:
    for jit in (False, True):
      run = lambda f: (jax.jit(lambda x, t: f(x, temperature=t)) if jit else
                       lambda x, t: f(x, temperature=t))(x, temp)
      np.testing.assert_allclose(run(softmax), np.exp(want_log_p), rtol=1e-6)
      np.testing.assert_allclose(run(log_softmax), want_log_p, rtol=1e-6)
      np.testing.assert_allclose(run(logsumexp), want_lse, rtol=1e-6)
  g = jax.jit(jax.grad(lambda x, t: (softmax(x, temperature=t)[:, 1]).sum(), (0, 1)))(x, t)
  assert np.isfinite(np.asarray(g[0])).all() and not np.any(np.asarray(g[0][:3]))  # constant
  assert np.isfinite(np.asarray(g[1])).all()
  # The limit is continuous from above (the maxima here are far apart).
  np.testing.assert_allclose(softmax(x[:2], temperature=1e-3), p[:2], atol=1e-6)


def test_out_of_range_labels_under_jit_give_nan():
  x, _ = _data((4, K), jnp.float32)
  labels = jnp.asarray([1, -1, K, 2])
  loss = jax.jit(cross_entropy)(x, labels)
  ref = _ref_ce(x, np.asarray([1, 0, 0, 2]))
  np.testing.assert_array_equal(np.isnan(loss), [False, True, True, False])
  np.testing.assert_allclose(np.asarray(loss)[[0, 3]], ref[[0, 3]], rtol=1e-6)
  loss = jax.vmap(lambda x, y: cross_entropy(x, y, label_smoothing=0.1, class_weights=jnp.ones(K)))(
      x, labels)
  np.testing.assert_array_equal(np.isnan(loss), [False, True, True, False])


@pytest.mark.parametrize('call,match', [
    (lambda: softmax(jnp.float32(1.0)),
     r'`x` must have shape \[\.\.\., num_classes\].*got shape \(\)'),
    (lambda: logsumexp(jnp.zeros((2, 0))), r'`x` .*num_classes >= 1.*got shape \(2, 0\)'),
    (lambda: softmax(jnp.zeros(3), temperature=-1), r'`temperature` must be finite and >= 0; got -1'),
    (lambda: softmax(jnp.zeros(3), temperature=np.inf), r'`temperature` must be finite and >= 0'),
    (lambda: log_softmax(jnp.zeros(3), temperature=np.asarray([1.0, 0.0, 1.0])),
     r'`temperature` must be finite and > 0; got \[1\. 0\. 1\.\]'),  # per class: no limit
    (lambda: cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2, int), class_weights=[1.0, np.nan, 1.0]),
     r'`class_weights` must be finite and >= 0; got nan at position \(1,\)'),
    (lambda: cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2, int), class_weights=[1.0, 1.0, -2.0]),
     r'`class_weights` must be finite and >= 0; got -2\.0 at position \(2,\)'),
    (lambda: softmax(jnp.zeros((2, 3)), where=np.ones(3, int)), r'`where` must be a bool.*int'),
    (lambda: softmax(jnp.zeros((2, 3)), where=np.ones((3, 3), bool)),
     r'`where` must broadcast to the shape of `x` \(2, 3\); got shape \(3, 3\)'),
    (lambda: cross_entropy(jnp.float32(0), jnp.int32(0)),
     r'`logits` must have shape .*got shape \(\)'),
    (lambda: cross_entropy(jnp.zeros((4, 3)), jnp.zeros(5, jnp.int32)),
     r'`labels` must have shape logits.shape\[:-1\] = \(4,\); got shape \(5,\)'),
    (lambda: cross_entropy(jnp.zeros((4, 3)), jnp.zeros(4)), r'`labels` must be integer.*float32'),
    (lambda: cross_entropy(jnp.zeros((2, 3)), jnp.asarray([0, 3])),
     r'`labels` must lie in \[0, 3\); got 3 at position \(1,\)'),
    (lambda: cross_entropy(jnp.zeros((2, 2, 3)), np.asarray([[0, 1], [-2, 0]])),
     r'`labels` must lie in \[0, 3\); got -2 at position \(1, 0\)'),
    (lambda: cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2, int), class_weights=jnp.ones(4)),
     r'`class_weights` must have shape \[num_classes\] = \(3,\); got shape \(4,\)'),
    (lambda: cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2, int), label_smoothing=1.0),
     r'`label_smoothing` must be in \[0, 1\); got 1\.0'),
    (lambda: cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2, int), label_smoothing=-0.1),
     r'`label_smoothing` must be in \[0, 1\); got -0\.1'),
    (lambda: soft_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 4))),
     r'`targets` must have the shape of `logits` \(2, 3\); got shape \(2, 4\)'),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_concrete_labels_are_checked_under_jit_and_grad():
  x = jnp.zeros((2, 3))
  bad = np.asarray([0, 5])
  with pytest.raises(ValueError, match=r'`labels` must lie in \[0, 3\); got 5 at position \(1,\)'):
    jax.jit(lambda x: cross_entropy(x, bad))(x)  # Closed-over labels are concrete.
  with pytest.raises(ValueError, match='`labels` must lie in'):
    jax.grad(lambda x: cross_entropy(x, bad).sum())(x)
