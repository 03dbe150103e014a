"""`run_steps` (train/runner.py) with a fake driver on a fake clock: dispatch, rates, failures,
and the bound on the steps (and evaluation batches) in flight."""

import json
import math
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax.train import base_config
from softmax_jax.train import parallel
from softmax_jax.train import runner

STEP_S, COMPILE_S, EVAL_S, SAVE_S, ITEMS = 1.0, 100.0, 50.0, 30.0, 10


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class Driver:
  """Each step costs STEP_S on the clock (the first COMPILE_S); loss = `losses[step]` or 1.0."""

  def __init__(self, clock, losses=None):
    self.clock, self.losses = clock, losses or {}

  def step(self, state, batch):
    self.clock.now += COMPILE_S if not self.clock.now else STEP_S
    step = int(state) + 1
    assert batch == step  # batches arrive in order
    return jnp.asarray(step), {'loss': jnp.asarray(self.losses.get(step, 1.0)), 'lr': jnp.asarray(0.1)}

  def get_state(self, state):
    return int(state)


class Writer:
  def __init__(self):
    self.rows = []

  def write(self, step, scalars):
    self.rows.append((step, dict(scalars)))


class Ckpt:
  def __init__(self, clock):
    self.clock, self.saved = clock, []

  def save(self, step, state):
    assert state == step
    self.clock.now += SAVE_S
    self.saved.append(step)

  def path(self, step):
    return None if step is None else f'ckpt/{step}'


class NaNParamsDriver(Driver):
  """State {'step', 'w'}: `w` turns NaN at step `bad` while the loss stays finite (a NaN gradient)."""

  def __init__(self, clock, losses=None, bad=7):
    super().__init__(clock, losses)
    self.bad = bad

  def step(self, state, batch):
    step, metrics = super().step(state['step'], batch)
    return {'step': step, 'w': jnp.where(step >= self.bad, jnp.nan, 1.0)}, metrics

  def get_state(self, state):
    assert jnp.isfinite(state['w'])  # the runner never hands a NaN state to the checkpointer
    return int(state['step'])


def run(monkeypatch, *, start_step=0, losses=None, num_steps=12, driver=Driver, batches=None,
        every=(4, 6, 5)):
  clock = Clock()
  monkeypatch.setattr(runner.time, 'perf_counter', clock)
  config = base_config()
  log_every, eval_every, checkpoint_every = every
  config.update_from_flattened_dict(dict(num_steps=num_steps, log_every=log_every, eval_every=eval_every,
                                         checkpoint_every=checkpoint_every, progress=False))
  writer, ckpt, evaluated = Writer(), Ckpt(clock), []

  def evaluate(state):
    clock.now += EVAL_S
    evaluated.append(int(state['step'] if isinstance(state, dict) else state))
    return {'validation/accuracy': 0.5}

  state, timing = runner.run_steps(
      config, driver(clock, losses), initial_state(driver, start_step),
      iter(range(start_step + 1, 100)) if batches is None else batches,
      start_step=start_step, writer=writer, ckpt=ckpt, evaluate=evaluate, items_per_step=ITEMS,
      rate='tokens_per_second', log_perplexity=True)
  return state, timing, writer.rows, ckpt.saved, evaluated, clock.now


def initial_state(driver, start_step):
  step = jnp.asarray(start_step)
  return {'step': step, 'w': jnp.asarray(1.0)} if driver is NaNParamsDriver else step


def test_logs_evaluates_and_checkpoints_on_schedule(monkeypatch):
  state, _, rows, saved, evaluated, _ = run(monkeypatch)
  assert int(state) == 12
  assert [s for s, r in rows if 'train/loss' in r] == [4, 8, 12]
  assert evaluated == [6]  # every eval_every steps but the last: the caller evaluates the final state
  assert saved == [5, 10, 12]
  assert all(r['train/loss'] == 1.0 and r['train/perplexity'] == pytest.approx(math.e)
             for _, r in rows if 'train/loss' in r)


def test_rates_leave_out_the_compiling_step_evaluation_and_checkpoints(monkeypatch):
  _, timing, rows, _, _, wall = run(monkeypatch)
  rates = [r['train/tokens_per_second'] for _, r in rows if 'train/loss' in r]
  assert rates == [ITEMS / STEP_S] * 3
  assert timing['train/tokens_per_second'] == ITEMS / STEP_S
  assert timing['train_wall_s'] == wall == COMPILE_S + 11 * STEP_S + EVAL_S + 3 * SAVE_S


def test_resumed_at_the_end_runs_nothing(monkeypatch):
  state, timing, rows, saved, _, _ = run(monkeypatch, start_step=12)
  assert int(state) == 12 and rows == [] and saved == []
  assert timing['train/tokens_per_second'] == 0.0


@pytest.mark.parametrize('bad_step, last_good', [(7, 'ckpt/5'), (3, None), (12, 'ckpt/10')])
def test_nonfinite_loss_names_the_step_and_last_checkpoint(monkeypatch, bad_step, last_good):
  # 7 and 3 are read back a step late (no sync there); 12 syncs at once.
  saved = f'The newest checkpoint, {last_good} .*is verified finite' if last_good else 'No checkpoint was written'
  with pytest.raises(FloatingPointError, match=f'diverged at step {bad_step}: the training loss is nan .*{saved}'
                     '.*rerun with the same workdir and --config.optimizer.learning_rate=0.0001 '):
    run(monkeypatch, losses={bad_step: math.nan})


def test_resume_names_the_checkpoint_it_started_from(monkeypatch):
  with pytest.raises(FloatingPointError, match='step 9: the training loss is inf.*checkpoint, ckpt/8'):
    run(monkeypatch, start_step=8, losses={9: math.inf})


def test_nonfinite_gradient_norm_with_a_finite_loss_names_its_step(monkeypatch):
  # A NaN gradient (the loss of that step is finite) makes the parameters NaN: caught at step 7,
  # read back at step 8 (no sync at 7), before the checkpoint at 10 could be written.
  class GradDriver(Driver):
    def step(self, state, batch):
      state, metrics = super().step(state, batch)
      return state, dict(metrics, grad_norm=jnp.asarray(math.nan if int(state) == 7 else 1.0))
  with pytest.raises(FloatingPointError, match='diverged at step 7: the gradient norm is nan.*checkpoint, ckpt/5'):
    run(monkeypatch, driver=GradDriver)


def test_nonfinite_state_with_a_finite_loss_stops_before_a_checkpoint_or_log(monkeypatch):
  # `w` is NaN from step 7; the loss never is. Step 8 logs: the state check there stops the run,
  # names `w` and the steps since it was last seen finite (7-8: the evaluation at 6 checked it),
  # and the last checkpoint (5) is the last finite one; checkpoint 10 is never written.
  with pytest.raises(FloatingPointError,
                     match=r"diverged in steps 7-8: the train state after step 8 holds NaN or inf in 1 "
                           r"arrays, e.g. \['w'\].*finite after step 6.*checkpoint, ckpt/5"):
    run(monkeypatch, driver=NaNParamsDriver)


class Recorded:
  """A metric whose every read on the host is recorded with the step last dispatched."""

  def __init__(self, value, driver):
    self.value, self.driver = value, driver

  def __float__(self):
    self.driver.reads.append(self.driver.dispatched)
    return float(self.value)

  def __array__(self, dtype=None, copy=None):
    self.driver.reads.append(self.driver.dispatched)
    return np.asarray(self.value, dtype)


class RecordingDriver(Driver):
  """Metrics that record when they are read; `fetches` counts the loop's jax.device_get calls."""

  def __init__(self, clock, losses=None):
    super().__init__(clock, losses)
    self.reads, self.dispatched = [], 0

  def step(self, state, batch):
    state, metrics = super().step(state, batch)
    self.dispatched = int(state)
    return state, {k: Recorded(v, self) for k, v in metrics.items()}


def test_metrics_are_read_only_at_log_evaluation_and_checkpoint_steps(monkeypatch):
  # log_every=4, eval_every=6, checkpoint_every=5 over 12 steps: the sync steps are these.
  syncs = {4, 5, 6, 8, 10, 12}
  fetches = []
  real_get = runner.jax.device_get
  monkeypatch.setattr(runner.jax, 'device_get', lambda x: fetches.append(1) or real_get(x))
  driver = {}

  def make(clock, losses):
    driver['d'] = RecordingDriver(clock, losses)
    return driver['d']

  run(monkeypatch, driver=make)
  reads = driver['d'].reads
  assert reads and set(reads) <= syncs, f'metrics read after steps {sorted(set(reads) - syncs)}'
  # Every step's metrics are read (checked finite) by the end, in one fetch per sync point
  # (the window's metrics stacked, and the state's finiteness probe).
  assert len(fetches) == len(syncs)


def test_a_stray_read_on_the_hot_path_is_caught_by_the_recording_test(monkeypatch):
  # The recording check can fail: a loop that reads every step's loss (as the old one did).
  class EagerDriver(RecordingDriver):
    def step(self, state, batch):
      state, metrics = super().step(state, batch)
      float(metrics['loss'])
      return state, metrics

  driver = {}

  def make(clock, losses):
    driver['d'] = EagerDriver(clock, losses)
    return driver['d']

  run(monkeypatch, driver=make)
  assert set(driver['d'].reads) - {4, 5, 6, 8, 10, 12}


def _strict(line):  # json.loads that rejects NaN and Infinity, as strict parsers do
  def bad(name):
    raise ValueError(f'non-strict JSON constant {name}')
  return json.loads(line, parse_constant=bad)


def test_metric_writer_writes_strict_json_and_no_nonfinite_tensorboard_scalars(tmp_path):
  from softmax_jax.train import writer as writer_lib  # pylint: disable=g-import-not-at-top
  w = writer_lib.MetricWriter(str(tmp_path), 0)
  logged = []
  w._tb.add_scalar = lambda k, v, step: logged.append((k, v, step))  # pylint: disable=protected-access
  w.write(5, {'train/loss': np.float32(0.5), 'nonfinite_state': float('nan')})
  w.write_final(9, {'test/few_accuracy': None, 'test/few_count': 0.0, 'test/nll': float('inf'),
                    'test/accuracy': 0.75})
  w.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [_strict(line) for line in f]
  assert rows == [{'step': 5, 'train/loss': 0.5, 'nonfinite_state': None},
                  {'step': 9, 'test/few_accuracy': None, 'test/few_count': 0.0, 'test/nll': None,
                   'test/accuracy': 0.75}]
  assert logged == [('train/loss', 0.5, 5), ('test/few_count', 0.0, 9), ('test/accuracy', 0.75, 9)]
  text = writer_lib.to_json({'a': float('nan'), 'b': np.float32(2.0), 'n': 3, 'c': None},
                            indent=2, sort_keys=True)
  assert _strict(text) == {'a': None, 'b': 2.0, 'n': 3, 'c': None}
  with pytest.raises(ValueError):  # a NaN the flat clean-up cannot see still fails loudly
    writer_lib.to_json({'nested': [float('nan')]})


def test_the_final_row_writes_no_tag_the_last_log_step_wrote(monkeypatch):
  from softmax_jax.train.loop import final_row  # pylint: disable=g-import-not-at-top
  _, timing, rows, _, _, _ = run(monkeypatch)
  last = {k for step, r in rows if step == 12 for k in r}
  assert 'train/tokens_per_second' in last and 'train/tokens_per_second' in timing
  row = final_row(dict(timing, **{'test/accuracy': 0.5}), 'tokens_per_second')
  assert not last & set(row)  # two values of one tag at one step, before loop.final_row
  assert row['train/steady_tokens_per_second'] == timing['train/tokens_per_second']


def test_stacked_window_metrics_keep_every_step_in_order_with_few_compiles(monkeypatch):
  # A fresh jit of the same function, its traces counted (the shared one's executable cache
  # depends on what ran before in the process: the persistent compilation cache of conftest.py).
  monkeypatch.setattr(runner, '_stack_jit',
                      jax.jit(chex.assert_max_traces(runner._stack_jit.__wrapped__, n=5)))
  for n in (1, 2, 3, 31, 32, 33, 70, 100):
    steps = [{'loss': jnp.float32(i), 'packed': jnp.array([i, -i], jnp.float32)} for i in range(n)]
    steps[n // 2] = {'loss': jnp.float32(np.nan), 'packed': steps[n // 2]['packed']}
    fetched = runner._unstack(jax.device_get(runner._stack(steps)))
    expected = np.arange(n, dtype=np.float32)
    expected[n // 2] = np.nan
    np.testing.assert_array_equal(fetched['loss'], expected)  # NaN stays at its own step
    np.testing.assert_array_equal(fetched['packed'], np.stack([np.arange(n), -np.arange(n)], 1))
  # group sizes 1, 2, 4, 8 (70 = 2 * 32 + 6) and 32: five traces (chex counts them), not one
  # per window length



class Lazy:
  """A step's metric, in flight until something waits for or reads it or a later step's (steps run
  in order: each takes the state the one before returns)."""

  def __init__(self, value, step, flight):
    self.value, self.step, self.flight = value, step, flight
    flight.add(step)

  def block_until_ready(self):
    self.flight.difference_update([s for s in self.flight if s <= self.step])
    return self

  def __float__(self):
    return float(self.block_until_ready().value)

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self.block_until_ready().value, dtype)


def test_the_loop_never_runs_32_steps_ahead_of_the_devices(monkeypatch):
  # XLA:CPU deadlocks a multi-device run 32 steps ahead (parallel.IN_FLIGHT), so the loop must
  # wait before that. Here a step finishes only when waited for or read; the count of unfinished
  # steps is taken at each batch the loop takes. Unbounded, it would reach 47 (no sync in 48 steps).
  flight, counts = set(), []

  class LazyDriver(Driver):
    def step(self, state, batch):
      state, metrics = super().step(state, batch)
      return state, {k: Lazy(v, int(state), flight) for k, v in metrics.items()}

  def batches():
    for b in range(1, 100):
      counts.append(len(flight))
      yield b

  run(monkeypatch, driver=LazyDriver, batches=batches(), num_steps=48, every=(48, 48, 48))
  assert max(counts) == 2 * parallel.IN_FLIGHT - 1, counts
  assert not flight  # all read at the end


def test_an_evaluation_pass_never_runs_32_batches_ahead():
  # The same bound in `JitDriver.evaluate` (a vocabulary-parallel evaluation all-reduces across
  # 'model'): its jitted step replaced by one whose outputs finish only when waited for.
  driver = parallel.JitDriver(types.SimpleNamespace(batch_sizes={'train': 8}, resident=None,
                                                    row_state_keys=()), None, None, 8)
  flight, counts, launched = set(), [], []

  def fn(variables, carry, batch):
    launched.append(batch)
    return Lazy(batch, len(launched), flight), carry

  def batches():
    for b in range(48):
      counts.append(len(flight))
      yield np.full((8,), b)

  driver._eval_fns[fn] = fn  # pylint: disable=protected-access
  outs = driver.evaluate(fn, {'params': {}, 'model_state': {}}, batches())
  assert len(outs) == 48 and max(counts) == 2 * parallel.IN_FLIGHT - 1, counts


def test_hot_path_guard_is_entered_unless_it_allows(monkeypatch):
  with runner._hot_path_guard():  # 'allow': no context (it costs ~5 us a step)
    assert jax.config.jax_transfer_guard_device_to_host is None
  monkeypatch.setattr(runner, 'TRANSFER_GUARD', 'disallow_explicit')
  with runner._hot_path_guard():
    assert jax.config.jax_transfer_guard_device_to_host == 'disallow_explicit'
