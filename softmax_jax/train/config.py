"""The full config schema with defaults; experiment configs override it, and unknown keys are errors."""

import ast
import dataclasses
import difflib
import importlib.util
import math
import os
from typing import Dict, List, Mapping, Sequence, Tuple

import ml_collections
from ml_collections import config_dict

from softmax_jax.data.longtail import PROFILES
from softmax_jax.data.pipeline import SAMPLING

# Sub-configs whose keys depend on `name` are checked against the module they build instead.
_FREE_FORM = ('model', 'head')
# Module fields that the data sets, never the config.
_FROM_DATA = ('num_classes', 'class_counts', 'vocab_size', 'parent', 'name')


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
      sampling='instance',                          # instance | class | sqrt | progressive | over | under | smote
      smote_neighbors=5,                            # sampling='smote': k of the k-nearest neighbours (imbalanced-learn)
      # Language modelling, name ptb | tinyshakespeare | lm1b (data/text.py, train/language_model.py):
      vocab_size=0,                                 # 0: every word of train; else the most frequent (data/text.py)
      lowercase=ml_collections.FieldReference(None, field_type=bool),  # None: tinyshakespeare only
      max_train_tokens=0,                           # 0: all of train; else its first N tokens (lm1b)
      seq_len=20,                                   # BPTT window / Transformer context, in tokens
  ))
  # `model` and `head` hold the fields of the module their `name` picks (`override_free_form`);
  # a field left out takes the module's default. TPU-ready options (issue 16), e.g.
  # --config.model.dtype=bfloat16 --config.head.dtype=bfloat16 --config.head.pad_classes_to=128:
  #   model.dtype, head.dtype: every backbone and head; the compute dtype, 'float32' (default)
  #     or 'bfloat16' (bfloat16 matmuls; parameters stay float32, normalization and softmax
  #     statistics and the losses accumulate in float32, features reach the head in float32);
  #   head.pad_classes_to: DenseSoftmax; the classes padded to a multiple (128: TPU lanes), the
  #     padding at probability 0 and in no loss or metric (None: no padding);
  #   head.approx_top_k, head.recall_target: DenseSoftmax; predict and top_k by
  #     jax.lax.approx_max_k (TPU's fast path; exact on CPU).
  # Sparse output distributions (issue 18), e.g. --config.head.mapping=entmax_bisect
  # --config.head.alpha=1.3:
  #   head.mapping, head.alpha: DenseSoftmax; softmax (default) | sparsemax | entmax15 |
  #     entmax_bisect (with alpha > 1), trained on its Fenchel-Young loss; not with head.fused,
  #     head.sigsoftmax or head.label_smoothing. Evaluation reports support_size and fy_loss
  #     instead of nll/perplexity (undefined for a sparse distribution).
  # They are not set here: a key here that a config's own `model`/`head` dict leaves out would
  # read as a changed config when a workdir is resumed (train/workdir.py).
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
      # Row-sparse gradients and lazy updates of the head's table (train/sparse.py, issue 23;
      # sampled and hierarchical heads): True forces them (lazy momentum / Adam moments / weight
      # decay on touched rows only), False never, None (auto) where they equal the dense
      # update and are faster: those heads with sgd, momentum=0, weight_decay=0, a table of at
      # least train.sparse.AUTO_MIN_ROWS rows and at most half of them touched per step.
      sparse_output=config_dict.placeholder(bool),
  ))
  # On-device augmentation of image batches in the train step (data/augment.py); off by default.
  c.augment = ml_collections.ConfigDict(dict(
      crop_padding=0,           # > 0: zero-pad (normalized) images by this, random crop back to H x W
      flip=False,               # random horizontal flip, probability 1/2
      rotation_degrees=0.0,     # > 0: rotate by an angle uniform in [-r, r] degrees (dm-pix)
      brightness=0.0,           # > 0: add a uniform delta in [-b, b] (grayscale-safe colour jitter)
      contrast=0.0,             # > 0: scale contrast by a factor uniform in [1 - c, 1 + c]
  ))
  # Knowledge distillation (train/distill.py, issue 19): with a teacher workdir, the loss is
  # alpha * (the head's loss) + (1 - alpha) * ops.kd_loss(student, teacher, temperature).
  c.distill = ml_collections.ConfigDict(dict(
      teacher_workdir=config_dict.placeholder(str),  # a trained run of scripts/train.py (any head)
      alpha=0.1,                # weight of the hard-label loss (RepDistiller's default CE weight)
      temperature=4.0,          # T of softmax(z / T); the KL term is scaled by T^2 (Hinton 2015)
      cache_teacher=True,       # a resident train split, no augmentation: teacher log-probs once
  ))
  c.parallel = 'jit'            # jit (over a Mesh, 'data' axis) | pmap (lax.pmean)
  c.num_devices = 0             # 0: all local devices; the batch sizes must divide by it
  # Vocabulary parallelism (train/parallel.py, issue 21): None, or {'data': D, 'model': M} for a
  # 2-D jit mesh of D * M devices (D = 0: the rest); the batch splits on 'data' (D divides the
  # batch sizes), the head's class-indexed parameters and their optimizer moments on 'model'.
  # M > 1: heads 'dense' (softmax mapping, no sigsoftmax, no label smoothing) and 'sampled'; jit
  # driver only.
  c.mesh = ml_collections.FieldReference(None, field_type=object)  # None: 1-D; --config.mesh="{'data': 2, 'model': 4}"
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
    if isinstance(sub, ml_collections.ConfigDict) and not (path == 'config' and key in (*_FREE_FORM, 'mesh')):
      validate_config(sub, reference[key], f'{path}.{key}')
  if path == 'config':
    if config.parallel not in ('jit', 'pmap'):
      raise ValueError(f"config.parallel must be 'jit' or 'pmap', got {config.parallel!r}.")
    _check_mesh(config.get('mesh'))
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
    k = config.distill
    if not 0.0 <= k.alpha <= 1.0:
      raise ValueError(f'config.distill.alpha must be in [0, 1] (the weight of the hard-label loss), '
                       f'got {k.alpha!r}.')
    if not (k.temperature > 0 and math.isfinite(k.temperature)):
      raise ValueError(f'config.distill.temperature must be a finite number > 0, got {k.temperature!r}.')
    if not d.imbalance_ratio >= 1:
      raise ValueError(f'config.data.imbalance_ratio must be >= 1 (1: unchanged), got {d.imbalance_ratio!r}.')


def _check_mesh(mesh) -> None:
  """`config.mesh` is None or {'data': D >= 0, 'model': M >= 1}, integers (train/parallel.py)."""
  if mesh is None:
    return
  items = dict(mesh) if isinstance(mesh, (ml_collections.ConfigDict, dict)) else None
  ok = (items is not None and sorted(items) == ['data', 'model']
        and all(isinstance(v, int) and not isinstance(v, bool) for v in items.values())
        and items['model'] >= 1 and items['data'] >= 0)
  if not ok:
    raise ValueError(f"config.mesh must be None or {{'data': D, 'model': M}} with integers M >= 1 "
                     f'and D >= 0 (0: the devices left over by M); got {mesh!r}.')


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


def _registry(config, section: str):
  """Name -> module class for `config.<section>` (heads; image or language-model backbones)."""
  # pylint: disable=g-import-not-at-top  (models import this package's users, not the reverse)
  from softmax_jax.data.text import LM_DATASETS
  from softmax_jax.heads import HEADS
  from softmax_jax.models import BACKBONES, LM_BACKBONES
  if section == 'head':
    return HEADS
  return LM_BACKBONES if config.data.name in LM_DATASETS else BACKBONES


def _parse(text: str, default, where: str):
  """The value of `--<where>=<text>`, typed like the field's `default` (a literal or a string)."""
  if isinstance(default, bool) or text.lower() in ('true', 'false'):
    if text.lower() not in ('true', 'false'):
      raise ValueError(f'--{where}={text}: expected true or false.')
    return text.lower() == 'true'
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(value, list):
    value = tuple(value)
  if isinstance(default, float) and isinstance(value, int):
    value = float(value)
  kinds = ((tuple,), (str,), (int, float))
  for kind in kinds:
    if isinstance(default, kind) and not isinstance(value, kind):
      raise ValueError(f'--{where}={text}: expected a {kind[0].__name__} like {default!r}.')
  return value


def override_free_form(config, overrides: Mapping[str, str]) -> None:
  """Applies `--config.model.<key>=` and `--config.head.<key>=` overrides to `config` in place.

  These sub-configs hold the options of the module their `name` picks, so their keys differ per
  name: `name` is applied first (a different name replaces the sub-config by `{'name': name}`,
  dropping the other module's options), then each key is checked against that module's fields
  and parsed like its default. E.g. on the default config, `head.name=margin, head.kind=cosface`.

  Args:
    config: a (possibly locked) config; it is locked again afterwards if it was.
    overrides: dotted key under 'model.' or 'head.' -> the flag's text, e.g. {'head.gamma': '2.0'}.

  Raises:
    ValueError: an unknown name, a key the chosen module does not take (naming the modules that
      do) or one the data sets (num_classes), or a value of the wrong type; names the flag.
  """
  for section in _FREE_FORM:
    items = {k[len(section) + 1:]: v for k, v in overrides.items() if k.startswith(section + '.')}
    if not items:
      continue
    registry, sub = _registry(config, section), config[section].to_dict()
    name = items.pop('name', sub.get('name'))
    if name not in registry:
      raise ValueError(f'--config.{section}.name={name}: unknown; choose one of {sorted(registry)}.')
    if name != sub.get('name'):
      sub = {'name': name}
    fields = {f.name: f.default for f in dataclasses.fields(registry[name]) if f.name not in _FROM_DATA}
    for key, text in items.items():
      where = f'config.{section}.{key}'
      if key not in fields:
        takes = sorted(n for n, cls in registry.items()
                       if key in {f.name for f in dataclasses.fields(cls)} - set(_FROM_DATA))
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = (f' The data sets {key}.' if key in _FROM_DATA else
                f' Did you mean {close[0]!r}?' if close else
                f' Set --config.{section}.name to one that does: {takes}.' if takes else '')
        raise ValueError(f'Unknown config key {where} in --{where}: {registry[name].__name__} '
                         f'({section}.name={name!r}) takes {sorted(fields)}.{hint}')
      default = fields[key]
      sub[key] = _parse(text, None if default is dataclasses.MISSING else default, where)
    locked = config.is_locked
    with config.unlocked():
      config[section] = ml_collections.ConfigDict(sub)
    if locked:
      config.lock()


def config_file_arg(argv: Sequence[str], default: str) -> str:
  """The config file spec ('path[:arg]') that absl reads from `argv`: `--config=<spec>` or
  `--config <spec>` (also with one dash), the last one winning; `default` without either."""
  spec = default
  for i, a in enumerate(argv[1:], 1):
    if a == '--':
      break
    if a in ('--config', '-config') and i + 1 < len(argv):
      spec = argv[i + 1]
    elif a.startswith(('--config=', '-config=')):
      spec = a.split('=', 1)[1]
  return spec


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
  """`(argv without its --config.model.* / --config.head.* flags, {dotted key: text} of those)`.

  absl's config flags can only set keys the config already has, but the keys of `config.model`
  and `config.head` depend on the module their `name` picks: `override_free_form` applies those.
  Both `--config.head.kind=cosface` and `--config.head.kind cosface` are understood.
  """
  kept, free, i = [argv[0]], {}, 1
  while i < len(argv):
    a = argv[i]
    if a == '--':
      kept += argv[i:]
      break
    key = a.lstrip('-').split('=', 1)[0]
    if a.startswith('-') and key.startswith(tuple(f'config.{s}.' for s in _FREE_FORM)):
      if '=' in a:
        free[key[len('config.'):]] = a.split('=', 1)[1]
      elif i + 1 < len(argv):
        free[key[len('config.'):]] = argv[i + 1]
        i += 1
      i += 1
      continue
    kept.append(a)
    i += 1
  return kept, free


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of config file `spec` = 'path[:arg]' (as `--config=` takes it).

  Raises:
    ValueError: no file at the path.
  """
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_config', path)
  if module_spec is None or not os.path.exists(path):
    raise ValueError(f'--config={spec}: no config file at {path!r}.')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_override_args(argv: Sequence[str], default: str) -> Tuple[List[str], Dict[str, str]]:
  """Checks every `--config.<key>` of `argv` against the config that its `--config` loads.

  Returns:
    `split_overrides(argv)`: what absl parses, and the model/head overrides for
    `override_free_form`.

  Raises:
    ValueError: an unknown key (naming it, the known ones and a close match), a model or head key
      that the chosen module does not take, or a value of the wrong type.
  """
  config = load_config_file(config_file_arg(argv, default))
  kept, free = split_overrides(argv)
  for a in kept[1:]:
    if a.startswith(('--config.', '-config.')):
      check_key_path(config, a.lstrip('-')[len('config.'):].split('=', 1)[0])
  override_free_form(config, free)
  return kept, free
