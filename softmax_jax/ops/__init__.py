"""Pure JAX ops of the softmax family. No Flax; jit/vmap/grad-safe; reduce over the last axis."""

from softmax_jax.ops.fused import linear_cross_entropy
from softmax_jax.ops.softmax import cross_entropy
from softmax_jax.ops.softmax import log_softmax
from softmax_jax.ops.softmax import logsumexp
from softmax_jax.ops.softmax import soft_cross_entropy
from softmax_jax.ops.softmax import softmax

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "log_softmax",
    "logsumexp",
    "soft_cross_entropy",
    "softmax",
]
