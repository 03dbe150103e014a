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


# Vocabulary padding (config.head.pad_classes_to) and the approximate top-k (issue 16 item 3).

def _padded_weights(params, k_pad, rng):
  """`params` of an unpadded head with `k_pad - K` junk columns appended: large, so that any
  leak of a padded class would win every argmax and dominate every normalizer."""
  extra = k_pad - params['kernel'].shape[1]
  kernel = np.concatenate([params['kernel'], 10 * rng.normal(size=(D, extra))], axis=1)
  bias = np.concatenate([params['bias'], np.full(extra, 50.0)])
  return {'kernel': jnp.asarray(kernel, jnp.float32), 'bias': jnp.asarray(bias, jnp.float32)}


@pytest.mark.parametrize('fused', [False, True])
def test_padded_head_equals_unpadded_on_the_same_weights(fused):
  """pad_classes_to=16 (K = 7): the same losses and gradients (smoothing over the K real
  classes), log-probs, predictions, top-k and eval_stats as the unpadded head with the first K
  columns; the padded classes have probability exactly 0 and gradient exactly 0; a traced label
  in the padding gives a NaN loss (an out-of-range label), not +inf."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 3, D)) * 2, jnp.float32)
  y = jnp.asarray(rng.integers(0, K, size=(2, 3)), jnp.int32)
  opts = dict(num_classes=K, label_smoothing=0.1, fused=fused, chunk_size=3 if fused else None)
  plain, padded = DenseSoftmax(**opts), DenseSoftmax(**opts, pad_classes_to=16)
  assert padded.padded_num_classes == 16
  params = plain.init(jax.random.PRNGKey(0), x, y)['params']
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), params)
  padded_params = _padded_weights(params, 16, rng)
  log_prior = jnp.log(jnp.linspace(1.0, 2.0, K) / jnp.sum(jnp.linspace(1.0, 2.0, K)))

  @jax.jit
  def everything(p, pp):
    out = {}
    for name, head, w in (('plain', plain, p), ('padded', padded, pp)):
      apply = lambda method, *a, **kw: head.apply({'params': w}, *a, method=method, **kw)  # pylint: disable=cell-var-from-loop
      train = lambda w, x: head.apply({'params': w}, x, y, train=True).sum()  # pylint: disable=cell-var-from-loop
      out[name] = dict(train=jax.value_and_grad(train, argnums=(0, 1))(w, x),
                       stats=apply('eval_stats', x, y, temperatures=(1.0, 2.0), log_prior=log_prior))
      if not fused:  # the rest does not depend on `fused`
        out[name] |= dict(eval=apply(None, x, y, train=False), log_prob=apply('log_prob', x),
                          predict=apply('predict', x), top_k=apply('top_k', x, 3))
    # A traced label in the padding [K, 16) is out of range like any label >= K: NaN, not +inf.
    out['padded']['bad'] = padded.apply({'params': pp}, x, y.at[0, 0].set(K), train=True)
    if not fused:
      out['padded']['padded_log_prob'] = padded.apply({'params': pp}, x, method='log_prob', padded=True)
    return out

  out = everything(params, padded_params)
  a, b = out['plain'], out['padded']
  (loss_a, (grad_w_a, grad_x_a)), (loss_b, (grad_w_b, grad_x_b)) = a['train'], b['train']
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
  np.testing.assert_allclose(grad_x_b, grad_x_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_w_b['kernel'][:, :K], grad_w_a['kernel'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_w_b['bias'][:K], grad_w_a['bias'], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grad_w_b['kernel'][:, K:], 0.0)  # exactly: the padding never moves
  np.testing.assert_array_equal(grad_w_b['bias'][K:], 0.0)
  for key, value in a['stats'].items():
    np.testing.assert_allclose(b['stats'][key], value, rtol=1e-5, atol=1e-5, err_msg=key)
  bad = np.asarray(b['bad'])
  assert np.isnan(bad[0, 0]) and np.all(np.isfinite(bad.reshape(-1)[1:]))
  if fused:
    return
  for key in ('eval', 'log_prob'):
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-5)
  assert b['log_prob'].shape == (2, 3, K) and b['padded_log_prob'].shape == (2, 3, 16)
  np.testing.assert_array_equal(b['padded_log_prob'][..., K:], -np.inf)
  np.testing.assert_array_equal(np.exp(b['padded_log_prob'][..., K:]), 0.0)
  np.testing.assert_allclose(b['padded_log_prob'][..., :K], a['log_prob'], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(b['predict'], a['predict'])
  assert np.all(np.asarray(b['predict']) < K) and np.all(np.asarray(b['top_k'][1]) < K)
  np.testing.assert_array_equal(b['top_k'][1], a['top_k'][1])
  np.testing.assert_allclose(b['top_k'][0], a['top_k'][0], rtol=1e-5, atol=1e-5)
  ref = _ref_log_prob(x, params)  # and both against the float64 reference
  np.testing.assert_allclose(b['log_prob'], ref, rtol=1e-5, atol=1e-5)


def test_padded_sigsoftmax_head_keeps_the_head_contract():
  """Padded, sigsoftmax and the approximate top-k at once (NaN rows, vmap, bfloat16 features,
  extreme inputs with -inf padding); one jit variant (the plain ones run under all three above;
  the fused padded path is compared with the unpadded one above)."""
  rng = np.random.default_rng(7)
  features, labels = rng.normal(size=(4, 8)) * 2, rng.integers(0, 8, size=4)
  head = DenseSoftmax(num_classes=8, pad_classes_to=16, approx_top_k=True, label_smoothing=0.1,
                      sigsoftmax=True)
  testing.assert_head_contract(head, features, labels, variant=jax.jit)


@pytest.mark.parametrize('field, value, match', [
    ('pad_classes_to', 0, r'`pad_classes_to` must be an integer >= 1 \(config.head.pad_classes_to'),
    ('pad_classes_to', 2.5, r'`pad_classes_to` must be an integer >= 1'),
    ('recall_target', 0.0, r'`recall_target` \(of jax.lax.approx_max_k.*\(0, 1\]; got 0.0'),
])
def test_bad_padding_and_recall_target_are_named(field, value, match):
  head = DenseSoftmax(num_classes=K, **{field: value})
  with pytest.raises(ValueError, match=rf'^DenseSoftmax: {match}'):
    jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), jnp.ones((2, D)), method='log_prob'))


def test_approx_top_k_is_exact_on_cpu_with_recall_one():
  """`approx_top_k=True` (padded to 128): on CPU XLA's approx_max_k is exact, so predict and
  top_k give the float64 reference's argmax and order, and the measured recall is 1.0."""
  rng = np.random.default_rng(5)
  k = 40
  x = jnp.asarray(rng.normal(size=(16, D)), jnp.float32)
  head = DenseSoftmax(num_classes=k, approx_top_k=True, pad_classes_to=128)
  params = DenseSoftmax(num_classes=k).init(jax.random.PRNGKey(0), x, method='log_prob')['params']
  params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
  padded = {'kernel': jnp.pad(params['kernel'], ((0, 0), (0, 128 - k))),
            'bias': jnp.pad(params['bias'], (0, 128 - k), constant_values=100.0)}
  f = jax.jit(lambda p: (head.apply({'params': p}, x, 5, method='top_k'),
                         head.apply({'params': p}, x, method='predict'),
                         head.apply({'params': p}, x, 5, method='top_k_recall')))
  (values, ids), predict, recall = f(padded)
  ref = _ref_log_prob(x, params)
  np.testing.assert_array_equal(ids, np.argsort(-ref, axis=-1, kind='stable')[:, :5])
  np.testing.assert_allclose(values, np.sort(ref, axis=-1)[:, ::-1][:, :5], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(predict, np.argmax(ref, axis=-1))
  assert float(recall) == 1.0
  with pytest.raises(ValueError, match=r'top_k `k` must be <= num_classes = 40; got 41'):
    head.apply({'params': padded}, x, 41, method='top_k')


def test_top_k_recall_counts_the_exact_ids_found():
  """Recall of [[0, 1, 2], [3, 4, 5]] against [[2, 1, 9], [5, 3, 4]]: (2/3 + 3/3) / 2."""
  from softmax_jax.heads import _eval  # pylint: disable=g-import-not-at-top
  recall = _eval.top_k_recall(jnp.asarray([[0, 1, 2], [3, 4, 5]]), jnp.asarray([[2, 1, 9], [5, 3, 4]]))
  np.testing.assert_allclose(recall, (2 / 3 + 1) / 2, rtol=1e-6)


def test_sigsoftmax_matches_a_float64_reference():
  """`sigsoftmax=True`: log_prob = log_softmax(z + log_sigmoid(z)) (Kanai et al. 2018), the
  training loss its smoothed cross-entropy, predict its argmax; with fused=True it is an error."""
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(5, D)) * 2, jnp.float32)
  y = jnp.asarray(rng.integers(0, K, size=5), jnp.int32)
  head = DenseSoftmax(num_classes=K, sigsoftmax=True, label_smoothing=0.2)
  params = head.init(jax.random.PRNGKey(0), x, y)['params']
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), params)
  z = np.asarray(x, np.float64) @ np.asarray(params['kernel'], np.float64) + np.asarray(
      params['bias'], np.float64)
  s = z - np.logaddexp(0.0, -z)  # z + log sigmoid(z)
  ref = s - s.max(-1, keepdims=True)
  ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
  log_prob, loss, predict = jax.jit(lambda p: (
      head.apply({'params': p}, x, method='log_prob'), head.apply({'params': p}, x, y, train=True),
      head.apply({'params': p}, x, method='predict')))(params)
  np.testing.assert_allclose(log_prob, ref, rtol=1e-5, atol=1e-5)
  target = 0.8 * np.eye(K)[np.asarray(y)] + 0.2 / K
  np.testing.assert_allclose(loss, -(target * ref).sum(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(predict, np.argmax(ref, -1))
  assert not np.allclose(ref, _ref_log_prob(x, params), atol=1e-2)  # not the plain softmax
  fused = DenseSoftmax(num_classes=K, sigsoftmax=True, fused=True)
  with pytest.raises(ValueError, match=r'^DenseSoftmax: sigsoftmax=True needs the \[..., K\] '
                     r'logits, which fused=True'):
    fused.init(jax.random.PRNGKey(0), x, y)


@pytest.mark.parametrize('fused', [False, True])
def test_vocab_parallel_head_equals_the_plain_head(fused):
  """vocab_parallel_axis='model' inside shard_map on a 2 x 4 mesh, K = 7 padded to 8: the same
  losses, gradients (params and features), log-probs and predictions as the plain head on the
  same params; the padding keeps probability and gradient exactly 0; the same eval statistics
  (two temperatures, a log prior); top_k raises."""
  from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(4, 3, D)) * 2, jnp.float32)
  y = jnp.asarray(rng.integers(0, K, size=(4, 3)), jnp.int32)
  opts = dict(num_classes=K, fused=fused, chunk_size=1 if fused else None, pad_classes_to=8)
  plain, vp = DenseSoftmax(**opts), DenseSoftmax(**opts, vocab_parallel_axis='model')
  params = plain.init(jax.random.PRNGKey(0), x, y)['params']
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), params)
  pspec = {'kernel': P(None, 'model'), 'bias': P('model')}
  fspec, yspec = P('data', None, None), P('data', None)

  def both(head, shard):
    def run(p, x, y):
      loss_fn = lambda p, x: head.apply({'params': p}, x, y, train=True).sum()
      loss, grads = jax.value_and_grad(loss_fn, (0, 1))(p, x)  # p's: summed over 'data'
      loss = jax.lax.psum(loss, 'data') if shard else loss
      log_p = head.apply({'params': p}, x, method=head.log_prob, padded=True)
      return loss, grads, log_p, head.apply({'params': p}, x, method=head.predict)
    if not shard:
      return jax.jit(run)
    return jax.jit(jax.shard_map(
        run, mesh=mesh, in_specs=(pspec, fspec, yspec),
        out_specs=(P(), (pspec, fspec), P('data', None, 'model'), yspec)))

  got, want = both(vp, True)(params, x, y), both(plain, False)(params, x, y)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=str(path))
  assert np.all(np.asarray(got[2])[..., K:] == -np.inf)
  assert not np.asarray(got[1][0]['kernel'])[:, K:].any()

  prior = jnp.asarray(rng.normal(size=K), jnp.float32)

  def stats(head):
    return lambda p, x, y: head.apply({'params': p}, x, y, method=head.eval_stats,
                                      temperatures=(1.0, 2.0), log_prior=prior)
  got = jax.jit(jax.shard_map(stats(vp), mesh=mesh, in_specs=(pspec, fspec, yspec),
                              out_specs=P('data')))(params, x, y)
  _assert_same_stats(got, jax.jit(stats(plain))(params, x, y))
  with pytest.raises(ValueError, match='top_k is not vocabulary-parallel'):
    jax.shard_map(lambda p, x: vp.apply({'params': p}, x, 2, method=vp.top_k), mesh=mesh,
                  in_specs=(pspec, fspec), out_specs=P())(params, x)


def _assert_same_stats(got, want):
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-5, atol=1e-5,
                               err_msg=key)


@pytest.mark.parametrize('fused', [False, True])
def test_vocab_parallel_head_under_a_context_mesh(fused):
  """Outside a shard_map but under `jax.set_mesh` of a 2 x 4 ('data', 'model') mesh (the
  trainer's), the head with vocab_parallel_axis wraps itself in a shard_map over the full params
  placed P(None, 'model'): the plain head's loss, gradients, log-probs, predictions and eval
  statistics; the kernel gradient stays sharded on 'model'."""
  from jax.sharding import AxisType, NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(4, 3, D)) * 2, jnp.float32)
  y = jnp.asarray(rng.integers(0, K, size=(4, 3)), jnp.int32)
  opts = dict(num_classes=K, fused=fused, chunk_size=1 if fused else None, pad_classes_to=8)
  plain, vp = DenseSoftmax(**opts), DenseSoftmax(**opts, vocab_parallel_axis='model')
  params = vp.init(jax.random.PRNGKey(0), x, y)['params']  # no mesh: the plain, full params
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), params)
  prior = jnp.asarray(rng.normal(size=K), jnp.float32)

  def run(head):
    def f(p, x, y):
      loss_fn = lambda p, x: head.apply({'params': p}, x, y, train=True).sum()
      loss, grads = jax.value_and_grad(loss_fn, (0, 1))(p, x)
      log_p = head.apply({'params': p}, x, method=head.log_prob)
      stats = head.apply({'params': p}, x, y, method=head.eval_stats, temperatures=(1.0, 2.0),
                         log_prior=prior)
      return loss, grads, log_p, head.apply({'params': p}, x, method=head.predict), stats
    return jax.jit(f)

  want = run(plain)(params, x, y)
  placed = {'kernel': jax.device_put(params['kernel'], NamedSharding(mesh, P(None, 'model'))),
            'bias': jax.device_put(params['bias'], NamedSharding(mesh, P('model')))}
  xs = jax.device_put(x, NamedSharding(mesh, P('data')))
  with jax.set_mesh(mesh):
    got = run(vp)(placed, xs, y)
  _assert_same_stats(got[4], want[4])
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[:4]),
                          jax.tree_util.tree_leaves(want[:4])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=str(path))
  assert got[2].shape == (4, 3, K)
  assert got[1][0]['kernel'].sharding.spec == P(None, 'model')
  assert not np.asarray(got[1][0]['kernel'])[:, K:].any()
  with jax.set_mesh(mesh), pytest.raises(ValueError, match='must divide by the size 4'):
    DenseSoftmax(num_classes=K, vocab_parallel_axis='model').apply(
        {'params': {'kernel': params['kernel'][:, :K], 'bias': params['bias'][:K]}}, x, y)
