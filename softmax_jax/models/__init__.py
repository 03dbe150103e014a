"""Backbones, chosen by name from config: images `[B, H, W, C]` -> features `[B, d]`."""

from softmax_jax.models.cnn import CNN
from softmax_jax.models.mlp import MLP

BACKBONES = {'mlp': MLP, 'cnn': CNN}

__all__ = ['BACKBONES', 'CNN', 'MLP']
