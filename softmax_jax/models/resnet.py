"""The CIFAR ResNet of He et al. 2016 (§4.2): ResNet-20/32/44/56/110, option-A shortcuts.

A 3x3 convolution stem (16 channels), three stages of n basic blocks (16, 32 and 64 channels,
feature maps 32x32, 16x16, 8x8 on CIFAR; the first block of stages 2 and 3 has stride 2), global
average pooling: depth = 6n + 2 weighted layers counting the classifier (the head here). Option-A
shortcuts are parameter-free: subsample by the stride and zero-pad the new channels, as in the
code of Cao et al. 2019 (LDAM-DRW) and Cui et al. 2019 (class-balanced loss), whose long-tailed
CIFAR results use ResNet-32.

References: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016;
Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019
(github.com/kaidic/LDAM-DRW, models/resnet_cifar.py).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from softmax_jax.models import _dtype

# Kaiming normal (fan_in, gain sqrt(2)), untruncated, as PyTorch's `kaiming_normal_` in Cao's code.
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def _batch_norm(train: bool, momentum: float, name: str, dtype: Any = jnp.float32) -> nn.BatchNorm:
  # Flax momentum 0.9 is PyTorch's momentum 0.1; epsilon 1e-5 as PyTorch. The batch statistics
  # and running averages are float32 for any `dtype` (Flax's force_float32_reductions).
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-5, name=name,
                      dtype=dtype)


def shortcut_a(x: jnp.ndarray, channels: int, stride: int) -> jnp.ndarray:
  """Option-A shortcut: `x [B, H, W, C]` -> `[B, ceil(H / s), ceil(W / s), channels]`.

  Keeps every `stride`-th pixel and zero-pads the channels, `(channels - C) // 2` before and the
  rest after (Cao's `F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))` when the
  channels double).
  """
  if stride > 1:
    x = x[:, ::stride, ::stride, :]
  extra = channels - x.shape[-1]
  if extra < 0:
    raise ValueError(f'shortcut_a: channels must be >= the input channels {x.shape[-1]}, got {channels}.')
  if extra:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class BasicBlock(nn.Module):
  """conv3x3(stride) -> BN -> relu -> conv3x3 -> BN, plus the option-A shortcut, then relu.

  Attributes:
    channels: output channels.
    stride: stride of the first convolution (and of the shortcut's subsampling).
    momentum: BatchNorm running-average momentum (Flax convention: the weight of the old value).
    dtype: compute dtype of the convolutions and activations.
  """
  channels: int
  stride: int = 1
  momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    conv = lambda s, name: nn.Conv(self.channels, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)),
                                   use_bias=False, kernel_init=_CONV_INIT, name=name,
                                   dtype=self.dtype)
    y = nn.relu(_batch_norm(train, self.momentum, 'bn1', self.dtype)(conv(self.stride, 'conv1')(x)))
    y = _batch_norm(train, self.momentum, 'bn2', self.dtype)(conv(1, 'conv2')(y))
    return nn.relu(y + shortcut_a(x, self.channels, self.stride))


class ResNet(nn.Module):
  """Maps images `[B, H, W, C]` to features `[B, widths[-1]]` float32 (64 for the CIFAR ResNets).

  With BatchNorm, training needs the 'batch_stats' collection mutable (the train step does it);
  `train=False` normalizes with the running averages.

  Attributes:
    depth: 6n + 2 (2 n len(widths) + 2 in general) with n >= 1 blocks per stage: 20, 32, 44, 56,
      110 in He et al.; 32 in Cao et al. and Cui et al.; 8 (n = 1) for tests.
    widths: channels of each stage (the stem has `widths[0]`); every stage after the first
      halves the resolution.
    momentum: BatchNorm momentum, 0.9 (PyTorch's 0.1).
    dtype: compute dtype of the convolutions and activations ('float32' or 'bfloat16');
      parameters, batch statistics and the pooled features stay float32 (`models/_dtype.py`).

  Raises:
    ValueError: `depth` not of the form above, images not of rank 4, or a non-floating `dtype`.
  """
  depth: int = 32
  widths: Sequence[int] = (16, 32, 64)
  momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    stages = len(self.widths)
    n, rest = divmod(self.depth - 2, 2 * stages)
    if stages < 1 or n < 1 or rest:
      raise ValueError(f'ResNet: depth must be 2 * len(widths) * n + 2 with n >= 1 (6n + 2 for 3 '
                       f'stages: 8, 14, 20, 32, ...), got depth={self.depth} with widths={tuple(self.widths)}.')
    if x.ndim != 4:
      raise ValueError(f'ResNet: images must be [B, H, W, C] (rank 4), got shape {x.shape}.')
    dtype = _dtype.compute_dtype('ResNet', self.dtype)
    x = nn.Conv(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=_CONV_INIT, name='stem_conv', dtype=dtype)(x.astype(dtype))
    x = nn.relu(_batch_norm(train, self.momentum, 'stem_bn', dtype)(x))
    for i, width in enumerate(self.widths):
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(width, stride, self.momentum, dtype, name=f'stage{i + 1}_block{j}')(
            x, train=train)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
