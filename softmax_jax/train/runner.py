"""`run_steps`: the step loop that both training drivers share (train/loop.py, train/lm.py).

Every step is dispatched without waiting for the previous one: a step's loss is read back (and
checked for NaN or inf) after the next step has been dispatched, except at the steps that log,
evaluate or checkpoint, which wait for their own and also check that the whole train state is
finite (`chex.assert_tree_all_finite` on a per-leaf probe), so no checkpoint holds NaN. Rates (`train/examples_per_second`,
`train/tokens_per_second`) count neither the first step of an invocation, which compiles, nor the
time spent in evaluation and checkpoints.
"""

import math
import time
from typing import Callable, Dict, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


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


def run_steps(config, driver, state, batches, *, start_step: int, writer, ckpt,
              evaluate: Callable[..., Dict[str, float]], items_per_step: int, rate: str,
              log_perplexity: bool = False) -> Tuple[object, Dict[str, float]]:
  """Steps `state` from `start_step` to `config.num_steps`; logs, evaluates and checkpoints.

  Args:
    config: reads num_steps, log_every, eval_every, checkpoint_every, progress and, for the error
      message, data.name, model.name and head.name.
    driver: `step(state, batch) -> (state, metrics)` with a scalar metrics['loss'];
      `get_state(state)` -> the host state to checkpoint.
    state: the device state after `start_step` steps.
    batches: an iterator of training batches, starting with step `start_step + 1`'s.
    start_step: steps already done (0, or the checkpoint resumed from).
    writer: a `MetricWriter`; every `log_every` steps it gets the window's mean metrics as
      f'train/{key}', plus f'train/{rate}'.
    ckpt: a `Checkpointer`, saved every `checkpoint_every` steps and at the last one.
    evaluate: `evaluate(state)` -> validation metrics, written every `eval_every` steps but the
      last (the caller evaluates the final state itself).
    items_per_step: examples or tokens a step consumes, for the rate.
    rate: the rate's name, e.g. 'examples_per_second'.
    log_perplexity: also log f'train/perplexity' = exp(mean loss).

  Returns:
    `(state, timing)`, timing {'train_wall_s': this invocation's loop, compilation, evaluation
    and checkpoints included; f'train/{rate}': over the steps after the first, evaluation and
    checkpoints left out (0.0 with fewer than two steps)}.

  Raises:
    FloatingPointError: the training loss is NaN or infinite, or at a log, evaluation or checkpoint
      step the train state is; names the step and the last good checkpoint.
  """
  last_good = start_step if start_step else None

  def check_finite(step: int, loss) -> None:
    loss = float(loss)
    if not math.isfinite(loss):
      writer.write(step, {'nonfinite_loss': loss})
      raise FloatingPointError(
          f'Training loss is {loss} at step {step} (config: {config.data.name}, {config.model.name}, '
          f'{config.head.name}). Last good checkpoint: {ckpt.path(last_good)}. Lower '
          'config.optimizer.learning_rate or set config.optimizer.clip_global_norm.')

  def check_state_finite(step: int, state) -> None:
    probe = jax.device_get(_finite_probe(state))
    try:
      chex.assert_tree_all_finite(probe)
    except AssertionError:
      bad = [jax.tree_util.keystr(path) for path, v in jax.tree_util.tree_leaves_with_path(probe)
             if not np.isfinite(v)]
      writer.write(step, {'nonfinite_state': float('nan')})
      raise FloatingPointError(
          f'Training state is not finite after step {step} (config: {config.data.name}, '
          f'{config.model.name}, {config.head.name}): {len(bad)} leaves hold NaN or inf, e.g. '
          f'{", ".join(bad[:3])}. Last good checkpoint: {ckpt.path(last_good)}. Lower '
          'config.optimizer.learning_rate or set config.optimizer.clip_global_norm.') from None

  def due(step: int, every: int) -> bool:
    return step % every == 0

  bar = tqdm(total=config.num_steps, initial=start_step, desc='train', disable=not config.progress,
             dynamic_ncols=True)
  t_begin = time.perf_counter()
  t_steady, steady_from, t_paused = None, start_step + 1, 0.0  # t_paused: evaluation, checkpoints
  window, untimed, t0, pending = [], 0, t_begin, None
  for step in range(start_step + 1, config.num_steps + 1):  # `step` counts steps done after this one
    state, step_metrics = driver.step(state, next(batches))
    if t_steady is None:  # the first step compiles: rates count from its end
      check_finite(step, step_metrics['loss'])
      t_steady = t0 = time.perf_counter()
      steady_from, untimed = step, 1
    if pending is not None:  # check the previous step while this one runs
      check_finite(*pending)
    pending = None
    window.append(step_metrics)
    bar.update(1)
    last = step == config.num_steps
    do_log, do_eval = due(step, config.log_every) or last, due(step, config.eval_every) and not last
    do_ckpt = due(step, config.checkpoint_every) or last
    if not (do_log or do_eval or do_ckpt):
      pending = (step, step_metrics['loss'])  # read after the next step is dispatched
      continue
    check_finite(step, step_metrics['loss'])
    check_state_finite(step, state)  # parameters and optimizer state: never log or save NaN ones
    if do_log:
      scalars = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
      if log_perplexity:
        scalars['perplexity'] = math.exp(min(scalars['loss'], 700.0))
      if len(window) > untimed:
        scalars[rate] = (len(window) - untimed) * items_per_step / (time.perf_counter() - t0)
      writer.write(step, {f'train/{k}': v for k, v in scalars.items()})
      shown = {'ppl': scalars['perplexity']} if log_perplexity else {'loss': scalars['loss']}
      shown[rate.replace('_per_second', '/s')] = scalars.get(rate, 0.0)
      bar.set_postfix({k: f'{v:.4g}' for k, v in shown.items()})
      window, t0, untimed = [], time.perf_counter(), 0
    t_pause = time.perf_counter()
    if do_eval:
      writer.write(step, evaluate(state))
    if do_ckpt:
      ckpt.save(step, driver.get_state(state))
      last_good = step
    paused = time.perf_counter() - t_pause
    t0, t_paused = t0 + paused, t_paused + paused
  if pending is not None:
    check_finite(*pending)
  jax.block_until_ready(state)
  t_end = time.perf_counter()
  bar.close()
  steady_steps = config.num_steps - steady_from
  steady_rate = (steady_steps * items_per_step / (t_end - t_steady - t_paused)
                 if t_steady is not None and steady_steps > 0 else 0.0)
  return state, {'train_wall_s': t_end - t_begin, f'train/{rate}': steady_rate}
