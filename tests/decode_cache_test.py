"""The Transformer's key/value cache (`TransformerLM(decode=True)`) and `decode.generate` over it,
against the full causal pass and the windowed decoding path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import decode
from softmax_jax.models import lm as lm_lib
from softmax_jax.models.transformer import TransformerLM
from softmax_jax.models.transformer import init_cache

V, L, B = 30, 12, 2
BACKBONE = dict(name='transformer', d_model=16, num_layers=2, num_heads=2, mlp_dim=32, max_len=L,
                dropout=0.0)


@functools.lru_cache(maxsize=None)
def _models():
  """`(model, cached, variables)`: the LanguageModel, its decode=True twin, and variables made
  by the twin's init on `[B, max_len]` tokens: the params (the head's scaled up, so that greedy
  and beam choices are well separated from ties) and an empty cache."""
  model = lm_lib.build_language_model(BACKBONE, {'name': 'dense'}, V)
  cached = model.clone(backbone=model.backbone.clone(decode=True))
  x = jnp.zeros((B, L), jnp.int32)
  variables = jax.jit(lambda k: cached.init(k, x, x, carry=None, train=False))(jax.random.key(0))
  params = dict(variables['params'], head=jax.tree.map(lambda p: 3.0 * p, variables['params']['head']))
  return model, cached, dict(variables, params=params)


def test_cached_steps_equal_the_full_pass_and_keep_the_parameters():
  model, cached, variables = _models()
  x = jax.random.randint(jax.random.key(1), (B, L + 1), 0, V)
  # decode=True initializes the same parameter tree (a checkpoint loads unchanged) plus a cache.
  plain = jax.eval_shape(lambda k: model.init(k, x[:, :L], x[:, :L], carry=None, train=False),
                         jax.random.key(0))
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  assert shapes(variables['params']) == shapes(plain['params']) and set(plain) == {'params'}
  assert set(variables) == {'params', 'cache'}
  assert shapes(variables['cache']['backbone']) == shapes(init_cache(model.backbone, B))
  assert shapes(variables['cache']['backbone']['block_1']['attn']['cached_key']) == (B, L, 2, 8)
  variables = {'params': variables['params']}

  @jax.jit
  def run(variables, x):
    features = model.apply(variables, x[:, :L], None, method='features')[0]

    def step(cache, token):
      (feature, _), mutated = cached.apply({**variables, 'cache': cache}, token[:, None], None,
                                           method='features', mutable=['cache'])
      return mutated['cache'], feature[:, 0]
    cache, steps = jax.lax.scan(step, {'backbone': init_cache(model.backbone, B)}, x.T)
    steps = steps.transpose(1, 0, 2)
    log_prob = lambda f: model.apply(variables, f, method=lambda m, f: m.head.log_prob(f))
    return features, steps, log_prob(features), log_prob(steps), cache

  features, steps, full_lp, step_lp, cache = jax.tree.map(np.asarray, run(variables, x))
  np.testing.assert_allclose(steps[:, :L], features, atol=1e-5)
  np.testing.assert_allclose(step_lp[:, :L], full_lp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.exp(full_lp).sum(-1), 1.0, atol=1e-5)
  assert np.abs(np.diff(features, axis=1)).max() > 1e-2  # positions differ: no constant output
  # Under jit, position L (past the cache) cannot raise: its features are NaN.
  assert np.isnan(steps[:, L]).all() and cache['backbone']['position'] == L + 1


def test_generate_with_the_cache_equals_the_window():
  model, _, variables = _models()
  variables = {'params': variables['params']}
  prompt = np.array([[3, 1, 4], [2, 6, 5]])
  gen = lambda **kw: np.asarray(decode.generate(model, variables, prompt, method='greedy', **kw))
  got = gen(max_new_tokens=L - 2)  # P + new - 1 = L: the cache is full at the end
  assert len(np.unique(got)) > 2
  # Longer than the cache: the sliding window decodes, and agrees on the tokens both see.
  np.testing.assert_array_equal(gen(max_new_tokens=L + 2)[:, :L - 2], got)
  # A shortlist holding every greedy choice (in another order, some classes left out) makes
  # the same choices through its own path (`shortlist_log_prob`, the ids mapped back).
  short = np.union1d(got, [0, 1])[::-1]
  assert len(short) < V
  np.testing.assert_array_equal(gen(max_new_tokens=L - 2, shortlist=short), got)
  beam = dict(method='beam', beam_size=3, max_new_tokens=4, eos_id=7, length_penalty=0.6)
  seqs, scores = decode.generate(model, variables, prompt, **beam)
  want_seqs, want_scores = decode.generate(model, variables, prompt, **beam, kv_cache=False)
  np.testing.assert_array_equal(seqs, want_seqs)
  np.testing.assert_allclose(scores, want_scores, atol=1e-5)
  assert np.isfinite(np.asarray(scores)).all()


def test_bad_inputs_are_named():
  model, cached, variables = _models()
  x = jnp.zeros((B, L), jnp.int32)
  features = functools.partial(cached.apply, method='features', mutable=['cache'])
  with pytest.raises(ValueError, match=r'initialize the cache on tokens \[B, max_len=12\]; got T=5'):
    jax.eval_shape(functools.partial(cached.init, method='features'), jax.random.key(0), x[:, :5], None)
  with pytest.raises(ValueError, match=r'decode=True is for evaluation; got train=True'):
    cached.apply(variables, x[:, :1], x[:, :1], carry=None, train=True, mutable=['cache'])
  with pytest.raises(ValueError, match=r'one token a call: tokens must be \[B, 1\]; got shape \(2, 2\)'):
    features(variables, x[:, :2], None)
  cache = variables['cache']['backbone']
  full = dict(variables, cache={'backbone': dict(cache, position=jnp.asarray(L, jnp.int32))})
  with pytest.raises(ValueError, match=r'position 12 is past the cache of max_len=12 positions'):
    features(full, x[:, :1], None)
  assert isinstance(model.backbone, TransformerLM)
