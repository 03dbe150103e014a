"""MixtureOfSoftmaxes: a mixture of M softmaxes (or sigsoftmaxes) over a shared output layer.

Yang et al. 2018: for features `h: [..., d]`, the prior `pi = softmax(h @ prior)` over M
components, the component contexts `c_m = tanh(h @ context_m + context_bias_m)` `[..., M, dc]`,
one shared output layer `z_m = c_m @ kernel + bias` `[..., M, K]`, and
`log p = logsumexp_m(log pi_m + log_softmax(z_m))` (log space, never `log(sum p + eps)` as the
reference code does). With `sigsoftmax=True` each component is a sigsoftmax (Kanai et al. 2018).
The head contract is DenseSoftmax's (see heads/dense.py). Parameters: `prior` `[d, M]`,
`context` `[d, M, dc]`, `context_bias` `[M, dc]`, `kernel` `[dc, K]` and `bias` `[K]`.

With `streamed=True` (the default) the loss is `ops.mixture_cross_entropy` (never `[N, M, K]`:
vocabulary chunks, an online logsumexp per component, a recomputing backward) and `eval_stats`
is computed chunk by chunk over the classes; `log_prob` and `predict` are exact and form
`[..., M, K]` either way. `streamed=False` forms `[..., M, K]` in training too (the baseline).
"""

from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from softmax_jax import ops
from softmax_jax.heads import _checks
from softmax_jax.heads import _eval


def _logits(contexts, kernel, bias):
  """`contexts @ kernel + bias`: `[..., M, dc]` -> `[..., M, K]` float32."""
  z = jnp.einsum('...mc,ck->...mk', contexts, kernel, preferred_element_type=jnp.float32)
  return z if bias is None else z + bias


class MixtureOfSoftmaxes(nn.Module):
  """Mixture-of-softmaxes head (high-rank log-probabilities past the softmax bottleneck).

  Attributes:
    num_classes: K >= 2, the number of classes.
    num_mixtures: M >= 1 components (M = 1: one softmax over `tanh` contexts).
    context_dim: dc, the width of each component's context (None: the features' d).
    use_bias: whether the shared output layer adds a learned `[K]` bias.
    sigsoftmax: mix sigsoftmaxes `softmax(z + log_sigmoid(z))` instead of softmaxes.
    streamed: train (and compute `eval_stats`) by vocabulary chunks, never `[N, M, K]`.
    chunk_size: classes per chunk of the streamed loss and statistics (None: the op's 1024).
    dtype: computation dtype of the matmuls, None or floating (None: the features' dtype).
      Losses and log-probabilities are accumulated in float32.

  References:
    Yang et al., "Breaking the softmax bottleneck: a high-rank RNN language model", ICLR 2018.
    Kanai et al., "Sigsoftmax: Reanalysis of the softmax bottleneck", NeurIPS 2018.
  """
  num_classes: int
  num_mixtures: int = 5
  context_dim: Optional[int] = None
  use_bias: bool = True
  sigsoftmax: bool = False
  streamed: bool = True
  chunk_size: Optional[int] = None
  dtype: Any = None

  def _config(self) -> None:
    """Validates the attributes (on every call, so evaluation-only use is checked too)."""
    name = type(self).__name__
    _checks.num_classes(name, self.num_classes)
    _checks.compute_dtype(name, self.dtype)
    _checks.integer_at_least(name, 'num_mixtures', self.num_mixtures, 1, 'mixture components')
    if self.context_dim is not None:
      _checks.integer_at_least(name, 'context_dim', self.context_dim, 1, 'context width')
    if self.chunk_size is not None:
      _checks.integer_at_least(name, 'chunk_size', self.chunk_size, 1, 'classes per chunk')

  @nn.compact
  def _weights(self, d: int):
    m, dc = int(self.num_mixtures), int(self.context_dim or d)
    f32 = jnp.float32  # parameters stay float32 (also under x64); `dtype` is the compute dtype
    prior = self.param('prior', nn.initializers.lecun_normal(), (d, m), f32)
    context = self.param('context', nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                         (d, m, dc), f32)
    context_bias = self.param('context_bias', nn.initializers.zeros, (m, dc), f32)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (dc, self.num_classes), f32)
    bias = (self.param('bias', nn.initializers.zeros, (self.num_classes,), f32) if self.use_bias
            else None)
    return prior, context, context_bias, kernel, bias

  def _mixture(self, features, labels=None):
    """Checks; returns `(prior_logits [..., M] f32, contexts [..., M, dc], kernel, bias, labels)`
    with the contexts and the kernel in the compute dtype."""
    self._config()
    features, labels = _checks.features_and_labels(
        type(self).__name__, features, labels,
        num_classes=None if labels is None else self.num_classes)
    prior, context, context_bias, kernel, bias = self._weights(features.shape[-1])
    dtype = self.dtype or features.dtype
    x = features.astype(dtype)
    prior_logits = jnp.einsum('...d,dm->...m', x, prior.astype(dtype),
                              preferred_element_type=jnp.float32)
    h = jnp.einsum('...d,dmc->...mc', x, context.astype(dtype), preferred_element_type=jnp.float32)
    contexts = jnp.tanh(h + context_bias).astype(dtype)
    return prior_logits, contexts, kernel.astype(dtype), bias, labels

  def logits(self, features: jnp.ndarray) -> jnp.ndarray:
    """The components' logits `[..., M, K]` float32 (before any sigsoftmax)."""
    return _logits(*self._mixture(features)[1:4])

  def __call__(self, features: jnp.ndarray, labels: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Per-example negative log-likelihood `[...]` for `features: [..., d]`, `labels: [...] int`."""
    del train  # The same loss in training and evaluation.
    prior_logits, contexts, kernel, bias, labels = self._mixture(features, labels)
    if self.streamed:
      return ops.mixture_cross_entropy(contexts, prior_logits, kernel, labels, bias=bias,
                                       sigsoftmax=self.sigsoftmax, chunk_size=self.chunk_size)
    log_p = ops.mixture_log_softmax(_logits(contexts, kernel, bias), prior_logits,
                                    sigsoftmax=self.sigsoftmax)
    return ops.cross_entropy(log_p, labels)  # -log_p[label]: log_p is already normalized

  def log_prob(self, features: jnp.ndarray) -> jnp.ndarray:
    """Exact normalized log-probabilities `[..., K]` float32 (forms `[..., M, K]`)."""
    prior_logits, contexts, kernel, bias, _ = self._mixture(features)
    return ops.mixture_log_softmax(_logits(contexts, kernel, bias), prior_logits,
                                   sigsoftmax=self.sigsoftmax)

  def predict(self, features: jnp.ndarray) -> jnp.ndarray:
    """Most probable class `[...] int32`, `argmax(log_prob(features), -1)`."""
    return jnp.argmax(self.log_prob(features), axis=-1).astype(jnp.int32)

  def eval_stats(self, features: jnp.ndarray, labels: jnp.ndarray, *, temperatures=(1.0,),
                 log_prior=None, chunk_size: Optional[int] = None) -> Dict[str, jnp.ndarray]:
    """Per-example statistics of `log_prob` (see `softmax_jax/heads/_eval.py`).

    With `streamed=True` one pass of `ops.linear_logsumexp` gives each component's normalizer
    `[..., M]`, then the exact log-probabilities are formed `chunk_size` classes at a time
    (None: the head's `chunk_size`, else 2048) as `[..., M, chunk]` blocks: never `[..., K]`.
    """
    opts = dict(temperatures=temperatures, log_prior=log_prior)
    if not self.streamed:
      return _eval.from_log_prob(self, features, labels, chunk_size=chunk_size, **opts)
    prior_logits, contexts, kernel, bias, labels = self._mixture(features, labels)
    size = chunk_size or self.chunk_size
    lse = ops.linear_logsumexp(contexts, kernel, bias=bias, sigsoftmax=self.sigsoftmax,
                               chunk_size=size)  # [..., M]
    shift = ops.log_softmax(prior_logits) - lse  # log pi_m - lse_m
    sig = self.sigsoftmax

    def mix(z):  # [..., M, c] logits -> [..., c] log-probabilities
      u = z + jax.nn.log_sigmoid(z) if sig else z
      return jax.nn.logsumexp(shift[..., None] + u, axis=-2)

    def chunk(start, size):
      w = jax.lax.dynamic_slice_in_dim(kernel, start, size, axis=1)
      z = jnp.einsum('...mc,ck->...mk', contexts, w, preferred_element_type=jnp.float32)
      return mix(z if bias is None else z + jax.lax.dynamic_slice_in_dim(bias, start, size))

    w_y = _eval.label_rows(kernel, labels, 1)  # [..., dc]
    z_y = jnp.einsum('...mc,...c->...m', contexts, w_y, preferred_element_type=jnp.float32)
    if bias is not None:
      z_y = z_y + _eval.label_rows(bias, labels, 0)[..., None]
    label_scores = mix(z_y[..., None])[..., 0]
    return _eval.chunked_eval_stats(chunk, labels, num_classes=self.num_classes, chunk_size=size,
                                    label_scores=label_scores, **opts)
