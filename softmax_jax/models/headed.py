"""`HeadedModel`: any of our heads on your own Flax backbone, with the head contract forwarded.

    model = HeadedModel(backbone=MyNet(), head=heads.DenseSoftmax(num_classes=10))
    loss = model.apply(variables, x, labels, train=True).mean()    # per-example [B] -> scalar
    logp = model.apply(variables, x, method='log_prob')             # [B, K], exact, normalized

`classifier.Classifier` is the same composition built by name from a config (the trainer's);
this one takes module instances and any backbone, so it is the one to use in your own loop.
"""

import inspect
from typing import Dict, Optional

import flax.linen as nn
import jax.numpy as jnp


def _takes_train(module: nn.Module) -> bool:
  """Whether `module.__call__` has a parameter named `train` (not merely `**kwargs`)."""
  parameter = inspect.signature(type(module).__call__).parameters.get('train')
  return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD,
                                                      parameter.KEYWORD_ONLY)


class HeadedModel(nn.Module):
  """Inputs `[B, ...]` -> `backbone` -> features `[B, ..., d]` -> `head`, forwarding the head contract.

  The backbone is any Flax module mapping the inputs to features `[..., d]` (`[B, d]` for a
  classifier, `[B, T, d]` for a language model); it is called as `backbone(inputs, train=train)`
  when its `__call__` takes a `train` argument (dropout, batch norm), else as `backbone(inputs)`.
  Methods other than `__call__` run it in evaluation mode (`train=False`). The head is any module
  with the head contract (`softmax_jax.heads`, or one that passes `softmax_jax.testing.assert_head_contract`).

  Attributes:
    backbone: the feature extractor, `inputs -> [..., d]`.
    head: `num_classes` is the head's; heads that sample in training draw from the rng stream
      'sample', backbones with dropout from 'dropout'.
  """
  backbone: nn.Module
  head: nn.Module

  def features(self, inputs: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Backbone features `[..., d]` of `inputs`."""
    if _takes_train(self.backbone):
      return self.backbone(inputs, train=train)
    return self.backbone(inputs)

  def __call__(self, inputs: jnp.ndarray, labels: jnp.ndarray, *, train: bool,
               step: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Per-example loss `[...]` (the shape of `labels`, int) of `inputs`; reduce it yourself.

    Args:
      inputs: what the backbone takes, `[B, ...]`.
      labels: `[...]` int class ids, the leading shape of the features.
      train: training mode (the head may approximate, e.g. sample; dropout is on).
      step: `[]` int training step, passed only to heads whose class sets `uses_step = True`
        (schedules inside a loss, e.g. SphereFace's lambda).

    Returns:
      `[...]` float per-example loss.
    """
    kwargs = {'step': step} if step is not None and getattr(type(self.head), 'uses_step', False) else {}
    return self.head(self.features(inputs, train=train), labels, train=train, **kwargs)

  def log_prob(self, inputs: jnp.ndarray) -> jnp.ndarray:
    """Exact normalized log-probabilities `[..., num_classes]` (evaluation mode)."""
    return self.head.log_prob(self.features(inputs))

  def predict(self, inputs: jnp.ndarray) -> jnp.ndarray:
    """Most probable class `[...]` int, the argmax of `log_prob` (evaluation mode)."""
    return self.head.predict(self.features(inputs))

  def eval_stats(self, inputs: jnp.ndarray, labels: jnp.ndarray, **options) -> Dict[str, jnp.ndarray]:
    """The head's per-example evaluation statistics (evaluation mode), `labels: [...] int`.

    `options` (keyword-only: `temperatures`, `log_prior`, `chunk_size`) go to the head's
    `eval_stats` (our heads have it; a user's head may not).
    """
    return self.head.eval_stats(self.features(inputs), labels, **options)
