"""Decoding ops: the top-k / top-p / min-p masks, greedy, sample and beam_search.

Masks against float64 NumPy references written from the definitions (ties included), sampling
frequencies against the filtered, renormalized reference by a chi-square test, beam search
against brute-force enumeration of every hypothesis of a tiny second-order Markov model; the
T = 0 limit, per-example options under vmap, the rows without candidates, the NaN rule, chex
variants and the argument errors. Few compilations: each jitted function checks several things.
"""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special
from scipy import stats

from softmax_jax.ops import decoding as dec

N, K = 6, 8
MASK = np.array([True, True, False, True, True, True, False, True])


def _logits(seed=0):
  """[N, K] logits on a 0.5 grid: many ties, also at the filters' boundaries."""
  x = np.random.default_rng(seed).integers(-6, 6, size=(N, K)).astype(np.float32) / 2
  x[0] = [1, 1, 1, 0.5, 0.5, 0, -1, -2]  # ties at the top, at the k-th value, at the nucleus edge
  return x


# Per-example options of the N rows (T = 0 in rows 1 and 4).
KS = np.array([2, 1, 3, 8, 4, 5], np.int32)
PS = np.array([0.3, 0.5, 0.9, 1.0, 0.75, 0.05], np.float32)
MIN_PS = np.array([0.5, 0.0, 0.2, 0.9, 0.6, 0.05], np.float32)
TS = np.array([1.0, 0.0, 0.7, 2.0, 0.0, 1.3], np.float32)


# ---------------------------------------------------------------- float64 references, per row
def _q(x, keep, t):
  """softmax(x / t) over `keep` (t = 0: the maxima share the mass)."""
  x = np.where(keep, np.asarray(x, np.float64), -np.inf)
  if t == 0:
    e = (x == x.max()).astype(np.float64)
  else:
    e = np.exp((x - x.max()) / t)
  return e / e.sum()


def _ref_top_k(x, keep, k):
  s = np.sort(np.asarray(x, np.float64)[keep])[::-1]
  return keep & (x >= s[min(k, len(s)) - 1])


def _ref_top_p(x, keep, p, t):
  if p >= 1:
    return keep.copy()
  q = _q(x, keep, t)
  return np.array([keep[j] and q[keep & (q > q[j])].sum() < p for j in range(len(x))])


def _ref_min_p(x, keep, mp, t):
  q = _q(x, keep, t)
  return keep & (q >= mp * q.max())


def _ref_filtered(x, keep, t=1.0, k=None, p=None, mp=None):
  """The classes `sample` draws from, in its documented order."""
  if k is not None:
    keep = _ref_top_k(x, keep, k)
  if p is not None:
    keep = _ref_top_p(x, keep, p, t)
  if mp is not None:
    keep = _ref_min_p(x, keep, mp, t)
  return keep


def _all_ops(x, k, p, mp, t, where=None, key=None):
  """Every op once: (top_k, top_p, min_p masks, greedy, sample with all filters)."""
  key = jax.random.key(0) if key is None else key
  return (dec.top_k_mask(x, k, where=where), dec.top_p_mask(x, p, temperature=t, where=where),
          dec.min_p_mask(x, mp, temperature=t, where=where), dec.greedy(x, where=where),
          dec.sample(key, x, temperature=t, top_k=k, top_p=p, min_p=mp, where=where))


# One compile each, shared by the tests: every op on [N, K] with a class mask `w` and per-example
# options (k, p, min_p, T), batched and vmapped over the rows.
def _ops(x, w, k, p, mp, t):
  return _all_ops(x, k, p, mp, t, where=w)


_BATCHED = jax.jit(_ops)  # (the variants test's jit of `_ops` reuses this compile)
_VMAPPED = jax.jit(jax.vmap(lambda x, w, k, p, mp, t: _all_ops(x, k, p, mp, t, where=w,
                                                             key=jax.random.key(1))))
ALL = np.ones(K, bool)


def _check_against_reference(out, x, where):
  topk, topp, minp, best, drawn = [np.asarray(o) for o in out]
  for i in range(N):
    keep = (x[i] != -np.inf) & (True if where is None else np.broadcast_to(where, x.shape)[i])
    np.testing.assert_array_equal(topk[i], _ref_top_k(x[i], keep, KS[i]), err_msg=f'top_k {i}')
    np.testing.assert_array_equal(topp[i], _ref_top_p(x[i], keep, PS[i], TS[i]), f'top_p {i}')
    np.testing.assert_array_equal(minp[i], _ref_min_p(x[i], keep, MIN_PS[i], TS[i]), f'min_p {i}')
    want = int(np.flatnonzero(keep & (x[i] == x[i][keep].max()))[0])  # lowest index among ties
    assert best[i] == want
    allowed = _ref_filtered(x[i], keep, TS[i], KS[i], PS[i], MIN_PS[i])
    assert allowed[drawn[i]], (i, drawn[i], allowed)
    if TS[i] == 0:
      assert drawn[i] == want  # T = 0 is greedy
    for m in (topk, topp, minp):
      assert m[i][want]  # the argmax is always kept
  return topk, topp, minp, best, drawn


@pytest.mark.parametrize('masked', [False, True])
def test_ops_match_reference_batched_and_vmapped(masked):
  """Per-example k, p, min_p and T (zeros included): the batched call, the vmapped call and the
  per-row float64 reference agree; T = 0 rows are greedy; every filter keeps the argmax."""
  x = _logits(1)
  where = MASK if masked else ALL
  args = (x, np.broadcast_to(where, x.shape), KS, PS, MIN_PS, TS)
  batched, vmapped = _BATCHED(*args), _VMAPPED(*args)
  _check_against_reference(batched, x, where)
  _check_against_reference(vmapped, x, where)
  for a, b in zip(batched[:4], vmapped[:4]):
    np.testing.assert_array_equal(a, b)
  # Documented boundary ties of row 0 (x = [1, 1, 1, .5, .5, 0, -1, -2], T = 1, unmasked):
  if not masked:
    topk, topp = np.asarray(batched[0][0]), np.asarray(batched[1][0])
    assert topk.tolist() == [True] * 3 + [False] * 5  # k = 2 keeps all three tied with the 2nd
    assert topp.tolist() == [True] * 3 + [False] * 5  # p = .3 < mass of one tied class: all three
    assert np.asarray(dec.top_k_mask(x[0], 4)).sum() == 5  # the 4th ties with the 5th


def test_top_p_one_keeps_every_class_of_50k():
  x = (np.random.default_rng(2).normal(size=(2, 50_000)) * 4).astype(np.float32)
  f = jax.jit(lambda x, p, t: dec.top_p_mask(x, p, temperature=t))
  assert np.all(np.asarray(f(x, 1.0, np.float32(1.0))))
  assert np.all(np.asarray(f(x, 1.0, np.float32(0.25))))  # a peaked row too
  near = np.asarray(f(x, 0.999, np.float32(1.0)))
  assert 0 < near.sum(-1).min() and near.sum(-1).max() < 50_000  # p < 1 does cut the tail
  q = special.softmax(x.astype(np.float64) / 1.0, -1)
  for i in range(2):  # the kept set is a nucleus of mass >= p (checked in float64)
    assert q[i][near[i]].sum() >= 0.999 - 1e-6 and q[i][near[i]].min() >= q[i][~near[i]].max()


def test_sampling_frequencies_chi_square():
  """20k draws of one K = 8 row per configuration (one compile, vmap over keys) against the
  filtered, renormalized float64 distribution: chi-square p-value > 1e-3 (fixed seed); the
  filtered-out classes are never drawn."""
  x = np.array([2.0, 1.5, 1.0, 0.8, 0.3, 0.0, -0.5, -1.0], np.float32)
  configs = [dict(), dict(temperature=0.7), dict(top_k=3), dict(top_p=0.6), dict(min_p=0.2),
             dict(temperature=1.3, top_k=6, top_p=0.8, min_p=0.1, where=MASK)]
  draws = 20_000
  keys = jax.random.split(jax.random.key(42), draws)
  run = jax.jit(lambda keys: [jax.vmap(lambda k, c=c: dec.sample(k, x, **c))(keys)
                              for c in configs])
  for c, ids in zip(configs, run(keys)):
    keep = np.ones(K, bool) if c.get('where') is None else c['where'].copy()
    t = c.get('temperature', 1.0)
    keep = _ref_filtered(x, keep, t, c.get('top_k'), c.get('top_p'), c.get('min_p'))
    q = _q(x, keep, t)
    counts = np.bincount(np.asarray(ids), minlength=K)
    assert counts[~keep].sum() == 0, c
    if keep.sum() > 1:
      p_value = stats.chisquare(counts[keep], q[keep] * draws).pvalue
      assert p_value > 1e-3, (c, counts, q * draws)
    assert keep.sum() < K or set(c) <= {'temperature'}  # every filter here removes something


def test_empty_rows_raise_eagerly_and_give_minus_one_under_jit():
  x = _logits(3)
  none = np.ones((N, K), bool)
  none[2] = False
  for f in (lambda x, w: dec.top_k_mask(x, 2, where=w), lambda x, w: dec.greedy(x, where=w),
            lambda x, w: dec.top_p_mask(x, 0.5, where=w),
            lambda x, w: dec.min_p_mask(x, 0.1, where=w),
            lambda x, w: dec.sample(jax.random.key(0), x, top_p=0.9, where=w)):
    with pytest.raises(ValueError, match=r'`where` must keep at least one class in every row; '
                                         r'got the row at position \(2,\) all False'):
      f(x, none)
  xi = x.copy()
  xi[4] = -np.inf
  with pytest.raises(ValueError, match=r'`logits` must have a logit > -inf not masked by `where` '
                                       r'in every row; got none in the row at position \(4,\)'):
    dec.sample(jax.random.key(0), xi)
  xi[1, :4] = -np.inf  # with where: the row's remaining logits are masked
  with pytest.raises(ValueError, match=r'`logits` must .* position \(1,\)'):
    dec.greedy(xi[:2], where=np.array([True] * 4 + [False] * 4))
  xi[2] = 0.0
  xi[2, :3] = np.nan  # a NaN row next to an empty one
  w = np.ones((N, K), bool)
  w[0] = False
  out = _BATCHED(xi, w, KS, PS, MIN_PS, TS)
  topk, topp, minp, best, drawn = [np.asarray(o) for o in out]
  for i in (0, 2, 4):  # masked by `where`, NaN, all -inf: all False and -1
    assert not (topk[i].any() or topp[i].any() or minp[i].any()), i
    assert best[i] == -1 and drawn[i] == -1, i
  others = [1, 3, 5]
  clean = _BATCHED(np.where(np.isnan(xi), 0, xi), np.ones((N, K), bool), KS, PS, MIN_PS, TS)
  for a, b in zip(out, clean):  # the other rows are unaffected
    np.testing.assert_array_equal(np.asarray(a)[others], np.asarray(b)[others])


def test_traced_k_is_clipped():
  """Out of [1, K] only under jit (concrete: an error, below): k <= 0 acts as 1, k > K as K."""
  x, w = _logits(6), np.ones((N, K), bool)
  got = np.asarray(_BATCHED(x, w, np.array([0, -3, 9, 8, 1, 100], np.int32), PS, MIN_PS, TS)[0])
  want = np.asarray(_BATCHED(x, w, np.array([1, 1, 8, 8, 1, 8], np.int32), PS, MIN_PS, TS)[0])
  np.testing.assert_array_equal(got, want)
  assert got[3].all() and got[1].sum() == (x[1] == x[1].max()).sum()


def test_nan_rule():
  """A NaN candidate logit, a NaN per-example temperature or threshold: that row all False / -1;
  a NaN logit masked by `where` is not read."""
  x = _logits(4)
  w = np.broadcast_to(MASK, x.shape)
  f = lambda x, t, p, mp: _BATCHED(x, w, KS, p, mp, t)
  clean = [np.asarray(o) for o in f(x, TS, PS, MIN_PS)]
  xn = x.copy()
  xn[1, 3] = np.nan
  xn[:, 2] = np.nan  # masked by MASK: not read
  tn, pn, mpn = TS.copy(), PS.copy(), MIN_PS.copy()
  tn[2], pn[3], mpn[5] = np.nan, np.nan, np.nan
  got = [np.asarray(o) for o in f(xn, tn, pn, mpn)]
  topk, topp, minp, best, drawn = got
  assert not topk[1].any() and best[1] == -1 and drawn[1] == -1  # NaN logit: every output
  assert not (topp[1].any() or minp[1].any())
  assert not (topp[2].any() or minp[2].any()) and drawn[2] == -1  # NaN temperature
  assert topk[2].any() and best[2] >= 0  # ... top_k and greedy do not read T
  assert not topp[3].any() and drawn[3] == -1 and minp[3].any()  # NaN top_p
  assert not minp[5].any() and drawn[5] == -1 and topp[5].any()  # NaN min_p
  for a, b in zip(got, clean):
    np.testing.assert_array_equal(a[[0, 4]], b[[0, 4]])  # rows not touched (and column 2 unread)


class VariantsTest(chex.TestCase):
  """Every op under jit, without jit and on a device: equal to the reference."""

  @chex.variants(with_jit=True, without_jit=True, with_device=True)
  def test_variants_match_reference(self):
    x = _logits(5)
    w = np.broadcast_to(MASK, x.shape)
    _check_against_reference(self.variant(_ops)(x, w, KS, PS, MIN_PS, TS), x, MASK)


@pytest.mark.parametrize('call, msg', [
    (lambda x: dec.top_k_mask(x, 0), r'`top_k` must lie in \[1, K = 8\]; got 0'),
    (lambda x: dec.top_k_mask(x, np.array([1, 2, 9, 1, 1, 1])),
     r'`top_k` must lie in \[1, K = 8\]; got 9.0 at position \(2,\)'),
    (lambda x: dec.top_k_mask(x, 2.0),
     r'`top_k` must be an integer \(or integer array\); got dtype'),
    (lambda x: dec.top_k_mask(x, np.ones(4, np.int32)),
     r'`top_k` must broadcast to the shape of `logits.shape\[:-1\]` \(6,\); got shape \(4,\)'),
    (lambda x: dec.top_p_mask(x, 0.0), r'`top_p` must lie in \(0, 1\]; got 0.0'),
    (lambda x: dec.sample(jax.random.key(0), x, top_p=1.5),
     r'`top_p` must lie in \(0, 1\]; got 1.5'),
    (lambda x: dec.min_p_mask(x, 1.0), r'`min_p` must lie in \[0, 1\); got 1.0'),
    (lambda x: dec.sample(jax.random.key(0), x, min_p=-0.1), r'`min_p` must lie in \[0, 1\)'),
    (lambda x: dec.sample(jax.random.key(0), x, temperature=-1.0),
     r'`temperature` must be finite and >= 0; got -1.0'),
    (lambda x: dec.top_p_mask(x, 0.5, temperature=np.array([1, 1, -2, 1, 1, 1.])),
     r'`temperature` must be finite and >= 0; got -2.0 at position \(2,\)'),
    (lambda x: dec.greedy(x[:, :0]), r'`logits` must have shape \[\.\.\., K\] with K >= 1'),
    (lambda x: dec.greedy(x, where=np.ones(K)), r'`where` must be a bool mask; got dtype float'),
    (lambda x: dec.sample(jax.random.key(0), x, temperature=np.ones(K)),
     r'`temperature` must broadcast to the shape of `logits.shape\[:-1\]` \(6,\); '
     r'got shape \(8,\)'),
])
def test_bad_arguments(call, msg):
  with pytest.raises(ValueError, match=msg):
    call(_logits())


# ---------------------------------------------------------------- beam search
B, KB, L, EOS = 2, 4, 3, 3  # batch, classes, max_len, eos id


def _tables():
  """[B, K, K, K] log p(tok | prev2, prev1) of a second-order Markov model. Entry 0 (seed 11):
  the greedy path is not the best; entry 1 (seed 27): the best ends early without a length
  penalty and is longer with one (both found by brute force, asserted below)."""
  t = [np.random.default_rng(s).normal(size=(1, KB, KB, KB)) * 1.5 for s in (11, 27)]
  return special.log_softmax(np.concatenate(t), -1)


def _brute_force(t, alpha):
  """Every hypothesis (ends at its first eos, or at L tokens), best first: [(score, seq)]."""
  hyps = []

  def grow(prefix, prev2, prev1, logp):
    for tok in range(KB):
      lp, seq = logp + t[prev2, prev1, tok], prefix + [tok]
      if tok == EOS or len(seq) == L:
        hyps.append((lp / ((5 + len(seq)) / 6) ** alpha, tuple(seq + [EOS] * (L - len(seq)))))
      else:
        grow(seq, prev1, tok, lp)

  grow([], 0, 0, 0.0)  # bos = 0 and a first prev2 of 0
  return sorted(hyps, reverse=True)


def _greedy_path(t):
  seq, prev2, prev1 = [], 0, 0
  while len(seq) < L and EOS not in seq:
    tok = int(np.argmax(t[prev2, prev1]))
    seq, prev2, prev1 = seq + [tok], prev1, tok
  return tuple(seq + [EOS] * (L - len(seq)))


def _search(beam_size, calls=None):
  table = jnp.asarray(_tables(), jnp.float32)

  def step(tokens, state):  # the state must follow its beam: it holds the token before last
    if calls is not None:
      jax.debug.callback(lambda: calls.append(1))
    return table[state['b'], state['prev'], tokens], dict(b=state['b'], prev=tokens)

  init = dict(b=jnp.arange(B), prev=jnp.zeros(B, jnp.int32))
  return jax.jit(lambda alpha: dec.beam_search(step, init, beam_size=beam_size, max_len=L,
                                               eos_id=EOS, length_penalty=alpha))


def test_beam_search_exact_against_brute_force():
  """beam_size 16 >= every length-2 prefix: the output is exactly the 16 best hypotheses, for two
  length penalties (one compile: alpha is traced)."""
  t = _tables()
  run = _search(16)
  best = {}
  for alpha in (0.0, 2.0):
    seqs, scores = [np.asarray(a) for a in run(np.float32(alpha))]
    assert seqs.shape == (B, 16, L) and seqs.dtype == np.int32 and scores.shape == (B, 16)
    for b in range(B):
      ref = _brute_force(t[b], alpha)[:16]
      np.testing.assert_allclose(scores[b], [s for s, _ in ref], rtol=1e-5)
      assert [tuple(s) for s in seqs[b]] == [s for _, s in ref]  # eos-padded after the eos
    best[alpha] = tuple(seqs[1, 0])
  length = lambda s: s.index(EOS) + 1 if EOS in s else L
  assert length(best[0.0]) < length(best[2.0])  # the penalty favours the longer hypothesis


def test_beam_search_beats_greedy_and_stops_early():
  t = _tables()
  seqs, scores = [np.asarray(a) for a in _search(4)(np.float32(0.6))]
  score, want = _brute_force(t[0], 0.6)[0]
  assert _greedy_path(t[0]) != want  # the case is one where greedy decoding fails
  assert tuple(seqs[0, 0]) == want and np.isclose(scores[0, 0], score, rtol=1e-5)
  assert np.all(np.diff(scores, axis=1) <= 0)  # best first
  calls = []  # a model that always ends at once: one step, not max_len = 5

  def step(tokens, state):
    jax.debug.callback(lambda: calls.append(1))
    lp = jnp.where(jnp.arange(KB) == EOS, 0.0, -jnp.inf)  # eos with probability 1
    return jnp.broadcast_to(lp, (tokens.shape[0], KB)), state

  seqs, scores = dec.beam_search(step, (), beam_size=2, max_len=5, eos_id=EOS, batch_size=1)
  jax.effects_barrier()
  assert len(calls) == 1 and np.all(np.asarray(seqs)[0, 0] == EOS)  # (slot 1 is -inf: arbitrary)
  assert np.asarray(scores).tolist() == [[0.0, -np.inf]]  # a second hypothesis does not exist


@pytest.mark.parametrize('kwargs, msg', [
    (dict(beam_size=0), r'`beam_size` must be a Python int >= 1; got 0'),
    (dict(max_len=2.5), r'`max_len` must be a Python int >= 1; got 2.5'),
    (dict(eos_id=4), r'`eos_id` must lie in \[0, K = 4\); got 4'),
    (dict(length_penalty=-1.0), r'`length_penalty` must be finite and >= 0; got -1.0'),
    (dict(batch_size=3), r'`init_state` must hold arrays with leading dim batch_size = 3; got a '
                         r'leaf of shape \(2,\)'),
])
def test_beam_search_bad_arguments(kwargs, msg):
  step = lambda tok, s: (jnp.zeros((tok.shape[0], KB)), s)
  args = {**dict(beam_size=2, max_len=L, eos_id=EOS), **kwargs}
  with pytest.raises(ValueError, match=msg):
    dec.beam_search(step, dict(a=jnp.zeros(2)), **args)
  with pytest.raises(ValueError, match=r'`batch_size` must be given'):
    dec.beam_search(step, (), beam_size=2, max_len=L, eos_id=EOS)
