"""Classifier = backbone + head, built from config by name.

The training loop only knows this module's methods, which forward the head
contract: `__call__(images, labels, *, train) -> loss [B]`, `log_prob(images) -> [B, K]`,
`predict(images) -> [B]`, `eval_stats(images, labels, **options) -> dict` of `[B]`/`[B, G]`
per-example statistics (nothing of shape `[B, K]` leaves the head). Any backbone trains with any head by changing one config field.
"""

import dataclasses
import difflib
from typing import Any, Mapping

import flax.linen as nn

from softmax_jax.heads import HEADS
from softmax_jax.models import BACKBONES
from softmax_jax.models.headed import HeadedModel


class Classifier(HeadedModel):
  """Images `[B, ...]` -> backbone features `[B, d]` -> head: a `HeadedModel` whose backbone and
  head the trainer builds by name from the config (`build_classifier`); same methods, same
  parameter tree."""


def build_module(registry: Mapping[str, type], cfg: Mapping[str, Any], where: str, **fixed) -> nn.Module:
  """Builds `registry[cfg['name']](**rest, **fixed)`, naming any unknown key and the known ones."""
  cfg = dict(cfg)
  name = cfg.pop('name', None)
  if name not in registry:
    raise ValueError(f'{where}.name={name!r} is unknown; choose one of {sorted(registry)}.')
  cls = registry[name]
  known = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'} - set(fixed)
  for key in cfg:
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise ValueError(f'Unknown config key {where}.{key} for {cls.__name__} '
                       f'(name={name!r}); it accepts {sorted(known)}.{hint}')
  cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
  return cls(**cfg, **fixed)


def build_classifier(model_cfg: Mapping[str, Any], head_cfg: Mapping[str, Any], num_classes: int,
                     class_counts=None) -> Classifier:
  """`Classifier` from `config.model` ({'name': 'mlp'|'cnn'|'resnet', ...}) and `config.head` ({'name': 'dense', ...}).

  `class_counts` (training examples per class, `[num_classes]`) reaches heads that have a
  `class_counts` field (losses for long-tailed data); the config never sets it.
  """
  backbone = build_module(BACKBONES, model_cfg, 'config.model')
  head_cls = HEADS.get(dict(head_cfg).get('name'))
  fixed = {'num_classes': num_classes}
  if head_cls is not None and 'class_counts' in {f.name for f in dataclasses.fields(head_cls)}:
    fixed['class_counts'] = None if class_counts is None else tuple(int(c) for c in class_counts)
  head = build_module(HEADS, head_cfg, 'config.head', **fixed)
  return Classifier(backbone=backbone, head=head)
