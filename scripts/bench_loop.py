"""`benchmark.py --suite=loop`: steps/s of our trainer against a minimal hand-written loop.

For each model (the digits MLP, the Fashion-MNIST CNN, the PTB small LSTM with the dense head,
and `digits_16`: the digits MLP cut to one layer of 16 units, whose ~0.2 ms step on a CPU core
makes the trainer's per-step host work show, as a fast accelerator or CPU makes it show on the
full models), three ways of running the same training steps:

  ours          `train.train_and_evaluate` in a fresh workdir, progress bar off, evaluation and
                checkpoint intervals beyond the run and log_every = num_steps (one sync, at the
                end); steps/s = its 'train/examples_per_second' (or tokens) / items per step
  ours log=1    the same with log_every = 1: a sync, a metrics read and a state probe every step
  hand-written  the same model (`build_classifier` / `build_language_model`), optimizer
                (`make_optimizer`), batch size and loss (mean per-example, or per-token with the
                carried LSTM state), the training data already on the device, one jitted step
                with `donate_argnums`, the loss read back only at the end

Each way runs `repeats` times, `steps` timed steps a run, the first (compiling) step of a run
excluded in all three; the runs are interleaved in rounds (ours, ours log=1, hand-written, ...).
Reported: the median and best steps/s, and against the hand-written loop the median over rounds
of the paired ratios (a load change between rounds cancels) and the ratio of the best runs. The final evaluation
of our runs reads trimmed validation and test splits (it is not timed either way). Fashion-MNIST
uses random images of its shape when its IDX files are absent (marked in the table: steps/s does
not depend on the pixel values); PTB is skipped, with the reason, when its raw files are absent.
"""

import dataclasses
import functools
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bench_utils
from softmax_jax import data
from softmax_jax.data import builders
from softmax_jax.models.classifier import build_classifier
from softmax_jax.models.lm import build_language_model
from softmax_jax.train import train_and_evaluate
from softmax_jax.train.config import load_config_file
from softmax_jax.train.state import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # name -> config spec ('path[:arg]', relative to the repo)
    'digits': 'configs/digits.py',
    'fashion_mnist': 'configs/fashion_mnist.py',
    'ptb': 'configs/ptb_lstm.py:dense,small',
    'digits_16': 'configs/digits.py',
}
OVERRIDES = {'digits_16': {'model.hidden': (16,)}}  # model -> config overrides
CPU_STEPS = dict(digits=300, fashion_mnist=20, ptb=30, digits_16=1000)
PRESETS = {  # timed steps per run of each model
    'cpu': CPU_STEPS, 'cpu_target': CPU_STEPS,
    'cpu_small': dict(digits=50, fashion_mnist=5, ptb=10, digits_16=100),
    'gpu': dict(digits=2000, fashion_mnist=1000, ptb=1000, digits_16=2000),
}
WAYS = ('ours', 'ours log=1', 'hand-written')


def bench_config(spec: str, steps: int, *, log_every: int = 0, overrides=None):
  """The config of `spec` (with `overrides`, {dotted key: value}) for one run of `steps` timed
  steps (plus the compiling one)."""
  config = load_config_file(os.path.join(REPO, spec)).unlock()
  config.update_from_flattened_dict(dict(overrides or {}))
  config.num_steps = steps + 1
  config.log_every = log_every or config.num_steps
  config.eval_every = config.checkpoint_every = config.num_steps + 1
  config.progress = False
  return config.lock()


def fashion_dataset(config):
  """`(dataset, note)`: the real Fashion-MNIST, or random images of its shape if its files are absent."""
  try:
    builders.fashion_paths(config.data.source_dir)
  except FileNotFoundError:
    rng = np.random.default_rng(0)
    split = lambda n: data.Split(rng.integers(0, 256, (n, 28, 28, 1), np.uint8),
                                 rng.integers(0, 10, n).astype(np.int32))
    splits = {'train': split(54_000), 'validation': split(6000), 'test': split(10_000)}
    mean, std = np.full(1, 0.5, np.float32), np.full(1, 0.29, np.float32)
    return (data.Dataset('fashion_mnist_idx', 10, (28, 28, 1), splits, mean, std),
            'random images of its shape: IDX files absent')
  return data.load_dataset(config.data), ''


def load(name: str, config):
  """`(dataset, note)` of model `name`, its eval splits trimmed to one batch (final eval is untimed)."""
  b = config.eval_batch_size
  if name == 'ptb':
    ds = data.load_text_dataset(config.data)
    keep = b * config.data.seq_len + 1
    return dataclasses.replace(ds, splits={
        s: v if s == 'train' else v[:keep] for s, v in ds.splits.items()}), ''
  ds, note = fashion_dataset(config) if name == 'fashion_mnist' else (data.load_dataset(config.data), '')
  ds.splits = {s: v if s == 'train' else data.Split(v.images[:b], v.labels[:b])
               for s, v in ds.splits.items()}
  return ds, note


def ours(config, dataset) -> float:
  """Steps/s of one `train_and_evaluate` run in a fresh workdir (steady state, first step excluded)."""
  with tempfile.TemporaryDirectory() as workdir:
    final = train_and_evaluate(config, workdir, dataset=dataset)
  rate = final.get('train/examples_per_second') or final['train/tokens_per_second']
  items = config.batch_size * (config.data.seq_len if 'train/tokens_per_second' in final else 1)
  return rate / items


def _apply(model, params, model_state, *args, **kwargs):
  """`(output, new model_state)` of `model.apply`, mutable collections updated if any."""
  variables = {'params': params, **model_state}
  if not model_state:
    return model.apply(variables, *args, **kwargs), model_state
  return model.apply(variables, *args, mutable=list(model_state), **kwargs)


def classifier_loop(config, dataset):
  """`(init(), step(state, images, labels), images, labels)`: the hand-written classifier loop.

  images: `[S, B, H, W, C]` float32 and labels `[S, B]` int32 on the device, S = train // B
  batches of one shuffled epoch; the step takes batch `step % S` on the device.
  """
  model = build_classifier(config.model, config.head, dataset.num_classes, dataset.class_counts)
  _, tx = make_optimizer(config.optimizer, config.num_steps)
  train, b = dataset.splits['train'], config.batch_size
  s = len(train) // b
  order = np.random.default_rng(config.seed).permutation(len(train))[:s * b]
  images = jax.device_put(dataset.normalize(train.images[order]).reshape(s, b, *dataset.input_shape))
  labels = jax.device_put(train.labels[order].reshape(s, b))
  init_rng, rng = jax.random.split(jax.random.PRNGKey(config.seed))
  model_init = jax.jit(functools.partial(model.init, train=False))

  def init():
    variables = dict(model_init(init_rng, images[0, :2], labels[0, :2]))
    params = variables.pop('params')
    return dict(params=params, model_state=variables, opt_state=tx.init(params),
                step=jnp.zeros((), jnp.int32))

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, images, labels):
    i = state['step'] % images.shape[0]
    dropout_rng, sample_rng = jax.random.split(jax.random.fold_in(rng, state['step']))

    def loss_fn(params):
      losses, model_state = _apply(model, params, state['model_state'], images[i], labels[i],
                                   train=True, rngs={'dropout': dropout_rng, 'sample': sample_rng})
      return jnp.mean(losses), model_state

    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    return dict(params=params, model_state=dict(model_state), opt_state=opt_state,
                step=state['step'] + 1), loss

  return init, step, images, labels


def lm_loop(config, dataset):
  """The hand-written LM loop: Zaremba's batchified rows `[B, L]` on the device, windows of T
  sliced in the step, the LSTM state carried (gradient stopped) and reset at each epoch start."""
  model = build_language_model(config.model, config.head, dataset.num_classes, dataset.counts)
  _, tx = make_optimizer(config.optimizer, config.num_steps)
  stream, b, t = dataset.splits['train'], config.batch_size, config.data.seq_len
  row = (len(stream) - 1) // b
  epoch = row // t
  inputs = jax.device_put(stream[:b * row].reshape(b, row).astype(np.int32))
  targets = jax.device_put(stream[1:b * row + 1].reshape(b, row).astype(np.int32))
  init_rng, rng = jax.random.split(jax.random.PRNGKey(config.seed))

  def init():
    tokens = jnp.zeros((1, t), jnp.int32)
    variables = dict(model.init(init_rng, tokens, tokens, carry=model.initial_carry(1), train=False))
    params = variables.pop('params')
    return dict(params=params, model_state=variables, opt_state=tx.init(params),
                step=jnp.zeros((), jnp.int32),  # one buffer per carry leaf: they are donated
                carry=jax.tree.map(jnp.zeros_like, model.initial_carry(b)))

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, inputs, targets):
    start = (state['step'] % epoch) * t
    window = lambda x: jax.lax.dynamic_slice_in_dim(x, start, t, axis=1)
    fresh = state['step'] % epoch == 0
    carry = jax.tree.map(lambda c: jnp.where(fresh, jnp.zeros_like(c), jax.lax.stop_gradient(c)),
                         state['carry'])
    dropout_rng, sample_rng = jax.random.split(jax.random.fold_in(rng, state['step']))

    def loss_fn(params):
      (losses, new_carry), model_state = _apply(
          model, params, state['model_state'], window(inputs), window(targets), carry=carry,
          train=True, rngs={'dropout': dropout_rng, 'sample': sample_rng})
      return jnp.mean(losses), (model_state, new_carry)

    (loss, (model_state, carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    return dict(params=params, model_state=dict(model_state), opt_state=opt_state,
                step=state['step'] + 1, carry=carry), loss

  return init, step, inputs, targets


def handwritten(name: str, config, dataset):
  """`run() -> steps/s` of the hand-written loop (compiled once): a fresh state, one untimed first
  step, then `config.num_steps - 1` timed steps, the loss read back at the end (`run.loss`)."""
  init, step, xs, ys = (lm_loop if name == 'ptb' else classifier_loop)(config, dataset)

  def run() -> float:
    state, loss = step(init(), xs, ys)
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for _ in range(config.num_steps - 1):
      state, loss = step(state, xs, ys)
    run.loss = float(loss)
    return (config.num_steps - 1) / (time.perf_counter() - start)

  return run


def loop_suite(preset_name: str, *, repeats: int = 5, models=None, max_load=0.0, wait_s=0):
  """One row per (model, way): steps/s (median, and every repeat), ratio to the hand-written loop.

  The repeats of the three ways are interleaved (ours, ours log=1, hand-written, ours, ...), so a
  change in the machine's load falls on all three alike.
  """
  preset = PRESETS[preset_name]
  rows = []
  for name in models or preset:
    steps = preset[name]
    config = bench_config(MODELS[name], steps, overrides=OVERRIDES.get(name))
    try:
      dataset, note = load(name, config)
    except FileNotFoundError as e:
      rows.append(dict(model=name, way='skipped', note=str(e).split('\n')[0]))
      print(f'{name}: skipped ({e})', flush=True)
      continue
    logged = bench_config(MODELS[name], steps, log_every=1, overrides=OVERRIDES.get(name))
    hand = handwritten(name, config, dataset)
    ways = {'ours': lambda: ours(config, dataset), 'ours log=1': lambda: ours(logged, dataset),
            'hand-written': hand}
    load_now = bench_utils.wait_quiet(max_load, wait_s)
    runs = {way: [] for way in WAYS}
    for _ in range(repeats):
      for way in WAYS:
        runs[way].append(ways[way]())
    for way in WAYS:
      rows.append(dict(model=name, config=MODELS[name], way=way, steps=steps, repeats=repeats,
                       batch_size=config.batch_size, runs=runs[way], load=load_now,
                       load_end=bench_utils.load(), note=note))
    add_ratios(rows[-len(WAYS):])
    rows[-1]['loss'] = hand.loss
    print(table(rows[-len(WAYS):]), flush=True)
  return rows


def add_ratios(rows) -> None:
  """Adds to each row of one model: steps_per_s (median), best (max), ratio (the median over
  rounds of runs[i] / hand-written runs[i]: paired, so a load change between rounds cancels) and
  best_ratio (best / hand-written best, the least loaded runs of each)."""
  hand = next(r for r in rows if r['way'] == 'hand-written')
  for r in rows:
    r['steps_per_s'], r['best'] = statistics.median(r['runs']), max(r['runs'])
    r['ratio'] = statistics.median([a / b for a, b in zip(r['runs'], hand['runs'])])
    r['best_ratio'] = r['best'] / max(hand['runs'])


def table(rows) -> str:
  lines = ['| model | way | steps x repeats | steps/s median | best | runs (in round order) | '
           'vs hand-written: paired median | best/best | load | note |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    if r['way'] == 'skipped':
      lines.append(f"| {r['model']} | skipped |  |  |  |  |  |  |  | {r['note']} |")
      continue
    runs = ' '.join(f'{v:.1f}' for v in r['runs'])
    lines.append(f"| {r['model']} | {r['way']} | {r['steps']} x {r['repeats']} | "
                 f"{r['steps_per_s']:.1f} | {r['best']:.1f} | {runs} | {r['ratio']:.3f} | "
                 f"{r['best_ratio']:.3f} | {r['load']:.2f}-{r['load_end']:.2f} | "
                 f"{r['note']} |")
  return '\n'.join(lines)
