"""chex variants, vmap and per-example gradients of the softmax, fused, imbalance, margin and
spherical ops.

Every op runs under `chex.variants(with_jit, without_jit, with_device)` against the float64 NumPy
references of its own test file (imported from there, written from the papers); `vmap(f)` over a
leading axis equals the batched call (or a Python loop, for ops of one scalar); and
`vmap(grad(f))` equals the per-example gradients read off `jax.jacrev` of the batched call: the
diagonal blocks for batched arguments, the rows for shared ones (class weights `w`). Per-example
options that an op documents as broadcastable (softmax temperature, margin scale) are vmapped too.
Static checks (shapes, dtypes) raise the same `ArgumentError` with and without `jit`.
"""

from typing import Any, Callable, NamedTuple, Optional

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax import ops
from softmax_jax.ops import _checks
from tests.ops.fused_test import _reference as _ref_fused
from tests.ops.imbalance_test import CB
from tests.ops.imbalance_test import COUNTS
from tests.ops.imbalance_test import DRW_W
from tests.ops.imbalance_test import LOG_PI
from tests.ops.imbalance_test import _ref_cb
from tests.ops.imbalance_test import _ref_focal
from tests.ops.imbalance_test import _ref_la
from tests.ops.imbalance_test import _ref_ldam
from tests.ops.imbalance_test import _ref_log_pi
from tests.ops.imbalance_test import _ref_margins
from tests.ops.margins_test import _ref_arcface
from tests.ops.margins_test import _ref_combined
from tests.ops.margins_test import _ref_cosface
from tests.ops.margins_test import _ref_cosine
from tests.ops.margins_test import _ref_psi
from tests.ops.margins_test import _ref_spherical
from tests.ops.margins_test import _ref_sphereface
from tests.ops.margins_test import _ref_taylor
from tests.ops.softmax_test import _ref as _ref_softmax
from tests.ops.softmax_test import _ref_ce

N, K, D = 4, 6, 5  # examples, classes (= C of the imbalance and margin tests), features
_RNG = np.random.default_rng(0)
X = (_RNG.normal(size=(N, K)) * 2).astype(np.float32)
Y = _RNG.integers(0, K, size=N).astype(np.int32)
MASK = (_RNG.random((N, K)) < 0.6) | np.eye(K, dtype=bool)[Y]  # Every label is kept.
TEMP = _RNG.uniform(0.5, 2.0, size=N).astype(np.float32)  # Per-example temperatures.
TARGETS = np.where(MASK, _RNG.random((N, K)), 0.0)
TARGETS = (TARGETS / TARGETS.sum(-1, keepdims=True)).astype(np.float32)
COS = _RNG.uniform(-0.9, 0.9, size=(N, K)).astype(np.float32)
SCALE = _RNG.uniform(2.0, 30.0, size=N).astype(np.float32)  # Per-example margin scale.
FEAT = _RNG.normal(size=(N, D)).astype(np.float32)
WEIGHTS = _RNG.normal(size=(D, K)).astype(np.float32)
SUB_WEIGHTS = _RNG.normal(size=(D, K, 2)).astype(np.float32)
STEPS = np.asarray([0.0, 3.0, 40.0, 2000.0], np.float32)
FUSED_OPTIONS = dict(label_smoothing=0.1, z_loss=1e-2, logit_soft_cap=4.0)
FUSED = dict(FUSED_OPTIONS, chunk_size=4)  # K = 6 classes in a chunk of 4 and a tail of 2.
W_CE = _RNG.uniform(0.5, 2.0, size=K).astype(np.float32)
Y_IGN = np.where(np.arange(N) == 1, -100, Y).astype(np.int32)  # Example 1 is ignored.


class Case(NamedTuple):
  f: Callable[..., Any]  # Keyword options bound; positional arguments are `args`.
  args: tuple
  ref: Callable[..., Any]  # float64 NumPy reference of f(*args).
  in_axes: Optional[tuple] = None  # vmap axes (0 or None per argument); None: no vmap case.
  grad_argnums: tuple = ()  # Arguments whose per-example gradients are compared.
  loop: bool = False  # vmap over scalars: compare with a Python loop, not a batched call.
  tol: float = 1e-5


def _soft_ce_ref(x, t, m):
  log_p = _ref_softmax(x, m)[0]
  with np.errstate(invalid='ignore'):
    return -np.sum(np.where(t > 0, t * log_p, 0.0), -1)


def _l2_ref(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _lambda_ref(step):
  return np.maximum(5.0, 1000.0 * (1 + 0.12 * np.asarray(step, np.float64)) ** -1.0)


T_COL = lambda t: t[..., None]  # [N] temperatures -> [N, 1]; under vmap [] -> [1].

CASES = {
    # softmax.py
    'softmax': Case(lambda x, m, t: ops.softmax(x, where=m, temperature=T_COL(t)), (X, MASK, TEMP),
                    lambda x, m, t: _ref_softmax(x / t[:, None], m)[1], (0, 0, 0), (0, 2)),
    'log_softmax': Case(lambda x, m, t: ops.log_softmax(x, where=m, temperature=T_COL(t)),
                        (X, MASK, TEMP), lambda x, m, t: _ref_softmax(x / t[:, None], m)[0],
                        (0, 0, 0), (0, 2)),
    'logsumexp': Case(lambda x, m, t: ops.logsumexp(x, where=m, temperature=T_COL(t)),
                      (X, MASK, TEMP), lambda x, m, t: _ref_softmax(x / t[:, None], m)[2],
                      (0, 0, 0), (0, 2)),
    'cross_entropy': Case(
        lambda x, y, m: ops.cross_entropy(x, y, where=m, label_smoothing=0.1, class_weights=W_CE),
        (X, Y, MASK), lambda x, y, m: _ref_ce(x, y, m, eps=0.1, weights=W_CE), (0, 0, 0), (0,)),
    'cross_entropy_ignore_index': Case(
        lambda x, y: ops.cross_entropy(x, y, label_smoothing=0.1, ignore_index=-100), (X, Y_IGN),
        lambda x, y: np.where(y == -100, 0.0, _ref_ce(x, np.maximum(y, 0), eps=0.1)), (0, 0),
        (0,)),
    'soft_cross_entropy': Case(lambda x, t, m: ops.soft_cross_entropy(x, t, where=m),
                               (X, TARGETS, MASK), _soft_ce_ref, (0, 0, 0), (0, 1)),
    # fused.py: x [N, d], labels [N], w [d, K] shared by the examples.
    'linear_cross_entropy': Case(
        lambda x, y, w: ops.linear_cross_entropy(x, w, y, **FUSED), (FEAT, Y, WEIGHTS),
        lambda x, y, w: _ref_fused(x, w, y, 1.0, **FUSED_OPTIONS)[0],
        (0, 0, None), (0, 2)),
    'linear_cross_entropy_mean': Case(
        lambda x, y, w: ops.linear_cross_entropy(x, w, y, reduction='mean', **FUSED),
        (FEAT, Y, WEIGHTS),
        lambda x, y, w: _ref_fused(x, w, y, 1.0, reduction='mean', **FUSED_OPTIONS)[0]),
    'linear_cross_entropy_ignore_index': Case(
        lambda x, y, w: ops.linear_cross_entropy(x, w, y, ignore_index=-100, **FUSED),
        (FEAT, Y_IGN, WEIGHTS),
        lambda x, y, w: _ref_fused(x, w, y, 1.0, ignore_index=-100, **FUSED_OPTIONS)[0],
        (0, 0, None), (0, 2)),
    # imbalance.py
    'focal_loss': Case(lambda z, y: ops.focal_loss(z, y, gamma=2.0, alpha=CB), (X, Y),
                       lambda z, y: _ref_focal(z, y, 2.0, CB), (0, 0), (0,)),
    'ldam_loss': Case(
        lambda z, y: ops.ldam_loss(z, y, class_counts=COUNTS, scale=16.0, class_weights=DRW_W),
        (COS, Y), lambda z, y: _ref_ldam(z, y, COUNTS, 0.5, 16.0, DRW_W), (0, 0), (0,)),
    'logit_adjusted_cross_entropy': Case(
        lambda z, y: ops.logit_adjusted_cross_entropy(z, y, log_prior=LOG_PI, tau=1.5), (X, Y),
        lambda z, y: _ref_la(z, y, COUNTS, 1.5), (0, 0), (0,)),
    'posthoc_logit_adjustment': Case(
        lambda z: ops.posthoc_logit_adjustment(z, log_prior=LOG_PI, tau=0.7), (X,),
        lambda z: np.float64(z) - 0.7 * _ref_log_pi(COUNTS), (0,), (0,)),
    # Functions of concrete counts: under jit only with the counts closed over (as here).
    'class_balanced_weights': Case(lambda: ops.class_balanced_weights(COUNTS, 0.999), (),
                                   lambda: _ref_cb(COUNTS, 0.999)),
    'ldam_margins': Case(lambda: ops.ldam_margins(COUNTS, 0.3), (),
                         lambda: _ref_margins(COUNTS, 0.3)),
    'log_prior': Case(lambda: ops.log_prior(COUNTS), (), lambda: _ref_log_pi(COUNTS)),
    'drw_class_weights': Case(
        lambda s: ops.drw_class_weights(s, class_counts=COUNTS, start_step=40, beta=0.999),
        (STEPS.astype(np.int32)[2],),
        lambda s: _ref_cb(COUNTS, 0.999) if s >= 40 else np.ones(len(COUNTS))),
    'drw_class_weights_vmap': Case(
        lambda s: ops.drw_class_weights(s, class_counts=COUNTS, start_step=40, beta=0.999),
        (STEPS.astype(np.int32),),
        lambda s: np.stack([_ref_cb(COUNTS, 0.999) if v >= 40 else np.ones(len(COUNTS))
                            for v in s]), (0,), loop=True),
    # margins.py: cos [N, C], labels [N], per-example scale [N].
    'l2_normalize': Case(ops.l2_normalize, (X,), _l2_ref, (0,), (0,)),
    'cosine_logits': Case(lambda x, w, s: ops.cosine_logits(x, w, scale=s),
                          (FEAT, WEIGHTS, SCALE), _ref_cosine, (0, None, 0), (0, 1, 2)),
    'cosine_logits_sub_center': Case(lambda x, w, s: ops.cosine_logits(x, w, scale=s),
                                     (FEAT, SUB_WEIGHTS, SCALE), _ref_cosine, (0, None, 0),
                                     (0, 1)),
    'cosface_logits': Case(lambda c, y, s: ops.cosface_logits(c, y, scale=s, margin=0.35),
                           (COS, Y, SCALE), lambda c, y, s: _ref_cosface(c, y, s, 0.35),
                           (0, 0, 0), (0, 2)),
    'arcface_logits': Case(lambda c, y, s: ops.arcface_logits(c, y, scale=s, margin=0.5),
                           (COS, Y, SCALE), lambda c, y, s: _ref_arcface(c, y, s, 0.5),
                           (0, 0, 0), (0, 2)),
    'combined_margin_logits': Case(
        lambda c, y, s: ops.combined_margin_logits(c, y, scale=s, m1=1.35, m2=0.25, m3=0.1),
        (COS, Y, SCALE), lambda c, y, s: _ref_combined(c, y, s, 1.35, 0.25, 0.1), (0, 0, 0),
        (0, 2)),
    'sphereface_logits': Case(
        lambda c, y, s: ops.sphereface_logits(c, y, scale=s, margin=4, lambda_=1.0),
        (COS, Y, SCALE), lambda c, y, s: _ref_sphereface(c, y, s, 4, 1.0), (0, 0, 0), (0, 2)),
    'sphereface_psi': Case(lambda c: ops.sphereface_psi(c, margin=3), (COS,),
                           lambda c: _ref_psi(c, 3), (0,), (0,)),
    'sphereface_lambda': Case(ops.sphereface_lambda, (STEPS[2],), _lambda_ref),
    'sphereface_lambda_vmap': Case(ops.sphereface_lambda, (STEPS,), _lambda_ref, (0,), (0,),
                                   loop=True),
    # spherical.py
    'spherical_softmax': Case(lambda x, m: ops.spherical_softmax(x, eps=0.1, where=m), (X, MASK),
                              lambda x, m: _ref_spherical(x, 0.1, m), (0, 0), (0,)),
    'taylor_softmax': Case(lambda x, m: ops.taylor_softmax(x, order=4, where=m), (X, MASK),
                           lambda x, m: _ref_taylor(x, 4, m), (0, 0), (0,)),
}

VARIANT_NAMES = [n for n in CASES if not n.endswith('_vmap')]
VMAP_NAMES = [n for n, c in CASES.items() if c.in_axes is not None]

# Every public op of the five modules has a case (the test of this list fails on a new op).
OPS = ('softmax', 'log_softmax', 'logsumexp', 'cross_entropy', 'soft_cross_entropy',
       'linear_cross_entropy', 'focal_loss', 'class_balanced_weights', 'ldam_loss',
       'ldam_margins', 'drw_class_weights', 'logit_adjusted_cross_entropy',
       'posthoc_logit_adjustment', 'log_prior', 'l2_normalize', 'cosine_logits',
       'arcface_logits', 'cosface_logits', 'sphereface_logits', 'sphereface_psi',
       'sphereface_lambda', 'combined_margin_logits', 'spherical_softmax', 'taylor_softmax')
MODULES = ('softmax', 'fused', 'imbalance', 'margins', 'spherical')


def test_every_public_op_of_these_modules_has_a_case():
  public = {n for n in ops.__all__
            if getattr(ops, n).__module__.rsplit('.', 1)[-1] in MODULES}
  assert public == set(OPS)
  assert set(OPS) <= set(VARIANT_NAMES) and set(OPS) - {
      'class_balanced_weights', 'ldam_margins', 'log_prior'} <= {
          n.removesuffix('_vmap') for n in VMAP_NAMES}


def _close(got, want, tol, err_msg=''):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want = np.asarray(want, np.float64)
  finite = np.isfinite(want)
  scale = np.abs(want[finite]).max() if finite.any() else 1.0
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(scale, 1.0), err_msg=err_msg)


def _scalarize(out, ct):
  """sum(ct * out) over the finite entries (masked log-probabilities are -inf, with no gradient)."""
  return jnp.sum(jnp.where(jnp.isneginf(out), 0.0, ct * out))


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  @parameterized.named_parameters((n, n) for n in VARIANT_NAMES)
  def test_matches_float64_reference(self, name):
    case = CASES[name]
    out = self.variant(case.f)(*case.args)
    ref = case.ref(*case.args)
    self.assertEqual(np.shape(out), np.shape(ref))
    _close(out, ref, case.tol)

  @parameterized.named_parameters((n, n) for n in VMAP_NAMES)
  def test_vmap_and_per_example_grads(self, name):
    """vmap(f) == f on the batch (or a loop); vmap(grad) == the per-example blocks of jacrev."""
    case = CASES[name]
    f, axes, argnums = case.f, case.in_axes, case.grad_argnums
    args = tuple(jnp.asarray(a) for a in case.args)
    out_shape = jax.eval_shape(jax.vmap(f, axes), *args).shape
    ct = jnp.asarray(np.random.default_rng(1).normal(size=out_shape), jnp.float32)
    example = lambda i: tuple(a if ax is None else a[i] for a, ax in zip(args, axes))

    def per_example(*a):  # One example's scalar: its output against its own cotangent.
      *a, c = a
      return _scalarize(f(*a), c)

    def batched(*a):  # [N] per-example scalars of the batched call.
      return jax.vmap(_scalarize)(f(*a), ct)

    @jax.jit
    def run(*a):
      vmapped = jax.vmap(f, axes)(*a)
      grads = argnums and jax.vmap(jax.grad(per_example, argnums), axes + (0,))(*a, ct)
      if case.loop:
        return vmapped, grads, None, None
      return vmapped, grads, f(*a), argnums and jax.jacrev(batched, argnums)(*a)

    vmapped, grads, full, jac = run(*args)
    if case.loop:  # An op of one scalar: a Python loop over the examples is the batched call.
      full = jnp.stack([f(*example(i)) for i in range(N)])
      if argnums:
        per = [jax.grad(per_example, argnums)(*example(i), ct[i]) for i in range(N)]
        jac = [jnp.stack([p[j] for p in per]) for j in range(len(argnums))]
    elif argnums:  # Block i of d(out_i)/d(arg): the diagonal for batched args, row for shared.
      jac = [j[np.arange(N), np.arange(N)] if axes[a] == 0 else j for j, a in zip(jac, argnums)]
    _close(vmapped, full, case.tol, 'vmap(f) vs f')
    for a, g, want in zip(argnums, grads or (), jac or ()):
      self.assertEqual(g.shape, want.shape)
      assert np.all(np.isfinite(np.asarray(g, np.float32))), (name, a)
      _close(g, want, case.tol, f'vmap(grad) vs jacrev, argument {a}')


# ----------------------------------------------------------------------------------------------
# Static checks raise the same error eagerly and under jit (shapes and dtypes only).

_Z = np.zeros((N, K), np.float32)
_L = np.zeros(N, np.int32)

STATIC_ERRORS = {
    'softmax_rank': (ops.softmax, (np.float32(1.0),),
                     r'`x` must have shape \[\.\.\., num_classes\]'),
    'log_softmax_where_dtype': (lambda x, m: ops.log_softmax(x, where=m), (_Z, np.ones(K, int)),
                                r'`where` must be a bool mask; got dtype int'),
    'logsumexp_temperature_shape': (lambda x, t: ops.logsumexp(x, temperature=t),
                                    (_Z, np.ones(N, np.float32)),
                                    r'`temperature` must broadcast to the shape of `x` '
                                    r'\(4, 6\); got shape \(4,\)'),
    'cross_entropy_labels_shape': (ops.cross_entropy, (_Z, _L[:3]),
                                   r'`labels` must have shape logits.shape\[:-1\] = \(4,\)'),
    'cross_entropy_labels_dtype': (ops.cross_entropy, (_Z, _L.astype(np.float32)),
                                   r'`labels` must be integer class indices; got dtype float32'),
    'cross_entropy_class_weights': (lambda x, y, w: ops.cross_entropy(x, y, class_weights=w),
                                    (_Z, _L, np.ones(K + 1, np.float32)),
                                    r'`class_weights` must have shape \[num_classes\] = \(6,\)'),
    'cross_entropy_smoothing_rank': (lambda x, y, e: ops.cross_entropy(x, y, label_smoothing=e),
                                     (_Z, _L, np.full(N, 0.1, np.float32)),
                                     r'`label_smoothing` must have shape \[\] \(rank 0\)'),
    'soft_cross_entropy_targets': (ops.soft_cross_entropy, (_Z, _Z[:, :3]),
                                   r'`targets` must have the shape of `logits` \(4, 6\)'),
    'linear_cross_entropy_x': (lambda x, y, w: ops.linear_cross_entropy(x, w, y),
                               (FEAT[:, :3], _L, WEIGHTS),
                               r'`x` must have shape \[\.\.\., d\] with d = w.shape\[0\] = 5'),
    'linear_cross_entropy_where': (
        lambda x, y, w, m: ops.linear_cross_entropy(x, w, y, where=m),
        (FEAT, _L, WEIGHTS, np.ones(N, bool)), r'`where` is not an option of linear_cross_entropy'),
    'focal_loss_alpha': (lambda z, y, a: ops.focal_loss(z, y, alpha=a),
                         (_Z, _L, np.ones(K - 1, np.float32)),
                         r'`alpha` must have shape \[num_classes\] = \(6,\); got shape \(5,\)'),
    'focal_loss_gamma_rank': (lambda z, y, g: ops.focal_loss(z, y, gamma=g),
                              (_Z, _L, np.ones(N, np.float32)),
                              r'`gamma` must have shape \[\] \(rank 0\); got shape \(4,\)'),
    'ldam_loss_labels': (lambda z, y: ops.ldam_loss(z, y, class_counts=COUNTS),
                         (_Z, _L[None]), r'`labels` must have shape logits.shape\[:-1\]'),
    'logit_adjusted_log_prior': (
        lambda z, y, p: ops.logit_adjusted_cross_entropy(z, y, log_prior=p),
        (_Z, _L, LOG_PI[:4]), r'`log_prior` must have shape \[num_classes\] = \(6,\)'),
    'posthoc_tau_rank': (lambda z, t: ops.posthoc_logit_adjustment(z, log_prior=LOG_PI, tau=t),
                         (_Z, np.ones(2, np.float32)), r'`tau` must have shape \[\]'),
    'drw_step_rank': (lambda s: ops.drw_class_weights(s, class_counts=COUNTS, start_step=1),
                      (np.zeros(2, np.int32),), r'`step` must have shape \[\] \(rank 0\)'),
    'l2_normalize_rank': (ops.l2_normalize, (np.float32(2.0),),
                          r'`x` must have shape \[\.\.\., d\]'),
    'cosine_logits_weights': (ops.cosine_logits, (FEAT, WEIGHTS[:3]),
                              r'`weights` must be \[d, C\] or \[d, C, k\] with d = '
                              r'features.shape\[-1\] = 5; got shape \(3, 6\)'),
    'cosine_logits_scale': (lambda x, w, s: ops.cosine_logits(x, w, scale=s),
                            (FEAT, WEIGHTS, np.ones(K, np.float32)),
                            r'`scale` must be a scalar or one value per example, shape \(4,\); '
                            r'got shape \(6,\)'),
    'arcface_cos_rank': (ops.arcface_logits, (np.float32(0.5), np.int32(0)),
                         r'`cos` must have shape \[\.\.\., num_classes\]'),
    'cosface_labels_dtype': (ops.cosface_logits, (COS, Y.astype(np.float32)),
                             r'`labels` must be integer'),
    'cosface_margin_rank': (lambda c, y, m: ops.cosface_logits(c, y, margin=m),
                            (COS, Y, np.full(N, 0.3, np.float32)),
                            r'`margin` must have shape \[\] \(rank 0\); got shape \(4,\)'),
    'combined_scale': (lambda c, y, s: ops.combined_margin_logits(c, y, scale=s),
                       (COS, Y, np.ones((N, 1), np.float32)),
                       r'`scale` must be a scalar or one value per example'),
    'sphereface_labels_shape': (ops.sphereface_logits, (COS, Y[:2]),
                                r'`labels` must have shape cos.shape\[:-1\] = \(4,\)'),
    'sphereface_lambda_rank': (ops.sphereface_lambda, (STEPS,),
                               r'`step` must have shape \[\] \(rank 0\); got shape \(4,\)'),
    'spherical_softmax_where': (lambda x, m: ops.spherical_softmax(x, where=m),
                                (X, np.ones((3, K), bool)), r'`where` must broadcast'),
    'spherical_softmax_eps_rank': (lambda x, e: ops.spherical_softmax(x, eps=e),
                                   (X, np.ones(K, np.float32)), r'`eps` must have shape \[\]'),
    'taylor_softmax_rank': (ops.taylor_softmax, (np.float32(1.0),), r'`x` must have shape'),
}


class StaticChecksTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters((n, n) for n in STATIC_ERRORS)
  def test_raises_eagerly_and_under_jit(self, name):
    f, args, match = STATIC_ERRORS[name]
    with self.assertRaisesRegex(_checks.ArgumentError, match):
      self.variant(f)(*args)
