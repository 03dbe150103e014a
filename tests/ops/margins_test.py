"""Margin logits and softmax alternatives vs float64 NumPy references of the published formulas.

The references below are written from the papers (and insightface's code for ArcFace's fallback
and the combined margin), not from softmax_jax.ops.margins, so a shared mistake cannot hide.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from softmax_jax.ops import arcface_logits
from softmax_jax.ops import combined_margin_logits
from softmax_jax.ops import cosface_logits
from softmax_jax.ops import cosine_logits
from softmax_jax.ops import l2_normalize
from softmax_jax.ops import spherical_softmax
from softmax_jax.ops import sphereface_lambda
from softmax_jax.ops import sphereface_logits
from softmax_jax.ops import sphereface_psi
from softmax_jax.ops import taylor_softmax

C = 6
LEADS = [(), (5,), (3, 4)]
S = 64.0
EPS32 = float(np.finfo(np.float32).eps)

# ----------------------------------------------------------------------------------------------
# Float64 references of the published formulas.


def _f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _with_target(c, labels, target, scale):
  """`s * cos` with the label column replaced by `s * target`; scale is a float or [...]."""
  onehot = np.eye(c.shape[-1], dtype=bool)[np.asarray(labels)]
  s = np.asarray(scale, np.float64)
  s = s[..., None] if s.ndim else s
  return s * np.where(onehot, target, c)


def _ref_cosface(cos, labels, scale, m):  # Wang et al. 2018: s (cos theta_y - m).
  c = _f64(cos)
  return _with_target(c, labels, c - m, scale)


def _ref_arcface(cos, labels, scale, m, easy_margin=False):  # Deng et al. 2019 + insightface.
  c = _f64(cos)
  t = np.cos(np.arccos(c) + m)
  if easy_margin:
    t = np.where(c > 0, t, c)
  else:
    t = np.where(c > np.cos(np.pi - m), t, c - m * np.sin(m))
  return _with_target(c, labels, t, scale)


def _ref_combined(cos, labels, scale, m1, m2, m3):  # insightface: s (cos(m1 theta + m2) - m3).
  c = _f64(cos)
  theta = np.arccos(c)
  # Outside m1 theta + m2 <= pi: the fallback documented in margins.combined_margin_logits.
  c0 = max(m2 * math.sin(m2), 1 + math.cos((math.pi - m2) / m1))
  t = np.where(m1 * theta + m2 <= np.pi, np.cos(m1 * theta + m2) - m3, c - m3 - c0)
  return _with_target(c, labels, t, scale)


def _ref_psi(cos, m):  # Liu et al. 2017: (-1)^k cos(m theta) - 2k on [k pi/m, (k+1) pi/m].
  theta = np.arccos(_f64(cos))
  k = np.minimum(np.floor(m * theta / np.pi), m - 1)  # theta = pi belongs to the last piece.
  return (-1.0) ** k * np.cos(m * theta) - 2 * k


def _ref_sphereface(cos, labels, scale, m, lam):  # Liu et al. 2017, eq. 7 with annealing.
  c = _f64(cos)
  return _with_target(c, labels, (lam * c + _ref_psi(c, m)) / (1 + lam), scale)


def _ref_cosine(x, w, scale=1.0):
  x, w = _f64(x), _f64(w)
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  w = w / np.linalg.norm(w, axis=0, keepdims=True)
  cos = np.einsum('...d,dck->...ck', x, w if w.ndim == 3 else w[..., None]).max(-1)
  s = np.asarray(scale, np.float64)
  return (s[..., None] if s.ndim else s) * cos


def _ref_normalize(f, mask):
  f = np.where(mask, f, 0.0) if mask is not None else f
  return f / f.sum(-1, keepdims=True)


def _ref_spherical(x, eps=0.0, mask=None):  # de Brebisson & Vincent 2016.
  x = _f64(x)
  return _ref_normalize(x * x + eps, mask)


def _ref_taylor(x, n, mask=None):  # f(z) = sum_{i <= n} z^i / i!.
  x = _f64(x)
  return _ref_normalize(sum(x ** i / math.factorial(i) for i in range(n + 1)), mask)


# name: (op(cos, labels, scale), reference(cos, labels, scale), jump location in theta or None).
MARGINS = {
    'cosface': (lambda c, y, s: cosface_logits(c, y, scale=s, margin=0.35),
                lambda c, y, s: _ref_cosface(c, y, s, 0.35), None),
    'arcface': (lambda c, y, s: arcface_logits(c, y, scale=s, margin=0.5),
                lambda c, y, s: _ref_arcface(c, y, s, 0.5), math.pi - 0.5),
    'arcface_m1.2': (lambda c, y, s: arcface_logits(c, y, scale=s, margin=1.2),
                     lambda c, y, s: _ref_arcface(c, y, s, 1.2), math.pi - 1.2),
    'arcface_easy': (lambda c, y, s: arcface_logits(c, y, scale=s, margin=0.5, easy_margin=True),
                     lambda c, y, s: _ref_arcface(c, y, s, 0.5, True), math.pi / 2),
    'combined_1_.3_.2': (
        lambda c, y, s: combined_margin_logits(c, y, scale=s, m1=1.0, m2=0.3, m3=0.2),
        lambda c, y, s: _ref_combined(c, y, s, 1.0, 0.3, 0.2), math.pi - 0.3),
    'combined_1.35_.25_.1': (
        lambda c, y, s: combined_margin_logits(c, y, scale=s, m1=1.35, m2=0.25, m3=0.1),
        lambda c, y, s: _ref_combined(c, y, s, 1.35, 0.25, 0.1), (math.pi - 0.25) / 1.35),
    'combined_2_.3_.2': (
        lambda c, y, s: combined_margin_logits(c, y, scale=s, m1=2.0, m2=0.3, m3=0.2),
        lambda c, y, s: _ref_combined(c, y, s, 2.0, 0.3, 0.2), (math.pi - 0.3) / 2),
    'sphereface_4': (lambda c, y, s: sphereface_logits(c, y, scale=s, margin=4),
                     lambda c, y, s: _ref_sphereface(c, y, s, 4, 0.0), None),
    'sphereface_3_lam5': (lambda c, y, s: sphereface_logits(c, y, scale=s, margin=3, lambda_=5.0),
                          lambda c, y, s: _ref_sphereface(c, y, s, 3, 5.0), None),
}
NAMES = list(MARGINS)


def _cos_data(lead, seed=0, lo=-0.99, hi=0.99, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  cos = jnp.asarray(rng.uniform(lo, hi, size=lead + (C,)), dtype)
  labels = jnp.asarray(rng.integers(0, C, size=lead), jnp.int32)
  return cos, labels


def _grid(n=4001):
  """float32 cos on a dense grid of theta in [0, pi] with exactly 0 and pi (cos = 1 and -1).

  Returns (theta, cos) with theta the float64 angle of the rounded float32 cos.
  """
  cos = np.cos(np.linspace(0.0, np.pi, n)).astype(np.float32)
  cos[0], cos[-1] = 1.0, -1.0
  return np.arccos(cos.astype(np.float64)), cos


def _target_on_grid(op, cos, scale=S):
  """The label-column logit of every grid point: cos [n, 1] with label 0."""
  out = jax.jit(lambda c: op(c[:, None], jnp.zeros(c.shape, jnp.int32), scale))(cos)
  assert out.shape == (cos.size, 1) and out.dtype == jnp.float32
  return np.asarray(out[:, 0])


# ----------------------------------------------------------------------------------------------
# Margin ops.


@pytest.mark.parametrize('lead', LEADS)
@pytest.mark.parametrize('name', NAMES)
def test_margin_ops_match_float64_reference(name, lead):
  op, ref, _ = MARGINS[name]
  cos, labels = _cos_data(lead)
  out = jax.jit(lambda c, y: op(c, y, S))(cos, labels)
  assert out.shape == lead + (C,) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref(cos, labels, S), rtol=1e-5, atol=1e-6 * S)


@pytest.mark.parametrize('name', NAMES)
def test_margin_ops_match_reference_on_dense_theta_grid(name):
  op, ref, jump = MARGINS[name]
  theta, cos = _grid()
  got = _target_on_grid(op, cos)
  want = ref(cos[:, None], np.zeros(cos.size, int), S)[:, 0]
  # At a jump the float32 and float64 sides may disagree on a point within rounding of it.
  keep = np.ones(theta.shape, bool) if jump is None else np.abs(theta - jump) > 1e-4
  np.testing.assert_allclose(got[keep], want[keep], rtol=1e-5, atol=1e-6 * S * 7)


@pytest.mark.parametrize('name', NAMES)
def test_non_target_columns_are_scale_times_cos_bitwise(name):
  op, _, _ = MARGINS[name]
  cos, labels = _cos_data((3, 4), seed=1)
  onehot = np.eye(C, dtype=bool)[np.asarray(labels)]
  scale = np.random.default_rng(2).uniform(1.0, 64.0, size=(3, 4)).astype(np.float32)
  for s, s_col in ((S, np.float32(S)), (scale, scale[..., None])):
    out = np.asarray(jax.jit(lambda c, y, s: op(c, y, s))(cos, labels, s))
    np.testing.assert_array_equal(out[~onehot], (s_col * np.asarray(cos))[~onehot])
    assert np.any(out[onehot] != (s_col * np.asarray(cos))[onehot])  # The label column moved.


def test_cosface_is_exactly_scale_times_cos_minus_margin():
  cos, labels = _cos_data((7, 5), seed=3)
  c = np.asarray(cos)
  onehot = np.eye(C, dtype=bool)[np.asarray(labels)]
  for s, m in ((64.0, 0.35), (30.0, 0.4), (1.7, 1.3)):
    out = np.asarray(jax.jit(lambda c, y: cosface_logits(c, y, scale=s, margin=m))(cos, labels))
    want = np.float32(s) * np.where(onehot, c - np.float32(m), c)  # float32: one sub, one mul.
    assert want.dtype == np.float32
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize('margin', [0.1, 0.5, 1.0, 1.5])
def test_arcface_target_is_non_increasing_and_below_cos(margin):
  theta, cos = _grid(20001)
  t = _target_on_grid(lambda c, y, s: arcface_logits(c, y, scale=s, margin=margin), cos)
  below = np.float32(S) * cos
  assert np.all(t <= below)
  # cos(theta + m) is flat at theta + m = pi; float32 may wobble there by an ulp of the logit.
  assert np.diff(t).max() <= 4 * EPS32 * S, np.diff(t).max()
  # At cos = +-1 the sine is floored at 1e-6, so the ends are exact to 1e-6 * s absolute.
  assert t[0] == pytest.approx(S * math.cos(margin), rel=1e-6, abs=1e-6 * S)  # theta = 0.
  assert t[-1] == pytest.approx(S * (-1 - margin * math.sin(margin)), rel=1e-6)  # theta = pi.
  # Strictly decreasing on a coarse sub-grid (steps far above rounding).
  assert np.all(np.diff(t[::200]) < 0)
  # easy_margin: never above cos, equal to it where cos <= 0, cos(theta + m) where cos > 0.
  e = _target_on_grid(lambda c, y, s: arcface_logits(c, y, scale=s, margin=margin,
                                                     easy_margin=True), cos)
  assert np.all(e <= below)
  np.testing.assert_array_equal(e[cos <= 0], below[cos <= 0])
  np.testing.assert_allclose(e[cos > 0], S * np.cos(theta[cos > 0] + margin), rtol=1e-5,
                             atol=1e-6 * S)


@pytest.mark.parametrize('m1,m2,m3', [(1.0, 0.5, 0.0), (1.35, 0.25, 0.1), (1.35, 0.5, 0.35),
                                      (2.0, 0.0, 0.0), (2.0, 0.3, 0.2), (4.0, 0.0, 0.0)])
def test_combined_target_is_non_increasing_and_below_cos(m1, m2, m3):
  theta, cos = _grid(20001)
  t = _target_on_grid(lambda c, y, s: combined_margin_logits(c, y, scale=s, m1=m1, m2=m2, m3=m3),
                      cos)
  assert np.all(t <= np.float32(S) * cos)
  assert np.diff(t).max() <= 4 * EPS32 * S, np.diff(t).max()
  assert np.all(np.diff(t[::200]) < 0)
  assert t[0] == pytest.approx(S * (math.cos(m2) - m3), rel=1e-6, abs=1e-6 * m1 * S)
  inside = m1 * theta + m2 <= math.pi - 1e-4
  np.testing.assert_allclose(t[inside], S * (np.cos(m1 * theta[inside] + m2) - m3), rtol=1e-5,
                             atol=1e-6 * S)


@pytest.mark.parametrize('m', [1, 2, 3, 4, 5])
def test_sphereface_psi_is_monotone_from_1_to_1_minus_2m(m):
  theta, cos = _grid(20001)
  psi = np.asarray(jax.jit(lambda c: sphereface_psi(c, margin=m))(cos))
  assert psi.dtype == np.float32
  assert psi[0] == 1.0 and psi[-1] == 1 - 2 * m
  assert np.diff(psi).max() <= 4 * EPS32 * 2 * m, np.diff(psi).max()  # Flat at k pi / m.
  assert np.all(np.diff(psi[::100]) < 0)
  np.testing.assert_allclose(psi, _ref_psi(cos, m), rtol=1e-5, atol=1e-5)
  # Continuous at the piece boundaries theta = k pi / m, where psi = 1 - 2k.
  k = np.arange(m + 1)
  at_k = np.cos(k * np.pi / m).astype(np.float32)
  np.testing.assert_allclose(jax.jit(lambda c: sphereface_psi(c, margin=m))(at_k), 1 - 2 * k,
                             atol=1e-5)


def test_sphereface_lambda_matches_the_schedule():
  steps = np.asarray([0, 1, 10, 100, 1000, 10 ** 6], np.float64)
  ref = lambda st, b, g, p, lo: np.maximum(lo, b * (1 + g * st) ** -p)
  got = np.asarray([sphereface_lambda(int(st)) for st in steps])
  np.testing.assert_allclose(got, ref(steps, 1000.0, 0.12, 1.0, 5.0), rtol=1e-6)
  assert got[0] == 1000.0 and got[-1] == 5.0
  traced = jax.jit(jax.vmap(lambda st: sphereface_lambda(st, base=10.0, gamma=0.5, power=2.0,
                                                          lambda_min=0.1)))(steps.astype(np.int32))
  assert traced.dtype == jnp.float32
  np.testing.assert_allclose(traced, ref(steps, 10.0, 0.5, 2.0, 0.1), rtol=1e-6)
  # A traced lambda_ in sphereface_logits gives the static result.
  cos, labels = _cos_data((5,), seed=4)
  f = jax.jit(lambda c, y, step: sphereface_logits(c, y, scale=S, margin=4,
                                                   lambda_=sphereface_lambda(step)))
  np.testing.assert_allclose(f(cos, labels, 30), _ref_sphereface(cos, labels, S, 4,
                                                                 ref(30.0, 1000.0, 0.12, 1.0, 5.0)),
                             rtol=1e-5, atol=1e-6 * S)


def test_traced_margins_and_scale_equal_static():
  cos, labels = _cos_data((5,), seed=5)
  cases = [
      (lambda c, y, m, s: arcface_logits(c, y, scale=s, margin=m), (0.5, S)),
      (lambda c, y, m, s: cosface_logits(c, y, scale=s, margin=m), (0.35, S)),
      (lambda c, y, m, s: combined_margin_logits(c, y, scale=s, m1=m, m2=0.2, m3=0.1), (1.35, S)),
  ]
  for f, (m, s) in cases:
    np.testing.assert_allclose(jax.jit(f)(cos, labels, m, s), f(cos, labels, m, s), rtol=1e-6,
                               atol=1e-6 * S)


def test_combined_reduces_to_arcface_and_cosface():
  cos, labels = _cos_data((64,), seed=6, lo=-0.95, hi=0.95)
  # Half the label columns in ArcFace's fallback region cos < -cos(0.5) = -0.878.
  fallback = np.random.default_rng(7).uniform(-0.97, -0.9, size=32)
  cos = cos.at[np.arange(32), labels[:32]].set(fallback)
  pairs = [
      (lambda c: combined_margin_logits(c, labels, scale=S, m1=1.0, m2=0.5, m3=0.0),
       lambda c: arcface_logits(c, labels, scale=S, margin=0.5)),
      (lambda c: combined_margin_logits(c, labels, scale=S, m1=1.0, m2=0.0, m3=0.35),
       lambda c: cosface_logits(c, labels, scale=S, margin=0.35)),
  ]
  for combined, single in pairs:
    np.testing.assert_allclose(jax.jit(combined)(cos), jax.jit(single)(cos), rtol=1e-6,
                               atol=2e-6 * S)
    g_c = jax.jit(jax.grad(lambda c: combined(c).sum()))(cos)
    g_s = jax.jit(jax.grad(lambda c: single(c).sum()))(cos)
    np.testing.assert_allclose(g_c, g_s, rtol=1e-5, atol=1e-5 * S)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', NAMES)
def test_margin_grads_finite_at_plus_minus_one_and_zero(name, dtype):
  op, _, _ = MARGINS[name]
  edge = [1.0, -1.0, 0.0, -math.cos(0.5), -math.cos(1.2), 0.5]
  idx = np.add.outer(np.arange(C), np.arange(C)) % C
  cos = jnp.asarray(np.asarray(edge)[idx], dtype)  # Row i: edge[i] in the label column 0, and
  labels = jnp.zeros(C, jnp.int32)  # every edge value in some non-label column.
  out, g = jax.jit(jax.value_and_grad(lambda c: op(c, labels, S).sum()))(cos)
  assert np.isfinite(out) and g.dtype == dtype and g.shape == cos.shape
  assert np.all(np.isfinite(np.asarray(g, np.float32))), g
  np.testing.assert_array_equal(np.asarray(g, np.float32)[:, 1:], S)


@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_input_gives_float32_logits_of_the_upcast_values(name):
  op, _, _ = MARGINS[name]
  cos, labels = _cos_data((4, 5), seed=7, dtype=jnp.bfloat16)
  out16 = jax.jit(lambda c, y: op(c, y, S))(cos, labels)
  out32 = jax.jit(lambda c, y: op(c, y, S))(cos.astype(jnp.float32), labels)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, rtol=1e-6, atol=1e-6 * S)


@pytest.mark.parametrize('lead', LEADS)
@pytest.mark.parametrize('name', NAMES)
def test_per_example_scale_equals_per_row_computation(name, lead):
  op, ref, _ = MARGINS[name]
  cos, labels = _cos_data(lead, seed=8)
  scale = np.random.default_rng(9).uniform(1.0, 64.0, size=lead).astype(np.float32)
  out = jax.jit(lambda c, y, s: op(c, y, s))(cos, labels, scale)
  assert out.shape == lead + (C,)
  rows_c, rows_y, rows_s = (np.asarray(a).reshape((-1,) + a.shape[len(lead):])
                            for a in (cos, labels, scale))
  row_op = jax.jit(lambda c, y, s: op(c, y, s))  # c: [C], y: [], s: [] (a scalar scale).
  per_row = np.stack([row_op(c, y, s) for c, y, s in zip(rows_c, rows_y, rows_s)])
  np.testing.assert_allclose(np.asarray(out).reshape(-1, C), per_row, rtol=1e-6, atol=1e-6 * S)
  np.testing.assert_allclose(out, ref(cos, labels, scale), rtol=1e-5, atol=1e-6 * S)


def test_check_grads_float64_interior():
  with jax.enable_x64(True):
    rng = np.random.default_rng(10)
    # Away from +-1 and from every jump: theta + 0.5 < pi - 0.1, 1.35 theta + 0.25 < pi - 0.1.
    cos = jnp.asarray(rng.uniform(-0.6, 0.95, size=(4, C)), jnp.float64)
    labels = jnp.asarray([0, 2, 5, 3])
    fallback = jnp.asarray(rng.uniform(-0.99, -0.95, size=(4, C)), jnp.float64)
    cases = [
        lambda c: cosface_logits(c, labels, scale=8.0, margin=0.35),
        lambda c: arcface_logits(c, labels, scale=8.0, margin=0.5),
        lambda c: combined_margin_logits(c, labels, scale=8.0, m1=1.35, m2=0.25, m3=0.1),
        lambda c: combined_margin_logits(c, labels, scale=8.0, m1=2.0, m2=0.0, m3=0.0),
        lambda c: sphereface_logits(c, labels, scale=2.0, margin=4, lambda_=1.0),
        lambda c: sphereface_logits(c, labels, scale=2.0, margin=3),
    ]
    for f in cases:
      assert f(cos).dtype == jnp.float64
      check_grads(jax.jit(f), (cos,), order=1, modes=('rev',))
    for f in cases[1:3]:  # The fallback branch (cos(theta) - const) too.
      check_grads(jax.jit(f), (fallback,), order=1, modes=('rev',))
    x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float64)
    for w in (rng.normal(size=(5, C)), rng.normal(size=(5, C, 3))):
      w = jnp.asarray(w, jnp.float64)
      check_grads(jax.jit(lambda x, w: cosine_logits(x, w, scale=3.0)), (x, w), order=1,
                  modes=('rev',))
    mask = np.ones((3, 5), bool)
    mask[1, 2] = False
    for f in (lambda x: spherical_softmax(x), lambda x: spherical_softmax(x, eps=0.1, where=mask),
              lambda x: taylor_softmax(x), lambda x: taylor_softmax(x, order=4, where=mask)):
      assert f(x).dtype == jnp.float64
      check_grads(jax.jit(f), (x,), order=1, modes=('rev',))


# ----------------------------------------------------------------------------------------------
# Cosine logits.


@pytest.mark.parametrize('lead', LEADS)
@pytest.mark.parametrize('wshape', [(8, C), (8, C, 3)])
def test_cosine_logits_match_reference(lead, wshape):
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=lead + (8,)) * 5, jnp.float32)
  w = jnp.asarray(rng.normal(size=wshape), jnp.float32)
  scale = rng.uniform(1.0, 30.0, size=lead).astype(np.float32)
  out, scaled, fixed = jax.jit(lambda x, w, s: (
      cosine_logits(x, w), cosine_logits(x, w, scale=s), cosine_logits(x, w, scale=S)))(x, w, scale)
  assert out.shape == lead + (C,) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _ref_cosine(x, w), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scaled, _ref_cosine(x, w, scale), rtol=1e-5, atol=1e-6 * 30)
  np.testing.assert_allclose(fixed, _ref_cosine(x, w, S), rtol=1e-5, atol=1e-6 * S)


def test_sub_center_is_max_over_sub_centers_and_k1_is_plain():
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, C, 3)), jnp.float32)
  sub = jax.jit(cosine_logits)(x, w)
  per = np.stack([np.asarray(cosine_logits(x, w[:, :, j])) for j in range(3)], -1)
  np.testing.assert_allclose(sub, per.max(-1), rtol=1e-6, atol=1e-6)
  assert len(np.unique(per.argmax(-1))) > 1  # Different sub-centers win: the max is exercised.
  np.testing.assert_allclose(cosine_logits(x, w[:, :, :1]), cosine_logits(x, w[:, :, 0]),
                             rtol=1e-6, atol=1e-6)


def test_cosine_logits_zero_features_give_zero_cos_and_finite_grads():
  rng = np.random.default_rng(13)
  x = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32).at[1].set(0.0)
  for w in (rng.normal(size=(8, C)), rng.normal(size=(8, C, 2))):
    w = jnp.asarray(w, jnp.float32).at[:, 2].set(0.0)  # A zero class weight as well.
    out = cosine_logits(x, w, scale=S)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(out[:, 2], 0.0)
    gx, gw = jax.jit(jax.grad(lambda x, w: cosine_logits(x, w, scale=S).sum(), (0, 1)))(x, w)
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))
    g16 = jax.jit(jax.grad(lambda x: cosine_logits(x, w.astype(jnp.bfloat16)).sum()))(
        x.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g16, np.float32)))


def test_l2_normalize_zero_vector_has_zero_gradient_as_documented():
  # Docstring: "zero vectors stay zero with finite (zero) gradient".
  x = jnp.zeros((2, 4), jnp.float32)
  c = jnp.asarray(np.random.default_rng(14).normal(size=(2, 4)), jnp.float32)
  np.testing.assert_array_equal(l2_normalize(x), 0.0)
  g = jax.grad(lambda x: (l2_normalize(x) * c).sum())(x)
  np.testing.assert_array_equal(g, 0.0)


# ----------------------------------------------------------------------------------------------
# Spherical and Taylor softmax.

ALT = {
    'spherical': (lambda x, w: spherical_softmax(x, where=w), lambda x, m: _ref_spherical(x, 0, m)),
    'spherical_eps': (lambda x, w: spherical_softmax(x, eps=0.3, where=w),
                      lambda x, m: _ref_spherical(x, 0.3, m)),
    'taylor2': (lambda x, w: taylor_softmax(x, where=w), lambda x, m: _ref_taylor(x, 2, m)),
    'taylor4': (lambda x, w: taylor_softmax(x, order=4, where=w),
                lambda x, m: _ref_taylor(x, 4, m)),
}


@pytest.mark.parametrize('lead', LEADS)
@pytest.mark.parametrize('name', list(ALT))
def test_softmax_alternatives_match_reference_and_mask_equals_slice(name, lead):
  op, ref = ALT[name]
  rng = np.random.default_rng(15)
  x = jnp.asarray(rng.normal(size=lead + (C,)) * 2, jnp.float32)
  mask = np.arange(C) < C - 2  # [C], broadcast; the slice is the first C - 2 columns.
  full_mask = rng.random(lead + (C,)) < 0.6
  full_mask[..., 0] = True
  p, pm, pf, sliced = jax.jit(lambda x, fm: (op(x, None), op(x, mask), op(x, fm),
                                             op(x[..., :C - 2], None)))(x, full_mask)
  assert p.shape == x.shape and p.dtype == jnp.float32
  np.testing.assert_allclose(p, ref(x, None), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.sum(p, -1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(pm[..., C - 2:], 0.0)
  np.testing.assert_allclose(pm[..., :C - 2], sliced, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(pm, ref(x, mask), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(pf)[~full_mask], 0.0)
  np.testing.assert_allclose(pf, ref(x, full_mask), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.sum(pf, -1), 1.0, rtol=1e-6)
  # bfloat16 in, bfloat16 out, computed in float32 from the same (rounded) values.
  x16 = x.astype(jnp.bfloat16)
  p16 = jax.jit(lambda x: op(x, None))(x16)
  assert p16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(p16, np.float32), ref(x16, None), rtol=8e-3, atol=1e-4)


def test_taylor_positive_for_very_negative_inputs():
  x = jnp.asarray([[-1e3, -50.0, -3.0, 0.0, 2.0], [-1e4, -1e4, -1e4, -1e4, -1e4],
                   [-7.0, -1.0, -1.0, -1.0, -200.0]], jnp.float32)
  p2 = jax.jit(taylor_softmax)(x)
  assert np.all(p2 > 0)
  np.testing.assert_allclose(p2, _ref_taylor(x, 2), rtol=1e-5)
  np.testing.assert_allclose(p2[1], 0.2, rtol=1e-6)
  p4 = jax.jit(lambda x: taylor_softmax(x, order=4))(x[:, 1:])
  assert np.all(p4 > 0)
  np.testing.assert_allclose(p4, _ref_taylor(x[:, 1:], 4), rtol=1e-5)
  # Order 2's f(z) = 1 + z + z^2 / 2 has its minimum 1/2 at z = -1.
  f_min = np.asarray(taylor_softmax(jnp.asarray([-1.0, 0.0])))
  np.testing.assert_allclose(f_min, [0.5 / 1.5, 1 / 1.5], rtol=1e-6)


def test_spherical_zero_row_is_uniform_with_finite_grads():
  x = jnp.asarray([[0.0] * 5, [1.0, -2.0, 0.0, 0.5, 3.0], [0.0] * 5], jnp.float32)
  mask = np.asarray([[True] * 5, [True] * 5, [True, False, True, False, False]])
  p = spherical_softmax(x, where=mask)
  np.testing.assert_allclose(p[0], 0.2, rtol=1e-6)
  np.testing.assert_allclose(p[2], [0.5, 0, 0.5, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(spherical_softmax(x)[2], 0.2, rtol=1e-6)
  c = jnp.asarray(np.random.default_rng(16).normal(size=(3, 5)), jnp.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    for where in (None, mask):
      g = jax.jit(jax.grad(lambda x: (spherical_softmax(x, where=where).astype(jnp.float32)
                                      * c).sum()))(x.astype(dtype))
      assert g.dtype == dtype and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_integer_input_gives_float_probabilities():
  # As softmax(x) does for integer x; the maths runs in float32 anyway.
  x = jnp.asarray([[1, 2, 3], [0, -1, 4]], jnp.int32)
  for f, ref in ((spherical_softmax, _ref_spherical(x)), (taylor_softmax, _ref_taylor(x, 2))):
    p = f(x)
    assert jnp.issubdtype(p.dtype, jnp.floating), (f.__name__, p.dtype)
    np.testing.assert_allclose(p, ref, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Errors.

_COS = jnp.zeros((2, 3))
_Y = jnp.asarray([0, 2])


@pytest.mark.parametrize('call,match', [
    (lambda: arcface_logits(_COS, _Y, margin=math.pi / 2),
     r'`margin` must be in \[0\.0, 1\.57.*\)'),
    (lambda: arcface_logits(_COS, _Y, margin=-0.1), r'`margin` must be in .*got -0\.1'),
    (lambda: cosface_logits(_COS, _Y, margin=-0.1), r'`margin` must be in \[0\.0, 2\.0\).*-0\.1'),
    (lambda: cosface_logits(_COS, _Y, margin=2.0), r'`margin` must be in \[0\.0, 2\.0\).*got 2\.0'),
    (lambda: sphereface_logits(_COS, _Y, margin=1.5), r'`margin` of SphereFace must be an integer'),
    (lambda: sphereface_logits(_COS, _Y, margin=0), r'`margin` of SphereFace.*got 0'),
    (lambda: sphereface_logits(_COS, _Y, margin=True), r'`margin` of SphereFace.*got True'),
    (lambda: sphereface_psi(_COS, margin=2.5), r'`margin` of SphereFace.*got 2\.5'),
    (lambda: sphereface_logits(_COS, _Y, lambda_=-1.0), r'`lambda_` must be >= 0; got -1\.0'),
    (lambda: cosface_logits(_COS, _Y, scale=0.0), r'`scale` must be finite and > 0; got 0\.0'),
    (lambda: arcface_logits(_COS, _Y, scale=-1), r'`scale` must be finite and > 0; got -1'),
    (lambda: combined_margin_logits(_COS, _Y, scale=np.asarray([2.0, 0.0])),
     r'`scale` must be finite and > 0; got 0\.0 \(1 bad entries\)'),
    (lambda: sphereface_logits(_COS, _Y, scale=np.asarray([1.0, -3.0])), r'`scale` must be'),
    (lambda: cosine_logits(jnp.zeros((2, 4)), jnp.zeros((4, 3)), scale=0), r'`scale` must be'),
    (lambda: arcface_logits(_COS, _Y, scale=np.inf), r'`scale` must be finite and > 0; got inf'),
    (lambda: cosface_logits(_COS, _Y, scale=np.nan), r'`scale` must be finite and > 0; got nan'),
    (lambda: combined_margin_logits(_COS, _Y, scale=np.asarray([2.0, np.inf])),
     r'`scale` must be finite and > 0; got inf'),
    (lambda: cosine_logits(jnp.zeros((2, 4)), jnp.zeros((4, 3)), scale=np.inf), r'got inf'),
    (lambda: sphereface_lambda(3, lambda_min=-1.0), r'`lambda_min` must be in \[0\.0, inf\)'),
    (lambda: sphereface_lambda(3, base=np.nan), r'`base` must be in \[0\.0, inf\).*got nan'),
    (lambda: sphereface_lambda(3, gamma=-0.1), r'`gamma` must be in'),
    (lambda: sphereface_lambda(3, power=np.inf), r'`power` must be in .*got inf'),
    (lambda: spherical_softmax(jnp.float32(1.0)),
     r'`x` must have shape \[\.\.\., num_classes\] with num_classes >= 1; got shape \(\)'),
    (lambda: taylor_softmax(2.0, where=True), r'`x` must have shape .*got shape \(\)'),
    (lambda: l2_normalize(jnp.float32(2.0)),
     r'`x` must have shape \[\.\.\., d\] \(rank >= 1\); got shape \(\)'),
    (lambda: combined_margin_logits(_COS, _Y, m1=0.9), r'`m1` must be in \[1\.0, inf\).*got 0\.9'),
    (lambda: combined_margin_logits(_COS, _Y, m2=2.0), r'`m2` must be in \[0\.0, 1\.57'),
    (lambda: combined_margin_logits(_COS, _Y, m3=-0.1), r'`m3` must be in \[0\.0, 2\.0\)'),
    (lambda: cosface_logits(_COS, jnp.asarray([0, 3])), r'`labels` must lie in \[0, 3\); got 3'),
    (lambda: arcface_logits(_COS, np.asarray([-1, 0])), r'`labels` must lie in \[0, 3\); got -1'),
    (lambda: sphereface_logits(_COS, jnp.zeros(3, jnp.int32)),
     r'`labels` must have shape cos\.shape\[:-1\] = \(2,\); got shape \(3,\)'),
    (lambda: combined_margin_logits(_COS, jnp.zeros((2, 1), jnp.int32)),
     r'`labels` must have shape .*got shape \(2, 1\)'),
    (lambda: arcface_logits(_COS, jnp.zeros(2)), r'`labels` must be integer'),
    (lambda: cosface_logits(jnp.float32(0.5), jnp.int32(0)), r'`cos` must have shape'),
    (lambda: cosine_logits(jnp.zeros((2, 4)), jnp.zeros((4,))),
     r'`weights` must be \[d, C\] or \[d, C, k\].*got shape \(4,\)'),
    (lambda: cosine_logits(jnp.zeros((2, 4)), jnp.zeros((4, 3, 2, 1))),
     r'`weights` must be .*got shape \(4, 3, 2, 1\)'),
    (lambda: cosine_logits(jnp.zeros((2, 4)), jnp.zeros((5, 3))),
     r'`weights` must be .*d = features\.shape\[-1\] = 4; got shape \(5, 3\)'),
    (lambda: cosine_logits(jnp.float32(1.0), jnp.zeros((1, 3))),
     r'`features` must have shape \[\.\.\., d\] \(rank >= 1\); got shape \(\)'),
    (lambda: taylor_softmax(jnp.zeros(3), order=3), r'`order` must be an even integer >= 2.*got 3'),
    (lambda: taylor_softmax(jnp.zeros(3), order=0), r'`order` must be an even integer'),
    (lambda: spherical_softmax(jnp.zeros(3), eps=-1e-3), r'`eps` must be >= 0; got -0\.001'),
    (lambda: spherical_softmax(jnp.zeros((2, 3)), where=np.ones((3, 3), bool)), r'`where` must'),
    (lambda: l2_normalize(jnp.zeros((2, 3)), axis=2),
     r'`axis` must be an int in \[-2, 2\) for `x` of shape \(2, 3\); got 2'),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_scale_array_must_have_one_value_per_example():
  cos = jnp.zeros((4, 4))  # B == C: a [C] scale must not silently scale rows
  labels = jnp.zeros((4,), jnp.int32)
  for op in (arcface_logits, cosface_logits, combined_margin_logits, sphereface_logits):
    with pytest.raises(ValueError, match=r'`scale` must be a scalar or one value per example'):
      op(cos, labels, scale=jnp.ones((1, 4)))
  assert cosface_logits(cos, labels, scale=jnp.ones((4,))).shape == (4, 4)
