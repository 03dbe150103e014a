"""The chunk-size autotuner of `linear_cross_entropy` (softmax_jax/ops/_autotune.py).

No test depends on timing: a fake timer (or a fake `measure`) stands in for the clock.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax.ops import _autotune
from softmax_jax.ops import cross_entropy
from softmax_jax.ops import linear_cross_entropy

BIG = dict(n=2048, d=512, k=200_000)  # above MIN_WORK: tuned


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
  """Each test: its own cache folder, an empty memory, tuning on (whatever the environment)."""
  monkeypatch.setenv(_autotune.ENV_CACHE_DIR, str(tmp_path))
  monkeypatch.delenv(_autotune.ENV_AUTOTUNE, raising=False)
  _autotune.set_autotune(None)
  _autotune.clear_memory()
  yield
  _autotune.set_autotune(None)
  _autotune.clear_memory()


class FakeTimer:
  """Seconds from a table (default 1.0); records every call."""

  def __init__(self, table=None):
    self.table, self.calls = table or {}, []

  def __call__(self, reduction, n, d, k, dtype, chunk, token):
    self.calls.append((reduction, n, d, k, np.dtype(dtype).name, chunk, token))
    return self.table.get((chunk, token), 1.0)


def _chunks(timer, reduction='mean', dtype=np.float32, **shape):
  shape = BIG | shape
  return _autotune.chunks(reduction, shape['n'], shape['d'], shape['k'], dtype,
                          linear_cross_entropy, timer=timer)


def test_candidates_start_with_the_default_need_no_more_memory_and_collapse_past_n_and_k():
  for reduction in ('none', 'sum', 'mean'):
    pairs = _autotune.candidates(reduction, 2048, 512, 200_000)
    assert pairs[0] == _autotune.DEFAULT and len(set(pairs)) == len(pairs) > 2
    limit = _autotune.MAX_MEMORY * _autotune.block_bytes(reduction, 2048, 512, 200_000, 4096, 256)
    assert all(_autotune.block_bytes(reduction, 2048, 512, 200_000, *p) <= limit for p in pairs)
  # 'none': [2048, 8192] blocks would double its memory; 'mean': a [512, K] block likewise
  assert _autotune.candidates('none', 2048, 512, 200_000) == [(4096, 256), (2048, 256),
                                                              (1024, 256)]
  assert _autotune.candidates('mean', 2048, 512, 200_000) == [
      (4096, 256), (8192, 256), (4096, 128), (4096, 64), (2048, 256), (1024, 256)]
  assert _autotune.candidates('mean', 100, 16, 3000) == [(3000, 100), (3000, 64), (2048, 100),
                                                         (1024, 100)]
  assert _autotune.block_bytes('none', 2048, 512, 200_000, 4096, 256) == 4 * 2 * 2048 * 4096
  assert _autotune.block_bytes('mean', 2048, 512, 200_000, 4096, 256) == 4 * (
      256 * 200_000 + 3 * (256 + 512) * 4096)


def test_the_fastest_candidate_wins_and_every_one_is_timed():
  timer = FakeTimer({(4096, 128): 0.5, (2048, 256): 0.7})
  assert _chunks(timer, 'mean') == (4096, 128)
  assert [c[-2:] for c in timer.calls] == _autotune.candidates('mean', 2048, 512, 200_000)
  assert timer.calls[0] == ('mean', 2048, 512, 200_000, 'float32', 4096, 256)
  timer = FakeTimer({(1024, 256): 0.2})
  assert _chunks(timer, 'none') == (1024, 256)


def test_a_tie_or_a_gain_within_the_margin_keeps_the_default():
  assert _chunks(FakeTimer(), 'sum') == _autotune.DEFAULT
  _autotune.clear_memory()
  os.remove(_autotune.cache_path())
  near = 1.0 - _autotune.MARGIN / 2
  assert _chunks(FakeTimer({(1024, 256): near}), 'none') == _autotune.DEFAULT
  far = 1.0 - 2 * _autotune.MARGIN
  assert _chunks(FakeTimer({(2048, 256): far}), 'none', n=4096) == (2048, 256)


def test_the_budget_stops_new_candidates_after_two(monkeypatch):
  monkeypatch.setattr(_autotune, 'BUDGET_S', -1.0)
  timer = FakeTimer({(2048, 256): 0.1, (1024, 256): 0.01})
  assert _chunks(timer, 'none') == (2048, 256)
  assert len(timer.calls) == 2


def test_answers_are_cached_in_memory_and_on_disk():
  timer = FakeTimer({(4096, 64): 0.1})
  assert _chunks(timer) == (4096, 64)
  tuned = len(timer.calls)
  assert _chunks(timer) == (4096, 64) and len(timer.calls) == tuned  # memory
  _autotune.clear_memory()
  assert _chunks(timer) == (4096, 64) and len(timer.calls) == tuned  # disk
  with open(_autotune.cache_path()) as f:
    entries = json.load(f)['entries']
  (key, value), = entries.items()
  assert key == _autotune.key('mean', 2048, 512, 200_000, np.float32)
  assert value['chunk_size'] == 4096 and value['token_chunk_size'] == 64
  assert value['timed'] == {f'{c}x{b}': timer.table.get((c, b), 1.0)
                            for c, b in _autotune.candidates('mean', 2048, 512, 200_000)}
  # 'sum' shares the answer of 'mean' (same code); another bucket of N, or a dtype, does not
  assert _chunks(timer, 'sum', n=1500) == (4096, 64) and len(timer.calls) == tuned
  assert _chunks(timer, n=4096) == (4096, 64) and len(timer.calls) == 2 * tuned  # tuned again
  _chunks(timer, dtype=jnp.bfloat16)
  assert len(timer.calls) == 3 * tuned and timer.calls[-1][4] == 'bfloat16'
  with open(_autotune.cache_path()) as f:
    assert len(json.load(f)['entries']) == 3
  assert not [p for p in os.listdir(os.path.dirname(_autotune.cache_path()))
              if p != _autotune.FILE_NAME]  # no temporary file left behind


def test_the_key_names_the_machine():
  key = _autotune.key('none', 1000, 512, 200_000, np.float32)
  assert key.startswith(jax.default_backend() + '|') and '|none|N=1024|d=512|K=200000' in key
  assert f'jax {jax.__version__}' in key
  if jax.default_backend() == 'cpu':
    assert _autotune.cpu_description() in key
  assert [_autotune.bucket(n) for n in (0, 1, 2, 3, 1024, 1025)] == [1, 1, 2, 4, 1024, 2048]


def test_an_xla_isa_cap_is_another_machine(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  plain = _autotune.cpu_description()
  assert 'xla<=' not in plain
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_max_isa=avx2 --xla_force_host_platform_device_count=8')
  assert _autotune.cpu_description() == plain + ' xla<=AVX2'


@pytest.mark.parametrize('content', [
    '{not json', '[]', '{"entries": []}', '{"entries": {"k": {"chunk_size": 1}}}',
    '{"entries": {"k": {"chunk_size": 0, "token_chunk_size": 2}}}',
    '{"entries": {"k": {"chunk_size": "4096", "token_chunk_size": 2}}}'])
def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(content):
  path = _autotune.cache_path()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(content)
  timer = FakeTimer({(2048, 256): 0.1})
  with pytest.warns(RuntimeWarning, match='ignoring the unreadable chunk-size cache'):
    assert _chunks(timer) == (2048, 256)
  assert timer.calls
  with open(path) as f:
    (entry,) = json.load(f)['entries'].values()
  assert (entry['chunk_size'], entry['token_chunk_size']) == (2048, 256)


@pytest.mark.parametrize('value', ['0', 'false', 'off'])
def test_the_environment_switch_gives_the_fixed_defaults_untimed(monkeypatch, value):
  monkeypatch.setenv(_autotune.ENV_AUTOTUNE, value)
  timer = FakeTimer({(4096, 64): 0.0})
  assert _chunks(timer) == (4096, 256) == _autotune.DEFAULT
  assert not timer.calls and not os.path.exists(_autotune.cache_path())
  _autotune.set_autotune(True)  # the function overrides the environment
  assert _chunks(timer) == (4096, 64) and timer.calls


def test_the_function_switch_gives_the_fixed_defaults_untimed():
  _autotune.set_autotune(False)
  timer = FakeTimer({(1024, 256): 0.0})
  assert _chunks(timer, 'none') == _autotune.DEFAULT and not timer.calls
  _autotune.set_autotune(None)
  assert _chunks(timer, 'none') == (1024, 256) and timer.calls


def test_small_problems_are_not_tuned():
  timer = FakeTimer({(1024, 64): 0.0})
  assert _chunks(timer, n=64, d=16, k=1000) == _autotune.DEFAULT and not timer.calls


@pytest.mark.parametrize('reduction', ['none', 'sum', 'mean'])
def test_the_scaled_problem_is_whole_blocks_of_the_real_shapes(reduction):
  for c, b in _autotune.candidates(reduction, 2048, 512, 200_000):
    n2, k2 = _autotune.scaled(reduction, 2048, 512, 200_000, c, b)
    assert 0 < n2 <= 2048 and 0 < k2 <= 200_000
    if reduction == 'none':
      assert k2 % c == 0
    else:
      assert k2 >= min(4 * c, 200_000) and n2 % b == 0
  assert _autotune.scaled(reduction, 8, 4, 30, 16, 4) == (8, 30)


def test_measure_runs_eagerly_inside_jit():
  seen = []

  def f(x):
    seen.append(_autotune.measure(linear_cross_entropy, 'mean', 32, 8, 300, np.float32, 64, 16))
    return x + 1

  jax.jit(f)(jnp.zeros(3))
  assert len(seen) == 1 and isinstance(seen[0], float) and 0 < seen[0] < 1


@pytest.mark.parametrize('reduction', ['none', 'mean'])
def test_linear_cross_entropy_tunes_under_jit_and_stays_exact(monkeypatch, reduction):
  monkeypatch.setattr(_autotune, 'MIN_WORK', 0)
  calls = []

  def fake_measure(loss_fn, reduction, n, d, k, dtype, chunk, token):
    calls.append((chunk, token))
    assert loss_fn is linear_cross_entropy
    return 0.5 if chunk == 1024 else 1.0
  monkeypatch.setattr(_autotune, 'measure', fake_measure)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((40, 8))
  w = rng.standard_normal((8, 3000)) * 0.3
  labels = rng.integers(0, 3000, 40)
  f = lambda x, w: linear_cross_entropy(x, w, labels, reduction=reduction).mean()
  got = jax.jit(jax.value_and_grad(f, (0, 1)))(jnp.float32(x), jnp.float32(w))
  assert calls == _autotune.candidates(reduction, 40, 8, 3000) and (1024, 40) in calls
  with open(_autotune.cache_path()) as f:  # token chunks collapse to N = 40
    entries = json.load(f)['entries']
  (entry,) = entries.values()
  assert (entry['chunk_size'], entry['token_chunk_size']) == (1024, 40)
  ref = lambda x, w: cross_entropy(x @ w, labels).mean()
  want = jax.value_and_grad(ref, (0, 1))(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b), rtol=2e-5, atol=2e-6)
