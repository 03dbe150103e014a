"""On-device image augmentation with dm-pix, run inside the jitted train step.

The standard CIFAR recipe (He et al. 2016 §4.2; Cao et al. 2019; Cui et al. 2019): pad 4 pixels
on each side, take a random 32x32 crop, flip horizontally with probability 1/2. The host pipeline
stays deterministic and augmentation-free; the step draws the augmentation from its per-step key,
so a resumed run augments exactly as an uninterrupted one.
"""

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
