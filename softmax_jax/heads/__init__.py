"""Output heads (flax.linen) over `softmax_jax.ops`, all with one contract (see dense.py)."""

from softmax_jax.heads._eval import chunked_eval_stats
from softmax_jax.heads._eval import log_prob_eval_stats
from softmax_jax.heads.adaptive import AdaptiveSoftmax
from softmax_jax.heads.dense import DenseSoftmax
from softmax_jax.heads.hierarchical import HierarchicalSoftmax
from softmax_jax.heads.imbalanced import ImbalancedSoftmax
from softmax_jax.heads.margin import MarginSoftmax
from softmax_jax.heads.mixture import MixtureOfSoftmaxes
from softmax_jax.heads.sampled import SampledSoftmax

HEADS = {'adaptive': AdaptiveSoftmax, 'dense': DenseSoftmax, 'hierarchical': HierarchicalSoftmax,
         'imbalanced': ImbalancedSoftmax, 'margin': MarginSoftmax, 'mos': MixtureOfSoftmaxes,
         'sampled': SampledSoftmax}

__all__ = ['AdaptiveSoftmax', 'DenseSoftmax', 'HEADS', 'HierarchicalSoftmax', 'ImbalancedSoftmax',
           'MarginSoftmax', 'MixtureOfSoftmaxes', 'SampledSoftmax', 'chunked_eval_stats',
           'log_prob_eval_stats']
