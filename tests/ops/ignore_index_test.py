"""`ignore_index`, the one per-example ignore of every loss with integer labels.

An example whose label equals `ignore_index` is as if sliced out of the batch: the loss of the
others equals the loss of the sliced batch, its own loss and its gradient are exactly 0 (also with
NaN logits or features and an out-of-range label there, which are not read), and its label is
not range-checked. Each loss runs under `jit` on six examples, two of them ignored.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import ops

N, K, D = 6, 5, 4
IGNORE = -100
_RNG = np.random.default_rng(0)
KEEP = np.asarray([True, False, True, True, False, True])
Y = jnp.asarray(np.where(KEEP, _RNG.integers(0, K, N), IGNORE), jnp.int32)
X = jnp.asarray(np.where(KEEP[:, None], _RNG.normal(size=(N, K)) * 2, np.nan), jnp.float32)
COS = jnp.tanh(X) * 0.9
FEAT = jnp.asarray(np.where(KEEP[:, None], _RNG.normal(size=(N, D)), np.nan), jnp.float32)
W = jnp.asarray(_RNG.normal(size=(D, K)), jnp.float32)
COUNTS = np.asarray([50.0, 20.0, 10.0, 5.0, 2.0])
TREE = ops.huffman_tree(COUNTS)
NODES = jnp.asarray(_RNG.normal(size=(K - 1, D)), jnp.float32)
HEAD = jnp.asarray(_RNG.normal(size=(D, 3)), jnp.float32)
TAILS = [(jnp.asarray(_RNG.normal(size=(D, 2)), jnp.float32),
          jnp.asarray(_RNG.normal(size=(2, 3)), jnp.float32))]


def _sampled(op, sampler=ops.log_uniform_sampler):
  def loss(f, y, ignore_index):
    sv = sampler(jax.random.key(0), 2, K, true_classes=y, ignore_index=ignore_index)
    return op(f, W.T, y, sv, ignore_index=ignore_index)
  return loss


# name -> (loss(input, labels, ignore_index), input): the input is NaN on the ignored examples.
LOSSES = {
    'cross_entropy': (lambda x, y, i: ops.cross_entropy(x, y, ignore_index=i), X),
    'cross_entropy_options': (lambda x, y, i: ops.cross_entropy(
        x, y, ignore_index=i, label_smoothing=0.1, class_weights=jnp.arange(1.0, K + 1),
        where=jnp.arange(K) != 4), X),
    'focal_loss': (lambda x, y, i: ops.focal_loss(x, y, ignore_index=i), X),
    'focal_loss_gamma_0': (lambda x, y, i: ops.focal_loss(x, y, gamma=0.0, ignore_index=i), X),
    'logit_adjusted_cross_entropy': (lambda x, y, i: ops.logit_adjusted_cross_entropy(
        x, y, log_prior=ops.log_prior(COUNTS), ignore_index=i), X),
    'ldam_loss': (lambda c, y, i: ops.ldam_loss(c, y, class_counts=COUNTS, ignore_index=i), COS),
    'linear_cross_entropy': (lambda f, y, i: ops.linear_cross_entropy(
        f, W, y, ignore_index=i, chunk_size=3), FEAT),
    'linear_cross_entropy_sum': (lambda f, y, i: ops.linear_cross_entropy(
        f, W, y, ignore_index=i, reduction='sum', token_chunk_size=4), FEAT),
    'sampled_softmax_loss': (_sampled(ops.sampled_softmax_loss), FEAT),
    'nce_loss': (_sampled(ops.nce_loss, ops.uniform_sampler), FEAT),
    'negative_sampling_loss': (_sampled(ops.negative_sampling_loss), FEAT),
    'hierarchical_loss': (lambda f, y, i: ops.hierarchical_loss(
        f, y, NODES, TREE, ignore_index=i), FEAT),
    'adaptive_softmax_loss': (lambda f, y, i: ops.adaptive_softmax_loss(
        f, y, HEAD, TAILS, cutoffs=(2,), capacity_fractions=(1 / 2,), ignore_index=i), FEAT),
    'adaptive_softmax_loss_all_tails': (lambda f, y, i: ops.adaptive_softmax_loss(
        f, y, HEAD, TAILS, cutoffs=(2,), capacity_fractions=None, ignore_index=i), FEAT),
}


@pytest.mark.parametrize('name', sorted(LOSSES))
def test_ignored_examples_are_as_if_sliced_out(name):
  loss, a = LOSSES[name]
  f = jax.jit(jax.value_and_grad(lambda a, y, i: loss(a, y, i).sum()), static_argnums=2)
  per_example = jax.jit(loss, static_argnums=2)
  (total, grad), (want_total, want_grad) = f(a, Y, IGNORE), f(a[KEEP], Y[KEEP], None)
  np.testing.assert_allclose(total, want_total, rtol=1e-6)
  np.testing.assert_allclose(grad[KEEP], want_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(grad[~KEEP], 0.0)  # exactly, and no NaN from the NaN inputs
  if name != 'linear_cross_entropy_sum':
    out = np.asarray(per_example(a, Y, IGNORE))
    np.testing.assert_array_equal(out[~KEEP], 0.0)
    np.testing.assert_allclose(out[KEEP], per_example(a[KEEP], Y[KEEP], None), rtol=1e-6)


def test_ignore_index_may_be_a_class():
  """PyTorch's semantics: any int, e.g. a background class 0 in range, is ignored."""
  x, y = jnp.nan_to_num(X), jnp.asarray([0, 1, 0, 2, 3, 0])
  loss = ops.cross_entropy(x, y, ignore_index=0)
  np.testing.assert_array_equal(np.asarray(loss)[[0, 2, 5]], 0.0)
  np.testing.assert_allclose(np.asarray(loss)[[1, 3, 4]],
                             np.asarray(ops.cross_entropy(x, y))[[1, 3, 4]])


def test_mean_divides_by_the_examples_not_ignored():
  mean = ops.linear_cross_entropy(FEAT, W, Y, ignore_index=IGNORE, reduction='mean')
  want = ops.cross_entropy(FEAT[KEEP] @ W, Y[KEEP]).mean()
  np.testing.assert_allclose(mean, want, rtol=1e-6)
  everything = ops.linear_cross_entropy(FEAT, W, jnp.full(N, IGNORE), ignore_index=IGNORE,
                                        reduction='mean')
  assert everything == 0


@pytest.mark.parametrize('name', ['cross_entropy', 'focal_loss', 'hierarchical_loss',
                                  'sampled_softmax_loss', 'linear_cross_entropy'])
def test_only_ignored_labels_escape_the_range_check(name):
  loss, a = LOSSES[name]
  if name == 'sampled_softmax_loss':  # The loss's own check (the sampler's names true_classes).
    loss = lambda f, y, i: ops.sampled_softmax_loss(f, W.T, y, jnp.asarray([0, 1]),
                                                    subtract_log_q=False, ignore_index=i)
  with pytest.raises(ValueError, match=rf'`labels` must lie in \[0, {K}\) or equal `ignore_index` '
                     rf'= {IGNORE}; got {K} at position \(2,\)'):
    loss(a, Y.at[2].set(K), IGNORE)
  with pytest.raises(ValueError, match=rf'`labels` must lie in \[0, {K}\); got {IGNORE}'):
    loss(a, Y, None)


@pytest.mark.parametrize('bad,match', [
    (1.5, r'`ignore_index` must be None or an int; got 1\.5'),
    (True, r'`ignore_index` must be None or an int; got True'),
    (np.asarray([1, 2]), r'`ignore_index` must be None or an int'),
])
def test_bad_ignore_index(bad, match):
  for name in ('cross_entropy', 'linear_cross_entropy', 'adaptive_softmax_loss',
               'hierarchical_loss'):
    loss, a = LOSSES[name]
    with pytest.raises(ValueError, match=match):
      loss(a, Y, bad)


def test_traced_ignore_index_is_rejected():
  with pytest.raises(ValueError, match=r'`ignore_index` must be None or a Python int \(static'):
    jax.jit(lambda i: ops.cross_entropy(X, Y, ignore_index=i))(IGNORE)


def test_sampler_counts_of_ignored_true_classes():
  """A sampler's `true_classes` may hold the ignored label: no range error, and a count."""
  sv = ops.unigram_sampler(jax.random.key(1), 2, COUNTS, true_classes=Y, ignore_index=IGNORE)
  want = ops.unigram_sampler(jax.random.key(1), 2, COUNTS, true_classes=jnp.maximum(Y, 0))
  np.testing.assert_array_equal(sv.sampled, want.sampled)
  np.testing.assert_array_equal(sv.true_expected_count, want.true_expected_count)
  with pytest.raises(ValueError, match=r'`true_classes` must lie in \[0, 5\)'):
    ops.uniform_sampler(jax.random.key(1), 2, K, true_classes=Y)
