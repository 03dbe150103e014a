"""Cheap-first cascades: classify with the cheapest model, pass only the unsure examples on.

A cascade is a list of trained classifier runs, cheapest first. An example stops at the first
stage whose confidence in it reaches the threshold; the last stage answers whatever reaches it.
Confidence is read off the stage's softmax (`confidence_stats`): 'max_prob' (the top
probability), 'margin' (top-1 minus top-2 probability) or 'entropy' (the negative entropy, so
that higher means surer for every kind). One threshold serves every stage but the last.

Costs are per example, of each stage on its own: measured seconds (the jitted forward pass on
batches of `batch_size`, best of `repeats` passes) and FLOPs (XLA's `cost_analysis()` of the
same computation). An example that reaches stage i has paid stages 1..i, so the cascade's mean
cost is `sum_i cost_i * fraction reaching stage i`. The threshold is chosen on the validation
split (`choose_threshold`): the cheapest point whose accuracy reaches a target, or the most
accurate one within a cost budget; the test split then reports that point.

Only per-example statistics (`[N]`) leave the devices: prediction and the three confidences.
"""

import time
from typing import Dict, List, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax import data as data_lib

CONFIDENCES = ('max_prob', 'margin', 'entropy')


def confidence_stats(log_probs: jnp.ndarray) -> Dict[str, jnp.ndarray]:
  """Per-example prediction and confidences of normalized log-probabilities `[B, K]` (K >= 2).

  Raises:
    AssertionError (chex): `log_probs` not `[B, K]` with K >= 2.

  Returns:
    {'prediction': [B] int32, 'max_prob', 'margin', 'entropy': [B] float32}: the top probability,
    the top-1 minus top-2 probability, and the negative entropy `sum p log p` (<= 0; 0 is sure).
    A NaN row gives NaN confidences (and never passes a threshold).
  """
  chex.assert_rank(log_probs, 2, custom_message='confidence_stats: `log_probs` must be [B, K]')
  chex.assert_axis_dimension_gteq(log_probs, 1, 2, custom_message='confidence_stats: `log_probs` '
                                  'must be [B, K] with K >= 2 (a margin needs two classes)')
  log_probs = jnp.asarray(log_probs).astype(jnp.float32)
  top2, idx = jax.lax.top_k(log_probs, 2)
  probs = jnp.exp(log_probs)
  p_log_p = jnp.where(probs > 0, probs * log_probs, 0.0)  # 0 log 0 = 0 (sparse heads)
  nan = jnp.any(jnp.isnan(log_probs), axis=-1)
  return {'prediction': idx[:, 0].astype(jnp.int32),
          'max_prob': jnp.exp(top2[:, 0]),
          'margin': jnp.where(nan, jnp.nan, jnp.exp(top2[:, 0]) - jnp.exp(top2[:, 1])),
          'entropy': jnp.where(nan, jnp.nan, jnp.sum(p_log_p, axis=-1))}


class Stage:
  """One trained run of the cascade: its model, variables and dataset (`train.load_trained`), and
  `stats_fn(variables, images [B, ...]) -> confidence_stats`, jitted."""

  def __init__(self, workdir: str, *, dataset=None):
    from softmax_jax.train import load_trained  # pylint: disable=g-import-not-at-top (heavy)
    self.workdir = workdir
    self.config, self.dataset, self.model, self.variables = load_trained(workdir, dataset=dataset)
    if hasattr(self.dataset, 'vocab'):
      raise ValueError(f'cascade: {workdir!r} is a language model; cascades take classifiers.')
    self.stats_fn = jax.jit(lambda v, x: confidence_stats(self.model.apply(v, x, method='log_prob')))

  def statistics(self, split: str, batch_size: int) -> Dict[str, np.ndarray]:
    """`confidence_stats` of every example of `split` and its 'label', `[N]` arrays on the host."""
    outs, labels = [], []
    for batch in data_lib.eval_batches(self.dataset, split, batch_size):
      out = self.stats_fn(self.variables, batch['image'])
      outs.append(jax.tree.map(lambda x, m=batch['mask']: x[m], out))
      labels.append(batch['label'][batch['mask']])
    stats = {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}
    return stats | {'label': np.concatenate(labels)}

  def cost(self, batch_size: int, repeats: int = 5) -> Dict[str, float]:
    """{'seconds', 'flops'} per example of this stage's forward pass at `batch_size`."""
    images = jnp.zeros((batch_size, *self.dataset.input_shape), jnp.float32)
    lowered = self.stats_fn.lower(self.variables, images)
    analysis = lowered.compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    flops = float(analysis.get('flops', float('nan'))) if analysis else float('nan')
    jax.block_until_ready(self.stats_fn(self.variables, images))  # compile and warm up
    best = float('inf')
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(self.stats_fn(self.variables, images))
      best = min(best, time.perf_counter() - start)
    return {'seconds': best / batch_size, 'flops': flops / batch_size}


def check_same_examples(stats: Sequence[Dict[str, np.ndarray]], workdirs: Sequence[str], split: str) -> None:
  """Raises ValueError unless every stage saw the same labels of `split` (the same examples)."""
  for s, w in zip(stats[1:], workdirs[1:]):
    if len(s['label']) != len(stats[0]['label']) or np.any(s['label'] != stats[0]['label']):
      raise ValueError(f"cascade: the {split} split of {w!r} is not that of {workdirs[0]!r} "
                       f"({len(s['label'])} vs {len(stats[0]['label'])} examples, or other labels); "
                       'the stages must be trained on the same data.')


def evaluate(stats: Sequence[Dict[str, np.ndarray]], costs: Sequence[float], threshold: float, *,
             confidence: str = 'max_prob') -> Dict[str, object]:
  """The cascade at one threshold: {'accuracy', 'cost', 'fractions' [stages], 'answered_by' [N]}.

  Args:
    stats: per stage, `confidence_stats` of the same N examples with their 'label'.
    costs: per stage, its cost per example (seconds or FLOPs).
    threshold: an example stops at the first stage (but the last) whose confidence >= threshold.
    confidence: one of `CONFIDENCES`.
  """
  if confidence not in CONFIDENCES:
    raise ValueError(f'confidence must be one of {CONFIDENCES}, got {confidence!r}.')
  n = len(stats[0]['label'])
  answered_by = np.full(n, len(stats) - 1)
  open_ = np.ones(n, bool)
  for i, s in enumerate(stats[:-1]):
    stop = open_ & (s[confidence] >= threshold)
    answered_by[stop] = i
    open_ &= ~stop
  prediction = np.choose(answered_by, [s['prediction'] for s in stats])
  fractions = np.bincount(answered_by, minlength=len(stats)) / n
  reached = 1.0 - np.concatenate([[0.0], np.cumsum(fractions)[:-1]])  # fraction reaching stage i
  return {'accuracy': float(np.mean(prediction == stats[0]['label'])),
          'cost': float(np.dot(reached, costs)), 'fractions': fractions, 'answered_by': answered_by}


def curve(stats, costs, *, confidence: str = 'max_prob', num: int = 200) -> List[Dict[str, float]]:
  """`evaluate` over thresholds at the quantiles of the first stage's confidence (plus -inf and
  +inf: every example stops at stage 1, or none does), sorted by cost."""
  values = stats[0][confidence][np.isfinite(stats[0][confidence])]
  grid = np.unique(np.concatenate([[-np.inf, np.inf], np.quantile(values, np.linspace(0, 1, num))]))
  points = []
  for t in grid:
    e = evaluate(stats, costs, float(t), confidence=confidence)
    points.append({'threshold': float(t), 'accuracy': e['accuracy'], 'cost': e['cost'],
                   'fraction_first': float(e['fractions'][0])})
  return sorted(points, key=lambda p: (p['cost'], -p['accuracy']))


def choose_threshold(points: Sequence[Dict[str, float]], *, target_accuracy: Optional[float] = None,
                     budget: Optional[float] = None) -> Dict[str, float]:
  """The operating point of a `curve` (on validation): with `target_accuracy`, the cheapest point
  whose accuracy reaches it (else the most accurate point); with `budget`, the most accurate point
  whose cost is at most it (else the cheapest). Exactly one of the two must be given."""
  if (target_accuracy is None) == (budget is None):
    raise ValueError('choose_threshold: give exactly one of target_accuracy and budget.')
  if target_accuracy is not None:
    ok = [p for p in points if p['accuracy'] >= target_accuracy]
    return min(ok, key=lambda p: p['cost']) if ok else max(points, key=lambda p: p['accuracy'])
  ok = [p for p in points if p['cost'] <= budget]
  return max(ok, key=lambda p: p['accuracy']) if ok else min(points, key=lambda p: p['cost'])
