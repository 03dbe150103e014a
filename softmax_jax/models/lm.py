"""LanguageModel = LM backbone + head, built from config by name (the LM twin of classifier.py).

Token windows `[B, T]` -> backbone features `[B, T, d]` (plus the state carried to the next
window, for recurrent backbones) -> any head of `softmax_jax.heads`, which scores the next token
`labels [B, T]` at every position. The training loop (`softmax_jax.train.language_model`) only knows the
methods here, so the LSTM and the Transformer train with the dense, adaptive, sampled or
hierarchical head by changing one config field.
"""

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from softmax_jax.heads import HEADS
from softmax_jax.models.classifier import build_module
from softmax_jax.models.lstm import LSTMLM
from softmax_jax.models.transformer import TransformerLM

LM_BACKBONES = {'lstm': LSTMLM, 'transformer': TransformerLM}


class LanguageModel(nn.Module):
  """Tokens `[B, T]` (+ carry) -> backbone features `[B, T, d]` -> head, per position."""
  backbone: nn.Module
  head: nn.Module

  def initial_carry(self, batch_size: int):
    """The backbone's fresh state for `batch_size` rows (None for the Transformer)."""
    return self.backbone.initial_carry(batch_size)

  def __call__(self, tokens: jnp.ndarray, labels: jnp.ndarray, *, carry: Any, train: bool,
               step: Optional[jnp.ndarray] = None):
    """Per-token loss `[B, T]` of `labels` (the next tokens) and the carry for the next window.

    `step` (the training step, [] int) reaches heads whose class sets `uses_step = True`;
    heads that sample draw from the rng stream 'sample' (training only).

    Returns:
      `(loss [B, T] float32, carry)`.
    """
    kwargs = {'step': step} if step is not None and getattr(type(self.head), 'uses_step', False) else {}
    features, carry = self.backbone(tokens, carry, train=train)
    return self.head(features, labels, train=train, **kwargs), carry

  def features(self, tokens: jnp.ndarray, carry: Any):
    """`(features [B, T, d], carry)` in evaluation mode."""
    return self.backbone(tokens, carry, train=False)

  def log_prob(self, tokens: jnp.ndarray, carry: Any):
    """`(log_probs [B, T, K], carry)`: exact normalized next-token log-probabilities (evaluation)."""
    features, carry = self.backbone(tokens, carry, train=False)
    return self.head.log_prob(features), carry

  def shortlist_log_prob(self, tokens: jnp.ndarray, carry: Any, shortlist_ids, *, where=None):
    """`(log_probs [B, T, S], carry)`: the next-token distribution restricted to a shortlist of
    classes (heads with `shortlist_log_prob`, e.g. DenseSoftmax), in evaluation mode."""
    if not hasattr(self.head, 'shortlist_log_prob'):
      raise ValueError(f'{type(self.head).__name__} has no shortlist decoding (DenseSoftmax has: '
                       f'it reads only the shortlisted columns of its output layer).')
    features, carry = self.backbone(tokens, carry, train=False)
    return self.head.shortlist_log_prob(features, shortlist_ids, where=where), carry

  def predict(self, tokens: jnp.ndarray, carry: Any):
    """`(predictions [B, T] int32, carry)`: the most probable next token (evaluation)."""
    features, carry = self.backbone(tokens, carry, train=False)
    return self.head.predict(features), carry

  def score(self, tokens: jnp.ndarray, labels: jnp.ndarray, carry: Any):
    """`(nll [B, T], predictions [B, T] int32, carry)` from one backbone pass (evaluation).

    `nll` is the head's evaluation loss, `-log_prob[label]`, computed without handing `[B, T, K]`
    log-probabilities to the caller.
    """
    features, carry = self.backbone(tokens, carry, train=False)
    return self.head(features, labels, train=False), self.head.predict(features), carry

  def eval_stats(self, tokens: jnp.ndarray, labels: jnp.ndarray, carry: Any, **options):
    """`(stats, carry)`: the head's per-token evaluation statistics from one backbone pass.

    `stats` holds 'prediction', 'label_rank' `[B, T]` int32, 'label_log_prob', 'confidence'
    `[B, T, G]` float32 (and 'adjusted_*' with `log_prior`); `options` (keyword-only:
    `temperatures`, `log_prior`, `chunk_size`) go to the head's `eval_stats`. Large-vocabulary
    heads compute them chunk by chunk, never forming `[B, T, K]`.
    """
    features, carry = self.backbone(tokens, carry, train=False)
    return self.head.eval_stats(features, labels, **options), carry


def build_language_model(model_cfg: Mapping[str, Any], head_cfg: Mapping[str, Any], vocab_size: int,
                         class_counts=None) -> LanguageModel:
  """`LanguageModel` from `config.model` ({'name': 'lstm'|'transformer', ...}) and `config.head`.

  Args:
    model_cfg: backbone name and its fields (not `vocab_size`, which comes from the data).
    head_cfg: head name (a key of `softmax_jax.heads.HEADS`) and its fields (not `num_classes`).
    vocab_size: V; the backbone's vocabulary and the head's `num_classes`.
    class_counts: `[V]` training counts per token id; reaches heads with a `class_counts` field
      (adaptive cutoffs, unigram samplers, Huffman trees); the config never sets it.

  Raises:
    ValueError: an unknown name or key, naming it and the known ones.
  """
  backbone = build_module(LM_BACKBONES, model_cfg, 'config.model', vocab_size=vocab_size)
  head_cls = HEADS.get(dict(head_cfg).get('name'))
  fixed = {'num_classes': vocab_size}
  if head_cls is not None and 'class_counts' in {f.name for f in dataclasses.fields(head_cls)}:
    if class_counts is not None and len(class_counts) != vocab_size:
      raise ValueError(f'class_counts has {len(class_counts)} entries; it needs vocab_size = {vocab_size}.')
    fixed['class_counts'] = None if class_counts is None else tuple(int(c) for c in class_counts)
  head = build_module(HEADS, head_cfg, 'config.head', **fixed)
  return LanguageModel(backbone=backbone, head=head)
