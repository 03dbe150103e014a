"""AdaptiveSoftmax: head contract vs PyTorch's module in float64 NumPy, training, cutoffs, errors."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softmax_jax import testing
from softmax_jax.heads import HEADS
from softmax_jax.heads.adaptive import AdaptiveSoftmax
from softmax_jax.ops import adaptive as A
from tests.ops.adaptive_test import TorchRef

K, D = 40, 16


def _params(head, features, labels, seed=0):
  """Initialized params, perturbed so that the cluster logits matter (some argmaxes in tails)."""
  params = head.init(jax.random.PRNGKey(seed), features, labels)['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + 0.7 * rng.normal(size=p.shape).astype(np.float32), params)


def _torch_ref(head, params):
  """The same weights in PyTorch's [out, in] layout."""
  cutoffs = head.resolved_cutoffs()
  f64 = lambda a: np.asarray(a, np.float64)
  tails = [(f64(params[f'tail_proj_{i}']).T, f64(params[f'tail_out_{i}']).T)
           for i in range(len(cutoffs))]
  bias = f64(params['head_bias']) if 'head_bias' in params else None
  return TorchRef(head.num_classes, cutoffs, f64(params['head_kernel']).T, bias, tails)


# The default routing ladder in the first case; a two-rung one (0, N/2, N) in the others, which
# compiles in a third of the time (the ladder's rungs are tested in tests/ops/adaptive_test.py).
@pytest.mark.parametrize('lead,kwargs', [((24,), dict(cutoffs=(6, 18))),
                                         ((3, 8), dict(cutoffs=(4, 10, 25), div_value=2.0,
                                                       head_bias=True, capacity_fractions=(0.5,))),
                                         ((16,), dict(class_counts=tuple(range(K, 0, -1)),
                                                      capacity_fractions=(0.5,)))])
def test_contract_matches_pytorch_reference(lead, kwargs):
  rng = np.random.default_rng(len(lead))
  features = jnp.asarray(rng.normal(size=(*lead, D)) * 2, jnp.float32)
  labels = jnp.asarray(rng.integers(0, K, size=lead), jnp.int32)
  head = AdaptiveSoftmax(num_classes=K, **kwargs)
  params = _params(head, features, labels)
  cutoffs = head.resolved_cutoffs()
  hidden = A.tail_hidden_sizes(D, len(cutoffs), head.div_value)
  assert params['head_kernel'].shape == (D, cutoffs[0] + len(cutoffs))
  assert [params[f'tail_proj_{i}'].shape for i in range(len(cutoffs))] == [(D, h) for h in hidden]
  assert ('head_bias' in params) == kwargs.get('head_bias', False)
  ref = _torch_ref(head, params)
  x, y = np.asarray(features, np.float64).reshape(-1, D), np.asarray(labels).reshape(-1)
  ref_lp = ref.log_prob(x).reshape(*lead, K)

  apply = lambda method: jax.jit(lambda p, *a: head.apply({'params': p}, *a, method=method))
  log_prob = apply('log_prob')(params, features)
  assert log_prob.shape == (*lead, K)
  np.testing.assert_allclose(log_prob, ref_lp, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(jax.nn.logsumexp(log_prob, -1), 0.0, atol=1e-5)
  picked = -np.take_along_axis(ref_lp, np.asarray(labels)[..., None], -1)[..., 0]
  np.testing.assert_allclose(-ref.forward(x, y)[0].reshape(lead), picked, rtol=1e-12)
  for train in (False, True):  # the same exact loss in training and evaluation
    loss = jax.jit(lambda p, f, l: head.apply({'params': p}, f, l, train=train))(params, features,
                                                                               labels)
    assert loss.shape == lead and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, picked, rtol=1e-5, atol=2e-5)
  predict = apply('predict')(params, features)
  assert predict.dtype == jnp.int32
  np.testing.assert_array_equal(predict, np.argmax(ref_lp, -1))
  np.testing.assert_array_equal(predict.reshape(-1), ref.predict(x))
  if 'cutoffs' in kwargs:  # the tails' branch of predict was exercised
    assert np.any(np.asarray(predict) >= cutoffs[0])


def test_cutoffs_default_from_counts_or_zipf():
  counts = np.zeros(1000, np.int64)
  counts[:10] = 1000  # of 10,990 tokens, 8 words hold 72.8% and 9 hold 81.9% >= head_mass 0.8
  counts[10:] = 1
  head = AdaptiveSoftmax(num_classes=1000, class_counts=tuple(int(c) for c in counts))
  assert head.resolved_cutoffs() == A.adaptive_cutoffs(counts)
  assert head.resolved_cutoffs()[0] == 9
  zipf = AdaptiveSoftmax(num_classes=1000).resolved_cutoffs()
  assert zipf == A.adaptive_cutoffs(A.log_uniform_probs(1000))
  assert zipf != head.resolved_cutoffs()
  assert AdaptiveSoftmax(num_classes=1000, cutoffs=[5, 50]).resolved_cutoffs() == (5, 50)


def test_trains_and_gradients_match_full_log_prob():
  """The routed loss's gradients equal those of -log_prob[label] (every tail on every row)."""
  rng = np.random.default_rng(3)
  features = jnp.asarray(rng.normal(size=(64, D)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, K, size=64), jnp.int32)
  head = AdaptiveSoftmax(num_classes=K, cutoffs=(6, 18), capacity_fractions=(0.25, 0.5))
  params = _params(head, features, labels)

  def routed(p, f):
    return jnp.mean(head.apply({'params': p}, f, labels, train=True))

  def full(p, f):
    lp = head.apply({'params': p}, f, method='log_prob')
    return -jnp.mean(jnp.take_along_axis(lp, labels[:, None], -1))

  g_routed, g_full = jax.grad(routed, (0, 1))(params, features), jax.grad(full, (0, 1))(params, features)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_routed, g_full)

  opt = optax.adam(0.05)
  opt_state, first = opt.init(params), float(routed(params, features))
  step = jax.jit(lambda p, s: (lambda l, g: (l, *opt.update(g, s, p)))(*jax.value_and_grad(routed)(p, features)))
  for _ in range(60):
    _, updates, opt_state = step(params, opt_state)
    params = optax.apply_updates(params, updates)
  assert float(routed(params, features)) < 0.3 * first


def test_registered_and_bad_input_errors():
  assert HEADS['adaptive'] is AdaptiveSoftmax
  x, y = jnp.ones((4, D)), jnp.zeros((4,), jnp.int32)
  with pytest.raises(ValueError, match='`num_classes` must be an int >= 2'):
    AdaptiveSoftmax(num_classes=1).init(jax.random.PRNGKey(0), x, y)
  with pytest.raises(ValueError, match=r'`cutoffs` must be .*num_classes - 1 = 39'):
    AdaptiveSoftmax(num_classes=K, cutoffs=(10, 40)).init(jax.random.PRNGKey(0), x, y)
  with pytest.raises(ValueError, match='class_counts must have num_classes = 40 entries; got 3'):
    AdaptiveSoftmax(num_classes=K, class_counts=(3, 2, 1)).init(jax.random.PRNGKey(0), x, y)
  with pytest.raises(ValueError, match='div_value'):
    AdaptiveSoftmax(num_classes=K, cutoffs=(5, 10, 20), div_value=4.0).init(
        jax.random.PRNGKey(0), x, y)  # 16 // 4**3 = 0 units
  head = AdaptiveSoftmax(num_classes=K, cutoffs=(6, 18))
  params = head.init(jax.random.PRNGKey(0), x, y)
  with pytest.raises(ValueError, match='labels'):
    head.apply(params, x, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match='labels'):
    head.apply(params, x, jnp.full((4,), K, jnp.int32))


class ContractTest(chex.TestCase):
  """`softmax_jax.testing.assert_head_contract` per configuration, under each chex variant."""

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  # One capacity rung (0.5: 0, 2 or 4 of the 4 rows) keeps the routing, its switch and its vmap rule
  # while compiling fewer branches: the default's rungs made the eager variants ~2x slower (45 s).
  @parameterized.named_parameters(('two_tails', dict(cutoffs=(3, 6), div_value=2.0, head_bias=True,
                                                     capacity_fractions=(0.5,))))
  def test_head_contract(self, kwargs):
    rng = np.random.default_rng(7)  # every head's test: these [4, 8] features, K = 8 (jax caches)
    features, labels = rng.normal(size=(4, 8)) * 2, rng.integers(0, 8, size=4)
    testing.assert_head_contract(AdaptiveSoftmax(num_classes=8, **kwargs), features, labels,
                                 variant=self.variant)
