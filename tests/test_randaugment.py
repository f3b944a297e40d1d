"""stas_jax.data.randaugment: each op on small images checked by hand (and against PIL, the
library timm runs them with), the draws, determinism by key, random erasing, and the wiring into
augment_batch."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from stas_jax.data import augment
from stas_jax.data import randaugment as ra

KEY = jax.random.PRNGKey(0)
FILL = jnp.array([0.0])


def _gray(values):
  """A (1, n, 1) one-channel image from a list of pixel values."""
  return jnp.asarray(values, jnp.float32)[None, :, None]


def _values(image):
  return np.asarray(image)[0, :, 0].tolist()


# Pixel ops, by hand.


def test_invert_posterize_solarize():
  assert _values(ra.invert(_gray([0, 10, 255]))) == [255, 245, 0]
  x = _gray([0, 127, 128, 200, 255])
  assert _values(ra.posterize(x, 1)) == [0, 0, 128, 128, 128]
  assert _values(ra.posterize(x, 4)) == [0, 112, 128, 192, 240]   # 200 & 0xF0 = 192
  assert _values(ra.posterize(x, 0)) == [0, 0, 0, 0, 0]
  assert _values(ra.solarize(_gray([0, 127, 128, 255]), 128)) == [0, 127, 127, 0]
  assert _values(ra.solarize_add(_gray([0, 100, 127, 128, 250]), 50)) == [50, 150, 177, 128, 250]
  assert _values(ra.solarize_add(_gray([100]), 200)) == [255]


def test_enhance_ops_blend_and_truncate_like_pil():
  # Brightness: factor * x, truncated: 0.5 * 3 = 1.5 -> 1; 1.5 * 200 = 300 -> 255.
  assert _values(ra.brightness(_gray([0, 1, 3, 255]), 0.5)) == [0, 0, 1, 127]
  assert _values(ra.brightness(_gray([3, 100, 200]), 1.5)) == [4, 150, 255]
  # Contrast: blend with the rounded mean, here (0 + 0 + 10 + 30) / 4 = 10: 10 + 2 (x - 10).
  assert _values(ra.contrast(_gray([0, 0, 10, 30]), 2.0)) == [0, 0, 10, 50]
  # Colour: one channel is its own grayscale, so nothing changes.
  assert _values(ra.color(_gray([0, 17, 255]), 0.1)) == [0, 17, 255]


def test_grayscale_and_color_on_rgb():
  red = jnp.array([[[255.0, 0.0, 0.0], [0.0, 255.0, 0.0], [10.0, 20.0, 30.0]]])
  # PIL's L of pure red, green: 76, 150; of (10, 20, 30): 2.99 + 11.74 + 3.42 = 18.15 -> 18.
  np.testing.assert_array_equal(ra.grayscale(red)[0, :, 0], [76, 150, 18])
  np.testing.assert_array_equal(ra.color(red, 0.0)[0, 0], [76, 76, 76])
  np.testing.assert_array_equal(ra.color(red, 1.0), red)


def test_auto_contrast():
  # Channel 0: [50, 150] -> scale 2.55: int(50 * 2.55 - 127.5) = 0, int(127.5) = 127, 255.
  # Channel 1 is constant and stays as it is.
  image = jnp.array([[[50.0, 7.0], [100.0, 7.0], [150.0, 7.0]]])
  out = ra.auto_contrast(image)
  np.testing.assert_array_equal(out[0, :, 0], [0, 127, 255])
  np.testing.assert_array_equal(out[0, :, 1], [7, 7, 7])


def test_equalize():
  # 1,024 pixels: 512 of value 10, 256 of 20, 256 of 30. step = (1024 - 256) // 255 = 3;
  # v -> (1 + pixels below v) // 3: 10 -> 0, 20 -> 513 // 3 = 171, 30 -> 769 // 3 = 256 -> 255.
  image = jnp.concatenate([jnp.full((16, 32, 1), 10.0), jnp.full((8, 32, 1), 20.0),
                           jnp.full((8, 32, 1), 30.0)])
  out = ra.equalize(image)
  np.testing.assert_array_equal(np.unique(out[:16]), [0])
  np.testing.assert_array_equal(np.unique(out[16:24]), [171])
  np.testing.assert_array_equal(np.unique(out[24:]), [255])
  # Too few pixels below the top value for a step: unchanged.
  small = _gray([0, 100, 200, 200])
  np.testing.assert_array_equal(ra.equalize(small), small)


def test_sharpness():
  image = jnp.zeros((5, 5, 1)).at[2, 2, 0].set(130.0)
  np.testing.assert_array_equal(ra.sharpness(image, 1.0), image)
  smooth = ra.sharpness(image, 0.0)[..., 0]
  # SMOOTH = [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded: the centre 5 * 130 / 13 = 50,
  # its interior neighbours 130 / 13 = 10; the border keeps the image's zeros.
  want = np.zeros((5, 5))
  want[1:4, 1:4] = 10
  want[2, 2] = 50
  np.testing.assert_array_equal(smooth, want)


# Geometric ops.


def test_rotate_90_is_a_quarter_turn_counter_clockwise():
  image = jnp.arange(16.0).reshape(4, 4, 1)
  out = ra.affine(image, ra.rotation_matrix(90.0, 4, 4), FILL)
  np.testing.assert_array_equal(out[..., 0], np.rot90(np.arange(16.0).reshape(4, 4)))


def test_translate_and_shear():
  image = jnp.arange(1.0, 13.0).reshape(3, 4, 1)
  fill = jnp.array([99.0])
  # Translate x by +1 pixel: the output takes the input one column to the right.
  out = ra.affine(image, jnp.array([1.0, 0, 1, 0, 1, 0]), fill)[..., 0]
  np.testing.assert_array_equal(out, [[2, 3, 4, 99], [6, 7, 8, 99], [10, 11, 12, 99]])
  # Translate y by -1: the output takes the row above; the first row comes from outside.
  out = ra.affine(image, jnp.array([1.0, 0, 0, 0, 1, -1]), fill)[..., 0]
  np.testing.assert_array_equal(out, [[99] * 4, [1, 2, 3, 4], [5, 6, 7, 8]])
  # Shear x by 1: row centre y = r + 0.5 shifts the source by y columns; half-pixel shifts
  # average two neighbours (bilinear): row 0 takes x + 0.5 -> (a + b) / 2, halves rounded up:
  # 1.5 -> 2, 2.5 -> 3, 3.5 -> 4, and the last centre falls outside.
  out = ra.affine(image, jnp.array([1.0, 1, 0, 0, 1, 0]), fill)[..., 0]
  np.testing.assert_array_equal(out[0], [2, 3, 4, 99])
  np.testing.assert_array_equal(ra.affine(image, ra._shear_x(0.0), fill), image)


def test_ops_agree_with_pil():
  """The ops on random uint8 images against Pillow's, as timm calls them (bilinear for the
  geometric ones, which timm runs bicubic): the pixel ops exactly, the geometric ones up to
  rounding of PIL's fixed-point bilinear weights."""
  pil = pytest.importorskip('PIL.Image')
  from PIL import ImageEnhance, ImageOps
  rng = np.random.default_rng(0)
  arr = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
  img = pil.fromarray(arr)
  x = jnp.asarray(arr, jnp.float32)
  fill = (120, 110, 100)
  same = {
      'autocontrast': (ImageOps.autocontrast(img), ra.auto_contrast(x)),
      'equalize': (ImageOps.equalize(pil.fromarray(rng.integers(0, 256, (32, 32, 3),
                                                                dtype=np.uint8))), None),
      'invert': (ImageOps.invert(img), ra.invert(x)),
      'posterize': (ImageOps.posterize(img, 2), ra.posterize(x, 2)),
      'solarize': (ImageOps.solarize(img, 100), ra.solarize(x, 100)),
      'color': (ImageEnhance.Color(img).enhance(1.7), ra.color(x, 1.7)),
      'contrast': (ImageEnhance.Contrast(img).enhance(0.4), ra.contrast(x, 0.4)),
      'brightness': (ImageEnhance.Brightness(img).enhance(1.3), ra.brightness(x, 1.3)),
  }
  eq_src = np.asarray(same['equalize'][0])
  for name, (want, got) in same.items():
    if name == 'equalize':
      arr32 = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
      want, got = ImageOps.equalize(pil.fromarray(arr32)), ra.equalize(
          jnp.asarray(arr32, jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
  del eq_src
  for name, data in (('shear', (1, 0.2, 0, 0, 1, 0)), ('translate', (1, 0, 2.5, 0, 1, -1))):
    want = np.asarray(img.transform(img.size, pil.AFFINE, data, resample=pil.BILINEAR,
                                    fillcolor=fill), np.float32)
    got = np.asarray(ra.affine(x, jnp.asarray(data, jnp.float32), jnp.asarray(fill, jnp.float32)))
    assert np.abs(got - want).max() <= 1, name
  want = np.asarray(img.rotate(17.0, resample=pil.BILINEAR, fillcolor=fill), np.float32)
  got = np.asarray(ra.affine(x, ra.rotation_matrix(17.0, 9, 11), jnp.asarray(fill, jnp.float32)))
  assert np.mean(np.abs(got - want) > 1) < 0.05  # the border pixels' in-or-out may differ


# The ops by index, the draws, determinism.


def test_apply_op_dispatches_with_timm_levels():
  x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3)), jnp.float32)
  fill = jnp.array([1.0, 2.0, 3.0])
  one_op = jax.jit(ra.apply_op)  # one compile: the op index is traced
  op = lambda name, m, sign=1.0: one_op(x, ra.OPS.index(name), m, sign, fill)
  np.testing.assert_array_equal(op('Invert', 9.0), ra.invert(x))
  # Level 10: rotate 30 degrees; the sign flips it.
  np.testing.assert_array_equal(op('Rotate', 10.0, -1.0),
                                ra.affine(x, ra.rotation_matrix(-30.0, 8, 8), fill))
  # Level 9: posterize to 4 - int(3.6) = 1 bit, solarize above 256 - int(230.4) = 26, add
  # int(99) = 99, enhance factors 1 +- 0.81, shear 0.27, translate 0.405 of the side.
  np.testing.assert_array_equal(op('PosterizeIncreasing', 9.0), ra.posterize(x, 1))
  np.testing.assert_array_equal(op('SolarizeIncreasing', 9.0), ra.solarize(x, 26))
  np.testing.assert_array_equal(op('SolarizeAdd', 9.0), ra.solarize_add(x, 99))
  np.testing.assert_array_equal(op('ContrastIncreasing', 9.0, -1.0), ra.contrast(x, 1 - 0.81))
  np.testing.assert_array_equal(op('ShearY', 9.0), ra.affine(x, ra._shear_y(0.27), fill))
  np.testing.assert_array_equal(op('TranslateXRel', 9.0),
                                ra.affine(x, ra._translate(0.405 * 8, 0.0), fill))


def test_draws_follow_timm():
  p = ra.draw_params(KEY, 4096, 2, magnitude=9.0, magnitude_std=0.4, prob=0.5)
  assert p.op.shape == (4096, 2) and int(p.op.min()) == 0 and int(p.op.max()) == 14
  assert abs(float(p.apply.mean()) - 0.5) < 0.02
  assert abs(float(p.magnitude.mean()) - 9.0) < 0.02 and abs(float(p.magnitude.std()) - 0.4) < 0.02
  assert float(p.magnitude.max()) <= 10.0
  assert set(np.unique(np.asarray(p.sign)).tolist()) == {-1.0, 1.0}
  uniform = ra.draw_params(KEY, 4096, 1, magnitude=9.0, magnitude_std=float('inf'), prob=1.0)
  assert 0 <= float(uniform.magnitude.min()) and float(uniform.magnitude.max()) <= 9.0
  assert bool(uniform.apply.all())


def test_rand_augment_is_the_drawn_ops_and_deterministic_by_key():
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (6, 8, 8, 1)), jnp.float32)
  kwargs = dict(num_layers=2, magnitude=9.0, magnitude_std=0.4, prob=0.5, fill=(1.0,))
  fn = jax.jit(functools.partial(ra.rand_augment, **kwargs))
  out = fn(KEY, images)
  np.testing.assert_array_equal(fn(KEY, images), out)
  assert not np.array_equal(fn(jax.random.PRNGKey(1), images), out)
  p = ra.draw_params(KEY, 6, 2, 9.0, 0.4, 0.5)
  one_op = jax.jit(ra.apply_op)
  for b in range(6):
    want = images[b]
    for i in range(2):
      if p.apply[b, i]:
        want = one_op(want, p.op[b, i], p.magnitude[b, i], p.sign[b, i], jnp.array([1.0]))
    np.testing.assert_array_equal(out[b], want)
  assert bool(jnp.all(out == jnp.round(out))) and 0 <= float(out.min()) <= float(out.max()) <= 255
  none = ra.apply_params(images, p._replace(apply=jnp.zeros_like(p.apply)), 1.0)
  np.testing.assert_array_equal(none, images)


# Random erasing.


def test_random_erasing_sets_one_box_to_zero():
  images = jnp.ones((64, 16, 16, 3))
  out = np.asarray(ra.random_erasing(KEY, images, 1.0))
  boxes = ra.draw_erasing(KEY, 64, 16, 16, 1.0)
  for b in range(64):
    zero = (out[b] == 0).all(-1)
    assert (out[b][~zero] == 1).all()
    if not boxes.erase[b]:
      assert not zero.any()
      continue
    top, left, h, w = (int(a[b]) for a in boxes[1:])
    want = np.zeros((16, 16), bool)
    want[top:top + h, left:left + w] = True
    np.testing.assert_array_equal(zero, want)
    assert 0 < h < 16 and 0 < w < 16 and 0.3 / 3.4 < h / w < 3.4 / 0.3
  assert int(boxes.erase.sum()) >= 60  # nearly every image finds a box that fits
  areas = np.asarray(boxes.height * boxes.width)[np.asarray(boxes.erase)] / 256
  assert areas.min() > 0.005 and areas.max() < 0.45


def test_random_erasing_probability_and_key():
  images = jnp.ones((256, 8, 8, 1))
  np.testing.assert_array_equal(ra.random_erasing(KEY, images, 0.0), images)
  out = ra.random_erasing(KEY, images, 0.25)
  erased = np.asarray((out == 0).any(axis=(1, 2, 3)))
  assert 0.15 < erased.mean() < 0.35
  np.testing.assert_array_equal(ra.random_erasing(KEY, images, 0.25), out)
  assert not np.array_equal(ra.random_erasing(jax.random.PRNGKey(5), images, 0.25), out)


# Wiring into augment_batch.


def _data_config(**data):
  config = default.get_config()
  config.data.mixup_alpha = 0.0
  config.data.update(data)
  return config


BATCH = {'image': jnp.asarray(np.random.default_rng(3).integers(0, 256, (4, 8, 8, 1)),
                              jnp.uint8), 'label': jnp.arange(4)}
MEAN, STD = np.array([120.0]), np.array([60.0])


def _augment(config, key=KEY):
  fn = jax.jit(functools.partial(augment.augment_batch, config=config, mean=MEAN, std=STD,
                                 num_classes=4, train=True, epoch=0))
  return fn(key, BATCH)[0]


def test_augment_batch_off_by_default_and_unchanged_for_old_configs():
  """Off, the draws of crop and flip are those of a config without the new keys."""
  old = _data_config()
  for key in ('randaugment_num_layers', 'randaugment_magnitude', 'randaugment_magnitude_std',
              'randaugment_prob', 'random_erasing_prob'):
    del old.data[key]
  np.testing.assert_array_equal(_augment(_data_config()), _augment(old))


def test_augment_batch_runs_randaugment_and_erasing_by_key():
  config = _data_config(randaugment_num_layers=1, randaugment_prob=1.0, random_erasing_prob=1.0,
                        crop_padding=0, hflip=False)
  out = _augment(config)
  np.testing.assert_array_equal(_augment(config), out)
  base = augment.normalize(BATCH['image'].astype(jnp.float32), MEAN, STD)
  assert not np.array_equal(out, base)
  # What augment_batch does, step by step, with the keys it folds out of the step's key.
  k_rand, k_erase = jax.random.split(jax.random.fold_in(KEY, 1))
  params = ra.draw_params(k_rand, 4, 1, magnitude=9.0, magnitude_std=0.4, prob=1.0)
  one_op = jax.jit(ra.apply_op)
  want = jnp.stack([one_op(BATCH['image'][b].astype(jnp.float32), params.op[b, 0],
                           params.magnitude[b, 0], params.sign[b, 0], jnp.round(MEAN))
                    for b in range(4)])
  want = ra.random_erasing(k_erase, augment.normalize(want, MEAN, STD), 1.0)
  np.testing.assert_allclose(out, want, atol=1e-6)
  assert isinstance(config.data, ml_collections.ConfigDict)
