"""The language-modelling task: word-level corpora (PTB, Tiny Shakespeare, lm1b) with a carried state.

Training reads the train stream as B contiguous rows in windows of T = `config.data.seq_len`
tokens (`data.text.lm_batches`, Zaremba's "batchify"); the backbone's state (`carry`, one row
per batch row) flows from each window into the next one, with the gradient stopped between
windows (truncated BPTT), and restarts from zeros at every epoch start, where the rows jump back
to their beginnings. The carry is part of the train state (a per-row entry, split over the
devices like the batch under both drivers) and of every checkpoint, so a killed run resumes
exactly where it stopped.

Evaluation is one pass over a split (`lm_eval_batches`), carrying the state across its windows;
the per-token NLL is `-log_prob[label]` (exact for every head), the accuracy next-token top-1
and top-5, from the head's per-token statistics (`eval_stats`, chunked over the vocabulary by
the large-output heads), reduced on device to per-row sums: `[N, K]` never reaches the host. Perplexity is `exp(mean NLL)`. The logged
'train/perplexity' is exp of the mean training loss: for the sampled head that is the sampled
loss, not the model's perplexity.

Sparse heads (`config.head.mapping='sparsemax'|...`, `eval_stats` with 'support' and 'fy_loss'):
NLL and perplexity are undefined (a token outside the support has probability 0), so neither
'<split>/nll', '<split>/perplexity' nor 'train/perplexity' is reported (logged once); instead
'<split>/fy_loss' (mean per-token Fenchel-Young loss) and '<split>/support_size' (mean support).
"""

import functools
import math
from typing import Dict

import chex
import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.data.text import (LM_DATASETS, lm_batches, lm_eval_batches, lm_steps_per_epoch,
                                   load_text_dataset)
from softmax_jax.models.lm import build_language_model
from softmax_jax.train.classification import log_nll_undefined
from softmax_jax.train.parallel import check_divisible, data_shards, head_config


def check_lm_batch(batch) -> None:
  """Static chex checks of `{'inputs', 'targets': [B, T] int}` (also under jit)."""
  chex.assert_rank(batch['inputs'], 2, custom_message="batch['inputs'] must be [B, T] token ids")
  chex.assert_type((batch['inputs'], batch['targets']), int,
                   custom_message="batch['inputs'] and batch['targets'] must be integer token ids")
  chex.assert_equal_shape((batch['inputs'], batch['targets']),
                          custom_message="batch['inputs'] and batch['targets'] must both be [B, T]")


def _check_lm_config(config) -> None:
  if config.data.name not in LM_DATASETS:
    raise ValueError(f'config.data.name={config.data.name!r} is not a language-modelling dataset {LM_DATASETS}.')
  for key in ('seq_len', 'vocab_size', 'max_train_tokens'):
    value, low = config.data[key], 1 if key == 'seq_len' else 0
    if int(value) != value or value < low:
      raise ValueError(f'config.data.{key} must be an integer >= {low}, got {value!r}.')


def eval_step(variables, carry, batch, *, model):
  """Per-row sums `{'nll', 'correct', 'top5', 'count'}: [B]` of one window, and the carry.

  From the head's per-token statistics (`LanguageModel.eval_stats`: label log-prob, prediction,
  label rank), which large-vocabulary heads compute chunk by chunk, never forming `[B, T, K]`.
  A sparse head's statistics ('fy_loss' among them): 'fy_loss' and 'support' sums, no 'nll'.
  """
  stats, carry = model.apply(variables, batch['inputs'], batch['targets'], carry,
                             method='eval_stats')
  mask = batch['mask']
  per_row = lambda x: jnp.sum(jnp.where(mask, x, 0), axis=1)
  if 'fy_loss' in stats:  # a sparse head: the NLL is undefined (maybe inf)
    sums = {'fy_loss': per_row(stats['fy_loss'][..., 0]), 'support': per_row(stats['support'])}
  else:
    sums = {'nll': per_row(-stats['label_log_prob'][..., 0])}
  sums |= {'correct': per_row(stats['prediction'] == batch['targets']),
          'top5': per_row(stats['label_rank'] < 5), 'count': per_row(jnp.ones_like(mask, jnp.int32))}
  return sums, carry


class LanguageModelTask:
  """Next-token prediction on a `data.text.TextDataset` with a `LanguageModel` (see `train.task`)."""
  rate = 'tokens_per_second'
  row_state_keys = ('carry',)
  log_perplexity = True
  resident = None  # batches come from the host
  check_batch = staticmethod(check_lm_batch)

  def __init__(self, config, dataset=None):
    _check_lm_config(config)
    self.config = config
    self.dataset = load_text_dataset(config.data) if dataset is None else dataset
    self.model = build_language_model(config.model, head_config(config), self.dataset.num_classes,
                                      self.dataset.counts)
    self.seq_len = config.data.seq_len
    self.items_per_step = config.batch_size * self.seq_len
    train = self.dataset.splits['train']
    self.steps_per_epoch = lm_steps_per_epoch(len(train), config.batch_size, self.seq_len)
    if self.steps_per_epoch < 1:
      raise ValueError(f'The train split ({len(train)} tokens) is too short for one window of '
                       f'config.batch_size x config.data.seq_len = {config.batch_size} x {self.seq_len}.')
    self._eval_step = functools.partial(eval_step, model=self.model)
    # A sparse head (a Fenchel-Young loss, see softmax_jax.testing): exp(loss) is no perplexity.
    self.sparse = getattr(self.model.head, 'fenchel_young', None) is not None
    self.log_perplexity = not self.sparse
    if self.sparse:
      log_nll_undefined(self.model.head, 'language model')

  @property
  def batch_sizes(self) -> Dict[str, int]:
    """{config key: global batch size}: the sizes the devices split (`parallel.usable_devices`)."""
    return {'batch_size': int(self.config.batch_size),
            'eval_batch_size': int(self.config.eval_batch_size)}

  def check_devices(self, num_devices: int) -> None:
    """Raises ValueError (naming the fixes) unless the data axis of `num_devices` devices (all of
    them, or `num_devices / M` with `config.mesh`) divides every batch size."""
    for key, size in self.batch_sizes.items():
      check_divisible(size, data_shards(self.config, num_devices), key)

  def init_state(self, tx):
    """Host state {step, params, model_state, opt_state, rng, carry}; carry = zeros, one row per batch row."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))
    tokens = jnp.zeros((1, self.seq_len), jnp.int32)
    model = self.model
    # Eagerly, not under jit: compiling the initializers of a scanned LSTM takes longer than running them.
    variables = dict(model.init(init_rng, tokens, tokens, carry=model.initial_carry(1), train=False))
    params = variables.pop('params')
    state = dict(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                 opt_state=tx.init(params), rng=train_rng, carry=model.initial_carry(self.config.batch_size))
    return jax.tree.map(np.asarray, state)

  def entering_carry(self, state, key: str = 'carry'):
    """`state[key]` as the step's window starts from it: gradient stopped, zeros at each epoch start."""
    fresh = state['step'] % self.steps_per_epoch == 0
    return jax.tree.map(lambda c: jnp.where(fresh, jnp.zeros_like(c), jax.lax.stop_gradient(c)),
                        state[key])

  def loss(self, params, state, batch, rng, *, method=None):
    """Mean per-token loss; the carry enters with its gradient stopped, zeros at each epoch start.

    `method` (None: `LanguageModel.__call__`) is a function `(module, tokens, labels, *, carry,
    train, step) -> (losses [B, T], carry)` applied in its place (distillation's, `train/distill.py`).
    """
    dropout_rng, sample_rng = jax.random.split(rng)
    carry = self.entering_carry(state)
    model_state = state['model_state']
    kwargs = dict(carry=carry, train=True, step=state['step'],
                  rngs={'dropout': dropout_rng, 'sample': sample_rng}, method=method)
    variables = {'params': params, **model_state}
    if model_state:
      (losses, new_carry), new_model_state = self.model.apply(
          variables, batch['inputs'], batch['targets'], mutable=list(model_state), **kwargs)
    else:
      (losses, new_carry), new_model_state = self.model.apply(
          variables, batch['inputs'], batch['targets'], **kwargs), model_state
    chex.assert_trees_all_equal_shapes_and_dtypes(
        new_carry, state['carry'], custom_message='the backbone must return a carry shaped like the one it got')
    return jnp.mean(losses.astype(jnp.float32)), {'model_state': dict(new_model_state), 'carry': new_carry}

  def train_batches(self, start_step: int):
    return lm_batches(self.dataset.splits['train'], self.config.batch_size, self.seq_len,
                      start_step=start_step, num_steps=self.config.num_steps)

  def evaluate(self, driver, state, split: str = 'validation') -> Dict[str, float]:
    """`{split}/{nll, perplexity, accuracy, top5_accuracy}` of one carried pass over `split`
    (a sparse head: `{split}/{fy_loss, support_size, accuracy, top5_accuracy}`)."""
    b = self.config.eval_batch_size
    batches = lm_eval_batches(self.dataset.splits[split], b, self.seq_len)
    outs = driver.evaluate(self._eval_step, state, batches, carry=self.model.initial_carry(b))
    total = {k: np.sum([np.asarray(o[k], np.float64).sum() for o in outs]) for k in outs[0]}
    count = total['count']
    out = {f'{split}/accuracy': float(total['correct'] / count),
           f'{split}/top5_accuracy': float(total['top5'] / count)}
    if 'fy_loss' in total:
      return out | {f'{split}/fy_loss': float(total['fy_loss'] / count),
                    f'{split}/support_size': float(total['support'] / count)}
    mean = float(total['nll'] / count)
    return out | {f'{split}/nll': mean, f'{split}/perplexity': math.exp(mean)}

  def final_evaluation(self, driver, state, workdir: str) -> Dict[str, float]:
    del workdir
    out = {}
    for split in ('validation', 'test'):
      out.update(self.evaluate(driver, state, split))
    return out
