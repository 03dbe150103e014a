"""LM backbones (LSTM, causal Transformer) and LanguageModel = backbone + head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax.heads.dense import DenseSoftmax
from softmax_jax.heads.imbalanced import ImbalancedSoftmax
from softmax_jax.models import lm as lm_lib
from softmax_jax.models.lstm import LSTMLM
from softmax_jax.models.transformer import TransformerLM

V, B, T = 37, 3, 6


def tokens(key, shape=(B, 2 * T)):
  return jax.random.randint(jax.random.PRNGKey(key), shape, 0, V)


def test_lstm_carry_continues_across_windows():
  num_layers = 2
  model = LSTMLM(vocab_size=V, embed_dim=8, hidden=16, num_layers=num_layers)
  x = tokens(0)
  variables = model.init(jax.random.PRNGKey(1), x)
  apply = jax.jit(model.apply)
  whole, carry = apply(variables, x, model.initial_carry(B))
  first, mid = apply(variables, x[:, :T], model.initial_carry(B))
  second, end = apply(variables, x[:, T:], mid)
  np.testing.assert_allclose(np.concatenate([first, second], 1), whole, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), end, carry)
  # The carry has content: restarting the second window from zeros changes its features.
  fresh, _ = apply(variables, x[:, T:], model.initial_carry(B))
  assert np.abs(np.asarray(fresh) - np.asarray(second)).max() > 1e-3
  assert whole.shape == (B, 2 * T, 16) and len(carry) == num_layers


def test_lstm_zaremba_init_and_dropout():
  model = LSTMLM(vocab_size=V, embed_dim=8, hidden=16, init_scale=0.1, dropout=0.5)
  x = tokens(2)
  variables = model.init(jax.random.PRNGKey(1), x)
  leaves = jax.tree.leaves(variables['params'])
  assert len(leaves) == 1 + 2 * 12  # embedding + per layer 8 kernels and 4 biases
  values = np.concatenate([np.ravel(leaf) for leaf in leaves])  # ~2.4k draws of uniform(-0.1, 0.1)
  assert np.abs(values).max() <= 0.1 and np.abs(values).max() > 0.099
  assert abs(values.std() - 0.1 / np.sqrt(3)) < 0.003 and abs(values.mean()) < 0.005
  assert all(np.abs(leaf).max() > 0.05 for leaf in leaves)  # biases too: no zero-initialized leaf

  @jax.jit
  def features(key):  # evaluation twice, training with keys `key` and `key + 1`
    evals = [model.apply(variables, x, train=False)[0] for _ in range(2)]
    trains = [model.apply(variables, x, train=True, rngs={'dropout': jax.random.fold_in(key, i)})[0]
              for i in range(2)]
    return evals + trains

  eval_a, eval_b, train_a, train_b = map(np.asarray, features(jax.random.PRNGKey(3)))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert np.mean(eval_a == 0) < 0.01
  assert np.abs(train_a - train_b).max() > 1e-3
  assert 0.35 < np.mean(train_a == 0) < 0.65  # the output dropout zeroes about half


def test_lstm_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r'LSTMLM: hidden must be an integer >= 1, got 0'):
    LSTMLM(vocab_size=V, hidden=0).init(jax.random.PRNGKey(0), tokens(0))
  with pytest.raises(ValueError, match=r'LSTMLM: tokens must be \[B, T\] int'):
    LSTMLM(vocab_size=V).init(jax.random.PRNGKey(0), jnp.zeros((2, 3, 4), jnp.int32))
  with pytest.raises(ValueError, match=r'one \(c, h\) pair per layer \(2\), got 1'):
    model = LSTMLM(vocab_size=V, hidden=4)
    model.init(jax.random.PRNGKey(0), tokens(0), model.initial_carry(B)[:1])


def test_transformer_is_causal():
  model = TransformerLM(vocab_size=V, d_model=16, num_layers=2, num_heads=2, mlp_dim=32, max_len=16)
  x = tokens(3, (B, 10))
  variables = model.init(jax.random.PRNGKey(4), x)
  positions = (0, 4, 9)
  variants = jnp.concatenate([x] + [x.at[:, t].set((x[:, t] + 1) % V) for t in positions])
  outs = np.asarray(jax.jit(lambda v, t: model.apply(v, t)[0])(variables, variants)).reshape(4, B, 10, 16)
  base = outs[0]
  for t, out in zip(positions, outs[1:]):
    np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=1e-5, atol=1e-6)  # the past is untouched
    assert np.abs(out[:, t:] - base[:, t:]).max(axis=-1).min() > 1e-4  # t and every later position see it
  assert base.shape == (B, 10, 16) and model.initial_carry(B) is None


def test_transformer_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r'T=10 exceeds max_len=8'):
    TransformerLM(vocab_size=V, d_model=8, num_heads=2, max_len=8).init(jax.random.PRNGKey(0), tokens(0, (1, 10)))
  with pytest.raises(ValueError, match=r'num_heads=3 must divide d_model=8'):
    TransformerLM(vocab_size=V, d_model=8, num_heads=3).init(jax.random.PRNGKey(0), tokens(0, (1, 4)))


@pytest.mark.parametrize('backbone', [dict(name='lstm', embed_dim=8, hidden=16),
                                      dict(name='transformer', d_model=16, num_heads=2, mlp_dim=32)])
def test_language_model_eval_loss_is_minus_log_prob_of_label(backbone):
  model = lm_lib.build_language_model(backbone, {'name': 'dense'}, V)
  assert isinstance(model.head, DenseSoftmax) and model.head.num_classes == V
  x, y = tokens(5, (B, T)), tokens(6, (B, T))
  carry = model.initial_carry(B)
  variables = model.init(jax.random.PRNGKey(7), x, y, carry=carry, train=False)

  @jax.jit
  def everything(variables, carry):
    return (model.apply(variables, x, y, carry=carry, train=False),
            model.apply(variables, x, carry, method='log_prob'),
            model.apply(variables, x, carry, method='predict'),
            model.apply(variables, x, y, carry, method='score'))

  (loss, carry_a), (log_probs, carry_b), (predictions, _), (nll, scored, _) = everything(variables, carry)
  assert loss.shape == (B, T) and log_probs.shape == (B, T, V)
  lp = np.asarray(log_probs, np.float64)
  np.testing.assert_allclose(np.log(np.exp(lp).sum(-1)), 0.0, atol=1e-5)
  expected = -np.take_along_axis(lp, np.asarray(y)[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(nll, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(predictions, lp.argmax(-1))
  np.testing.assert_array_equal(scored, predictions)
  jax.tree.map(np.testing.assert_array_equal, carry_a, carry_b)


def test_build_language_model_fills_class_counts_and_names_bad_keys():
  counts = np.arange(V, 0, -1)
  model = lm_lib.build_language_model({'name': 'lstm', 'hidden': 8}, {'name': 'imbalanced', 'loss': 'cb'}, V,
                                      counts)
  assert isinstance(model.head, ImbalancedSoftmax) and model.head.class_counts == tuple(range(V, 0, -1))
  assert model.backbone.vocab_size == V and model.backbone.hidden == 8
  assert lm_lib.build_language_model({'name': 'lstm'}, {'name': 'dense'}, V, counts).head.num_classes == V
  with pytest.raises(ValueError, match=r"Unknown config key config.model.hiden for LSTMLM.*Did you mean 'hidden'"):
    lm_lib.build_language_model({'name': 'lstm', 'hiden': 8}, {'name': 'dense'}, V)
  with pytest.raises(ValueError, match=r"config.model.name='gru' is unknown; choose one of \['lstm', 'transformer'\]"):
    lm_lib.build_language_model({'name': 'gru'}, {'name': 'dense'}, V)
  with pytest.raises(ValueError, match=r'class_counts has 3 entries; it needs vocab_size = 37'):
    lm_lib.build_language_model({'name': 'lstm'}, {'name': 'imbalanced'}, V, [3, 2, 1])


def test_steps_reach_only_heads_that_use_them():
  model = lm_lib.build_language_model({'name': 'lstm', 'hidden': 8}, {'name': 'imbalanced', 'loss': 'ldam',
                                                                      'drw_start_step': 5}, V, np.arange(V, 0, -1))
  x, y = tokens(8, (B, T)), tokens(9, (B, T))
  variables = model.init(jax.random.PRNGKey(0), x, y, carry=None, train=False)
  loss = jax.jit(lambda step: model.apply(variables, x, y, carry=None, train=True, step=step)[0])
  before, after = np.asarray(loss(jnp.int32(0))), np.asarray(loss(jnp.int32(10)))
  assert np.abs(before - after).max() > 1e-4  # deferred re-weighting kicked in
  dense = lm_lib.build_language_model({'name': 'lstm', 'hidden': 8}, {'name': 'dense'}, V)
  dv = jax.eval_shape(lambda: dense.init(jax.random.PRNGKey(0), x, y, carry=None, train=False))
  out, _ = jax.eval_shape(lambda v: dense.apply(v, x, y, carry=None, train=True, step=jnp.int32(3)), dv)
  assert out.shape == (B, T)  # DenseSoftmax has no `step` argument: LanguageModel does not pass it


@pytest.mark.parametrize('head', [{'name': 'dense'}, {'name': 'sampled'},
                                  {'name': 'hierarchical'}])
def test_language_model_eval_stats_forward_the_head_from_one_backbone_pass(head):
  model = lm_lib.build_language_model(dict(name='lstm', embed_dim=8, hidden=16), head, V)
  x, y = tokens(5, (B, T)), tokens(6, (B, T))
  carry = model.initial_carry(B)
  variables = model.init(jax.random.PRNGKey(7), x, y, carry=carry, train=False)
  prior = jnp.log(jnp.linspace(1.0, 2.0, V) / jnp.sum(jnp.linspace(1.0, 2.0, V)))

  @jax.jit
  def everything(variables, carry):
    return (model.apply(variables, x, y, carry, temperatures=(0.5, 2.0), log_prior=prior,
                        method='eval_stats'),
            model.apply(variables, x, carry, method='log_prob'))

  (stats, carry_a), (log_probs, carry_b) = everything(variables, carry)
  lp = np.asarray(log_probs, np.float64)
  assert stats['label_log_prob'].shape == (B, T, 2) and stats['prediction'].shape == (B, T)
  np.testing.assert_array_equal(stats['prediction'], lp.argmax(-1))
  label = np.take_along_axis(lp, np.asarray(y)[..., None], -1)
  np.testing.assert_array_equal(stats['label_rank'], (lp > label).sum(-1))
  for g, t in enumerate((0.5, 2.0)):
    scaled = lp / t - np.logaddexp.reduce(lp / t, axis=-1, keepdims=True)
    np.testing.assert_allclose(stats['label_log_prob'][..., g],
                               np.take_along_axis(scaled, np.asarray(y)[..., None], -1)[..., 0],
                               rtol=1e-5, atol=1e-5)
    adjusted = lp - np.asarray(prior, np.float64)
    np.testing.assert_allclose(stats['adjusted_confidence'][..., g],
                               np.exp((adjusted / t - np.logaddexp.reduce(
                                   adjusted / t, axis=-1, keepdims=True)).max(-1)),
                               rtol=1e-5, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, carry_a, carry_b)
