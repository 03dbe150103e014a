"""Pure JAX ops of the softmax family. No Flax; jit/vmap/grad-safe; reduce over the last axis."""

from softmax_jax.ops.adaptive import adaptive_cutoffs
from softmax_jax.ops.adaptive import adaptive_log_softmax
from softmax_jax.ops.adaptive import adaptive_predict
from softmax_jax.ops.adaptive import adaptive_softmax_loss
from softmax_jax.ops.fused import linear_cross_entropy
from softmax_jax.ops.hierarchical import Tree
from softmax_jax.ops.hierarchical import balanced_tree
from softmax_jax.ops.hierarchical import hierarchical_log_prob
from softmax_jax.ops.hierarchical import hierarchical_loss
from softmax_jax.ops.hierarchical import hierarchical_predict
from softmax_jax.ops.hierarchical import huffman_tree
from softmax_jax.ops.imbalance import class_balanced_weights
from softmax_jax.ops.imbalance import drw_class_weights
from softmax_jax.ops.imbalance import focal_loss
from softmax_jax.ops.imbalance import ldam_loss
from softmax_jax.ops.imbalance import ldam_margins
from softmax_jax.ops.imbalance import log_prior
from softmax_jax.ops.imbalance import logit_adjusted_cross_entropy
from softmax_jax.ops.imbalance import posthoc_logit_adjustment
from softmax_jax.ops.margins import arcface_logits
from softmax_jax.ops.margins import combined_margin_logits
from softmax_jax.ops.margins import cosface_logits
from softmax_jax.ops.margins import cosine_logits
from softmax_jax.ops.margins import l2_normalize
from softmax_jax.ops.margins import sphereface_lambda
from softmax_jax.ops.margins import sphereface_logits
from softmax_jax.ops.margins import sphereface_psi
from softmax_jax.ops.sampled import SampledValues
from softmax_jax.ops.sampled import log_uniform_probs
from softmax_jax.ops.sampled import log_uniform_sampler
from softmax_jax.ops.sampled import negative_sampling_loss
from softmax_jax.ops.sampled import nce_loss
from softmax_jax.ops.sampled import sampled_softmax_loss
from softmax_jax.ops.sampled import uniform_sampler
from softmax_jax.ops.sampled import unigram_probs
from softmax_jax.ops.sampled import unigram_sampler
from softmax_jax.ops.softmax import cross_entropy
from softmax_jax.ops.softmax import log_softmax
from softmax_jax.ops.softmax import logsumexp
from softmax_jax.ops.softmax import soft_cross_entropy
from softmax_jax.ops.softmax import softmax
from softmax_jax.ops.spherical import spherical_softmax
from softmax_jax.ops.spherical import taylor_softmax

__all__ = [
    "adaptive_cutoffs",
    "adaptive_log_softmax",
    "adaptive_predict",
    "adaptive_softmax_loss",
    "SampledValues",
    "log_uniform_probs",
    "log_uniform_sampler",
    "negative_sampling_loss",
    "nce_loss",
    "sampled_softmax_loss",
    "uniform_sampler",
    "unigram_probs",
    "unigram_sampler",
    "Tree",
    "balanced_tree",
    "hierarchical_log_prob",
    "hierarchical_loss",
    "hierarchical_predict",
    "huffman_tree",
    "arcface_logits",
    "combined_margin_logits",
    "cosface_logits",
    "cosine_logits",
    "l2_normalize",
    "spherical_softmax",
    "sphereface_lambda",
    "sphereface_logits",
    "sphereface_psi",
    "taylor_softmax",
    "class_balanced_weights",
    "cross_entropy",
    "drw_class_weights",
    "focal_loss",
    "ldam_loss",
    "ldam_margins",
    "linear_cross_entropy",
    "log_prior",
    "log_softmax",
    "logit_adjusted_cross_entropy",
    "logsumexp",
    "posthoc_logit_adjustment",
    "soft_cross_entropy",
    "softmax",
]
