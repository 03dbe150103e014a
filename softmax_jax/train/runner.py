"""`run_steps`: the step loop of every task and both drivers (train/loop.py).

The hot path never talks to the host: every step is dispatched without waiting for the previous one
(but fewer than 16 ahead of the devices: `parallel.bound_in_flight`, since XLA:CPU deadlocks a
multi-device run 32 steps ahead), its metrics stay on device, and the data reaches the devices
ahead of its step (the driver's `feed`: the next batch put while a step runs, or a resident
split's index tables once per 64 steps). Only the steps that log, evaluate or checkpoint
(or are interrupted) sync: one `jax.device_get` reads the metrics of every step since the last sync
(stacked on device, 32 steps to an array: `_stack`) and a one-scalar finiteness probe of the whole
train state; each step's loss and gradient norm are checked for NaN or inf, and a non-finite probe
is traced to the arrays that hold it (`chex.assert_tree_all_finite` on a per-leaf probe), so no
checkpoint holds NaN. A failure names the first step whose loss or gradient norm is not finite (or,
if only the state check saw it, the range of steps since the state was last seen finite) and the
newest checkpoint, which is verified finite, and says how to resume from it with a lower learning
rate. A SIGINT or SIGTERM (see train/interrupt.py) stops the loop after the step in flight, which is
checkpointed. Rates (`train/examples_per_second`, `train/tokens_per_second`) count neither the first
step of an invocation, which compiles, nor the time spent in evaluation and checkpoints. """

import contextlib
import math
import time
from typing import Callable, Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from softmax_jax.train.interrupt import Interrupts, TrainingInterrupted
from softmax_jax.train.parallel import bound_in_flight
from softmax_jax.train.workdir import check_steps, record_config


# The device-to-host transfer guard of the hot path (`jax.transfer_guard_device_to_host`): 'allow'
# (then no guard is entered: the context and the jitted calls inside it cost ~4.6 us a step on
# a Zen 3 core, WORKSPACE, issue 15). Tests set 'disallow_explicit', so that any read between the
# sync points fails.
TRANSFER_GUARD = 'allow'


def _hot_path_guard() -> contextlib.AbstractContextManager:
  if TRANSFER_GUARD == 'allow':
    return contextlib.nullcontext()
  return jax.transfer_guard_device_to_host(TRANSFER_GUARD)


@jax.jit
def _finite_probe(state):
  """Per floating leaf of `state`, `sum(x * 0)`: 0 where the leaf is finite, NaN where it is not.

  A few bytes reach the host instead of the whole state, and `chex.assert_tree_all_finite` on the
  probe names the leaves that are not finite."""
  def probe(x):
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return jnp.zeros((), jnp.float32)
    return jnp.sum(x.astype(jnp.float32) * 0)
  return jax.tree.map(probe, state)


@jax.jit
def _state_probe(state):
  """`sum(x * 0)` over every floating leaf of `state`: one scalar, NaN iff some leaf is not finite."""
  return sum(jax.tree.leaves(_finite_probe(state)), jnp.zeros((), jnp.float32))


STACK_GROUP = 32  # per-step metrics are stacked on device this many at a time (see `_stack`)


@jax.jit
def _stack_jit(metrics):
  return jax.tree.map(lambda *x: jnp.stack(x), *metrics)


def _stack(metrics):
  """A list of n per-step metrics (dicts, or the drivers' packed vectors) -> `(groups, n)`:
  device trees stacked `STACK_GROUP` steps at a time (the last group, or a shorter list, padded
  with its last step to a power of two), which `_unstack` joins on the host after one fetch.

  Stacking the whole window in one jitted call compiled anew for every window length: 330 ms
  for 300 steps on one Zen 3 core, paid inside the timed loop at the first log (WORKSPACE,
  issue 15). Fixed group sizes compile at most log2(STACK_GROUP) + 1 small functions a run;
  the price is ceil(n / STACK_GROUP) arrays in the sync's one fetch instead of one.
  """
  n = len(metrics)
  if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(metrics)):
    return [jax.tree.map(lambda *x: np.stack([np.asarray(v) for v in x]), *metrics)], n
  groups = []
  for i in range(0, n, STACK_GROUP):
    group = metrics[i:i + STACK_GROUP]
    size = min(STACK_GROUP, 1 << (len(group) - 1).bit_length())
    groups.append(_stack_jit(group + group[-1:] * (size - len(group))))
    bound_in_flight(groups)
  return groups, n


def _unstack(fetched):
  """The fetched `_stack` result -> one host tree of `[n, ...]` arrays (padding dropped)."""
  groups, n = fetched
  return jax.tree.map(lambda *g: np.concatenate(g)[:n], *groups)


def restore(config, workdir: str, ckpt, template, *, changes, interrupts: Interrupts):
  """`(host_state, start_step)` of a run: the newest intact checkpoint (or `template`, step 0).

  Broken newer checkpoints are set aside; then `config.num_steps` is checked against the step and
  `config.json` is (re)written with the harmless `changes` of `workdir.check_config` logged.

  Raises:
    WorkdirError: checkpoints exist but none is intact, or the workdir trained past num_steps.
  """
  state, start_step = ckpt.restore_latest(template, set_aside_broken=True)
  check_steps(config, start_step, ckpt.path(start_step))
  record_config(config, workdir, changes, start_step)
  if start_step:
    logging.info('Resuming from %s at step %d of %d', ckpt.path(start_step), start_step,
                 config.num_steps)
    interrupts.resume_hint = f'Rerun with the same workdir to resume from {ckpt.path(start_step)}.'
  else:
    interrupts.resume_hint = 'No checkpoint was written yet: a rerun with the same workdir starts from scratch.'
  return state, start_step


def finished(interrupts: Interrupts, ckpt, num_steps: int) -> None:
  """After training: an interruption during the final evaluation loses nothing."""
  interrupts.resume_hint = (f'Training had finished ({ckpt.path(num_steps)}); rerun with the same '
                            'workdir to evaluate it.')


class Diverged(FloatingPointError):
  """The loss, gradient norm or state became NaN or inf; the message names the step and checkpoint.

  Attributes:
    resume_flags: flags that, added to the run's command, resume it with a 10x lower learning rate.
  """

  def __init__(self, message: str, resume_flags):
    super().__init__(message)
    self.resume_flags = list(resume_flags)


def _lower_lr_flags(config):
  return [f'--config.optimizer.learning_rate={float(config.optimizer.learning_rate) / 10:g}']


def _resume_advice(config, ckpt, last_good: Optional[int]) -> str:
  lr = float(config.optimizer.learning_rate)
  flags = f'{_lower_lr_flags(config)[0]} (now {lr:g})'
  if not config.optimizer.clip_global_norm:
    flags += ', or add --config.optimizer.clip_global_norm=1.0'
  if last_good is None:
    return f'No checkpoint was written before it. To start again, rerun with the same workdir and {flags}.'
  return (f'The newest checkpoint, {ckpt.path(last_good)} (step {last_good}), is verified finite. '
          f'To resume from it with a lower learning rate, rerun with the same workdir and {flags}.')


# The validation metrics a line during training shows, in this order, where the task has them.
SHOWN_METRICS = ('accuracy', 'nll', 'perplexity', 'ece', 'fy_loss')


def key_metrics(metrics: Dict[str, float], split: str) -> Dict[str, float]:
  """The `SHOWN_METRICS` among `metrics` keyed f'{split}/{name}', by name (all, if none of them).

  None values (an empty bucket's accuracy) are left out.
  """
  values = {k[len(split) + 1:]: float(v) for k, v in metrics.items()
            if k.startswith(f'{split}/') and v is not None}
  return {k: values[k] for k in SHOWN_METRICS if k in values} or dict(sorted(values.items()))


def metrics_line(step: int, num_steps: int, label: str, values: Dict[str, float]) -> str:
  """'step 100/1500 validation: accuracy 0.9028, nll 0.4159, ece 0.1416' (`values` in order)."""
  def fmt(v):
    return f'{v:.4g}' if abs(v) < 1e4 else f'{v:.0f}'
  return f'step {step}/{num_steps} {label}: ' + ', '.join(f'{k} {fmt(v)}' for k, v in values.items())


def run_steps(config, driver, state, batches, *, start_step: int, writer, ckpt,
              evaluate: Callable[..., Dict[str, float]], items_per_step: int, rate: str,
              log_perplexity: bool = False,
              interrupts: Optional[Interrupts] = None) -> Tuple[object, Dict[str, float]]:
  """Steps `state` from `start_step` to `config.num_steps`; logs, evaluates and checkpoints.

  Args:
    config: reads num_steps, log_every, eval_every, checkpoint_every, progress,
      optimizer.learning_rate and optimizer.clip_global_norm (for advice) and, for the error
      message, data.name, model.name and head.name.
    driver: `step(state, batch) -> (state, metrics)`, metrics a pytree of device arrays;
      `host_metrics(stacked)` (default: the identity) turns the fetched metrics of n steps,
      stacked on a leading axis, into `{name: [n] array}` with 'loss' (and optionally
      'grad_norm'; both checked finite for every step, at the next sync): the drivers of
      train/parallel.py pack a step's metrics in one vector; `get_state(state)` -> the host
      state to checkpoint; optionally `feed(batches, start_step)`, the iterator of what `step`
      takes, one item a step (the batches put on the devices ahead of their steps).
    state: the device state after `start_step` steps (finite: a restored checkpoint is checked).
    batches: an iterator of training batches, starting with step `start_step + 1`'s.
    start_step: steps already done (0, or the checkpoint resumed from).
    writer: a `MetricWriter`; every `log_every` steps it gets the window's mean metrics as
      f'train/{key}', plus f'train/{rate}'.
    ckpt: a `Checkpointer`, saved every `checkpoint_every` steps and at the last one.
    evaluate: `evaluate(state)` -> validation metrics, written every `eval_every` steps but the
      last (the caller evaluates the final state itself); their `key_metrics` are printed as a
      line above the progress bar (`config.progress`), or logged at INFO without it, when the
      train loss and rate of each log step are logged too.
    items_per_step: examples or tokens a step consumes, for the rate.
    rate: the rate's name, e.g. 'examples_per_second'.
    log_perplexity: also log f'train/perplexity' = exp(mean loss).
    interrupts: the run's `Interrupts`; after a SIGINT or SIGTERM the loop checkpoints the step in
      flight and raises `TrainingInterrupted`.

  Returns:
    `(state, timing)`, timing {'train_wall_s': this invocation's loop, compilation, evaluation
    and checkpoints included; f'train/{rate}': over the steps after the first, evaluation and
    checkpoints left out (0.0 with fewer than two steps)}.

  Raises:
    FloatingPointError: the training loss or gradient norm is NaN or infinite, or at a log,
      evaluation or checkpoint step the train state is; names the first bad step (or the range
      of steps it lies in), the newest checkpoint (verified finite) and how to resume from it.
    TrainingInterrupted: a SIGINT or SIGTERM; the step it stopped at was checkpointed.
  """
  last_good = start_step if start_step else None  # newest checkpoint, verified finite
  verified = start_step  # the state after this step was seen finite

  def where() -> str:
    return f'(config: {config.data.name}, {config.model.name}, {config.head.name})'

  def check_finite(steps, columns) -> None:
    """Raises at the first of `steps` whose loss or gradient norm (`columns[key][i]`) is not finite."""
    keys = [k for k in ('loss', 'grad_norm') if k in columns]
    finite = {k: np.isfinite(np.reshape(columns[k], len(steps))) for k in keys}
    bad = ~np.logical_and.reduce([finite[k] for k in keys])
    if not bad.any():
      return
    i = int(np.argmax(bad))
    key = next(k for k in keys if not finite[k][i])
    step, value = steps[i], float(np.reshape(columns[key], len(steps))[i])
    writer.write(step, {f'nonfinite_{key}': value})
    name = 'training loss' if key == 'loss' else 'gradient norm'
    raise Diverged(
        f'Training diverged at step {step}: the {name} is {value} {where()}; every earlier '
        f'step\'s loss and gradient norm were finite. {_resume_advice(config, ckpt, last_good)}',
        _lower_lr_flags(config))

  def check_state_finite(step: int, state, total) -> None:
    if np.isfinite(total):
      return
    probe = jax.device_get(_finite_probe(state))  # per leaf, to name them
    try:
      chex.assert_tree_all_finite(probe)
    except AssertionError:
      bad = [jax.tree_util.keystr(path) for path, v in jax.tree_util.tree_leaves_with_path(probe)
             if not np.isfinite(v)]
      writer.write(step, {'nonfinite_state': float('nan')})
      steps = f'step {step}' if step == verified + 1 else f'steps {verified + 1}-{step}'
      raise Diverged(
          f'Training diverged in {steps}: the train state after step {step} holds NaN or inf in '
          f'{len(bad)} arrays, e.g. {", ".join(bad[:3])} {where()}; it was finite after step '
          f'{verified}, and every loss and gradient norm up to step {step} was finite. '
          f'{_resume_advice(config, ckpt, last_good)}', _lower_lr_flags(config)) from None

  def interrupted() -> bool:
    return interrupts is not None and interrupts.signum is not None

  host_metrics = getattr(driver, 'host_metrics', lambda m: m)
  feed = getattr(driver, 'feed', None)
  batches = feed(batches, start_step) if feed is not None else batches
  bar = tqdm(total=config.num_steps, initial=start_step, desc='train', dynamic_ncols=True,
             disable=not config.progress or jax.process_index() != 0)  # one bar per run

  def say(line: str) -> None:
    """A console line: above the progress bar when it is shown (not breaking it), else logged."""
    if bar.disable:
      logging.info('%s', line)
    else:
      bar.write(line)

  t_begin = time.perf_counter()
  t_steady, steady_from, t_paused = None, start_step + 1, 0.0  # t_paused: evaluation, checkpoints
  # pending: (step, metrics on device); window: host metric columns since the last log, of n steps
  pending, window, n, untimed, t0 = [], [], 0, 0, t_begin
  guard = interrupts.deferred() if interrupts is not None else contextlib.nullcontext()
  with guard:
    # Read once: a ConfigDict attribute costs ~2 us, and the hot path is a few us of Python a step.
    num_steps, log_every, eval_every = config.num_steps, config.log_every, config.eval_every
    checkpoint_every = config.checkpoint_every
    for step in range(start_step + 1, num_steps + 1):  # `step` counts steps done after this one
      with _hot_path_guard():  # the hot path: no reads
        state, step_metrics = driver.step(state, next(batches))
        if t_steady is None:  # the first step compiles: rates count from its end
          jax.block_until_ready(step_metrics)
          t_steady = t0 = time.perf_counter()
          steady_from, untimed = step, 1
      pending.append((step, step_metrics))
      bound_in_flight(pending)  # never 32 steps ahead: XLA:CPU would deadlock (parallel.IN_FLIGHT)
      bar.update(1)
      last = step == num_steps
      do_log, do_eval = step % log_every == 0 or last, step % eval_every == 0 and not last
      do_ckpt = step % checkpoint_every == 0 or last
      if not (do_log or do_eval or do_ckpt or interrupted()):
        continue
      # A sync point: one read of every step's metrics since the last one, then the state probe.
      stacked, total = jax.device_get((_stack([m for _, m in pending]), _state_probe(state)))
      columns = host_metrics(_unstack(stacked))  # {name: [steps since the last sync]}
      steps, pending = [s for s, _ in pending], []
      check_finite(steps, columns)
      window.append(columns)
      n += len(steps)
      check_state_finite(step, state, total)  # parameters and optimizer state: never log or save NaN
      verified = step
      if do_log:
        scalars = {k: float(np.mean(np.concatenate([np.reshape(c[k], -1) for c in window]),
                                    dtype=np.float64)) for k in window[0]}
        if log_perplexity:
          scalars['perplexity'] = math.exp(min(scalars['loss'], 700.0))
        if n > untimed:
          scalars[rate] = (n - untimed) * items_per_step / (time.perf_counter() - t0)
        writer.write(step, {f'train/{k}': v for k, v in scalars.items()})
        shown = {'ppl': scalars['perplexity']} if log_perplexity else {'loss': scalars['loss']}
        shown[rate.replace('_per_second', '/s')] = scalars.get(rate, 0.0)
        bar.set_postfix({k: f'{v:.4g}' for k, v in shown.items()})
        if bar.disable:  # no bar to show the loss: a log line instead
          say(metrics_line(step, config.num_steps, 'train', shown))
        window, n, t0, untimed = [], 0, time.perf_counter(), 0
      t_pause = time.perf_counter()
      if do_eval and not interrupted():
        metrics = evaluate(state)
        writer.write(step, metrics)
        say(metrics_line(step, config.num_steps, 'validation', key_metrics(metrics, 'validation')))
      if do_ckpt or interrupted():
        ckpt.save(step, driver.get_state(state))
        last_good = step
      if interrupted():
        bar.close()
        raise TrainingInterrupted(
            f'Interrupted by {Interrupts.name(interrupts.signum)} after step {step} of '
            f'{config.num_steps}: saved checkpoint {ckpt.path(step)}. Rerun with the same workdir '
            'and config to resume from it.', interrupts.signum)
      paused = time.perf_counter() - t_pause
      t0, t_paused = t0 + paused, t_paused + paused
  jax.block_until_ready(state)
  t_end = time.perf_counter()
  bar.close()
  steady_steps = config.num_steps - steady_from
  steady_rate = (steady_steps * items_per_step / (t_end - t_steady - t_paused)
                 if t_steady is not None and steady_steps > 0 else 0.0)
  return state, {'train_wall_s': t_end - t_begin, f'train/{rate}': steady_rate}
