"""DenseSoftmax against a float64 NumPy reference of its own parameters, and its error messages."""

import re

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import testing
from softmax_jax.heads import HEADS
from softmax_jax.heads import DenseSoftmax

K, D = 7, 5


def _ref_log_prob(features, params):
  z = np.asarray(features, np.float64) @ np.asarray(params['kernel'], np.float64)
  z = z + np.asarray(params['bias'], np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


@pytest.mark.parametrize('lead', [(6,), (2, 3)])
def test_contract_matches_reference(lead):
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(*lead, D)) * 3, jnp.float32)
  labels = jnp.asarray(rng.integers(0, K, size=lead), jnp.int32)
  head = DenseSoftmax(num_classes=K)
  params = head.init(jax.random.PRNGKey(1), features, labels, train=False)['params']
  params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
  ref = _ref_log_prob(features, params)
  log_prob = jax.jit(lambda p, f: head.apply({'params': p}, f, method='log_prob'))(params, features)
  np.testing.assert_allclose(log_prob, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.nn.logsumexp(log_prob, -1), 0.0, atol=1e-5)
  loss = head.apply({'params': params}, features, labels, train=True)
  np.testing.assert_allclose(loss, -np.take_along_axis(ref, np.asarray(labels)[..., None], -1)[..., 0],
                             rtol=1e-5, atol=1e-5)
  predict = head.apply({'params': params}, features, method='predict')
  np.testing.assert_array_equal(predict, np.argmax(log_prob, -1))


def test_label_smoothing_only_in_training():
  rng = np.random.default_rng(1)
  features = jnp.asarray(rng.normal(size=(4, D)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3], jnp.int32)
  head = DenseSoftmax(num_classes=K, label_smoothing=0.2)
  params = head.init(jax.random.PRNGKey(0), features, labels)['params']
  ref = _ref_log_prob(features, params)
  target = 0.8 * np.eye(K)[np.asarray(labels)] + 0.2 / K
  np.testing.assert_allclose(head.apply({'params': params}, features, labels, train=True),
                             -(target * ref).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(head.apply({'params': params}, features, labels, train=False),
                             -ref[np.arange(4), np.asarray(labels)], rtol=1e-5)


def test_fused_equals_unfused_loss_and_gradients():
  rng = np.random.default_rng(2)
  features = jnp.asarray(rng.normal(size=(9, D)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, K, size=9), jnp.int32)
  plain, fused = DenseSoftmax(num_classes=K), DenseSoftmax(num_classes=K, fused=True, chunk_size=3)
  params = plain.init(jax.random.PRNGKey(0), features, labels)['params']

  def mean_loss(head):
    return lambda p, f: head.apply({'params': p}, f, labels, train=True).mean()

  (l0, g0), (l1, g1) = [jax.value_and_grad(mean_loss(h), argnums=(0, 1))(params, features)
                        for h in (plain, fused)]
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_wrong_feature_rank_names_the_shapes():
  head = DenseSoftmax(num_classes=K)
  images = jnp.zeros((4, 8, 8, 1))  # a backbone that forgot to flatten
  with pytest.raises(ValueError, match=r'`labels` must have shape features.shape\[:-1\] = \(4, 8, 8\) .*got shape \(4,\)'):
    head.init(jax.random.PRNGKey(0), images, jnp.zeros((4,), jnp.int32))


@pytest.mark.parametrize('name', sorted(HEADS))
@pytest.mark.parametrize('features, labels, msg', [
    (np.zeros((4, 8), np.int32), np.zeros(4, np.int32), '`features` must be floating; got dtype int32'),
    (np.zeros((4, 8), np.float32), np.zeros(4, np.float32),
     '`labels` must be integer class ids; got dtype float32'),
    (np.zeros((), np.float32), np.zeros((), np.int32),
     r'`features` must have shape \[..., d\] \(rank >= 1\); got shape \(\)'),
    (np.zeros((4, 8), np.float32), np.zeros((4, 1), np.int32),
     r'`labels` must have shape features.shape\[:-1\] = \(4,\) .*got shape \(4, 1\)'),
])
def test_every_head_checks_shapes_and_dtypes_eagerly_and_under_jit(name, features, labels, msg):
  """The chex checks of `heads/_checks.py` name the argument, the head, what they got and need."""
  head = HEADS[name](num_classes=8)
  rngs = {'params': jax.random.PRNGKey(0), 'sample': jax.random.PRNGKey(1)}
  for run in (lambda f, y: head.init(rngs, f, y, train=True),  # eager
              lambda f, y: jax.eval_shape(lambda f, y: head.init(rngs, f, y, train=True), f, y)):
    with pytest.raises(ValueError, match=f'{HEADS[name].__name__}: {msg}'):
      run(jnp.asarray(features), jnp.asarray(labels))


@pytest.mark.parametrize('name', sorted(HEADS))
@pytest.mark.parametrize('k', [0, -1, 1, 8.0, True])
def test_every_head_names_a_bad_num_classes(name, k):
  """0 and -1 gave ZeroDivisionError / TypeError from the initializer (issue 14, item 8)."""
  head = HEADS[name](num_classes=k)
  rngs = {'params': jax.random.PRNGKey(0), 'sample': jax.random.PRNGKey(1)}
  x, y = jnp.zeros((4, 8)), jnp.zeros((4,), jnp.int32)
  with pytest.raises(ValueError, match=rf'^{HEADS[name].__name__}: `num_classes` must be an int '
                     rf'>= 2 \(the number of classes\); got {re.escape(repr(k))}\.'):
    jax.eval_shape(lambda: head.init(rngs, x, y, train=False))


@pytest.mark.parametrize('name', ['adaptive', 'dense', 'hierarchical', 'sampled'])
def test_an_integer_compute_dtype_is_rejected(name):
  """DenseSoftmax(dtype=int32) rounded the kernel to integers: silently wrong logits (item 8)."""
  head = HEADS[name](num_classes=8, dtype=jnp.int32)
  rngs = {'params': jax.random.PRNGKey(0), 'sample': jax.random.PRNGKey(1)}
  x, y = jnp.ones((4, 8)), jnp.zeros((4,), jnp.int32)
  for method in ('log_prob', None):
    kwargs = {'method': method} if method else {'train': True}
    args = (x,) if method else (x, y)
    with pytest.raises(ValueError, match=rf'^{HEADS[name].__name__}: `dtype` .*must be None or a '
                       'floating dtype.*got .*int32'):
      jax.eval_shape(lambda: head.init(rngs, *args, **kwargs))  # pylint: disable=cell-var-from-loop


@pytest.mark.parametrize('name', sorted(HEADS))
def test_every_head_names_out_of_range_labels_before_its_op(name):
  """SampledSoftmax named the sampler's `true_classes` for a label >= K in training (item 8)."""
  head = HEADS[name](num_classes=8)
  rngs = {'params': jax.random.PRNGKey(0), 'sample': jax.random.PRNGKey(1)}
  for bad in ([0, 1, 8, 2], [0, -1, 2, 3]):
    with pytest.raises(ValueError, match=rf'^{HEADS[name].__name__}: `labels` must lie in \[0, 8\) '
                       rf'\(num_classes = 8\); got {bad[1] if bad[1] < 0 else 8} at position'):
      head.init(rngs, jnp.ones((4, 8)), jnp.asarray(bad, jnp.int32), train=True)


@pytest.mark.parametrize('name', ['dense', 'sampled'])  # one shared check; eager adaptive is slow
def test_heads_take_lists_as_arrays(name):
  """Python lists were checked as pytrees: `labels` must have shape (4,); got shape (4,)."""
  head = HEADS[name](num_classes=8)
  rngs = {'params': jax.random.PRNGKey(0), 'sample': jax.random.PRNGKey(1)}
  x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
  y = [0, 3, 7, 1]
  variables = head.init(rngs, jnp.asarray(x), jnp.asarray(y), train=False)
  np.testing.assert_allclose(head.apply(variables, x.tolist(), y, train=False),
                             head.apply(variables, jnp.asarray(x), jnp.asarray(y), train=False),
                             rtol=1e-6)
  np.testing.assert_allclose(head.apply(variables, x.tolist(), method='log_prob'),
                             head.apply(variables, jnp.asarray(x), method='log_prob'), rtol=1e-6)


class ContractTest(chex.TestCase):
  """`softmax_jax.testing.assert_head_contract` per configuration, under each chex variant."""

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  @parameterized.named_parameters(
      ('plain', dict(label_smoothing=0.1)), ('fused', dict(fused=True, chunk_size=3)))
  def test_head_contract(self, kwargs):
    rng = np.random.default_rng(7)  # every head's test: these [4, 8] features, K = 8 (jax caches)
    features, labels = rng.normal(size=(4, 8)) * 2, rng.integers(0, 8, size=4)
    testing.assert_head_contract(DenseSoftmax(num_classes=8, **kwargs), features, labels,
                                 variant=self.variant)
