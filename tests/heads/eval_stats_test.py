"""`eval_stats` of every head against float64 NumPy statistics of its own `log_prob`; the online
pass over class chunks (ties, chunk boundaries, permuted chunks, NaN); memory independent of K."""

import functools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import heads

K, D, N = 11, 8, 6
TEMPERATURES = (0.5, 1.0, 2.5)

CONFIGS = {
    'dense': lambda: heads.DenseSoftmax(K),
    'dense_fused': lambda: heads.DenseSoftmax(K, fused=True, chunk_size=4),
    'dense_fused_bf16': lambda: heads.DenseSoftmax(K, fused=True, dtype=jnp.bfloat16),
    'sampled': lambda: heads.SampledSoftmax(K),
    'sampled_no_bias': lambda: heads.SampledSoftmax(K, use_bias=False),
    'adaptive': lambda: heads.AdaptiveSoftmax(K, cutoffs=(4, 8), div_value=2.0),
    'hierarchical': lambda: heads.HierarchicalSoftmax(K, class_counts=tuple(range(K, 0, -1))),
    'hierarchical_balanced': lambda: heads.HierarchicalSoftmax(K, tree='balanced'),
    'margin': lambda: heads.MarginSoftmax(K, kind='cosface', scale=8.0),
    'imbalanced_ldam': lambda: heads.ImbalancedSoftmax(K, loss='ldam', class_counts=tuple(
        range(1, K + 1))),
    'imbalanced_ce': lambda: heads.ImbalancedSoftmax(K),
}


def _reference(log_prob, labels, temperatures, log_prior=None):
  """float64 NumPy statistics of `log_prob: [..., K]` (minus `log_prior`, renormalized)."""
  lp = np.asarray(log_prob, np.float64)
  if log_prior is not None:
    lp = lp - np.asarray(log_prior, np.float64)
  y = np.asarray(labels)[..., None]
  label = np.take_along_axis(lp, y, -1)
  out = {'prediction': lp.argmax(-1), 'label_rank': (lp > label).sum(-1)}
  scaled = [lp / t - np.logaddexp.reduce(lp / t, axis=-1, keepdims=True) for t in temperatures]
  out['label_log_prob'] = np.stack([np.take_along_axis(s, y, -1)[..., 0] for s in scaled], -1)
  out['confidence'] = np.stack([np.exp(s.max(-1)) for s in scaled], -1)
  return out


def _setup(name, lead=(N,), seed=0):
  rng = np.random.default_rng(seed)
  head = CONFIGS[name]()
  x = jnp.asarray(rng.normal(size=(*lead, D)) * 2, jnp.float32)
  y = jnp.asarray(rng.integers(0, K, size=lead), jnp.int32)
  params = head.init(jax.random.PRNGKey(seed), x, y, train=False)['params']
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(p.dtype), params)
  prior = jnp.asarray(np.log(rng.dirichlet(np.ones(K))), jnp.float32)
  return head, params, x, y, prior


def _assert_matches(stats, ref, adjusted=None, atol=1e-5):
  for key in ('prediction', 'label_rank'):
    assert stats[key].dtype == jnp.int32, key
    np.testing.assert_array_equal(stats[key], ref[key], err_msg=key)
  for key in ('label_log_prob', 'confidence'):
    assert stats[key].dtype == jnp.float32, key
    np.testing.assert_allclose(stats[key], ref[key], rtol=atol, atol=atol, err_msg=key)
  if adjusted is not None:
    _assert_matches({k[len('adjusted_'):]: v for k, v in stats.items()
                     if k.startswith('adjusted_')}, adjusted, atol=atol)
  else:
    assert not any(k.startswith('adjusted_') for k in stats)


class HeadsTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(name=sorted(CONFIGS), chunk_size=[None, 3])
  def test_eval_stats_match_float64_statistics_of_log_prob(self, name, chunk_size):
    head, params, x, y, prior = _setup(name)
    lp = head.apply({'params': params}, x, method='log_prob')
    stats = self.variant(lambda p, x, y, prior: head.apply(
        {'params': p}, x, y, temperatures=TEMPERATURES, log_prior=prior, chunk_size=chunk_size,
        method='eval_stats'))(params, x, y, prior)
    atol = 2e-2 if 'bf16' in name else 1e-5
    _assert_matches(stats, _reference(lp, y, TEMPERATURES),
                    _reference(lp, y, TEMPERATURES, prior), atol=atol)
    np.testing.assert_array_equal(stats['prediction'],
                                  head.apply({'params': params}, x, method='predict'))

  @parameterized.parameters(*sorted(CONFIGS))
  def test_vmap_and_leading_dims_equal_the_batched_call(self, name):
    head, params, x, y, prior = _setup(name, lead=(2, 3))
    call = lambda x, y: head.apply({'params': params}, x, y, temperatures=(1.0, 2.0),
                                   log_prior=prior, chunk_size=4, method='eval_stats')
    batched = jax.jit(call)(x, y)
    mapped = jax.jit(jax.vmap(call))(x, y)
    lp = head.apply({'params': params}, x, method='log_prob')
    assert batched['label_log_prob'].shape == (2, 3, 2)
    _assert_matches(batched, _reference(lp, y, (1.0, 2.0)), _reference(lp, y, (1.0, 2.0), prior),
                    atol=2e-2 if 'bf16' in name else 1e-5)
    chex.assert_trees_all_close(mapped, batched, atol=1e-6, rtol=1e-6)

  @parameterized.parameters(*sorted(CONFIGS))
  def test_nan_row_is_nan_for_that_row_only(self, name):
    head, params, x, y, _ = _setup(name)
    call = jax.jit(lambda x: head.apply({'params': params}, x, y, temperatures=TEMPERATURES,
                                        chunk_size=4, method='eval_stats'))
    clean, poisoned = call(x), call(x.at[1, 0].set(jnp.nan))
    for key in ('label_log_prob', 'confidence'):
      assert np.all(np.isnan(poisoned[key][1])), (key, poisoned[key][1])
    assert 0 <= int(poisoned['prediction'][1]) < K
    rest = lambda t: jax.tree.map(lambda a: np.delete(np.asarray(a), 1, axis=0), t)
    chex.assert_trees_all_close(rest(poisoned), rest(clean))

  @parameterized.parameters('dense', 'sampled', 'hierarchical', 'dense_fused')
  def test_traced_label_out_of_range_is_nan(self, name):
    head, params, x, y, _ = _setup(name)
    stats = jax.jit(lambda y: head.apply({'params': params}, x, y, chunk_size=4,
                                         method='eval_stats'))(y.at[2].set(K + 1))
    assert np.isnan(stats['label_log_prob'][2, 0])
    assert np.all(np.isfinite(np.delete(np.asarray(stats['label_log_prob']), 2, 0)))

  @parameterized.parameters('dense', 'sampled', 'hierarchical')
  def test_bad_options_are_named(self, name):
    head, params, x, y, _ = _setup(name)
    apply = functools.partial(head.apply, {'params': params}, x, y, method='eval_stats')
    with pytest.raises(ValueError, match=r'`temperatures` must be a non-empty .*got \(\)'):
      apply(temperatures=())
    with pytest.raises(ValueError, match=r'`temperatures` .*> 0.*got \(1.0, 0.0\)'):
      apply(temperatures=(1.0, 0.0))
    with pytest.raises(ValueError, match=r'`log_prior` must be a \[num_classes\] = \(11,\)'):
      apply(log_prior=jnp.zeros(K - 1))
    with pytest.raises(ValueError, match=r'`labels` must lie in \[0, 11\)'):
      head.apply({'params': params}, x, y.at[0].set(K), method='eval_stats')


def _tied_scores(rng, n, k):
  z = np.round(rng.normal(size=(n, k)), 0).astype(np.float32)  # many ties, also across chunks
  z[0] = 1.0  # a row that is all ties
  z[1, [2, k - 1]] = 10.0  # a tie split by every chunk boundary
  return z


@pytest.mark.parametrize('chunk_size', [1, 2, 3, 5, 7])
def test_online_pass_ties_and_chunk_boundaries(chunk_size):
  rng = np.random.default_rng(4)
  n, k = 9, 7
  z = _tied_scores(rng, n, k)
  y = rng.integers(0, k, n).astype(np.int32)
  y[1] = k - 1  # tied with class 2 at the top: prediction 2, rank 0
  prior = np.log(rng.dirichlet(np.ones(k))).astype(np.float32)
  stats = jax.jit(lambda z, y: heads.chunked_eval_stats(
      lambda a, b: jax.lax.dynamic_slice_in_dim(z, a, b, -1), y, num_classes=k,
      chunk_size=chunk_size, temperatures=TEMPERATURES, log_prior=prior))(z, y)
  _assert_matches(stats, _reference(z, y, TEMPERATURES), _reference(z, y, TEMPERATURES, prior))
  assert int(stats['prediction'][1]) == 2 and int(stats['label_rank'][1]) == 0


@pytest.mark.parametrize('chunk_size', [2, 3, 7])
def test_permuted_chunks_break_ties_by_class_id(chunk_size):
  rng = np.random.default_rng(5)
  n, k = 9, 7
  z = _tied_scores(rng, n, k)
  y = rng.integers(0, k, n).astype(np.int32)
  perm = rng.permutation(k).astype(np.int32)  # position p holds class perm[p]
  stats = heads.chunked_eval_stats(
      lambda a, b: jax.lax.dynamic_slice_in_dim(z[:, perm], a, b, -1), y, num_classes=k,
      chunk_size=chunk_size, temperatures=TEMPERATURES, class_ids=perm)
  _assert_matches(stats, _reference(z, y, TEMPERATURES))


def _temp_bytes(name, k, chunk):
  """Compiled temporary memory of `eval_stats` at K classes (N=64, d=32, 4 temperatures)."""
  head = {'dense': lambda: heads.DenseSoftmax(k),
          'dense_fused': lambda: heads.DenseSoftmax(k, fused=True),
          'sampled': lambda: heads.SampledSoftmax(k),
          'hierarchical': lambda: heads.HierarchicalSoftmax(k)}[name]()
  x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  y = jax.ShapeDtypeStruct((64,), jnp.int32)
  params = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), jnp.zeros((2, 32)),
                                            jnp.zeros((2,), jnp.int32)))['params']
  prior = jax.ShapeDtypeStruct((k,), jnp.float32)
  fn = jax.jit(lambda p, x, y, prior: head.apply(
      {'params': p}, x, y, temperatures=(0.5, 1.0, 2.0, 4.0), log_prior=prior, chunk_size=chunk,
      method='eval_stats'))
  return fn.lower(params, x, y, prior).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('name', ['dense_fused', 'sampled', 'hierarchical'])
def test_chunked_heads_temporary_memory_does_not_grow_with_num_classes(name):
  small, large = _temp_bytes(name, 2048, 256), _temp_bytes(name, 65536, 256)
  # [N, K] float32 at K = 64k would be 16 MiB; the chunked pass holds a few [N, chunk] blocks.
  assert large <= 1.1 * small + 4096, (small, large)
  assert large < 64 * 65536 * 4 / 8, (small, large)


def test_the_memory_measure_sees_a_full_log_prob():
  # The plain dense head forms log_prob [N, K]: its temporaries do grow with K.
  small, large = _temp_bytes('dense', 2048, 256), _temp_bytes('dense', 65536, 256)
  assert large > 64 * 65536 * 4, (small, large)
