"""random_crop_flip: every output is a flipped-or-not window of the zero-padded input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax.data.augment import random_crop_flip

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
