"""Imbalance losses and priors vs float64 NumPy references of the papers' formulas.

The references are written from Cui et al. 2019, Lin et al. 2017, Cao et al. 2019 (and Cao's
LDAMLoss code) and Menon et al. 2021, not from softmax_jax.ops.imbalance.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from softmax_jax.ops import class_balanced_weights
from softmax_jax.ops import cross_entropy
from softmax_jax.ops import drw_class_weights
from softmax_jax.ops import focal_loss
from softmax_jax.ops import ldam_loss
from softmax_jax.ops import ldam_margins
from softmax_jax.ops import log_prior
from softmax_jax.ops import log_softmax
from softmax_jax.ops import logit_adjusted_cross_entropy
from softmax_jax.ops import posthoc_logit_adjustment

C = 6
COUNTS = np.array([5000, 2000, 500, 120, 30, 7])
LEADS = [(), (5,), (2, 3)]
GAMMAS = [0.0, 0.5, 1.0, 2.0, 5.0]

# ----------------------------------------------------------------------------------------------
# Float64 references.


def _f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _ref_log_softmax(z):
  z = _f64(z)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _pick(a, labels):
  return np.take_along_axis(a, np.asarray(labels)[..., None], -1)[..., 0]


def _ref_ce(z, labels, w=None):
  loss = -_pick(_ref_log_softmax(z), labels)
  return loss if w is None else loss * np.asarray(w, np.float64)[np.asarray(labels)]


def _ref_cb(counts, beta, normalize=True):  # Cui et al. 2019, eq. 2-4: (1 - b) / (1 - b^n).
  n = np.asarray(counts, np.float64)
  w = (1 - beta) / (1 - beta ** n)
  return w / w.sum() * len(n) if normalize else w


def _ref_focal(z, labels, gamma, alpha=None):  # Lin et al. 2017: -a_y (1 - p_y)^g log p_y.
  lp = _pick(_ref_log_softmax(z), labels)
  a = 1.0 if alpha is None else np.asarray(alpha, np.float64)[np.asarray(labels)]
  return -a * (1 - np.exp(lp)) ** gamma * lp


def _ref_margins(counts, max_m):  # Cao's LDAMLoss: m = 1 / n^(1/4), m *= max_m / max(m).
  m = 1.0 / np.sqrt(np.sqrt(np.asarray(counts, np.float64)))
  return m * (max_m / m.max())


def _ref_ldam(z, labels, counts, max_m, s, w=None):
  z = _f64(z)
  onehot = np.eye(z.shape[-1], dtype=bool)[np.asarray(labels)]
  m = _ref_margins(counts, max_m)[np.asarray(labels)][..., None]
  return _ref_ce(s * np.where(onehot, z - m, z), labels, w)


def _ref_log_pi(counts):
  n = np.asarray(counts, np.float64)
  return np.log(n / n.sum())


def _ref_la(z, labels, counts, tau):  # Menon et al. 2021, eq. 11.
  return _ref_ce(_f64(z) + tau * _ref_log_pi(counts), labels)


def _data(lead, dtype=jnp.float32, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.normal(size=lead + (C,)) * scale, dtype)
  return z, jnp.asarray(rng.integers(0, C, size=lead), jnp.int32)


CB = _ref_cb(COUNTS, 0.999)
DRW_W = np.linspace(0.5, 2.0, C)
LOG_PI = np.log(COUNTS / COUNTS.sum())

# name: (op(z, y), reference(z, y), cosine-like logits in [-1, 1]).
LOSSES = {
    'focal_g0.5': (lambda z, y: focal_loss(z, y, gamma=0.5),
                   lambda z, y: _ref_focal(z, y, 0.5), False),
    'focal_g2': (lambda z, y: focal_loss(z, y), lambda z, y: _ref_focal(z, y, 2.0), False),
    'cb_focal_g1': (lambda z, y: focal_loss(z, y, gamma=1.0, alpha=class_balanced_weights(
        COUNTS, 0.999)), lambda z, y: _ref_focal(z, y, 1.0, CB), False),
    'ldam': (lambda z, y: ldam_loss(z, y, class_counts=COUNTS),
             lambda z, y: _ref_ldam(z, y, COUNTS, 0.5, 30.0), True),
    'ldam_drw': (lambda z, y: ldam_loss(z, y, class_counts=COUNTS, max_margin=0.3, scale=16.0,
                                        class_weights=DRW_W),
                 lambda z, y: _ref_ldam(z, y, COUNTS, 0.3, 16.0, DRW_W), True),
    'logit_adjusted': (lambda z, y: logit_adjusted_cross_entropy(z, y, log_prior=LOG_PI),
                       lambda z, y: _ref_la(z, y, COUNTS, 1.0), False),
    'logit_adjusted_t1.5': (
        lambda z, y: logit_adjusted_cross_entropy(z, y, log_prior=log_prior(COUNTS), tau=1.5),
        lambda z, y: _ref_la(z, y, COUNTS, 1.5), False),
}


def _inputs(name, lead, dtype=jnp.float32, seed=0):
  z, y = _data(lead, dtype, seed)
  return (jnp.tanh(z / 3).astype(dtype), y) if LOSSES[name][2] else (z, y)


@pytest.mark.parametrize('name,lead', list(itertools.product(LOSSES, LEADS)))
def test_losses_match_float64_reference_under_jit(name, lead):
  op, ref, _ = LOSSES[name]
  z, y = _inputs(name, lead)
  out = jax.jit(op)(z, y)
  assert out.shape == lead and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref(z, y), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize('name', LOSSES)
def test_bfloat16_logits_are_computed_in_float32(name):
  op, ref, _ = LOSSES[name]
  z, y = _inputs(name, (4, 3), jnp.bfloat16, seed=1)
  out = op(z, y)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref(z, y), rtol=2e-5, atol=1e-5)  # Upcast values: f32 accuracy.
  np.testing.assert_array_equal(out, op(z.astype(jnp.float32), y))


@pytest.mark.parametrize('lead', LEADS)
def test_posthoc_adjustment_matches_reference_and_balanced_bayes_rule(lead):
  z, _ = _data(lead)
  out = jax.jit(lambda z: posthoc_logit_adjustment(z, log_prior=log_prior(COUNTS), tau=0.7))(z)
  np.testing.assert_allclose(out, _f64(z) - 0.7 * _ref_log_pi(COUNTS), rtol=1e-6, atol=1e-5)
  # With z = log p(y|x), argmax of the tau = 1 adjustment is argmax p(y|x) / pi_y (Menon eq. 9).
  post = np.exp(_ref_log_softmax(z))
  pred = jnp.argmax(posthoc_logit_adjustment(log_softmax(z), log_prior=LOG_PI), -1)
  np.testing.assert_array_equal(pred, np.argmax(post / (COUNTS / COUNTS.sum()), -1))
  zb = z.astype(jnp.bfloat16)
  assert posthoc_logit_adjustment(zb, log_prior=LOG_PI).dtype == jnp.bfloat16
  np.testing.assert_array_equal(posthoc_logit_adjustment(z, log_prior=LOG_PI, tau=0.0), z)


# ----------------------------------------------------------------------------------------------
# Identities.


def test_focal_gamma0_is_cross_entropy_bitwise_also_with_alpha_and_mask():
  z, y = _data((4, 5))
  mask = jnp.asarray(np.random.default_rng(3).random((4, 5, C)) > 0.3) | jax.nn.one_hot(
      y, C, dtype=bool)
  alpha = jnp.asarray(CB, jnp.float32)
  for kw, ce_kw in [({}, {}), (dict(alpha=alpha), dict(class_weights=alpha)),
                    (dict(where=mask), dict(where=mask))]:
    f = jax.jit(lambda z, y, kw=kw: focal_loss(z, y, gamma=0, **kw))
    g = jax.jit(lambda z, y, kw=ce_kw: cross_entropy(z, y, **kw))
    np.testing.assert_array_equal(f(z, y), g(z, y))
    # The general (traced-gamma) path agrees to rounding.
    traced = jax.jit(lambda z, y, g, kw=kw: focal_loss(z, y, gamma=g, **kw))(z, y, 0.0)
    np.testing.assert_allclose(traced, g(z, y), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('gamma', [0.5, 2.0])
def test_focal_traced_gamma_equals_static_and_mask_equals_slice(gamma):
  z, y = _data((3, 4), seed=2)
  static = focal_loss(z, y, gamma=gamma)
  np.testing.assert_allclose(jax.jit(lambda g: focal_loss(z, y, gamma=g))(gamma), static,
                             rtol=1e-6, atol=1e-7)
  # Classes C-2 and C-1 masked out == sliced away (labels kept below C-2).
  y = y % (C - 2)
  mask = np.arange(C) < C - 2
  np.testing.assert_allclose(focal_loss(z, y, gamma=gamma, where=mask),
                             focal_loss(z[..., :C - 2], y, gamma=gamma), rtol=1e-6, atol=1e-7)


def test_logit_adjusted_tau0_is_cross_entropy_bitwise_and_equals_ce_of_inverse_posthoc():
  z, y = _data((4, 5))
  ce = jax.jit(cross_entropy)(z, y)
  la0 = jax.jit(lambda z, y: logit_adjusted_cross_entropy(z, y, log_prior=LOG_PI, tau=0))(z, y)
  np.testing.assert_array_equal(la0, ce)
  for tau in [0.5, 1.0, 2.0]:
    la = logit_adjusted_cross_entropy(z, y, log_prior=LOG_PI, tau=tau)
    inverse = posthoc_logit_adjustment(z, log_prior=-LOG_PI, tau=tau)  # z + tau log pi.
    np.testing.assert_allclose(la, cross_entropy(inverse, y), rtol=1e-6, atol=1e-6)
    traced = jax.jit(lambda t: logit_adjusted_cross_entropy(z, y, log_prior=LOG_PI, tau=t))(tau)
    np.testing.assert_allclose(traced, la, rtol=1e-6, atol=1e-6)


def test_ldam_with_vanishing_margin_is_ce_of_scaled_logits():
  z, y = _data((4, 5))
  cos = jnp.tanh(z)
  out = ldam_loss(cos, y, class_counts=COUNTS, max_margin=1e-7, scale=30.0)
  np.testing.assert_allclose(out, cross_entropy(30.0 * cos, y), rtol=1e-5, atol=1e-5)
  # The margin makes the loss strictly larger.
  assert np.all(ldam_loss(cos, y, class_counts=COUNTS) > cross_entropy(30.0 * cos, y))


def test_class_balanced_weights_limits_and_reference():
  np.testing.assert_array_equal(class_balanced_weights(COUNTS, 0.0), np.ones(C, np.float32))
  np.testing.assert_array_equal(class_balanced_weights(COUNTS, 0), np.ones(C, np.float32))
  inv = (1 / COUNTS) / (1 / COUNTS).sum() * C
  np.testing.assert_allclose(class_balanced_weights(COUNTS, 1 - 1e-12), inv, rtol=1e-6)
  # Un-normalized, beta -> 1 gives exactly 1 / n to float32 (the -expm1 form has no cancellation).
  np.testing.assert_allclose(class_balanced_weights(COUNTS, 1 - 1e-13, normalize=False),
                             1 / COUNTS, rtol=1e-6)
  for beta in [0.5, 0.9, 0.99, 0.999, 0.9999]:
    w = class_balanced_weights(COUNTS, beta)
    assert w.shape == (C,) and w.dtype == jnp.float32
    np.testing.assert_allclose(w, _ref_cb(COUNTS, beta), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(w, np.float64).sum(), C, rtol=1e-6)
    np.testing.assert_allclose(class_balanced_weights(COUNTS, beta, normalize=False),
                               _ref_cb(COUNTS, beta, normalize=False), rtol=1e-6)
    assert np.all(np.diff(np.asarray(w)) >= 0)  # Rarer class, no smaller weight (COUNTS falls).
  assert np.all(np.diff(np.asarray(class_balanced_weights(COUNTS, 0.9999))) > 0)


@pytest.mark.parametrize('max_m', [0.5, 0.1])
def test_ldam_margins_largest_at_rarest_with_quarter_power_ratios(max_m):
  counts = np.array([30, 7, 5000, 120, 2000, 500])
  m = np.asarray(ldam_margins(counts, max_m), np.float64)
  assert m.dtype == np.float64 and int(np.argmax(m)) == int(np.argmin(counts))
  np.testing.assert_allclose(m.max(), max_m, rtol=1e-7)
  ratio = m[:, None] / m[None, :]
  np.testing.assert_allclose(ratio, (counts[None, :] / counts[:, None]) ** 0.25, rtol=1e-6)
  np.testing.assert_allclose(m, _ref_margins(counts, max_m), rtol=1e-6)


def test_drw_weights_switch_exactly_at_start_step_with_traced_step():
  f = jax.jit(lambda s: drw_class_weights(s, class_counts=COUNTS, start_step=100, beta=0.999))
  cb = class_balanced_weights(COUNTS, 0.999)
  for step in [0, 99]:
    np.testing.assert_array_equal(f(step), np.ones(C, np.float32))
  for step in [100, 101, 10 ** 6]:
    np.testing.assert_array_equal(f(step), cb)
  np.testing.assert_array_equal(drw_class_weights(0, class_counts=COUNTS, start_step=0),
                                class_balanced_weights(COUNTS))
  np.testing.assert_array_equal(drw_class_weights(jnp.int32(5), class_counts=COUNTS,
                                                  start_step=6), np.ones(C))


def test_log_prior_is_log_frequency():
  lp = log_prior(COUNTS)
  assert lp.dtype == jnp.float32
  np.testing.assert_allclose(lp, _ref_log_pi(COUNTS), rtol=1e-6)
  np.testing.assert_allclose(jax.nn.logsumexp(lp), 0.0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Gradients.


def _extreme():
  """Rows: p_y == 1 exactly, p_y == 0, uniform, a 1e4 tie, p_y == 1 by rounding (z_y = 20)."""
  big = np.full((5, C), -1e4, np.float32)
  big[:, 0] = 1e4
  big[2] = 0.0
  big[3, 1] = 1e4
  big[4] = 0.0
  big[4, 0] = 20.0
  return big, np.array([0, 1, 0, 0, 0], np.int32)


GRAD_OPS = {
    'cb_focal': lambda z, y: focal_loss(z, y, gamma=0.5, alpha=CB),
    'ldam': lambda z, y: ldam_loss(z, y, class_counts=COUNTS, class_weights=DRW_W),
    'logit_adjusted': lambda z, y: logit_adjusted_cross_entropy(z, y, log_prior=LOG_PI),
    'posthoc': lambda z, y: posthoc_logit_adjustment(z, log_prior=LOG_PI)[..., 0],
}


def _value_and_grad(op, z, *args):
  f = lambda z, *args: jnp.sum(op(z, *args).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(f))(z, *args)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_grads_finite_for_extreme_logits(dtype):
  z, y = _extreme()
  z = jnp.asarray(z, dtype)
  p = jnp.exp(log_softmax(z.astype(jnp.float32)))
  assert p[0, 0] == 1 and p[1, 1] == 0 and p[4, 0] == 1  # The edge cases are really hit.
  for name, op in GRAD_OPS.items():
    loss, grad = _value_and_grad(lambda z, op=op: op(z, y), z)
    assert np.isfinite(loss) and grad.dtype == dtype, name
    assert np.all(np.isfinite(np.asarray(grad, np.float32))), (name, grad)
  _, ce_grad = _value_and_grad(lambda z: cross_entropy(z, y), z)
  traced = lambda z, g: focal_loss(z, y, gamma=g)
  for gamma in GAMMAS:
    for loss, grad in [_value_and_grad(lambda z, g=gamma: focal_loss(z, y, gamma=g), z),
                       _value_and_grad(traced, z, jnp.float32(gamma))]:
      assert np.isfinite(loss) and grad.dtype == dtype
      assert np.all(np.isfinite(np.asarray(grad, np.float32))), (gamma, grad)
      np.testing.assert_array_equal(grad[1], ce_grad[1])  # p_y == 0: factor 1, no extra term.
      if gamma == 0:
        np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(ce_grad, np.float32),
                                   rtol=1e-6, atol=1e-12)
      else:
        np.testing.assert_array_equal(grad[0], np.zeros(C))  # p_y == 1: flat.


@pytest.mark.parametrize('gamma', GAMMAS)
def test_focal_grad_finite_for_a_masked_label(gamma):
  z, y = _data((3,))
  mask = np.arange(C) != int(y[0])  # Row 0's label is masked: loss +inf, finite gradient.
  loss, grad = jax.value_and_grad(
      lambda z: focal_loss(z, y, gamma=gamma, where=mask)[0])(z)
  assert loss == np.inf and np.all(np.isfinite(grad))
  ce_grad = jax.grad(lambda z: cross_entropy(z, y, where=mask)[0])(z)
  np.testing.assert_allclose(grad, ce_grad, rtol=1e-6, atol=1e-7)  # p_y = 0: factor 1.


def test_check_grads_float64_interior():
  with jax.enable_x64(True):
    z, y = _data((3,), jnp.float64, scale=1.5)
    cos = jnp.tanh(z)
    ops = [lambda z, g=g: focal_loss(z, y, gamma=g, alpha=CB) for g in [0.5, 1.0, 2.0, 5.0]]
    ops += [lambda z: ldam_loss(z, y, class_counts=COUNTS, scale=4.0, class_weights=DRW_W),
            lambda z: logit_adjusted_cross_entropy(z, y, log_prior=LOG_PI, tau=1.3),
            lambda z: posthoc_logit_adjustment(z, log_prior=LOG_PI, tau=0.6)]
    for op in ops:
      assert op(z).dtype == jnp.float64
      check_grads(jax.jit(op), (cos,), order=1, modes=('rev',))


# ----------------------------------------------------------------------------------------------
# Errors.


def test_errors_name_the_argument():
  z, y = _data((4,))
  with pytest.raises(ValueError, match=r'`beta` must be finite and >= 0; got -0.1'):
    class_balanced_weights(COUNTS, -0.1)
  with pytest.raises(ValueError, match=r'`beta` must be in \[0, 1\); got 1.0'):
    class_balanced_weights(COUNTS, 1.0)
  with pytest.raises(ValueError, match=r'`beta` must be in \[0, 1\)'):
    drw_class_weights(0, class_counts=COUNTS, start_step=1, beta=1.0)
  with pytest.raises(ValueError, match=r'`gamma` must be finite and >= 0; got -1'):
    focal_loss(z, y, gamma=-1)
  with pytest.raises(ValueError, match=r'`alpha` must have shape \[num_classes\] = \(6,\); got '
                     r'shape \(5,\)'):
    focal_loss(z, y, alpha=np.ones(5))
  with pytest.raises(ValueError, match=r'`class_counts` must be finite and > 0 .* got 0.0 at '
                     r'class 2'):
    class_balanced_weights([3, 2, 0, 1])
  for bad in ([3, -1], [3, np.inf], [3, np.nan]):
    with pytest.raises(ValueError, match=r'`class_counts` must be finite and > 0'):
      log_prior(bad)
  with pytest.raises(ValueError, match=r'`class_counts` must have logits.shape\[-1\] = 6 '
                     r'entries; got 5'):
    ldam_loss(z, y, class_counts=COUNTS[:5])
  with pytest.raises(ValueError, match=r'`class_counts` must be a non-empty 1-D .* got shape '
                     r'\(2, 3\)'):
    ldam_margins(COUNTS.reshape(2, 3))
  with pytest.raises(ValueError, match=r'`class_counts` must be concrete'):
    jax.jit(lambda n: log_prior(n))(COUNTS)
  with pytest.raises(ValueError, match=r'`tau` must be finite and >= 0; got -1'):
    logit_adjusted_cross_entropy(z, y, log_prior=LOG_PI, tau=-1)
  with pytest.raises(ValueError, match=r'`tau` must be finite and >= 0; got -1'):
    posthoc_logit_adjustment(z, log_prior=LOG_PI, tau=-1)
  with pytest.raises(ValueError, match=r'`log_prior` must have shape \[num_classes\] = \(6,\)'):
    logit_adjusted_cross_entropy(z, y, log_prior=LOG_PI[:4])
  with pytest.raises(ValueError, match=r'`log_prior` must be finite'):
    posthoc_logit_adjustment(z, log_prior=np.full(C, -np.inf))
  with pytest.raises(ValueError, match=r'`scale` must be finite and > 0; got 0'):
    ldam_loss(z, y, class_counts=COUNTS, scale=0)
  with pytest.raises(ValueError, match=r'`max_margin` must be finite and > 0; got 0'):
    ldam_loss(z, y, class_counts=COUNTS, max_margin=0)
  with pytest.raises(ValueError, match=r'`max_margin` must be finite and > 0; got 0'):
    ldam_margins(COUNTS, 0)
  with pytest.raises(ValueError, match=r'`start_step` must be a Python int >= 0; got -1'):
    drw_class_weights(0, class_counts=COUNTS, start_step=-1)
  with pytest.raises(ValueError, match=r'`start_step` must be a Python int >= 0; got 1.5'):
    drw_class_weights(0, class_counts=COUNTS, start_step=1.5)
  with pytest.raises(ValueError, match=r'`labels` must lie in \[0, 6\)'):
    focal_loss(z, jnp.full((4,), 6))
  with pytest.raises(ValueError, match=r'`scale` must be finite and > 0; got inf'):
    ldam_loss(z, y, class_counts=COUNTS, scale=np.inf)
  with pytest.raises(ValueError, match=r'`gamma` must be finite and >= 0; got nan'):
    focal_loss(z, y, gamma=np.nan)
  for bad, got in ((np.nan, 'nan'), (-1.0, '-1.0')):
    with pytest.raises(ValueError, match=r'`alpha` must be (finite|finite and >= 0); got'):
      focal_loss(z, y, alpha=np.where(np.arange(C) == 3, bad, 1.0))
    with pytest.raises(ValueError, match=rf'`class_weights` must be finite and >= 0; got {got} '
                       r'at position \(3,\)'):
      ldam_loss(z, y, class_counts=COUNTS, class_weights=np.where(np.arange(C) == 3, bad, 1.0))
