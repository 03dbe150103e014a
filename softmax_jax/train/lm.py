"""`train_and_evaluate_lm(config, workdir)`: word-level language modelling (PTB, Tiny Shakespeare, lm1b).

`softmax_jax.train.train_and_evaluate` hands every `config.data.name` in `data.text.LM_DATASETS`
here. Training reads the train stream as B contiguous rows in windows of T = `config.data.seq_len`
tokens (`data.text.lm_batches`, Zaremba's "batchify"); the backbone's state (`carry`, one row
per batch row) flows from each window into the next one, with the gradient stopped between
windows (truncated BPTT), and restarts from zeros at every epoch start, where the rows jump back
to their beginnings. The carry is part of the train state and of every checkpoint, so a killed
run resumes exactly where it stopped.

Evaluation is one pass over a split (`lm_eval_batches`), carrying the state across its windows;
the per-token NLL is the head's evaluation loss (`-log_prob[label]`, exact for every head) and
the accuracy is next-token top-1 (`head.predict`), both reduced on device: `[N, K]` log-probs
never reach the host. Perplexity is `exp(mean NLL)`. The logged 'train/perplexity' is exp of the
mean training loss: for the sampled head that is the sampled loss, not the model's perplexity.

Data parallelism: one `jax.jit` over a 1-D Mesh, the batch and the carry split on axis 'data',
everything else replicated; XLA inserts the gradient reduction, so every device count gives the
same run up to float summation order. There is no pmap driver for language models
(`config.parallel` must be 'jit'): it would need a per-device copy of the carry and gains nothing.
"""

import functools
import json
import math
import os
from typing import Dict

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from softmax_jax.data.text import (LM_DATASETS, lm_batches, lm_eval_batches, lm_steps_per_epoch,
                                   load_text_dataset)
from softmax_jax.models.lm import build_language_model
from softmax_jax.train.checkpoint import Checkpointer
from softmax_jax.train.config import validate_config
from softmax_jax.train.interrupt import Interrupts
from softmax_jax.train.parallel import _devices, check_divisible
from softmax_jax.train.runner import finished, restore, run_steps
from softmax_jax.train.state import TrainState, make_optimizer
from softmax_jax.train.step import check_updated_state
from softmax_jax.train.workdir import WorkdirLock, atomic_write, check_config
from softmax_jax.train.writer import MetricWriter

__all__ = ['LM_DATASETS', 'LMDriver', 'init_lm_state', 'lm_train_step', 'train_and_evaluate_lm']


def init_lm_state(model, tx, batch_size: int, seq_len: int, seed: int) -> TrainState:
  """Host state {step, params, model_state, opt_state, rng, carry}; carry = zeros for `batch_size` rows."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  # Eagerly, not under jit: compiling the initializers of a scanned LSTM takes longer than running them.
  variables = dict(model.init(init_rng, tokens, tokens, carry=model.initial_carry(1), train=False))
  params = variables.pop('params')
  state = dict(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
               opt_state=tx.init(params), rng=train_rng, carry=model.initial_carry(batch_size))
  return jax.tree.map(np.asarray, state)


def lm_train_step(state: TrainState, batch, *, model, tx, schedule, steps_per_epoch: int):
  """One optimizer step on the mean per-token loss of `batch` ({'inputs', 'targets'} `[B, T]` int).

  The carry enters with its gradient stopped and is reset to zeros at each epoch start
  (`step % steps_per_epoch == 0`). Keys: `fold_in(rng, step)` split into 'dropout' and 'sample'.

  Returns:
    `(new_state, metrics)`, metrics {'loss', 'learning_rate', 'grad_norm'} (the norm before clipping).
  """
  chex.assert_rank(batch['inputs'], 2, custom_message="batch['inputs'] must be [B, T] token ids")
  chex.assert_type((batch['inputs'], batch['targets']), int,
                   custom_message="batch['inputs'] and batch['targets'] must be integer token ids")
  chex.assert_equal_shape((batch['inputs'], batch['targets']),
                          custom_message="batch['inputs'] and batch['targets'] must both be [B, T]")
  dropout_rng, sample_rng = jax.random.split(jax.random.fold_in(state['rng'], state['step']))
  fresh = state['step'] % steps_per_epoch == 0
  carry = jax.tree.map(lambda c: jnp.where(fresh, jnp.zeros_like(c), jax.lax.stop_gradient(c)),
                       state['carry'])
  model_state = state['model_state']

  def loss_fn(params):
    kwargs = dict(carry=carry, train=True, step=state['step'],
                  rngs={'dropout': dropout_rng, 'sample': sample_rng})
    variables = {'params': params, **model_state}
    if model_state:
      (losses, new_carry), new_model_state = model.apply(
          variables, batch['inputs'], batch['targets'], mutable=list(model_state), **kwargs)
    else:
      (losses, new_carry), new_model_state = model.apply(
          variables, batch['inputs'], batch['targets'], **kwargs), model_state
    return jnp.mean(losses.astype(jnp.float32)), (new_carry, dict(new_model_state))

  (loss, (new_carry, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  chex.assert_trees_all_equal_shapes_and_dtypes(
      new_carry, state['carry'], custom_message='the backbone must return a carry shaped like the one it got')
  metrics = dict(loss=loss, learning_rate=schedule(state['step']), grad_norm=optax.tree.norm(grads))
  params = optax.apply_updates(state['params'], updates)
  check_updated_state(state, params, model_state)
  return dict(step=state['step'] + 1, params=params, model_state=model_state, opt_state=opt_state, rng=state['rng'], carry=new_carry), metrics


def _eval_step(variables, carry, batch, *, model):
  nll, predictions, carry = model.apply(variables, batch['inputs'], batch['targets'], carry, method='score')
  mask = batch['mask']
  sums = (jnp.sum(jnp.where(mask, nll.astype(jnp.float32), 0.0)),
          jnp.sum(mask & (predictions == batch['targets'])), jnp.sum(mask))
  return sums, carry


class LMDriver:
  """`jax.jit` over a 1-D Mesh: batch and carry split on axis 'data', the rest replicated."""

  def __init__(self, model, tx, schedule, num_devices: int, steps_per_epoch: int):
    self.model, self.devices = model, _devices(num_devices)
    mesh = Mesh(np.array(self.devices), ('data',))
    self.replicated, self.sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    self._step = jax.jit(functools.partial(lm_train_step, model=model, tx=tx, schedule=schedule,
                                           steps_per_epoch=steps_per_epoch), donate_argnums=(0,))
    self._eval = jax.jit(functools.partial(_eval_step, model=model))

  def put_state(self, state):
    placement = {k: self.sharded if k == 'carry' else self.replicated for k in state}
    return {k: jax.device_put(v, placement[k]) for k, v in state.items()}

  def get_state(self, state):
    return jax.tree.map(np.asarray, jax.device_get(state))

  def step(self, state, batch):
    return self._step(state, jax.device_put(batch, self.sharded))

  def evaluate(self, state, stream, batch_size: int, seq_len: int, split: str) -> Dict[str, float]:
    """`{split}/nll`, `{split}/perplexity`, `{split}/accuracy` of one carried pass over `stream`."""
    variables = {'params': state['params'], **state['model_state']}
    carry = jax.device_put(self.model.initial_carry(batch_size), self.sharded)
    sums = []
    for batch in lm_eval_batches(stream, batch_size, seq_len):
      batch_sums, carry = self._eval(variables, carry, jax.device_put(batch, self.sharded))
      sums.append(batch_sums)  # device scalars: no host sync inside the pass
    nll, correct, count = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
    mean = float(nll / count)
    return {f'{split}/nll': mean, f'{split}/perplexity': math.exp(mean),
            f'{split}/accuracy': float(correct / count)}


def _check_lm_config(config) -> None:
  if config.data.name not in LM_DATASETS:
    raise ValueError(f'config.data.name={config.data.name!r} is not a language-modelling dataset {LM_DATASETS}.')
  if config.parallel != 'jit':
    raise ValueError(f"config.parallel must be 'jit' for language models (jit over a Mesh), got {config.parallel!r}.")
  for key in ('seq_len', 'vocab_size', 'max_train_tokens'):
    value, low = config.data[key], 1 if key == 'seq_len' else 0
    if int(value) != value or value < low:
      raise ValueError(f'config.data.{key} must be an integer >= {low}, got {value!r}.')


def train_and_evaluate_lm(config, workdir: str, *, dataset=None) -> Dict[str, float]:
  """Trains a language model per `config` in `workdir` (resuming from its latest checkpoint), evaluates.

  Args:
    config: `base_config()` with a `config.data.name` in `LM_DATASETS`, `config.model.name` in
      'lstm'|'transformer', any head of `softmax_jax.heads.HEADS`; see configs/ptb_lstm.py.
    workdir: config.json, metrics.jsonl, TensorBoard events, checkpoints, final_metrics.json.
    dataset: a `data.text.TextDataset` to use instead of `load_text_dataset(config.data)`.

  Returns:
    The final metrics: '{validation,test}/{perplexity,nll,accuracy}', 'train_wall_s' (this
    invocation's training loop, compilation, evaluation and checkpoints included),
    'train/tokens_per_second' (steady state: after the first step of this invocation, evaluation
    and checkpoint time left out), 'num_params'; also written to final_metrics.json.

  Raises:
    ValueError: an unknown config key or a bad value, naming it.
    WorkdirError, FloatingPointError, TrainingInterrupted: as `train.train_and_evaluate`.
  """
  validate_config(config)
  _check_lm_config(config)
  workdir = os.path.abspath(workdir)
  with Interrupts() as interrupts, WorkdirLock(workdir):
    changes = check_config(config, workdir)
    dataset = load_text_dataset(config.data) if dataset is None else dataset
    model = build_language_model(config.model, config.head, dataset.num_classes, dataset.counts)
    batch_size, seq_len, eval_batch_size = config.batch_size, config.data.seq_len, config.eval_batch_size
    train = dataset.splits['train']
    steps_per_epoch = lm_steps_per_epoch(len(train), batch_size, seq_len)
    if steps_per_epoch < 1:
      raise ValueError(f'The train split ({len(train)} tokens) is too short for one window of '
                       f'config.batch_size x config.data.seq_len = {batch_size} x {seq_len}.')
    schedule, tx = make_optimizer(config.optimizer, config.num_steps)
    driver = LMDriver(model, tx, schedule, config.num_devices, steps_per_epoch)
    check_divisible(batch_size, len(driver.devices), 'batch_size')
    check_divisible(eval_batch_size, len(driver.devices), 'eval_batch_size')

    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), config.max_checkpoints)
    try:
      template = init_lm_state(model, tx, batch_size, seq_len, config.seed)
      host_state, start_step = restore(config, workdir, ckpt, template, changes=changes,
                                       interrupts=interrupts)
      num_params = sum(int(np.size(p)) for p in jax.tree.leaves(host_state['params']))
      state = driver.put_state(host_state)
      writer = MetricWriter(workdir, start_step)
      batches = lm_batches(train, batch_size, seq_len, start_step=start_step, num_steps=config.num_steps)
      try:
        state, final = run_steps(
            config, driver, state, batches, start_step=start_step, writer=writer, ckpt=ckpt,
            evaluate=lambda s: driver.evaluate(s, dataset.splits['validation'], eval_batch_size,
                                               seq_len, 'validation'),
            items_per_step=batch_size * seq_len, rate='tokens_per_second', log_perplexity=True,
            interrupts=interrupts)
        finished(interrupts, ckpt, config.num_steps)
        final['num_params'] = float(num_params)
        for split in ('validation', 'test'):
          final.update(driver.evaluate(state, dataset.splits[split], eval_batch_size, seq_len, split))
        writer.write_final(config.num_steps, final)
      finally:
        writer.close()
    finally:
      ckpt.close()
    atomic_write(os.path.join(workdir, 'final_metrics.json'), json.dumps(final, indent=2, sort_keys=True))
  return final
