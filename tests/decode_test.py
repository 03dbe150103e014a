"""`softmax_jax.decode.generate` against step-by-step references on tiny untrained LMs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import decode
from softmax_jax.models import lm as lm_lib

V = 7
BACKBONES = {
    'lstm': dict(name='lstm', embed_dim=8, hidden=8, num_layers=1),
    # max_len 5 < prompt + new tokens: the window slides.
    'transformer': dict(name='transformer', d_model=8, num_heads=2, mlp_dim=16, num_layers=1,
                        max_len=5, dropout=0.0),
}


def _model(name, head=None):
  model = lm_lib.build_language_model(BACKBONES[name], head or {'name': 'dense'}, V)
  tokens = jnp.zeros((1, 2), jnp.int32)
  variables = model.init(jax.random.key(0), tokens, tokens, carry=model.initial_carry(1), train=False)
  # Sharper than at init, so that greedy and beam choices are well separated from ties.
  variables = jax.tree.map(lambda x: x * 3.0, variables)
  return model, variables


def _log_probs(model, variables, seqs):
  """`[B, T, V]` float64: the model's next-token log-probabilities over `seqs` [B, T] in one
  pass from a fresh state (teacher forcing)."""
  fn = jax.jit(lambda v, x: model.apply(v, x, model.initial_carry(x.shape[0]), method='log_prob')[0])
  return np.asarray(fn(variables, jnp.asarray(seqs, jnp.int32)), np.float64)


def _next_log_probs(model, variables, seqs, pos):
  """`[B, V]`: log p(token pos + 1 | tokens <= pos), the Transformer seeing its last `max_len`."""
  seqs = np.asarray(seqs)
  if model.initial_carry(1) is not None:
    return _log_probs(model, variables, seqs[:, :pos + 1])[:, -1]
  w = model.backbone.max_len
  start = max(0, pos + 1 - w)
  window = seqs[:, start:start + w]  # always `w` tokens: one compilation (causal: the tail is unread)
  return _log_probs(model, variables, window)[:, pos - start]


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_greedy_and_shortlist_follow_the_step_by_step_reference(name):
  model, variables = _model(name)
  prompt = np.array([[3, 1, 4], [2, 6, 5]])
  got = np.asarray(decode.generate(model, variables, prompt, method='greedy', max_new_tokens=4))
  full = np.concatenate([prompt, got], 1)
  for i in range(4):
    np.testing.assert_array_equal(got[:, i], np.argmax(_next_log_probs(model, variables, full, 2 + i), -1))
  # temperature 0 is greedy; a full shortlist is the model itself; a partial one stays inside it.
  np.testing.assert_array_equal(decode.generate(model, variables, prompt, temperature=0.0,
                                                max_new_tokens=4), got)
  np.testing.assert_array_equal(decode.generate(model, variables, prompt, method='greedy',
                                                max_new_tokens=4, shortlist=np.arange(V)), got)
  short = np.array([5, 0, 2])
  out = np.asarray(decode.generate(model, variables, prompt, max_new_tokens=6, shortlist=short,
                                   key=jax.random.key(1)))
  assert np.isin(out, short).all()


def test_sampling_is_keyed_and_top_k_1_is_greedy():
  model, variables = _model('lstm')
  prompt = np.array([[1, 2]] * 4)
  a = decode.generate(model, variables, prompt, key=jax.random.key(3), max_new_tokens=6)
  b = decode.generate(model, variables, prompt, key=jax.random.key(3), max_new_tokens=6)
  c = decode.generate(model, variables, prompt, key=jax.random.key(4), max_new_tokens=6)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (4, 6) and a.dtype == jnp.int32 and not np.array_equal(a, c)
  np.testing.assert_array_equal(
      decode.generate(model, variables, prompt, key=jax.random.key(5), top_k=1, max_new_tokens=6),
      decode.generate(model, variables, prompt, method='greedy', max_new_tokens=6))


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_beam_search_finds_the_best_two_token_continuation(name):
  """Beam = V keeps every first token, so after two tokens the beam is exhaustive: the best
  sequence by log-probability (length_penalty 0) equals a brute-force enumeration."""
  model, variables = _model(name)
  prompt, eos = [3, 1, 4], 6
  seqs, scores = decode.generate(model, variables, np.array([prompt]), method='beam', beam_size=V,
                                 max_new_tokens=2, eos_id=eos, length_penalty=0.0)
  first = _next_log_probs(model, variables, np.array([prompt + [0]]), 2)[0]
  second = _next_log_probs(model, variables, np.array([prompt + [y, 0] for y in range(V)]), 3)
  best = {}
  for y1, y2 in itertools.product(range(V), range(V)):
    if y1 == eos:
      best[(eos, eos)] = first[eos]
    else:
      best[(y1, y2)] = first[y1] + second[y1, y2]
  want = max(best, key=best.get)
  assert tuple(np.asarray(seqs)[0, 0]) == want
  np.testing.assert_allclose(scores[0, 0], best[want], atol=1e-5)
  assert np.all(np.diff(np.asarray(scores)[0]) <= 0)  # best first


def test_every_head_generates():
  for head in ({'name': 'adaptive', 'cutoffs': (3,)}, {'name': 'hierarchical'}, {'name': 'sampled', 'num_sampled': 3},
               {'name': 'mos', 'num_mixtures': 2}):
    model, variables = _model('lstm', head)
    out = decode.generate(model, variables, np.array([[1, 2]]), method='greedy', max_new_tokens=3)
    assert out.shape == (1, 3) and np.all((np.asarray(out) >= 0) & (np.asarray(out) < V))


@pytest.mark.parametrize('kwargs, match', [
    (dict(method='nucleus'), r"`method` must be one of \('sample', 'greedy', 'beam'\); got 'nucleus'"),
    (dict(prompt=np.zeros((2,), np.int32)), r'`prompt` must be \[B, P >= 1\] int token ids; got shape \(2,\)'),
    (dict(max_new_tokens=0), r'`max_new_tokens` must be an int >= 1; got 0'),
    (dict(method='beam'), r"`eos_id` must be a class id for method='beam'"),
    (dict(method='beam', eos_id=1, shortlist=[1, 2]), r"`shortlist` decodes with method 'sample' or 'greedy'"),
    (dict(top_p=1.5), r'top_p'),
])
def test_bad_arguments_are_named(kwargs, match):
  model, variables = _model('lstm')
  prompt = kwargs.pop('prompt', np.array([[1, 2]]))
  with pytest.raises(ValueError, match=match):
    decode.generate(model, variables, prompt, **kwargs)
