"""Text generation from a trained `LanguageModel`: sampling rules, greedy and beam search.

The loop works from the model's exact next-token log-probabilities (`LanguageModel.log_prob`), so
every head decodes the same way (dense, adaptive, sampled, hierarchical, mixture): the head's
`log_prob` is its normalized distribution, and the rules of `ops.decoding` act on it as logits.

- A recurrent backbone (LSTM) reads the prompt once, then one token a step with its carry.
- The Transformer decodes through its key/value cache (`TransformerLM(decode=True)`), which is
  carried like a recurrent state: the prompt is read into it one token at a time (a `lax.scan`
  of single-token steps; exact, and the same code as a generation step), then one token a step
  (O(max_len) attention a token instead of a whole window). The cache holds `max_len` positions:
  when the prompt and the new tokens need more (P + max_new_tokens - 1 > max_len), or with
  `kv_cache=False`, each step instead runs the window of the last `max_len` tokens again
  (causal, so the result is exact; the cost is O(T) a token). Beam search carries the cache in
  its state, which `ops.decoding.beam_search` reorders by the beams' parents.

Everything is one `jax.jit` per (shapes, method): `lax.scan` over the new tokens, static shapes.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.models import transformer
from softmax_jax.ops import decoding

Array = jax.Array
METHODS = ('sample', 'greedy', 'beam')


def _recurrent(model, batch_size: int) -> bool:
  return model.initial_carry(batch_size) is not None


def _window(model) -> int:
  """The Transformer's context length (its positional table)."""
  return int(model.backbone.max_len)


def _cached(model, total: int, kv_cache: bool) -> bool:
  """Whether to decode through the Transformer's key/value cache (`total` tokens in all)."""
  return (kv_cache and isinstance(model.backbone, transformer.TransformerLM)
          and total - 1 <= _window(model))


def _stepper(model, variables, prompt, shortlist=None):
  """`(state, next)` to decode one token a step: `state` is the backbone's state after
  `prompt[:, :-1]` (the LSTM carry or the Transformer's key/value cache) and
  `next(tokens [B], state) -> (log_probs [B, K] (or [B, S]) float32, state)`."""
  batch, prompt_len = prompt.shape
  if _recurrent(model, batch):
    carry = model.initial_carry(batch)
    if prompt_len > 1:
      _, carry = model.apply(variables, prompt[:, :-1], carry, method='features')
    return carry, lambda tokens, carry: _next_log_probs(model, variables, tokens[:, None], carry,
                                                        None, True, shortlist)
  cached = model.clone(backbone=model.backbone.clone(decode=True))
  params = {k: v for k, v in variables.items() if k != 'cache'}

  def apply(tokens, cache, *args, method):
    out, mutated = cached.apply({**params, 'cache': cache}, tokens[:, None], None, *args,
                                method=method, mutable=['cache'])
    return out[0], mutated['cache']

  def prefill(cache, tokens):
    return apply(tokens, cache, method='features')[1], None
  cache = {'backbone': transformer.init_cache(model.backbone, batch)}
  cache, _ = jax.lax.scan(prefill, cache, prompt[:, :-1].T)

  def next_log_probs(tokens, cache):
    if shortlist is None:
      log_probs, cache = apply(tokens, cache, method='log_prob')
    else:
      log_probs, cache = apply(tokens, cache, shortlist, method='shortlist_log_prob')
    return log_probs[:, -1].astype(jnp.float32), cache
  return cache, next_log_probs


def _next_log_probs(model, variables, tokens, carry, length, recurrent: bool, shortlist=None):
  """`(log_probs [B, K] float32 of the token after position length - 1, carry)`.

  Recurrent: `tokens` [B, 1] is the last token and `carry` the state before it. Transformer:
  `tokens` [B, W] is the window buffer, `length` [] the number of real tokens in it. With a
  `shortlist` [S], the log-probabilities are `[B, S]`, over those classes only.
  """
  if shortlist is None:
    log_probs, new_carry = model.apply(variables, tokens, carry, method='log_prob')
  else:
    log_probs, new_carry = model.apply(variables, tokens, carry, shortlist,
                                       method='shortlist_log_prob')
  if recurrent:
    return log_probs[:, -1].astype(jnp.float32), new_carry
  return jnp.take(log_probs, length - 1, axis=1).astype(jnp.float32), carry


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'method', 'top_k', 'kv_cache'))
def _generate(model, variables, prompt, key, temperature, top_p, min_p, shortlist, *,
              max_new_tokens: int, method: str, top_k: Optional[int], kv_cache: bool = True):
  batch, prompt_len = prompt.shape
  total = prompt_len + max_new_tokens
  _next = functools.partial(_next_log_probs, shortlist=shortlist)

  def choose(key, log_probs):
    if method == 'greedy':
      j = decoding.greedy(log_probs)
    else:
      j = decoding.sample(key, log_probs, temperature=temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p)
    return j if shortlist is None else jnp.take(shortlist, j)

  if _recurrent(model, batch) or _cached(model, total, kv_cache):
    state, next_log_probs = _stepper(model, variables, prompt, shortlist)

    def body(carry, key):
      last, state = carry
      log_probs, state = next_log_probs(last, state)
      token = choose(key, log_probs)
      return (token, state), token
    _, tokens = jax.lax.scan(body, (prompt[:, -1], state), jax.random.split(key, max_new_tokens))
    return tokens.T

  width = min(_window(model), total)
  buffer = jnp.zeros((batch, total), prompt.dtype).at[:, :prompt_len].set(prompt)

  def body(buffer, inputs):
    key, pos = inputs  # `pos` tokens are known; predict token `pos`
    start = jnp.clip(pos - width, 0, total - width)
    view = jax.lax.dynamic_slice_in_dim(buffer, start, width, axis=1)
    log_probs, _ = _next(model, variables, view, None, pos - start, False)
    token = choose(key, log_probs)
    return jax.lax.dynamic_update_slice_in_dim(buffer, token[:, None], pos, axis=1), token
  positions = prompt_len + jnp.arange(max_new_tokens)
  _, tokens = jax.lax.scan(body, buffer, (jax.random.split(key, max_new_tokens), positions))
  return tokens.T


def generate(model, variables, prompt, *, key: Optional[Array] = None, max_new_tokens: int = 20,
             method: str = 'sample', temperature=1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, min_p: Optional[float] = None, beam_size: int = 4,
             eos_id: Optional[int] = None, length_penalty: float = 1.0, shortlist=None,
             kv_cache: bool = True):
  """New tokens after `prompt` from a trained `LanguageModel`.

  Args:
    model: a `models.lm.LanguageModel` (e.g. from `train.load_trained`).
    variables: its variables (`{'params': ...}`).
    prompt: [B, P] int token ids, P >= 1 (every row the same length).
    key: a PRNG key (method 'sample'); default `PRNGKey(0)`.
    max_new_tokens: how many tokens to generate.
    method: 'sample' (with the rules of `ops.decoding.sample`), 'greedy' or 'beam'.
    temperature, top_k, top_p, min_p: the sampling rules (see `ops.decoding.sample`);
      temperature 0 is greedy.
    beam_size, eos_id, length_penalty: beam search (`ops.decoding.beam_search`); `eos_id` None
      means no token ends a sequence.
    shortlist: optional [S] distinct class ids: decode from the model restricted to them
      (`LanguageModel.shortlist_log_prob`, DenseSoftmax heads; 'sample' and 'greedy').
    kv_cache: a Transformer decodes through its key/value cache when P + max_new_tokens - 1 <=
      max_len; False (or longer generations) reruns the window of the last max_len tokens each
      step (the same tokens up to float rounding; kept to compare and to measure).

  Returns:
    'sample', 'greedy': [B, max_new_tokens] int32. 'beam': `(sequences [B, beam_size,
    max_new_tokens] int32, scores [B, beam_size])`, best first.

  Raises:
    ValueError: an unknown `method`, a prompt that is not [B, P >= 1] int, `max_new_tokens` < 1,
      and the rules' own argument errors.
  """
  if method not in METHODS:
    raise ValueError(f'`method` must be one of {METHODS}; got {method!r}.')
  prompt = np.asarray(prompt) if not isinstance(prompt, jax.Array) else prompt
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f'`prompt` must be [B, P >= 1] int token ids; got shape {prompt.shape} and '
                     f'dtype {prompt.dtype}.')
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f'`max_new_tokens` must be an int >= 1; got {max_new_tokens!r}.')
  prompt = jnp.asarray(prompt, jnp.int32)
  if shortlist is not None:
    if method == 'beam':
      raise ValueError('`shortlist` decodes with method \'sample\' or \'greedy\', not \'beam\'.')
    shortlist = jnp.asarray(shortlist, jnp.int32)
  if method == 'beam':
    return _beam(model, variables, prompt, max_new_tokens=int(max_new_tokens),
                 beam_size=beam_size, eos_id=eos_id, length_penalty=float(length_penalty),
                 kv_cache=bool(kv_cache))
  key = jax.random.PRNGKey(0) if key is None else key
  if method == 'sample':  # the rules' argument errors, eagerly, before tracing
    decoding.sample(key, jnp.zeros((1, 2), jnp.float32), temperature=temperature, top_k=None,
                    top_p=top_p, min_p=min_p)
  return _generate(model, variables, prompt, key, jnp.asarray(temperature, jnp.float32),
                   None if top_p is None else jnp.asarray(top_p, jnp.float32),
                   None if min_p is None else jnp.asarray(min_p, jnp.float32), shortlist,
                   max_new_tokens=int(max_new_tokens), method=method,
                   top_k=None if top_k is None else int(top_k), kv_cache=bool(kv_cache))


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'beam_size', 'eos_id',
                                             'length_penalty', 'kv_cache'))
def _beam(model, variables, prompt, *, max_new_tokens: int, beam_size: int, eos_id, length_penalty,
          kv_cache: bool = True):
  """Beam search over `ops.decoding.beam_search`; the state after the prompt is repeated over
  the beams by it, and the first step reads the prompt's last token (not `bos_id`). The state's
  scalars (the cache's positions, the same for every beam) travel as rows of [B] for it."""
  if eos_id is None:
    raise ValueError("`eos_id` must be a class id for method='beam' (e.g. the id of '<eos>').")
  batch, prompt_len = prompt.shape
  started = jnp.zeros((batch,), bool)
  if _recurrent(model, batch) or _cached(model, prompt_len + max_new_tokens, kv_cache):
    carry0, next_log_probs = _stepper(model, variables, prompt)
    rows = lambda x: jnp.broadcast_to(x, (batch,)) if x.ndim == 0 else x
    init_state = {'carry': jax.tree.map(rows, carry0), 'last': prompt[:, -1], 'started': started}

    def step_fn(tokens, state):
      tokens = jnp.where(state['started'], tokens, state['last'])
      carry = jax.tree.map(lambda x, ref: x[0] if ref.ndim == 0 else x, state['carry'], carry0)
      log_probs, carry = next_log_probs(tokens, carry)
      carry = jax.tree.map(lambda x, ref: jnp.broadcast_to(x, ref.shape), carry, state['carry'])
      return log_probs, dict(state, carry=carry, started=jnp.ones_like(state['started']))
  else:
    total = prompt_len + max_new_tokens
    width = min(_window(model), total)
    buffer = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)
    init_state = {'buffer': buffer, 'pos': jnp.full((batch,), prompt_len, jnp.int32), 'started': started}

    def step_fn(tokens, state):
      pos, started = state['pos'][0], state['started'][0]  # the same for every beam
      # `pos` tokens are known before this step; a started step adds its token at index `pos`.
      buffer = jnp.where(started, jax.lax.dynamic_update_slice_in_dim(
          state['buffer'], tokens[:, None], pos, axis=1), state['buffer'])
      known = pos + started.astype(jnp.int32)
      start = jnp.clip(known - width, 0, total - width)
      view = jax.lax.dynamic_slice_in_dim(buffer, start, width, axis=1)
      log_probs, _ = _next_log_probs(model, variables, view, None, known - start, False)
      return log_probs, {'buffer': buffer, 'pos': jnp.full_like(state['pos'], known),
                         'started': jnp.ones_like(state['started'])}
  return decoding.beam_search(step_fn, init_state, beam_size=beam_size, max_len=max_new_tokens,
                              eos_id=eos_id, length_penalty=length_penalty, batch_size=batch)


def decode_tokens(vocab, ids) -> str:
  """Words of `ids` joined by spaces (`<eos>` as a line break)."""
  return ' '.join(vocab[int(i)] for i in np.asarray(ids).reshape(-1)).replace(' <eos> ', '\n')


__all__ = ['METHODS', 'decode_tokens', 'generate']
