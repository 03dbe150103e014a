"""On-device image augmentation with dm-pix, run inside the jitted train step.

The standard CIFAR recipe (He et al. 2016 §4.2; Cao et al. 2019; Cui et al. 2019): pad 4 pixels
on each side, take a random 32x32 crop, flip horizontally with probability 1/2
(`random_crop_flip`); random rotation (`random_rotation`) and brightness/contrast jitter
(`color_jitter`) for small grayscale images. `augment_images` applies what `config.augment`
selects. The host pipeline stays deterministic and augmentation-free; the step draws the
augmentation from its per-step key, so a resumed run augments exactly as an uninterrupted one.
"""

import math
from typing import Tuple, Union

import dm_pix as pix
import jax
import jax.numpy as jnp


def random_crop_flip(rng: jax.Array, images: jnp.ndarray, *, padding: int = 4,
                     flip: bool = True) -> jnp.ndarray:
  """Random crop of the zero-padded image and random horizontal flip, independently per example.

  Each example is padded with `padding` zeros on all four sides, cropped back to `H x W` at a
  uniform offset in `[0, 2 padding]^2` (`pix.random_crop`) and, with `flip`, mirrored left-right
  with probability 1/2 (`pix.random_flip_left_right`). The pad value is 0 of the *normalized*
  image, i.e. the training mean, not black (torchvision's `RandomCrop(32, padding=4)` in Cao's code
  pads the raw image with black before normalizing; the difference is the colour of the border).

  Args:
    rng: a PRNG key; example i uses `split(rng, B)[i]`, so the output is a function of
      `(rng, images)` only.
    images: `[B, H, W, C]` float.
    padding: p >= 0 pixels of zero padding (0: no crop).
    flip: whether to flip left-right at random.

  Returns:
    `[B, H, W, C]` augmented images, same dtype; the identity when `padding == 0 and not flip`.

  Raises:
    ValueError: `images` not of rank 4, or `padding` negative.
  """
  if images.ndim != 4:
    raise ValueError(f'random_crop_flip: images must be [B, H, W, C] (rank 4), got shape {images.shape}.')
  if int(padding) != padding or padding < 0:
    raise ValueError(f'random_crop_flip: padding must be an integer >= 0, got {padding!r}.')
  if not padding and not flip:
    return images
  _, h, w, c = images.shape

  def one(key, image):  # [H, W, C]
    crop_key, flip_key = jax.random.split(key)
    if padding:
      image = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
      image = pix.random_crop(crop_key, image, (h, w, c))
    if flip:
      image = pix.random_flip_left_right(flip_key, image)
    return image

  return jax.vmap(one)(jax.random.split(rng, images.shape[0]), images)


# Folded into the train step's key, one stream per augmentation, so turning one on leaves the
# draws of the others (and of runs without it) unchanged. `random_crop_flip`'s is the stream the
# train step used before the others existed.
CROP_FLIP_STREAM = 1 << 20
ROTATION_STREAM = CROP_FLIP_STREAM + 1
COLOR_STREAM = CROP_FLIP_STREAM + 2


def _check_images(name: str, images) -> None:
  if images.ndim != 4:
    raise ValueError(f'{name}: images must be [B, H, W, C] (rank 4), got shape {images.shape}.')


def _nonnegative(name: str, arg: str, value) -> float:
  value = float(value)
  if not value >= 0 or value == float('inf'):  # also NaN
    raise ValueError(f'{name}: {arg} must be a finite number >= 0, got {value!r}.')
  return value


def random_rotation(rng: jax.Array, images: jnp.ndarray, *,
                    degrees: Union[float, Tuple[float, float]],
                    mode: str = 'nearest', cval: float = 0.0) -> jnp.ndarray:
  """Rotates each example about its centre by its own random angle (`pix.rotate`, bilinear).

  Example i is rotated counter-clockwise (as displayed, row 0 at the top: `np.rot90`'s sense)
  by `a_i = uniform(split(rng, B)[i], (), minval=lo, maxval=hi)` degrees, with `(lo, hi) =
  (-degrees, degrees)` or the given pair (torchvision's `RandomRotation` convention). Pixels
  that come from outside the image take the nearest edge pixel (`mode='nearest'`, the default):
  for Fashion-MNIST and MNIST the edge is background, so the corners stay background, as with
  torchvision's black fill of the raw image; `mode='constant'` fills with `cval` of the
  *normalized* image instead (0 = the training mean, a grey).

  Args:
    rng: a PRNG key.
    images: `[B, H, W, C]` float (C = 1 or 3 alike).
    degrees: `d >= 0` for angles uniform in `[-d, d]`, or a pair `(lo, hi)` with `lo <= hi`.
    mode: `pix.affine_transform`'s boundary mode: 'nearest' or 'constant'.
    cval: the fill value of `mode='constant'`.

  Returns:
    `[B, H, W, C]` rotated images, same dtype; the identity (the input itself) when the range is
    `[0, 0]`.

  Raises:
    ValueError: `images` not of rank 4, a negative or non-finite `degrees`, `lo > hi`, or an
      unknown `mode`.

  References:
    Simard, Steinkraus and Platt, "Best practices for convolutional neural networks applied to
    visual document analysis", ICDAR 2003.
  """
  _check_images('random_rotation', images)
  if isinstance(degrees, (tuple, list)):
    if len(degrees) != 2 or not all(math.isfinite(float(d)) for d in degrees) or degrees[0] > degrees[1]:
      raise ValueError(f'random_rotation: degrees must be d >= 0 or a pair (lo, hi) of finite '
                       f'numbers with lo <= hi, got {degrees!r}.')
    lo, hi = float(degrees[0]), float(degrees[1])
  else:
    hi = _nonnegative('random_rotation', 'degrees', degrees)
    lo = -hi
  if mode not in ('nearest', 'constant'):
    raise ValueError(f"random_rotation: mode must be 'nearest' or 'constant', got {mode!r}.")
  if lo == hi == 0.0:
    return images

  def one(key, image):  # [H, W, C]
    angle = jax.random.uniform(key, (), minval=lo, maxval=hi)
    return pix.rotate(image, jnp.deg2rad(angle), mode=mode, cval=cval).astype(image.dtype)

  return jax.vmap(one)(jax.random.split(rng, images.shape[0]), images)


def color_jitter(rng: jax.Array, images: jnp.ndarray, *, brightness: float = 0.0,
                 contrast: float = 0.0) -> jnp.ndarray:
  """Random brightness, then random contrast, independently per example; grayscale-safe.

  Example i splits `split(rng, B)[i]` into `(brightness_key, contrast_key)`; brightness adds
  `delta ~ U[-brightness, brightness]` to every pixel and channel (`pix.random_brightness`);
  contrast maps each channel to `f (x - mean) + mean` with `f ~ U[1 - contrast, 1 + contrast]`
  and `mean` that channel's spatial mean (`pix.random_contrast`). Both act per channel, so C = 1
  and C = 3 work alike (no RGB-to-gray step). The images are *normalized* (`(x / 255 - mean) /
  std`), so `delta` is in units of the training std, not of [0, 1] pixels: for Fashion-MNIST
  (std about 0.35) `brightness=0.2` shifts by at most about 0.07 of the pixel range. No clipping: the
  normalized range has no fixed bounds.

  Args:
    rng: a PRNG key.
    images: `[B, H, W, C]` float.
    brightness: b >= 0, the largest additive shift (0: off).
    contrast: c in [0, 1], the largest relative contrast change (0: off).

  Returns:
    `[B, H, W, C]` jittered images, same dtype; the identity (the input itself) when both are 0.

  Raises:
    ValueError: `images` not of rank 4, `brightness` negative or not finite, or `contrast`
      outside [0, 1].
  """
  _check_images('color_jitter', images)
  brightness = _nonnegative('color_jitter', 'brightness', brightness)
  contrast = _nonnegative('color_jitter', 'contrast', contrast)
  if contrast > 1:
    raise ValueError(f'color_jitter: contrast must be in [0, 1] (factors in [1 - c, 1 + c] must '
                     f'be >= 0), got {contrast!r}.')
  if not brightness and not contrast:
    return images

  def one(key, image):  # [H, W, C]
    brightness_key, contrast_key = jax.random.split(key)
    if brightness:
      image = pix.random_brightness(brightness_key, image, brightness)
    if contrast:
      image = pix.random_contrast(contrast_key, image, 1.0 - contrast, 1.0 + contrast)
    return image.astype(images.dtype)

  return jax.vmap(one)(jax.random.split(rng, images.shape[0]), images)


def augment_images(rng: jax.Array, images: jnp.ndarray, *, crop_padding: int = 0, flip: bool = False,
                   rotation_degrees: float = 0.0, brightness: float = 0.0,
                   contrast: float = 0.0) -> jnp.ndarray:
  """The train step's augmentation (`config.augment`): crop and flip, rotation, colour jitter.

  In that order, each from its own key folded from `rng` (`CROP_FLIP_STREAM`, `ROTATION_STREAM`,
  `COLOR_STREAM`): a run with only crop and flip augments exactly as before rotation and jitter
  existed, and turning one augmentation on leaves the draws of the others unchanged.

  Args:
    rng: the train step's key.
    images: `[B, H, W, C]` float, normalized.
    crop_padding, flip: `random_crop_flip`'s `padding` and `flip`.
    rotation_degrees: `random_rotation`'s `degrees` (0: off).
    brightness, contrast: `color_jitter`'s options (0: off).

  Returns:
    `[B, H, W, C]` augmented images; the input itself when everything is off.

  Raises:
    ValueError: from the augmentations, on a bad option or `images` not of rank 4.
  """
  _check_images('augment_images', images)
  if crop_padding or flip:
    images = random_crop_flip(jax.random.fold_in(rng, CROP_FLIP_STREAM), images,
                              padding=crop_padding, flip=flip)
  if rotation_degrees:
    images = random_rotation(jax.random.fold_in(rng, ROTATION_STREAM), images,
                             degrees=rotation_degrees)
  if brightness or contrast:
    images = color_jitter(jax.random.fold_in(rng, COLOR_STREAM), images, brightness=brightness,
                          contrast=contrast)
  return images
