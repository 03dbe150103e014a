"""Pure JAX ops of the softmax family. No Flax; jit/vmap/grad-safe; reduce over the last axis.

**NaN rule** (every op, and the heads over them): a NaN in what an op reads for an example (a
logit, a cosine, a score, a feature row, a per-example option such as a margin `scale` or a
`temperature`) makes that example's output NaN: its loss, its whole row of probabilities,
log-probabilities or margin logits, its `logsumexp`. Never a finite number: no guard (fully
masked row, empty sum, zero norm) mistakes a NaN for its case. Other examples are unaffected,
value for value. What an op does not read cannot poison it: classes excluded by a `where=False`
mask (like `-inf` logits) and examples ignored by `ignore_index`. A NaN in a shared argument (a
weight matrix, `class_weights`, `log_prior`) reaches every example that reads it, and a traced
sampled id out of range gives every loss of the batch NaN (the sample is shared). Integer outputs
(`adaptive_predict`, `hierarchical_predict`) cannot be NaN: for a NaN row the id is unspecified.

**Two masks, two names** (docs/architecture.md): `where=` is always a mask of CLASSES (`[..., K]`,
broadcastable); examples are ignored by `ignore_index: int | None` (PyTorch's semantics), taken
by every loss with integer labels (`cross_entropy`, `linear_cross_entropy`, `focal_loss`,
`logit_adjusted_cross_entropy`, `ldam_loss`, the sampled losses and samplers,
`hierarchical_loss`, `adaptive_softmax_loss`, `mixture_cross_entropy`, the Fenchel-Young losses
`sparsemax_loss`, `entmax15_loss`, `entmax_bisect_loss`): an example whose label
equals it gets loss exactly 0 and gradient exactly 0, its label is not range-checked, and its
logits/features are not read (replaced by zeros, so a NaN there leaks nowhere);
`reduction='mean'` divides by the examples not ignored. A bool mask `m` of examples is
`labels=jnp.where(m, labels, -1), ignore_index=-1`.
`soft_cross_entropy` has no labels: a zero target row gives 0 (unless its logits are NaN).
"""

from softmax_jax.ops.adaptive import adaptive_cutoffs
from softmax_jax.ops.adaptive import adaptive_log_softmax
from softmax_jax.ops.adaptive import adaptive_predict
from softmax_jax.ops.adaptive import adaptive_softmax_loss
from softmax_jax.ops.decoding import beam_search
from softmax_jax.ops.decoding import greedy
from softmax_jax.ops.decoding import min_p_mask
from softmax_jax.ops.decoding import sample
from softmax_jax.ops.decoding import top_k_mask
from softmax_jax.ops.decoding import top_p_mask
from softmax_jax.ops.distill import kd_loss
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
from softmax_jax.ops.mixture import linear_logsumexp
from softmax_jax.ops.mixture import log_sigsoftmax
from softmax_jax.ops.mixture import mixture_cross_entropy
from softmax_jax.ops.mixture import mixture_log_softmax
from softmax_jax.ops.mixture import sigsoftmax
from softmax_jax.ops.restricted import shortlist_log_softmax
from softmax_jax.ops.restricted import topk_log_softmax
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
from softmax_jax.ops.sparse import entmax15
from softmax_jax.ops.sparse import entmax15_loss
from softmax_jax.ops.sparse import entmax_bisect
from softmax_jax.ops.sparse import entmax_bisect_loss
from softmax_jax.ops.sparse import sparsemax
from softmax_jax.ops.sparse import sparsemax_loss
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
    "linear_logsumexp",
    "log_sigsoftmax",
    "mixture_cross_entropy",
    "mixture_log_softmax",
    "sigsoftmax",
    "shortlist_log_softmax",
    "topk_log_softmax",
    "beam_search",
    "greedy",
    "min_p_mask",
    "sample",
    "top_k_mask",
    "top_p_mask",
    "entmax15",
    "entmax15_loss",
    "entmax_bisect",
    "entmax_bisect_loss",
    "sparsemax",
    "sparsemax_loss",
    "kd_loss",
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
