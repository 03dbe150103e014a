"""Backbones, chosen by name from config: images `[B, H, W, C]` -> features `[B, d]`."""

from softmax_jax.models.cnn import CNN
from softmax_jax.models.mlp import MLP
from softmax_jax.models.resnet import ResNet

BACKBONES = {'mlp': MLP, 'cnn': CNN, 'resnet': ResNet}

__all__ = ['BACKBONES', 'CNN', 'MLP', 'ResNet']
