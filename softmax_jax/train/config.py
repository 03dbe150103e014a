"""The full config schema with defaults; experiment configs override it, and unknown keys are errors."""

import difflib

import ml_collections
from ml_collections import config_dict

from softmax_jax.data.longtail import PROFILES
from softmax_jax.data.pipeline import SAMPLING

# Sub-configs whose keys depend on `name` are checked against the module they build instead.
_FREE_FORM = ('model', 'head')


def base_config() -> ml_collections.ConfigDict:
  """Every key `train_and_evaluate` reads, with working defaults (digits + MLP + dense head)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name='digits',                                # digits | fashion_mnist_idx | mnist | fashion_mnist | cifar10 | cifar100
      data_dir=config_dict.placeholder(str),        # TFDS data_dir (None: ~/tensorflow_datasets)
      source_dir=config_dict.placeholder(str),      # raw files of a local builder (fashion_mnist_idx)
      validation_fraction=0.1,                      # carved from train with split_seed
      split_seed=0,
      classes=config_dict.placeholder(tuple),       # keep only these class ids, relabelled 0.. in this order
      imbalance_ratio=1.0,                          # > 1: long-tailed train split, n_max / n_min (1: unchanged)
      imbalance_profile='exponential',              # exponential | step (Cao 2019)
      imbalance_seed=0,                             # which train examples the long-tailed cut keeps
      sampling='instance',                          # instance | class | sqrt | progressive | over | under
      # Language modelling, name ptb | tinyshakespeare | lm1b (data/text.py, train/lm.py):
      vocab_size=0,                                 # 0: every word of train; else the most frequent (data/text.py)
      lowercase=ml_collections.FieldReference(None, field_type=bool),  # None: tinyshakespeare only
      max_train_tokens=0,                           # 0: all of train; else its first N tokens (lm1b)
      seq_len=20,                                   # BPTT window / Transformer context, in tokens
  ))
  c.model = ml_collections.ConfigDict(dict(name='mlp', hidden=(256, 256), dropout=0.1))
  c.head = ml_collections.ConfigDict(dict(name='dense'))
  c.batch_size = 128
  c.eval_batch_size = 512
  c.num_steps = 2000
  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw',             # adamw | sgd (with momentum)
      learning_rate=1e-3,       # peak learning rate
      schedule='cosine',        # cosine | constant | step, all after a linear warmup from 0
      warmup_steps=100,
      end_learning_rate_fraction=0.0,  # cosine: the final rate, a fraction of the peak
      decay_at=(0.8, 0.9),      # step: fractions of num_steps at which the rate is multiplied...
      decay_factor=0.01,        # ...by this (Cao 2019 CIFAR: x0.01 at epochs 160 and 180 of 200)
      weight_decay=1e-4,        # decoupled (adamw) or added to the gradient (sgd)
      b1=0.9, b2=0.999,         # adamw
      momentum=0.9, nesterov=True,  # sgd
      clip_global_norm=0.0,     # > 0: clip the gradient by its global norm
      clip_value=0.0,           # > 0: clip each gradient entry to [-v, v]
  ))
  # On-device augmentation of image batches in the train step (data/augment.py); off by default.
  c.augment = ml_collections.ConfigDict(dict(
      crop_padding=0,           # > 0: zero-pad (normalized) images by this, random crop back to H x W
      flip=False,               # random horizontal flip, probability 1/2
  ))
  c.parallel = 'jit'            # jit (over a Mesh, 'data' axis) | pmap (lax.pmean)
  c.num_devices = 0             # 0: all local devices; the batch sizes must divide by it
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.max_checkpoints = 2
  c.progress = True             # tqdm progress bar
  return c


def validate_config(config, reference=None, path='config') -> None:
  """Raises ValueError naming the first key of `config` that `base_config()` does not have."""
  reference = base_config() if reference is None else reference
  for key in config.keys():
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise ValueError(f'Unknown config key {path}.{key}; known keys there: {sorted(reference.keys())}.{hint}')
    sub = config[key]
    if isinstance(sub, ml_collections.ConfigDict) and not (path == 'config' and key in _FREE_FORM):
      validate_config(sub, reference[key], f'{path}.{key}')
  if path == 'config':
    if config.parallel not in ('jit', 'pmap'):
      raise ValueError(f"config.parallel must be 'jit' or 'pmap', got {config.parallel!r}.")
    for key in ('batch_size', 'eval_batch_size', 'num_steps', 'log_every', 'eval_every', 'checkpoint_every'):
      if int(config[key]) < 1:
        raise ValueError(f'config.{key} must be >= 1, got {config[key]!r}.')
    padding = config.augment.crop_padding
    if int(padding) != padding or padding < 0:
      raise ValueError(f'config.augment.crop_padding must be an integer >= 0, got {padding!r}.')
    d = config.data
    if d.sampling not in SAMPLING:
      raise ValueError(f'config.data.sampling must be one of {SAMPLING}, got {d.sampling!r}.')
    if d.imbalance_profile not in PROFILES:
      raise ValueError(f'config.data.imbalance_profile must be one of {PROFILES}, got {d.imbalance_profile!r}.')
    if not d.imbalance_ratio >= 1:
      raise ValueError(f'config.data.imbalance_ratio must be >= 1 (1: unchanged), got {d.imbalance_ratio!r}.')


def check_key_path(config, dotted: str) -> None:
  """Raises ValueError unless `config.<dotted>` exists (for `--config.a.b=...` overrides)."""
  node, path = config, 'config'
  for key in dotted.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(key, known, n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise ValueError(f'Unknown config key {path}.{key} in --config.{dotted}; known keys at {path}: '
                       f'{known}.{hint}')
    node, path = node[key], f'{path}.{key}'
