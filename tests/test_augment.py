"""Tests for stas_jax.data.augment: each augmentation on a hand-checkable case, jit, retracing."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from stas_jax.data import augment

KEY = jax.random.key(0)


def _ramp_images(b=4, h=6, w=6, c=3):
  """Distinct, asymmetric float images: pixel value = 1 + its flat index."""
  return jnp.arange(1, b * h * w * c + 1, dtype=jnp.float32).reshape(b, h, w, c)


def _constant_images(b=4, h=8, w=8):
  """Example i is constant i + 1, so every pixel says which example it came from."""
  return jnp.broadcast_to(jnp.arange(1.0, b + 1.0)[:, None, None, None], (b, h, w, 1))


def test_normalize():
  images = jnp.array([[[[0, 128, 255]]]], jnp.uint8)
  out = augment.normalize(images, [0.0, 128.0, 127.5], [1.0, 2.0, 127.5])
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out[0, 0, 0], [0.0, 0.0, 1.0])


def test_smooth_labels():
  targets = augment.smooth_labels(jnp.array([2, 0]), 5, 0.1)
  expected = np.full((2, 5), 0.1 / 5)
  expected[0, 2] = expected[1, 0] = 1 - 0.1 + 0.1 / 5
  np.testing.assert_allclose(targets, expected, rtol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_random_crop_with_padding_matches_numpy_slice():
  images, p = _ramp_images(), 2
  out = augment.random_crop_with_padding(KEY, images, p)
  offsets = np.asarray(augment.crop_offsets(KEY, 4, p))
  assert offsets.min() >= 0 and offsets.max() <= 2 * p
  padded = np.pad(np.asarray(images), ((0, 0), (p, p), (p, p), (0, 0)))
  for i, (dy, dx) in enumerate(offsets):
    np.testing.assert_array_equal(out[i], padded[i, dy:dy + 6, dx:dx + 6])
  np.testing.assert_array_equal(out, augment.random_crop_with_padding(KEY, images, p))
  assert augment.random_crop_with_padding(KEY, images, 0) is images


def test_random_hflip_flips_some_and_keeps_others():
  images = _ramp_images(b=16)
  out = np.asarray(augment.random_hflip(KEY, images))
  flipped = [np.array_equal(o, np.asarray(x)[:, ::-1]) for o, x in zip(out, images)]
  kept = [np.array_equal(o, np.asarray(x)) for o, x in zip(out, images)]
  assert all(f != k for f, k in zip(flipped, kept))  # asymmetric: exactly one holds
  assert 0 < sum(flipped) < 16
  np.testing.assert_array_equal(out, augment.random_hflip(KEY, images))


def test_random_resized_crop():
  rrc = jax.jit(augment.random_resized_crop, static_argnums=(2, 3, 4))
  images = _ramp_images(b=3, h=8, w=8, c=1)
  full = rrc(KEY, images, 8, (1.0, 1.0), (1.0, 1.0))
  np.testing.assert_allclose(full, images, rtol=1e-5)
  # A quarter of the area at aspect 1 is a 4x4 box; at out_size 4 the crop is an exact slice.
  quarter = np.asarray(rrc(KEY, images, 4, (0.25, 0.25), (1.0, 1.0)))
  for i in range(3):
    windows = [np.asarray(images[i, y:y + 4, x:x + 4]) for y in range(5) for x in range(5)]
    assert any(np.allclose(quarter[i], win, rtol=1e-5) for win in windows)
  out = rrc(KEY, images, 5, (0.08, 1.0), (3 / 4, 4 / 3))
  assert out.shape == (3, 5, 5, 1) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, rrc(KEY, images, 5, (0.08, 1.0), (3 / 4, 4 / 3)))


def test_mixup_is_convex_combination_of_reversed_pairs():
  images, labels = _ramp_images(), jnp.arange(4)
  targets = jax.nn.one_hot(labels, 4)
  mixed, mixed_targets = augment.mixup(KEY, images, targets, alpha=0.5)
  np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
  lam = float(mixed_targets[0, 0])
  assert 0.0 < lam < 1.0
  np.testing.assert_allclose(mixed_targets[0, 3], 1 - lam, rtol=1e-6)
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5)


def test_cutmix_target_weight_equals_kept_area():
  images = _constant_images()
  targets = jax.nn.one_hot(jnp.arange(4), 4)
  cut_any = False
  for seed in range(5):
    mixed, mixed_targets = augment.cutmix(jax.random.key(seed), images, targets, alpha=1.0)
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
    for i in range(4):
      partner = 4 - i  # the reversed batch's constant
      from_partner = np.mean(np.asarray(mixed[i]) == partner)
      assert np.all((np.asarray(mixed[i]) == i + 1) | (np.asarray(mixed[i]) == partner))
      np.testing.assert_allclose(mixed_targets[i, 3 - i], from_partner, atol=1e-6)
      np.testing.assert_allclose(mixed_targets[i, i], 1 - from_partner, atol=1e-6)
      cut_any |= 0 < from_partner < 1
  assert cut_any


def _config(**data):
  config = default.get_config()
  config.data.update(data)
  return config


@pytest.fixture(scope='module')
def batch():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)), jnp.uint8)
  return {'image': images, 'label': jnp.array([0, 1, 2, 3], jnp.int32)}


MEAN, STD = np.array([120.0, 110.0, 100.0]), np.array([60.0, 50.0, 40.0])


def test_augment_batch_eval_is_normalise_and_one_hot(batch):
  images, targets = augment.augment_batch(KEY, batch, _config(), epoch=0, mean=MEAN, std=STD,
                                          num_classes=10, train=False)
  np.testing.assert_allclose(images, (np.asarray(batch['image'], np.float32) - MEAN) / STD,
                             rtol=1e-6)
  np.testing.assert_array_equal(targets, jax.nn.one_hot(batch['label'], 10))


def test_augment_batch_jit_switches_mixup_off_without_retrace(batch):
  config = _config(mixup_alpha=0.5, cutmix_alpha=1.0, mixup_off_epoch=5, label_smoothing=0.1)
  traces = []

  def fn(key, batch, epoch):
    traces.append(1)
    return augment.augment_batch(key, batch, config, epoch=epoch, mean=MEAN, std=STD,
                                 num_classes=10, train=True)

  jitted = jax.jit(fn)
  images, targets = jitted(KEY, batch, jnp.float32(0))
  assert images.shape == (4, 8, 8, 3) and targets.shape == (4, 10)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  smoothed = augment.smooth_labels(batch['label'], 10, 0.1)
  mixed_any = False
  for seed in range(4):
    _, t = jitted(jax.random.key(seed), batch, jnp.float32(1))
    mixed_any |= not np.allclose(t, smoothed)
  assert mixed_any
  _, late = jitted(KEY, batch, jnp.float32(7))
  np.testing.assert_allclose(late, smoothed, rtol=1e-6)  # mixup and cutmix off
  assert len(traces) == 1
  again = jitted(KEY, batch, jnp.float32(0))
  np.testing.assert_array_equal(again[0], images)  # same key, same output


def test_augment_batch_random_resized_crop(batch):
  config = _config(random_resized_crop=True, mixup_alpha=0.0, label_smoothing=0.0)
  config.model.image_size = 6
  fn = functools.partial(augment.augment_batch, config=config, mean=MEAN, std=STD,
                         num_classes=10, train=True)
  images, targets = jax.jit(fn)(KEY, batch, epoch=0)
  assert images.shape == (4, 6, 6, 3)
  np.testing.assert_array_equal(targets, jax.nn.one_hot(batch['label'], 10))
