"""kd_loss: T^2 KL(softmax(t/T) || softmax(s/T)), the distillation loss of Hinton et al. 2015.

Against a float64 reference built on scipy's `rel_entr` (independent of the op's log-space code),
the gradient identity `d loss / d s = T (softmax(s/T) - softmax(t/T))` and the Hessian identity
`d^2 loss / ds^2 = diag(q) - q q^T`, `check_grads` in float64,
the limits T -> inf (logit matching) and T -> 0, zero-probability teachers and `-inf` logits
(finite value and gradient), masks == dropping classes, bfloat16, the NaN rule, chex variants,
vmap over per-example temperatures and the argument errors. Few compilations: one jitted
function per test, several checks per call.
"""

import chex
import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from softmax_jax.ops.distill import kd_loss

N, K = 4, 6
TS = np.array([0.5, 1.0, 4.0, 10.0], np.float32)  # one temperature per example
MASK = np.array([True, False, True, True, False, True])
# float32 loss vs the float64 reference: KL = sum p (log p - log q) is a difference of O(log K)
# terms, so its absolute error is ~eps * log K; at T = 10 (KL ~ 1e-3, times T^2) that is ~1e-4
# relative. Gradients (T (q - p)) have no such cancellation and keep 1e-5.
RTOL = 2e-4


def _data(seed=0, lead=(N,), dtype=np.float32):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(*lead, K)) * 2).astype(dtype) for _ in range(2)]


def _f64(x):
  return np.asarray(x, np.float64)


def _softmax(x, temperature, mask=None):
  """float64 softmax(x / T) over the classes `mask` keeps; -inf entries (and masked) are 0."""
  x, temp = _f64(x), _f64(temperature)[..., None]
  keep = np.isfinite(x) if mask is None else np.isfinite(x) & mask
  z = np.where(keep, np.where(keep, x, 0) / temp, -np.inf)
  z = np.where(keep.any(-1, keepdims=True), z, 0)  # a fully masked row: all zeros
  return np.where(keep, special.softmax(z, axis=-1), 0)


def _ref(s, t, temperature, mask=None):
  """T^2 sum_k rel_entr(p_k, q_k) (rel_entr(0, q) = 0, rel_entr(p > 0, 0) = inf), float64."""
  p, q = _softmax(t, temperature, mask), _softmax(s, temperature, mask)
  return _f64(temperature) ** 2 * special.rel_entr(p, q).sum(-1)


def _grad_ref(s, t, temperature, mask=None):
  """The identity d/ds sum(loss) = T (q - p)."""
  return _f64(temperature)[..., None] * (_softmax(s, temperature, mask) - _softmax(t, temperature,
                                                                                 mask))


def _value_and_grads(where=None):
  """jit of (loss, d sum(loss) / d(student, teacher, temperature))."""
  f = lambda s, t, temp: kd_loss(s, t, temperature=temp, where=where)
  return jax.jit(lambda s, t, temp: (f(s, t, temp), jax.grad(lambda *a: f(*a).sum(), (0, 1, 2))(
      s, t, temp)))


def test_matches_float64_reference():
  """T = 1, 4, 10 (Python floats), leading dims (2, 3), with and without a class mask; >= 0."""
  s, t = _data(lead=(2, 3))
  for temp in (1.0, 4.0, 10.0):
    for where in (None, MASK):
      got = kd_loss(s, t, temperature=temp, where=where)
      assert got.shape == (2, 3) and got.dtype == jnp.float32
      np.testing.assert_allclose(got, _ref(s, t, temp, where), rtol=RTOL, atol=1e-6)
      assert np.all(np.asarray(got) > 0)
  assert np.all(np.asarray(kd_loss(s, s, temperature=4.0)) == 0)  # KL(p || p) = 0


def test_gradient_identity_and_stop_gradient():
  """grad_s = T (q - p) at T = 0.5, 1, 4, 10 (one per example); no gradient into the teacher;
  student == teacher: loss 0 and gradient 0."""
  s, t = _data(1)
  run = _value_and_grads()
  loss, (gs, gt, _) = run(s, t, TS)
  np.testing.assert_allclose(loss, _ref(s, t, TS), rtol=RTOL)
  np.testing.assert_allclose(gs, _grad_ref(s, t, TS), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(gt) == 0)
  loss, (gs, _, gtemp) = run(s, s, TS)  # the gradient up to rounding (sum p is not exactly 1)
  assert np.all(np.asarray(loss) == 0)
  np.testing.assert_allclose(gs, 0, atol=1e-6)
  np.testing.assert_allclose(gtemp, 0, atol=1e-6)


def test_check_grads_and_hessian_float64():
  """check_grads (order 1, reverse) in the student logits and per-example temperatures, with a
  class mask and a -inf teacher logit (a zero-probability class); second order (forward over
  reverse) against the identity d^2 loss / ds^2 = diag(q) - q q^T (T^2 cancels both 1/T)."""
  with jax.enable_x64(True):
    s, t = _data(2, dtype=np.float64)
    t[1, 0] = -np.inf
    temps = TS.astype(np.float64)
    f = jax.jit(lambda s, temp: kd_loss(s, t, temperature=temp, where=MASK))
    check_grads(f, (s, temps), order=1, modes=['rev'])
    row = lambda s, t, temp: kd_loss(s, t, temperature=temp, where=MASK)
    hess = jax.jit(jax.vmap(jax.hessian(row)))(s, t, temps)
    q = _softmax(s, temps, MASK)
    want = jax.vmap(jnp.diag)(q) - q[:, :, None] * q[:, None, :]
    np.testing.assert_allclose(hess, want, rtol=1e-10, atol=1e-12)


def test_zero_probability_teacher_and_minus_inf_logits():
  """Finite value and gradient where the teacher gives a class probability 0 (a -inf logit, or a
  logit so low its probability underflows), equal to the reference (those classes contribute
  0); -inf in both == dropping the class; a student -inf where the teacher has mass: +inf (the
  true KL) with a finite student gradient."""
  s, t = _data(3)
  t[0, 2] = -np.inf
  t[1, [0, 4]] = -np.inf
  t[2, 1] = -1e30  # exp underflows: p = 0 with a finite log p
  run = _value_and_grads()
  loss, (gs, _, gtemp) = run(s, t, TS)
  chex.assert_tree_all_finite((loss, gs, gtemp))
  np.testing.assert_allclose(loss, _ref(s, t, TS), rtol=RTOL)
  np.testing.assert_allclose(gs, _grad_ref(s, t, TS), rtol=1e-5, atol=1e-6)

  s2 = s.copy()
  s2[0, 2] = -np.inf  # also -inf in the student: the class is gone from both
  s2[3, 3] = -np.inf  # the teacher has mass there: +inf
  loss, (gs, _, _) = run(s2, t, TS)
  assert np.isposinf(loss[3]) and np.all(np.isfinite(np.asarray(loss[:3])))
  chex.assert_tree_all_finite(gs)
  keep = np.arange(K) != 2
  np.testing.assert_allclose(loss[0], kd_loss(s[0, keep], t[0, keep], temperature=TS[0]),
                             rtol=1e-6)
  np.testing.assert_allclose(loss[:3], _ref(s2, t, TS)[:3], rtol=RTOL)
  assert gs[0, 2] == 0


def test_mask_equals_dropping_classes():
  """A mask == slicing the kept classes (a [K] mask) and == -inf in both logits (a per-row
  mask); value and gradient against the reference, masked gradient exactly 0; a NaN in a masked
  class is not read; a fully masked row gives loss 0 and gradient 0."""
  s, t = _data(4)
  row_mask = np.random.default_rng(5).random((N, K)) < 0.7
  row_mask[3] = False  # fully masked
  f = lambda s, t, temp, where: kd_loss(s, t, temperature=temp, where=where)
  run = jax.jit(lambda *a: (f(*a), jax.grad(lambda s: f(s, *a[1:]).sum())(a[0])))
  for where in (np.broadcast_to(MASK, s.shape), row_mask):
    sn = np.where(where, s, np.nan)
    loss, gs = run(sn, t, TS, where)
    np.testing.assert_allclose(loss, _ref(s, t, TS, where), rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(gs, _grad_ref(s, t, TS, where), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(gs)[~where] == 0)
    if where is row_mask:
      assert loss[3] == 0
      minus_inf = lambda x: np.where(row_mask, x, -np.inf)
      np.testing.assert_allclose(loss, kd_loss(minus_inf(s), minus_inf(t), temperature=TS),
                                 rtol=1e-6)
    else:
      np.testing.assert_allclose(loss, kd_loss(s[:, MASK], t[:, MASK], temperature=TS),
                                 rtol=1e-6)


def test_nan_rule_and_traced_temperature():
  """A NaN student logit, teacher logit or temperature makes that example NaN and leaves the
  others' losses and gradients unchanged (also when the teacher row has no mass); a traced
  temperature <= 0 or inf gives NaN."""
  s, t = _data(6)
  run = _value_and_grads()
  clean, (gs_clean, _, _) = run(s, t, TS)
  sn, tn, temp = s.copy(), t.copy(), TS.copy()
  sn[1, 0], tn[2, 3], temp[3] = np.nan, np.nan, np.nan
  loss, (gs, _, _) = run(sn, tn, temp)
  assert np.all(np.isnan(np.asarray(loss[1:]))) and np.isnan(np.asarray(gs[1])).any()
  np.testing.assert_allclose(loss[0], clean[0], rtol=1e-6)
  np.testing.assert_allclose(gs[0], gs_clean[0], rtol=1e-6)
  t_none, sn = t.copy(), s.copy()
  t_none[:2] = -np.inf  # no teacher mass at all: 0, unless the student row is NaN
  sn[1, 3] = np.nan
  loss, (gs, _, _) = run(sn, t_none, TS)
  assert loss[0] == 0 and np.all(np.asarray(gs[0]) == 0) and np.isnan(loss[1])
  loss, _ = run(s, t, np.array([1.0, 0.0, -1.0, np.inf], np.float32))
  assert np.isfinite(loss[0]) and np.all(np.isnan(np.asarray(loss[1:])))
  loss = kd_loss(s, t, temperature=temp)  # eager: a NaN entry of an array is data, not an error
  assert np.isnan(loss[3]) and np.all(np.isfinite(np.asarray(loss[:3])))
  assert np.isnan(kd_loss(s, t, temperature=temp, where=np.zeros(K, bool))[3])  # fully masked


def test_bfloat16_inputs_give_float32():
  s, t = (jnp.asarray(a * 30, jnp.bfloat16) for a in _data(7))  # |logits| ~ 100
  loss, (gs, _, _) = _value_and_grads()(s, t, TS)
  assert loss.dtype == jnp.float32 and gs.dtype == jnp.bfloat16
  chex.assert_tree_all_finite((loss, gs))
  want = kd_loss(s.astype(jnp.float32), t.astype(jnp.float32), temperature=TS)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(loss, _ref(s.astype(np.float32), t.astype(np.float32), TS),
                             rtol=1e-4)


def test_temperature_limits():
  """T -> inf: T^2 KL -> ||(s - mean s) - (t - mean t)||^2 / (2K) (Hinton et al. sec. 2.1), not
  so at T = 1. T -> 0 with distinct maxima a = argmax t, b = argmax s: q_a -> exp(-(s_b - s_a)/T)
  and p -> onehot(a) up to exp(-gap/T), so loss = T (s_b - s_a) + O(T^2 exp(-gap/T)): ~0 when
  a = b, and loss / T -> s_b - s_a otherwise."""
  with jax.enable_x64(True):
    s, t = _data(8, dtype=np.float64)
    d = (s - s.mean(-1, keepdims=True)) - (t - t.mean(-1, keepdims=True))
    match = (d ** 2).sum(-1) / (2 * K)
    np.testing.assert_allclose(kd_loss(s, t, temperature=1e3), match, rtol=1e-2)
    assert np.all(np.abs(np.asarray(kd_loss(s, t, temperature=1.0)) / match - 1) > 0.1)
  rng = np.random.default_rng(9)
  s = np.stack([rng.permutation(K) * 0.7 for _ in range(N)]).astype(np.float32)  # gaps >= 0.5
  t = np.stack([rng.permutation(K) * 0.9 for _ in range(N)]).astype(np.float32)
  t[:2] = s[:2] * 1.3  # rows 0, 1: the same argmax (and order)
  a, b = t.argmax(-1), s.argmax(-1)
  assert np.all(a[:2] == b[:2]) and np.all(a[2:] != b[2:])
  temp = 1e-2
  loss = np.asarray(kd_loss(s, t, temperature=temp))
  assert np.all(loss[:2] < 1e-12)
  np.testing.assert_allclose(loss[2:] / temp, (s.max(-1) - s[np.arange(N), a])[2:], rtol=1e-5)


def _variant_case():
  s, t = _data(10)
  f = lambda s, t, temp: kd_loss(s, t, temperature=temp, where=MASK)
  return f, (s, t, TS), _ref(s, t, TS, MASK)


class VariantsTest(chex.TestCase):
  """kd_loss under jit, without jit and on a device; vmapped over examples and temperatures."""

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  def test_variants_match_reference(self):
    f, args, want = _variant_case()
    np.testing.assert_allclose(self.variant(f)(*args), want, rtol=RTOL, atol=1e-6)

  def test_vmap_per_example_temperature(self):
    f, (s, t, temps), _ = _variant_case()
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(s, t, temps), f(s, t, temps), rtol=1e-6)
    # vmap over the temperature alone: a traced scalar T per call, shared by the batch
    by_t = jax.jit(jax.vmap(lambda temp: f(s, t, temp)))(temps)
    np.testing.assert_allclose(by_t, [_ref(s, t, np.full(N, x), MASK) for x in temps], rtol=RTOL,
                               atol=1e-6)


@pytest.mark.parametrize('kwargs, msg', [
    (dict(temperature=0.0), r'`temperature` must be finite and > 0; got 0.0'),
    (dict(temperature=-2.0), r'`temperature` must be finite and > 0; got -2.0'),
    (dict(temperature=float('nan')), r'`temperature` must be finite and > 0; got nan'),
    (dict(temperature=float('inf')), r'`temperature` must be finite and > 0; got inf'),
    (dict(temperature=np.array([1.0, -1.0, 2.0, 0.0])),
     r'`temperature` must be finite and > 0; got -1.0 at position \(1,\) \(2 bad in all\)'),
    (dict(temperature=np.ones(5)), r'`temperature` must broadcast to the shape of '
     r'`student_logits.shape\[:-1\]` \(4,\); got shape \(5,\)'),
    (dict(teacher=lambda t: t[:3]), r'`teacher_logits` must have shape student_logits.shape = '
     r'\(4, 6\); got shape \(3, 6\)'),
    (dict(teacher=lambda t: t[:, :5]), r'`teacher_logits` must have shape \[\.\.\., K\] with K = '
     r'student_logits.shape\[-1\] = 6; got shape \(4, 5\)'),
    (dict(teacher=lambda t: t.astype(np.int32)),
     r'`teacher_logits` must be a float array \[\.\.\., K\]; got dtype int32'),
    (dict(student=lambda s: s[0, 0]), r'`student_logits` must have shape \[\.\.\., K\] with K >= 1'),
    (dict(where=np.ones(K)), r'`where` must be a bool mask; got dtype float'),
    (dict(where=np.ones((3, K), bool)), r'`where` must broadcast to the shape of `student_logits`'),
])
def test_bad_arguments(kwargs, msg):
  s, t = _data(11)
  kwargs = dict(kwargs)
  s = kwargs.pop('student', lambda x: x)(s)
  t = kwargs.pop('teacher', lambda x: x)(t)
  call = lambda s, t: kd_loss(s, t, **kwargs)
  for run in (call, jax.jit(call)):  # the temperature is closed over: concrete under jit too
    with pytest.raises(ValueError, match=msg):
      run(s, t)
