"""random_crop_flip: every output is a flipped-or-not window of the zero-padded input.
random_rotation and color_jitter: against np.rot90, scipy.ndimage.rotate and a float64 NumPy
reference at the angles and factors drawn from the documented keys; augment_images' key streams.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from softmax_jax.data.augment import augment_images, color_jitter, random_crop_flip, random_rotation

H, W, C = 5, 6, 2


def _images(b):
  # Distinct, non-zero pixels, so a window and a flip identify themselves.
  return jnp.arange(1, 1 + b * H * W * C, dtype=jnp.float32).reshape(b, H, W, C)


def _windows(image, p):
  """{(dy, dx, flipped): the crop at offset (dy, dx) of the zero-padded image, mirrored or not}."""
  padded = np.pad(np.asarray(image), ((p, p), (p, p), (0, 0)))
  out = {}
  for dy in range(2 * p + 1):
    for dx in range(2 * p + 1):
      crop = padded[dy:dy + H, dx:dx + W]
      out[(dy, dx, False)], out[(dy, dx, True)] = crop, crop[:, ::-1]
  return out


def _identify(out, image, p):
  matches = [k for k, v in _windows(image, p).items() if np.array_equal(out, v)]
  assert len(matches) == 1, matches
  return matches[0]


def test_flip_is_exactly_a_mirror():
  x = _images(16)
  out = jax.jit(lambda r, x: random_crop_flip(r, x, padding=0, flip=True))(jax.random.PRNGKey(0), x)
  flipped = [bool(np.array_equal(o, np.asarray(i)[:, ::-1])) for o, i in zip(out, x)]
  assert all(f or np.array_equal(o, i) for f, o, i in zip(flipped, out, x))
  assert 0 < sum(flipped) < 16


def test_crop_is_a_window_of_the_zero_padded_image_with_its_own_offset():
  p, x = 2, _images(32)
  out = random_crop_flip(jax.random.PRNGKey(1), x, padding=p, flip=False)
  assert out.shape == x.shape and out.dtype == x.dtype
  keys = [_identify(o, i, p) for o, i in zip(out, x)]
  assert not any(k[2] for k in keys)
  assert len({k[:2] for k in keys}) > 5  # examples get their own offsets


def test_crop_and_flip_together():
  p, x = 1, _images(32)
  keys = [_identify(o, i, p) for o, i in zip(random_crop_flip(jax.random.PRNGKey(2), x, padding=p), x)]
  assert {k[2] for k in keys} == {False, True}


def test_same_rng_same_output_other_rng_other_output():
  x = _images(8)
  a = random_crop_flip(jax.random.PRNGKey(3), x, padding=2)
  np.testing.assert_array_equal(a, jax.jit(lambda r, x: random_crop_flip(r, x, padding=2))(
      jax.random.PRNGKey(3), x))
  assert not np.array_equal(a, random_crop_flip(jax.random.PRNGKey(4), x, padding=2))


def test_offsets_cover_all_positions():
  p = 2
  x = jnp.broadcast_to(_images(1), (400, H, W, C))
  out = jax.jit(lambda r, x: random_crop_flip(r, x, padding=p, flip=False))(jax.random.PRNGKey(6), x)
  offsets = [_identify(o, x[0], p)[:2] for o in np.asarray(out)]
  assert set(offsets) == {(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)}
  counts = np.unique(np.array(offsets), axis=0, return_counts=True)[1]
  assert counts.min() >= 4 and counts.max() <= 32  # 16 expected for each of the 25


def test_no_padding_and_no_flip_is_the_identity():
  x = _images(3)
  np.testing.assert_array_equal(random_crop_flip(jax.random.PRNGKey(0), x, padding=0, flip=False), x)


@pytest.mark.parametrize('shape, padding, match', [
    ((H, W, C), 1, r'images must be \[B, H, W, C\] \(rank 4\), got shape \(5, 6, 2\)'),
    ((2, H, W, C), -1, r'padding must be an integer >= 0, got -1'),
])
def test_bad_arguments_are_named(shape, padding, match):
  with pytest.raises(ValueError, match=match):
    random_crop_flip(jax.random.PRNGKey(0), jnp.zeros(shape), padding=padding)


def _random_images(b, h, w, c, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, h, w, c)), jnp.float32)


def _draws(rng, b, lo, hi):
  """The per-example uniform draws of the documented key layout: `uniform(split(rng, B)[i])`."""
  return np.array([jax.random.uniform(k, (), minval=lo, maxval=hi) for k in jax.random.split(rng, b)],
                  np.float64)


def test_rotation_by_90_degrees_is_rot90_and_by_0_the_identity():
  x = _random_images(3, 6, 6, 1)  # square: rot90 moves whole pixels
  rotate = jax.jit(random_rotation, static_argnames='degrees')
  # +90 is counter-clockwise as displayed (row 0 on top), np.rot90's sense (not its inverse).
  out = rotate(jax.random.PRNGKey(0), x, degrees=(90.0, 90.0))
  np.testing.assert_allclose(out, np.rot90(np.asarray(x), 1, axes=(1, 2)), atol=1e-5)
  assert not np.allclose(out, np.rot90(np.asarray(x), -1, axes=(1, 2)), atol=1e-2)
  assert random_rotation(jax.random.PRNGKey(0), x, degrees=0.0) is x
  assert random_rotation(jax.random.PRNGKey(0), x, degrees=(0, 0)) is x


def test_rotation_matches_scipy_at_the_drawn_angles_and_examples_draw_their_own():
  b, degrees, rng = 6, 40.0, jax.random.PRNGKey(7)
  image = _random_images(1, 7, 6, 3)[0]  # not square, RGB: each channel rotates alike
  x = jnp.broadcast_to(image, (b,) + image.shape)  # the same image six times
  out = np.asarray(jax.jit(lambda r, x: random_rotation(r, x, degrees=degrees))(rng, x))
  angles = _draws(rng, b, -degrees, degrees)
  assert angles.min() >= -degrees and angles.max() <= degrees and len(np.unique(angles)) == b
  for o, a in zip(out, angles):  # float64 bilinear rotation about the centre, edge fill
    ref = ndimage.rotate(np.asarray(image, np.float64), a, axes=(1, 0), reshape=False, order=1,
                         mode='nearest')
    np.testing.assert_allclose(o, ref, atol=1e-4)
  assert len({o.tobytes() for o in out}) == b  # per-example angles: six different outputs


@pytest.mark.parametrize('channels', [1, 3])
def test_color_jitter_matches_a_numpy_reference_with_the_drawn_factors(channels):
  b, bright, contrast, rng = 5, 0.3, 0.4, jax.random.PRNGKey(3)
  x = _random_images(b, 4, 3, channels, seed=channels)
  out = np.asarray(jax.jit(lambda r, x: color_jitter(r, x, brightness=bright, contrast=contrast))(rng, x))
  assert out.shape == x.shape and out.dtype == np.float32
  pairs = [jax.random.split(k) for k in jax.random.split(rng, b)]
  deltas = np.array([jax.random.uniform(p[0], (), minval=-bright, maxval=bright) for p in pairs], np.float64)
  factors = np.array([jax.random.uniform(p[1], (), minval=1 - contrast, maxval=1 + contrast)
                      for p in pairs], np.float64)
  assert np.abs(deltas).max() <= bright and np.abs(factors - 1).max() <= contrast
  assert len(np.unique(deltas)) == b and len(np.unique(factors)) == b
  shifted = np.asarray(x, np.float64) + deltas[:, None, None, None]
  mean = shifted.mean(axis=(1, 2), keepdims=True)  # per image and channel
  ref = factors[:, None, None, None] * (shifted - mean) + mean
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # Identity: contrast keeps each channel's mean, so the mean moves by the brightness delta only.
  np.testing.assert_allclose(out.mean(axis=(1, 2)), np.asarray(x, np.float64).mean(axis=(1, 2))
                             + deltas[:, None], atol=1e-5)
  assert color_jitter(rng, x) is x


def test_augment_images_keeps_the_crop_flip_stream_and_vmaps():
  x, rng = _random_images(4, 6, 6, 1), jax.random.PRNGKey(11)
  augment = jax.jit(augment_images, static_argnames=('crop_padding', 'flip', 'brightness'))
  crop_flip = jax.jit(lambda r, x: random_crop_flip(jax.random.fold_in(r, 1 << 20), x, padding=2))(rng, x)
  # Only crop and flip: bit-identical to what the train step drew before rotation and jitter existed.
  np.testing.assert_array_equal(augment(rng, x, crop_padding=2, flip=True), crop_flip)
  # Brightness on as well: the same crops and flips, each shifted by its own constant.
  jittered = np.asarray(augment(rng, x, crop_padding=2, flip=True, brightness=0.5))
  shift = jittered - np.asarray(crop_flip)
  np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1, :1], shift.shape), atol=1e-6)
  assert len(np.unique(shift[:, 0, 0, 0])) == 4
  assert augment_images(rng, x) is x
  # vmap over keys: each key's batch as in its own call (rotation and jitter; crop and flip, slow
  # to compile under vmap, are vmapped inside random_crop_flip already).
  options = dict(rotation_degrees=15.0, brightness=0.2, contrast=0.2)
  keys = jax.random.split(rng, 2)
  batched = jax.jit(jax.vmap(lambda r: augment_images(r, x, **options)))(keys)
  one = jax.jit(lambda r: augment_images(r, x, **options))
  for k, o in zip(keys, batched):
    np.testing.assert_allclose(o, one(k), atol=1e-6)
  assert not np.allclose(batched[0], batched[1])


@pytest.mark.parametrize('fn, kwargs, match', [
    (random_rotation, dict(degrees=-1.0), r'random_rotation: degrees must be a finite number >= 0, got -1.0'),
    (random_rotation, dict(degrees=float('nan')), r'degrees must be a finite number >= 0, got nan'),
    (random_rotation, dict(degrees=(10.0, -10.0)), r'a pair \(lo, hi\) .* lo <= hi, got \(10.0, -10.0\)'),
    (random_rotation, dict(degrees=10.0, mode='wrap'), r"mode must be 'nearest' or 'constant', got 'wrap'"),
    (color_jitter, dict(brightness=-0.1), r'color_jitter: brightness must be a finite number >= 0, got -0.1'),
    (color_jitter, dict(contrast=1.5), r'contrast must be in \[0, 1\] .* got 1.5'),
])
def test_bad_augmentation_options_are_named(fn, kwargs, match):
  with pytest.raises(ValueError, match=match):
    fn(jax.random.PRNGKey(0), jnp.zeros((2, 4, 4, 1)), **kwargs)
  with pytest.raises(ValueError, match=r'images must be \[B, H, W, C\] \(rank 4\), got shape \(4, 4, 1\)'):
    fn(jax.random.PRNGKey(0), jnp.zeros((4, 4, 1)), **kwargs)
