"""Every config on 1 and on 8 (fake CPU) devices: the device rule of `train/parallel.py`.

The rule: batch sizes are never changed to fit the hardware. `config.num_devices=0` (the default)
uses the most local devices that divide every batch size, with a logged warning when that is
fewer than all; an explicit count that does not divide one is an error naming the fixes.

`test_config_picks_devices` checks the rule for every variant of every config (no training);
`test_small_variant_takes_a_step_on_8_devices` builds each config file's small variant
(task, model, optimizer, driver) on the 8 fake devices of conftest.py and runs one train step
there; `test_ptb_small_trains_on_5_of_8_devices` trains the issue's case two steps end to end. All on
synthetic data shaped like the config's dataset: the real cifar10, mnist, fashion_mnist and lm1b
need a network or a Debian package, and digits and PTB would only add their loading time.
Longer data-parallel training is tested on 8 devices in tests/train (loop_test, lm_test,
batchnorm_test).
"""

import os

from absl import logging
import jax
import numpy as np
import pytest

from softmax_jax import data
from softmax_jax.data.text import TextDataset
from softmax_jax.train import parallel
from softmax_jax.train import train_and_evaluate
from softmax_jax.train.config import load_config_file
from softmax_jax.train.parallel import DRIVERS
from softmax_jax.train.state import make_optimizer
from softmax_jax.train.task import build_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {  # config file -> its small variant
    'cifar10.py': 'small', 'cifar10_lt.py': 'ce,small', 'digits.py': 'small',
    'fashion_lt.py': 'ldam_drw,small', 'fashion_margins.py': 'arcface,2d,small',
    'fashion_mnist.py': 'small', 'lm1b.py': 'transformer,adaptive,small', 'mnist.py': 'small',
    'ptb_lstm.py': 'adaptive,small',
}
VARIANTS = sorted({f'{f}:{a}' for f, a in SMALL.items()} | {
    'cifar10.py:', 'digits.py:', 'fashion_mnist.py:', 'mnist.py:', 'ptb_lstm.py:dense',
    'ptb_lstm.py:sampled', 'ptb_lstm.py:hierarchical', 'lm1b.py:lstm', 'lm1b.py:lstm,sampled,small',
    'fashion_margins.py:softmax,open', 'cifar10_lt.py:ldam_drw', 'fashion_lt.py:resample'})
IMAGES = {'digits': (8, 8, 1), 'mnist': (28, 28, 1), 'fashion_mnist': (28, 28, 1),
          'fashion_mnist_idx': (28, 28, 1), 'cifar10': (32, 32, 3), 'cifar100': (32, 32, 3)}


def _config(spec: str):
  path, _, arg = spec.partition(':')
  return load_config_file(os.path.join(REPO, 'configs', path) + (f':{arg}' if arg else ''))


def _sizes(config):
  return {'batch_size': config.batch_size, 'eval_batch_size': config.eval_batch_size}


def test_every_config_file_is_covered():
  files = sorted(f for f in os.listdir(os.path.join(REPO, 'configs')) if f.endswith('.py'))
  assert files == sorted(SMALL), 'add the new config to SMALL (and VARIANTS) here'


@pytest.mark.parametrize('spec', VARIANTS)
def test_config_picks_devices(spec, monkeypatch):
  config = _config(spec)
  sizes = _sizes(config)
  assert len(jax.local_devices()) == 8
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  devices = parallel.usable_devices(0, sizes)
  n = len(devices)
  assert devices == jax.local_devices()[:n]
  # The most devices (of 8) that divide both batch sizes: found independently by brute force.
  assert n == max(k for k in range(1, 9) if all(s % k == 0 for s in sizes.values()))
  if n == 8:
    assert not warnings
  else:
    assert len(warnings) == 1 and f'Using {n} of the 8 local devices' in warnings[0]
    assert f'--config.num_devices={n}' in warnings[0]
  assert parallel.usable_devices(1, sizes) == jax.local_devices()[:1]  # one device always works


def test_ptb_on_8_devices_uses_5_and_says_how_to_use_8(monkeypatch):
  """The issue's case: batch 20, evaluation batch 10 on a v5e-8 (8 devices)."""
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  sizes = _sizes(_config('ptb_lstm.py:adaptive,small'))
  assert sizes == {'batch_size': 20, 'eval_batch_size': 10}
  assert len(parallel.usable_devices(0, sizes)) == 5
  assert '--config.batch_size=24 --config.eval_batch_size=16' in warnings[0]


@pytest.mark.parametrize('num_devices, key, size, match', [
    (8, 'batch_size', 20, r'config.batch_size=20 must be divisible by the number of devices \(8\): '
     r'set --config.batch_size=16 or --config.batch_size=24 to use 8 devices, or '
     r'--config.num_devices to one of 5, 4, 2, 1 to keep the batch'),
    (3, 'eval_batch_size', 10, r'config.eval_batch_size=10 .*\(3\): set --config.eval_batch_size=9 '
     r'or --config.eval_batch_size=12 .* one of 5, 2, 1 '),
    (8, 'batch_size', 4, r'set --config.batch_size=8 to use 8 devices, or --config.num_devices to '
     r'one of 4, 2, 1 '),
])
def test_explicit_num_devices_that_do_not_divide_name_the_fixes(num_devices, key, size, match):
  sizes = {'batch_size': 48, 'eval_batch_size': 48, key: size}
  with pytest.raises(ValueError, match=match):
    parallel.usable_devices(num_devices, sizes)
  with pytest.raises(ValueError, match=r'config.num_devices=9 but only 8 local devices exist'):
    parallel.usable_devices(9, sizes)


def _image_dataset(name, num_classes, counts):
  """A synthetic `data.Dataset` shaped like `name`'s: `counts[k]` train images of class k."""
  shape, rng = IMAGES[name], np.random.default_rng(0)

  def split(labels):
    labels = np.asarray(labels, np.int32)
    return data.Split(rng.integers(0, 256, (len(labels), *shape), dtype=np.uint8), labels)
  train = np.repeat(np.arange(num_classes), counts)
  splits = {'train': split(train), 'validation': split(np.arange(40) % num_classes),
            'test': split(np.arange(40) % num_classes)}
  return data.Dataset(name=name, num_classes=num_classes, input_shape=shape, splits=splits,
                      mean=np.full(shape[-1], 0.5, np.float32), std=np.full(shape[-1], 0.3, np.float32))


def _text_dataset(name, vocab_size):
  """A synthetic `TextDataset`: Zipf-like token streams over `vocab_size` words."""
  rng = np.random.default_rng(0)
  p = 1.0 / np.arange(1, vocab_size + 1)
  stream = lambda n: rng.choice(vocab_size, n, p=p / p.sum()).astype(np.int32)
  splits = {'train': stream(30_000), 'validation': stream(600), 'test': stream(600)}
  counts = np.sort(np.bincount(splits['train'], minlength=vocab_size))[::-1].astype(np.int64) + 1
  return TextDataset(name=name, vocab=tuple(f'w{i}' for i in range(vocab_size)), counts=counts,
                     splits=splits)


def _dataset(config):
  """Synthetic data shaped like `config.data`'s (long-tailed counts, for the long-tail heads)."""
  if config.data.name in IMAGES:
    k = len(config.data.classes) if config.data.classes else 100 if config.data.name == 'cifar100' else 10
    counts = np.maximum((64 * 0.5 ** np.arange(k)).astype(int), 3)
    return _image_dataset(config.data.name, k, counts)
  return _text_dataset(config.data.name, config.data.vocab_size or 10_000)  # PTB's 10k


@pytest.mark.parametrize('file', sorted(SMALL))
def test_small_variant_takes_a_step_on_8_devices(file):
  """The small variant's task, optimizer and driver on the 8 fake devices, and one train step."""
  config = _config(f'{file}:{SMALL[file]}').unlock()
  # Smaller to compile, same parts: a two-rung routing ladder (the default's 9 streamed losses per
  # tail doubled lm1b's compile time, 21 s against 10), one transformer layer on windows of 32
  # tokens, not 256 (lm1b's step over 16 x 256 tokens ran 15 s at conftest's -O0), ResNet-8 for
  # ResNet-32 (cifar10_lt: 31 s of CI on 2026-12-03).
  if config.head.name == 'adaptive':
    config.head.capacity_fractions = (0.5,)
  if config.model.name == 'transformer':
    config.model.num_layers, config.data.seq_len = 1, 32
  if config.model.name == 'resnet':
    config.model.depth = 8
  task = build_task(config, _dataset(config))
  schedule, tx = make_optimizer(config.optimizer, config.num_steps)
  driver = DRIVERS[config.parallel](task, tx, schedule, config.num_devices)
  n = 5 if file == 'ptb_lstm.py' else 8  # PTB: batch 20, evaluation batch 10
  assert driver.devices == jax.local_devices()[:n]
  state = driver.put_state(task.init_state(tx))
  state, metrics = driver.step(state, driver.put_batch(next(iter(task.train_batches(0)))))
  metrics = driver.host_metrics(jax.device_get(metrics))
  assert np.isfinite(metrics['loss']) and metrics['loss'] > 0, metrics
  assert np.isfinite(metrics['grad_norm']) and metrics['grad_norm'] > 0, metrics
  for leaf in jax.tree.leaves(state['params']):
    assert {s.device for s in leaf.addressable_shards} == set(driver.devices)
  assert int(driver.get_state(state)['step']) == 1


def test_ptb_small_trains_on_5_of_8_devices(tmp_path, monkeypatch):
  """The issue's case end to end (dense head: the adaptive one's CPU compile takes a minute)."""
  used = []
  pick = parallel.usable_devices
  monkeypatch.setattr(parallel, 'usable_devices', lambda *a: used.append(pick(*a)) or used[-1])
  config = _config('ptb_lstm.py:dense,small').unlock()
  config.num_steps, config.progress, config.log_every = 2, False, 1
  config.eval_every = config.checkpoint_every = 2
  final = train_and_evaluate(config.lock(), str(tmp_path), dataset=_dataset(config))
  assert [len(d) for d in used] == [5]
  assert np.isfinite(final['test/perplexity']) and final['test/perplexity'] > 1
