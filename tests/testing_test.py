"""softmax_jax.testing: a correct head passes `assert_head_contract`; a broken one fails naming the
property it broke. The README's example of a user's head runs as written."""

import pathlib
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import heads
from softmax_jax import ops
from softmax_jax import testing

K, D, N = 6, 5, 4


class ToyHead(nn.Module):
  """A dense softmax head; `broken` names one way of breaking the contract ('' keeps it)."""
  num_classes: int = K
  broken: str = ''

  @nn.compact
  def logits(self, features):
    if self.broken == 'batch_coupled':  # centred over the batch: each example depends on the others
      features = features - features.mean(axis=tuple(range(features.ndim - 1)), keepdims=True)
    if self.broken == 'nan_to_zero':  # a guard that turns a NaN feature into a finite one
      features = jnp.nan_to_num(features)
    z = nn.Dense(self.num_classes)(features)
    if self.broken == 'nan_spreads':  # 0 for finite features, but one NaN poisons every example
      z = z + 0.0 * jnp.sum(features)
    if self.broken == 'nan_gradient_dropped':  # NaN logits pass no gradient back
      z = jnp.where(jnp.isnan(z), jax.lax.stop_gradient(z), z)
    return z

  def __call__(self, features, labels, *, train=False):
    z = self.logits(features)
    if self.broken == 'doubled_eval_loss':
      return 2.0 * ops.cross_entropy(z, labels)
    if self.broken == 'naive_train_loss' and train:  # log(softmax): log(0) = -inf for large logits
      return -jnp.log(jnp.take_along_axis(jax.nn.softmax(z), labels[..., None], -1))[..., 0]
    if self.broken == 'keepdims_loss':
      return ops.cross_entropy(z, labels)[..., None]
    if self.broken == 'needs_concrete_features':
      z = z + float(jnp.sum(features)) * 0.0
    return ops.cross_entropy(z, labels)

  def log_prob(self, features):
    log_prob = jax.nn.log_softmax(self.logits(features))
    return log_prob + 0.5 if self.broken == 'shifted_log_prob' else log_prob

  def eval_stats(self, features, labels, **options):
    stats = heads.log_prob_eval_stats(self.log_prob(features), labels, **options)
    if self.broken == 'untempered_eval_stats':  # every column at temperature 1
      stats['label_log_prob'] = jnp.broadcast_to(stats['label_log_prob'][..., :1],
                                                 stats['label_log_prob'].shape)
    if self.broken == 'argmin_eval_stats':
      stats['prediction'] = jnp.argmin(self.log_prob(features), -1).astype(jnp.int32)
    if self.broken == 'rank_from_one':
      stats['label_rank'] = stats['label_rank'] + 1
    if self.broken == 'unadjusted_eval_stats':  # the log prior ignored
      stats |= {k: stats[k[len('adjusted_'):]] for k in stats if k.startswith('adjusted_')}
    return stats

  def predict(self, features):
    if self.broken == 'argmin_predict':
      return jnp.argmin(self.log_prob(features), -1)
    if self.broken == 'float_predict':
      return jnp.argmax(self.log_prob(features), -1).astype(jnp.float32)
    return jnp.argmax(self.log_prob(features), -1)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(N, D)) * 2, rng.integers(0, K, size=N)


class PassesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  def test_correct_head_passes_under_each_variant(self):
    testing.assert_head_contract(ToyHead(), *_data(), variant=self.variant)

  def test_rank_one_features_skip_vmap_and_keys_work(self):
    features, labels = _data()
    testing.assert_head_contract(ToyHead(), features[0], labels[0], rng=jax.random.PRNGKey(3),
                                 dtypes=(jnp.float32,))


@pytest.mark.parametrize('broken, prop', [
    ('shifted_log_prob', 'log_prob normalized'),
    ('argmin_predict', r'predict == argmax\(log_prob\)'),
    ('doubled_eval_loss', r'eval loss == -log_prob\[label\]'),
    ('naive_train_loss', 'finite gradients at extreme inputs'),
    ('keepdims_loss', 'shapes and dtypes'),
    ('float_predict', 'shapes and dtypes'),
    ('batch_coupled', 'vmap == batched call'),
    ('needs_concrete_features', 'runs'),
    ('nan_to_zero', 'NaN propagates'),
    ('nan_spreads', 'NaN propagates'),
    ('nan_gradient_dropped', 'NaN propagates'),
    ('untempered_eval_stats', 'eval_stats agrees with log_prob'),
    ('argmin_eval_stats', 'eval_stats agrees with log_prob'),
    ('rank_from_one', 'eval_stats agrees with log_prob'),
    ('unadjusted_eval_stats', 'eval_stats agrees with log_prob'),
])
def test_broken_head_fails_naming_the_property(broken, prop):
  assert re.sub(r'\\', '', prop) in testing.PROPERTIES
  with pytest.raises(testing.HeadContractError, match=rf'^ToyHead breaks "{prop}" \(.*jit'):
    testing.assert_head_contract(ToyHead(broken=broken), *_data())


def test_inexact_eval_loss_can_be_allowed():
  testing.assert_head_contract(ToyHead(broken='doubled_eval_loss'), *_data(), exact_eval_loss=False,
                               dtypes=(jnp.float32,), variant=jax.jit)


def test_readme_example_runs():
  readme = (pathlib.Path(__file__).parent.parent / 'README.md').read_text()
  section = readme.split('## Testing your own head', 1)[1].split('\n## ', 1)[0]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  exec(compile(code, 'README.md', 'exec'), {})  # pylint: disable=exec-used


def test_a_head_without_eval_stats_skips_that_property():
  class NoStats(nn.Module):  # a user's head with the three contract methods only
    num_classes: int = K

    @nn.compact
    def __call__(self, features, labels, *, train=False):
      return ops.cross_entropy(nn.Dense(K, name='out')(features), labels)

    @nn.compact
    def log_prob(self, features):
      return jax.nn.log_softmax(nn.Dense(K, name='out')(features))

    def predict(self, features):
      return jnp.argmax(self.log_prob(features), -1)

  testing.assert_head_contract(NoStats(), *_data(), dtypes=(jnp.float32,), variant=jax.jit)
