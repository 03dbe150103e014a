"""Backbones, chosen by name from config.

Images `[B, H, W, C]` -> features `[B, d]` (`BACKBONES`, wrapped by `classifier.Classifier`);
tokens `[B, T]` -> features `[B, T, d]` (`LM_BACKBONES`, wrapped by `lm.LanguageModel`).
`HeadedModel(backbone=..., head=...)` puts any head on your own Flax backbone.
"""

from softmax_jax.models.cnn import CNN
from softmax_jax.models.headed import HeadedModel
from softmax_jax.models.mlp import MLP
from softmax_jax.models.resnet import ResNet

BACKBONES = {'mlp': MLP, 'cnn': CNN, 'resnet': ResNet}  # before the imports below: classifier reads it

# pylint: disable=g-import-not-at-top,g-bad-import-order
from softmax_jax.models.lm import LM_BACKBONES
from softmax_jax.models.lm import LanguageModel
from softmax_jax.models.lm import build_language_model
from softmax_jax.models.lstm import LSTMLM
from softmax_jax.models.transformer import TransformerLM

__all__ = ['BACKBONES', 'CNN', 'HeadedModel', 'LM_BACKBONES', 'LSTMLM', 'LanguageModel', 'MLP',
           'ResNet', 'TransformerLM', 'build_language_model']
