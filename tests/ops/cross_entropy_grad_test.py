"""Gradients of `ops.cross_entropy` (the custom_jvp of ops/_ce.py) for every option combination.

References: the float64 NumPy gradient `c * w[y] * (softmax - t)` on the valid classes (0 on
masked ones and on ignored examples), with `t = (1 - eps) onehot(y) + eps valid / K_valid` and
`c` the cotangent of each example's loss; and the formulation before issue 15 (plain autodiff
through `log_softmax`), loss and gradient. Then `check_grads` (forward and reverse, orders 1
and 2, also w.r.t. `label_smoothing` and `class_weights`), edge rows (-inf logits, a label on a
masked class, a NaN row), and the compiled temporary memory of `value_and_grad`.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from softmax_jax import ops

N, K = 6, 9
IGNORE = -100
_RNG = np.random.default_rng(0)
X = (_RNG.normal(size=(N, K)) * 3).astype(np.float32)
Y = _RNG.integers(0, K, size=N).astype(np.int32)
Y = np.where(Y == 4, 0, Y).astype(np.int32)  # No label on class 4 (masked by MASK_K).
MASK_K = np.arange(K) != 4  # [K], broadcast over the examples.
MASK_NK = (_RNG.random((N, K)) < 0.7) | np.eye(K, dtype=bool)[Y]  # Every label kept.
Y_IGN = np.where(np.arange(N) % 3 == 1, IGNORE, Y).astype(np.int32)  # Examples 1, 4 ignored.
W = _RNG.uniform(0.5, 2.0, size=K).astype(np.float32)
CT = _RNG.uniform(0.5, 1.5, size=N).astype(np.float32)  # Per-example cotangents.
MASKS = {'none': None, 'K': MASK_K, 'NK': MASK_NK}
OPTIONS = list(itertools.product(MASKS, [0.0, 0.2], [False, True], [False, True]))


def _ref(x, labels, mask=None, eps=0.0, weights=None, ignore=False):
  """float64 (loss, gradient of sum(CT * loss)) from the formulas."""
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  labels = np.asarray(labels)
  ignored = labels == IGNORE if ignore else np.zeros(labels.shape, bool)
  y = np.where(ignored, 0, labels)
  valid = np.broadcast_to(True if mask is None else mask, x.shape) & (x != -np.inf)
  xm = np.where(valid, x, -np.inf)
  m = xm.max(-1, keepdims=True)
  e = np.exp(xm - m)
  p = e / e.sum(-1, keepdims=True)
  log_p = np.where(valid, xm - m - np.log(e.sum(-1, keepdims=True)), 0.0)
  t = (1 - eps) * np.eye(K)[y] + eps * valid / valid.sum(-1, keepdims=True)
  w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, np.float64)[y]
  loss = np.where(ignored, 0.0, -w * np.sum(t * log_p, -1))
  grad = np.where(ignored[:, None] | ~valid, 0.0, (CT * w)[:, None] * (p - t))
  return loss, grad


def _old(x, labels, where=None, label_smoothing=0.0, class_weights=None, ignore_index=None):
  """The formulation before issue 15: plain autodiff through log_softmax in float32."""
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  ignored = None if ignore_index is None else labels == ignore_index
  if ignored is not None:
    x = jnp.where(ignored[..., None], 0, x)
  log_p = ops.log_softmax(x, where=where)
  safe = jnp.where(labels == ignore_index, 0, labels)[..., None] if ignored is not None else (
      labels[..., None])
  loss = -jnp.take_along_axis(log_p, safe, axis=-1)[..., 0]
  if label_smoothing:
    valid = log_p != -jnp.inf
    mean_nll = -jnp.sum(jnp.where(valid, log_p, 0), -1) / jnp.maximum(jnp.sum(valid, -1), 1)
    loss = (1 - label_smoothing) * loss + label_smoothing * mean_nll
  if class_weights is not None:
    loss = loss * jnp.take(jnp.asarray(class_weights, x.dtype), safe[..., 0])
  return loss if ignored is None else jnp.where(ignored, 0.0, loss)


def _kwargs(mask, eps, weights, ignore):
  return dict(where=MASKS[mask], label_smoothing=eps, class_weights=W if weights else None,
              ignore_index=IGNORE if ignore else None)


def _value_and_grad(f, x, labels):
  """`((sum(CT * loss), gradient), loss)`, op by op: at these shapes the compiled primitives are
  shared by every case, where one `jit` per case compiled for 1.5 minutes (the op under jit
  is tested in variants_test.py and softmax_test.py)."""
  return jax.value_and_grad(lambda x, y: jnp.sum(CT * f(x, y)))(x, labels), f(x, labels)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('mask,eps,weights,ignore', OPTIONS)
def test_gradient_matches_float64_reference_and_the_old_formulation(dtype, mask, eps, weights,
                                                                    ignore):
  kw = _kwargs(mask, eps, weights, ignore)
  x = jnp.asarray(X, dtype)
  labels = jnp.asarray(Y_IGN if ignore else Y)
  (_, grad), loss = _value_and_grad(lambda x, y: ops.cross_entropy(x, y, **kw), x, labels)
  (_, old_grad), old_loss = _value_and_grad(lambda x, y: _old(x, y, **kw), x, labels)
  ref_loss, ref_grad = _ref(x, labels, MASKS[mask], eps, W if weights else None, ignore)
  assert loss.dtype == jnp.float32 and grad.dtype == dtype
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, old_loss, rtol=1e-5, atol=1e-5)
  tol = dict(rtol=2e-2, atol=1e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.float64(grad), ref_grad, **tol)
  np.testing.assert_allclose(np.float64(grad), np.float64(old_grad), **tol)
  zero = (~np.broadcast_to(True if MASKS[mask] is None else MASKS[mask], X.shape)
          | (np.asarray(labels) == IGNORE)[:, None])
  np.testing.assert_array_equal(np.float64(grad)[zero], 0.0)  # Exactly.
  assert ignore or mask == 'none' or zero.any()


@pytest.mark.parametrize('mask,eps,weights,ignore', OPTIONS)
def test_check_grads_float64(mask, eps, weights, ignore):
  kw = _kwargs(mask, eps, weights, ignore)
  with jax.enable_x64(True):
    x = jnp.asarray(X, jnp.float64)
    labels = jnp.asarray(Y_IGN if ignore else Y)
    f = lambda x: ops.cross_entropy(x, labels, **kw)  # op by op (see _value_and_grad)
    assert f(x).dtype == jnp.float64
    check_grads(f, (x,), order=2 if ignore else 1, modes=('fwd', 'rev'))


def test_check_grads_of_the_options():
  with jax.enable_x64(True):
    x = jnp.asarray(X, jnp.float64)
    f = lambda x, eps, w: ops.cross_entropy(x, jnp.asarray(Y_IGN), where=MASK_NK,
                                            label_smoothing=eps, class_weights=w,
                                            ignore_index=IGNORE)
    check_grads(f, (x, 0.3, jnp.asarray(W, jnp.float64)), order=2, modes=('fwd', 'rev'))
    # vmap(grad) (per-example gradients) equals jacrev of the batched call, also in float64.
    per_example = jax.vmap(jax.grad(lambda x, y: ops.cross_entropy(
        x, y, label_smoothing=0.3, ignore_index=IGNORE)))(x, jnp.asarray(Y_IGN))
    jac = jax.jacrev(lambda x: ops.cross_entropy(x, jnp.asarray(Y_IGN), label_smoothing=0.3,
                                                 ignore_index=IGNORE))(x)
    np.testing.assert_allclose(per_example, jac[np.arange(N), np.arange(N)], rtol=1e-12)
    np.testing.assert_array_equal(per_example[np.asarray(Y_IGN) == IGNORE], 0.0)


def test_edge_rows_neg_inf_masked_label_and_nan():
  """Row 0: -inf logits; row 1: the label on a masked class (+inf); row 2: a NaN logit."""
  x = jnp.asarray(X).at[0, :3].set(-jnp.inf).at[2, 5].set(jnp.nan)
  labels = jnp.asarray(Y).at[0].set(6).at[1].set(4)
  not_1 = np.arange(N) != 1  # Row 1's loss is +inf: left out of the summed loss.
  grad_of = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(CT * jnp.where(not_1, f(x), 0))))(x)
  for kw in (dict(where=MASK_K), dict(where=MASK_K, label_smoothing=0.1, class_weights=W)):
    f = lambda x, kw=kw: ops.cross_entropy(x, labels, **kw)
    loss, grad = np.asarray(jax.jit(f)(x)), np.asarray(grad_of(f))
    assert loss[1] == np.inf and np.isnan(loss[2]) and np.isfinite(np.delete(loss, [1, 2])).all()
    assert np.isnan(grad[2, MASK_K]).all() and np.isfinite(np.delete(grad, 2, 0)).all()
    np.testing.assert_array_equal(grad[0, :3], 0.0)  # -inf logits: exactly 0.
    np.testing.assert_array_equal(grad[:, ~MASK_K], 0.0)  # Masked class, even in the NaN row.
    old = np.asarray(grad_of(lambda x, kw=kw: _old(x, labels, **kw)))
    np.testing.assert_allclose(np.delete(grad, 2, 0), np.delete(old, 2, 0), rtol=1e-5, atol=1e-6)
    assert np.isnan(old[2, MASK_K]).all()
  # The label on a masked class: a finite gradient, softmax on the kept classes and 0 on it.
  g = np.asarray(jax.jit(jax.grad(lambda x: ops.cross_entropy(x, labels, where=MASK_K)[1]))(x))
  np.testing.assert_allclose(g[1], jax.nn.softmax(jnp.where(MASK_K, x[1], -jnp.inf)), rtol=1e-5,
                             atol=1e-7)
  assert g[1, 4] == 0 and not np.any(np.delete(g, [1, 2], 0))  # Row 2, NaN: 0 * NaN, as before.


@pytest.mark.parametrize('kw', [{}, dict(label_smoothing=0.1, class_weights=np.ones(256)),
                                dict(where=np.arange(256) > 2, ignore_index=IGNORE)])
def test_value_and_grad_keeps_no_logits_sized_temporary(kw):
  """Compiled memory beside the logits and the gradient: no [N, K] buffer (optax keeps none)."""
  n, k = 512, 256
  spec = (jax.ShapeDtypeStruct((n, k), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32))
  temp = lambda f: jax.jit(jax.value_and_grad(lambda x, y: f(x, y).mean())).lower(
      *spec).compile().memory_analysis().temp_size_in_bytes
  ours = temp(lambda x, y: ops.cross_entropy(x, y, **kw))
  old = temp(lambda x, y: _old(x, y, **kw))
  theirs = temp(optax.softmax_cross_entropy_with_integer_labels)
  assert ours < n * k * 4 / 8, (ours, theirs)
  assert ours <= theirs + n * 4 * 8  # At most a few [N] vectors more than optax.
  assert old >= n * k * 4  # The old formulation did keep one (the test can fail).
