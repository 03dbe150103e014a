"""HierarchicalSoftmax: head contract vs a float64 reference walk of its tree, training, errors."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softmax_jax import testing
from softmax_jax.heads import hierarchical as hh
from softmax_jax.ops import hierarchical as hs

K, D = 11, 5
COUNTS = (90, 40, 40, 20, 10, 8, 5, 3, 1, 1, 0)


def _ref_log_prob(features, params, tree):
  """float64, per leaf: sum over its path of log sigmoid(code * (x . v + b))."""
  x = np.asarray(features, np.float64)
  z = x @ np.asarray(params['node_vectors'], np.float64).T
  if 'bias' in params:
    z = z + np.asarray(params['bias'], np.float64)
  out = np.zeros(x.shape[:-1] + (K,))
  for k in range(K):
    for node, code, valid in zip(tree.paths[k], tree.codes[k], tree.mask[k]):
      if valid:
        out[..., k] -= np.logaddexp(0.0, -float(code) * z[..., node])
  return out


def _init(head, features, labels, seed=0):
  params = head.init(jax.random.PRNGKey(seed), features, labels)['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + 0.5 * rng.normal(size=p.shape).astype(np.float32), params)


@pytest.mark.parametrize('lead,kwargs', [((6,), {}), ((2, 3), {'class_counts': COUNTS}),
                                         ((2, 3), {'tree': 'balanced'}),
                                         ((6,), {'use_bias': False, 'class_counts': COUNTS})])
def test_contract_matches_reference(lead, kwargs):
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(*lead, D)) * 2, jnp.float32)
  labels = jnp.asarray(rng.integers(0, K, size=lead), jnp.int32)
  head = hh.HierarchicalSoftmax(num_classes=K, **kwargs)
  params = _init(head, features, labels)
  assert params['node_vectors'].shape == (K - 1, D)
  assert ('bias' in params) == kwargs.get('use_bias', True)
  tree = hh.build_tree(K, head.tree, head.class_counts)
  ref = _ref_log_prob(features, params, tree)
  log_prob = jax.jit(lambda p, f: head.apply({'params': p}, f, method='log_prob'))(params, features)
  assert log_prob.shape == (*lead, K)
  np.testing.assert_allclose(log_prob, ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(jax.nn.logsumexp(log_prob, -1), 0.0, atol=1e-5)
  picked = -np.take_along_axis(ref, np.asarray(labels)[..., None], -1)[..., 0]
  loss = jax.jit(lambda p, f, y: head.apply({'params': p}, f, y))(params, features, labels)
  assert loss.shape == lead
  np.testing.assert_allclose(loss, picked, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(head.apply({'params': params}, features, labels, train=True), picked,
                             rtol=2e-5, atol=2e-5)
  predict = head.apply({'params': params}, features, method='predict')
  assert predict.dtype == jnp.int32
  np.testing.assert_array_equal(predict, np.argmax(ref, -1))


def test_trees():
  counts_tree = hh.build_tree(K, 'huffman', COUNTS)
  assert counts_tree is hs.huffman_tree(COUNTS)
  assert np.dot(COUNTS, counts_tree.depths) < np.dot(COUNTS, hs.balanced_tree(K).depths)
  # No counts: Zipf over frequency-sorted ids, so class 0 is shallow and the tail deep.
  zipf = hh.build_tree(1000)
  assert zipf.depths[0] <= 4 and zipf.depths[-1] >= 11 and np.all(np.diff(zipf.depths) >= 0)
  assert hh.build_tree(1000) is zipf
  balanced = hh.build_tree(1000, 'balanced', tuple(range(1000)))  # Counts ignored.
  assert balanced is hs.balanced_tree(1000) and balanced.paths.shape[1] == 10


def test_tree_is_built_once():
  head = hh.HierarchicalSoftmax(num_classes=37, class_counts=tuple(range(37, 0, -1)))
  x, y = jnp.ones((4, D)), jnp.zeros((4,), jnp.int32)
  params = head.init(jax.random.PRNGKey(0), x, y)['params']
  misses = hs._huffman.cache_info().misses
  for n in (3, 5):  # Every new shape re-traces.
    x, y = jnp.ones((n, D)), jnp.zeros((n,), jnp.int32)
    jax.jit(lambda p, x, y: head.apply({'params': p}, x, y))(params, x, y)
    jax.jit(lambda p, x: head.apply({'params': p}, x, method='log_prob'))(params, x)
  assert hs._huffman.cache_info().misses == misses


def test_default_head_trains():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(10, 8)) * 3
  labels = rng.integers(0, 10, size=256)
  features = jnp.asarray(centers[labels] + rng.normal(size=(256, 8)), jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  head = hh.HierarchicalSoftmax(num_classes=10)
  params = head.init(jax.random.PRNGKey(0), features, labels)['params']
  opt = optax.adam(0.05)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(
        lambda p: head.apply({'params': p}, features, labels, train=True).mean())(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  first = None
  for _ in range(150):
    params, state, loss = step(params, state)
    first = loss if first is None else first
  assert float(loss) < 0.25 * float(first), (float(first), float(loss))
  accuracy = np.mean(np.asarray(head.apply({'params': params}, features, method='predict'))
                     == np.asarray(labels))
  assert accuracy > 0.9


def test_bfloat16():
  rng = np.random.default_rng(3)
  features = jnp.asarray(rng.normal(size=(2, 4, D)), jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, K, size=(2, 4)), jnp.int32)
  head = hh.HierarchicalSoftmax(num_classes=K, class_counts=COUNTS, dtype=jnp.bfloat16)
  params = head.init(jax.random.PRNGKey(0), features, labels)['params']
  loss, grads = jax.value_and_grad(lambda p: head.apply({'params': p}, features, labels).sum())(params)
  log_prob = head.apply({'params': params}, features, method='log_prob')
  assert log_prob.dtype == jnp.float32 and np.isfinite(float(loss))
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(jax.nn.logsumexp(log_prob, -1), 0.0, atol=1e-5)


def test_errors_name_the_argument():
  x, y = jnp.ones((4, D)), jnp.zeros((4,), jnp.int32)
  init = lambda head, x=x, y=y: head.init(jax.random.PRNGKey(0), x, y)
  with pytest.raises(ValueError, match=r"tree must be one of \('huffman', 'balanced'\); got 'random'"):
    init(hh.HierarchicalSoftmax(num_classes=K, tree='random'))
  with pytest.raises(ValueError, match=r'class_counts must have num_classes = 11 entries.*got shape \(3,\)'):
    init(hh.HierarchicalSoftmax(num_classes=K, class_counts=(1, 2, 3)))
  with pytest.raises(ValueError, match=r'`num_classes` must be an int >= 2 \(the number of classes\); got 1'):
    init(hh.HierarchicalSoftmax(num_classes=1))
  with pytest.raises(ValueError, match=r'`class_counts` must be finite and >= 0; got -2'):
    init(hh.HierarchicalSoftmax(num_classes=3, class_counts=(5, -2, 1)))
  with pytest.raises(ValueError, match=r'`labels` must have shape features.shape\[:-1\] = \(4, 8, 8\) .*got shape \(4,\)'):
    init(hh.HierarchicalSoftmax(num_classes=K), jnp.zeros((4, 8, 8, 1)))


class ContractTest(chex.TestCase):
  """`softmax_jax.testing.assert_head_contract` per configuration, under each chex variant."""

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  @parameterized.named_parameters(('huffman', dict(class_counts=(50, 30, 20, 9, 6, 3, 2, 1))))
  def test_head_contract(self, kwargs):
    rng = np.random.default_rng(7)  # every head's test: these [4, 8] features, K = 8 (jax caches)
    features, labels = rng.normal(size=(4, 8)) * 2, rng.integers(0, 8, size=4)
    testing.assert_head_contract(hh.HierarchicalSoftmax(num_classes=8, **kwargs), features, labels,
                                 variant=self.variant)


def test_row_loss_equals_the_path_loss_and_its_row_gradients():
  """`row_loss` (train/sparse.py's path): the path loss, and its row gradients are the dense
  gradient's rows (nodes shared by several paths summed), zero elsewhere."""
  k, d = 30, 6
  head = hh.HierarchicalSoftmax(num_classes=k)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, d))
  y = jnp.asarray(np.random.default_rng(0).integers(0, k, (3, 4)), jnp.int32)
  v = head.init(jax.random.PRNGKey(1), x, y)
  depth = int(head._tree().paths.shape[1])  # pylint: disable=protected-access

  @jax.jit
  def both(params):
    dense_loss, dense_grad = jax.value_and_grad(
        lambda p: head.apply({'params': p}, x, y, train=True).sum())(params)
    (row_loss, ids), row_grad = jax.value_and_grad(
        lambda delta: (lambda l, i: (l.sum(), i))(*head.apply(
            {'params': params}, x, y, delta, method='row_loss')),
        has_aux=True)(jnp.zeros((min(y.size * depth, k - 1), d)))
    return dense_loss, dense_grad['node_vectors'], row_loss, ids, row_grad

  dense_loss, dense_grad, row_loss, ids, row_grad = both(v['params'])
  np.testing.assert_allclose(row_loss, dense_loss, rtol=1e-6)
  ids, rows = np.asarray(ids), k - 1
  assert len(set(ids[ids < rows])) == int(np.sum(ids < rows))
  scattered = np.zeros((rows, d), np.float32)
  scattered[ids[ids < rows]] = np.asarray(row_grad)[ids < rows]
  np.testing.assert_allclose(scattered, dense_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(row_grad)[ids >= rows], 0)
