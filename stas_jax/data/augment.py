"""On-device data augmentation in pure JAX: crops, flips, RandAugment and random erasing
(`randaugment.py`), mixup / cutmix and label smoothing.

Every function takes an explicit PRNG key and keeps shapes static, so it runs inside the jitted
train step and a run's augmentation is reproducible and resumable from the step's key (spec 8).
"""
from typing import Any
from collections.abc import Mapping

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stas_jax.data import randaugment


def normalize(images: jax.Array, mean: Any, std: Any) -> jax.Array:
  """Per-channel normalisation.

  Args:
    images: (B, H, W, C) pixels, uint8 or float, in the same units as `mean` and `std`.
    mean: (C,) channel means.
    std: (C,) channel standard deviations.

  Returns:
    (B, H, W, C) float32 `(images - mean) / std`.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  chex.assert_shape([mean, std], (images.shape[-1],))
  return (images.astype(jnp.float32) - mean) / std


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """Label-smoothed one-hot targets: 1 - s + s/K on the true class, s/K elsewhere.

  Args:
    labels: (B,) integer class indices.
    num_classes: K.
    smoothing: s in [0, 1).

  Returns:
    (B, K) float32 targets; every row sums to 1.
  """
  chex.assert_rank(labels, 1)
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return one_hot * (1.0 - smoothing) + smoothing / num_classes


def crop_offsets(key: jax.Array, batch_size: int, padding: int) -> jax.Array:
  """The (B, 2) top-left (row, column) offsets `random_crop_with_padding` uses for `key`."""
  keys = jax.random.split(key, batch_size)
  return jax.vmap(lambda k: jax.random.randint(k, (2,), 0, 2 * padding + 1))(keys)


def random_crop_with_padding(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
  """Zero-pads every side by `padding`, then crops each example back to H x W at random.

  Args:
    key: PRNG key.
    images: (B, H, W, C).
    padding: pixels added on each side (static); 0 returns `images` unchanged.

  Returns:
    (B, H, W, C), same dtype; the crop of example i starts at `crop_offsets(key, B, padding)[i]`
    of the padded image.
  """
  chex.assert_rank(images, 4)
  if padding == 0:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = crop_offsets(key, b, padding)
  crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def random_hflip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Mirrors each example left-right with probability 1/2.

  Args:
    key: PRNG key.
    images: (B, H, W, C).

  Returns:
    (B, H, W, C), same dtype.
  """
  chex.assert_rank(images, 4)
  keys = jax.random.split(key, images.shape[0])
  flip = jax.vmap(jax.random.bernoulli)(keys)
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def _resized_crop_one(key, image, out_size, scale, ratio):
  """One example of `random_resized_crop`: (H, W, C) -> (out_size, out_size, C) float32."""
  h, w, c = image.shape
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = h * w * jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (), minval=np.log(ratio[0]),
                                      maxval=np.log(ratio[1])))
  # torchvision retries until the box fits; clipping instead keeps one static-shaped draw.
  crop_h = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, h).astype(jnp.int32)
  crop_w = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, w).astype(jnp.int32)
  top = jax.random.randint(k_y, (), 0, h - crop_h + 1)
  left = jax.random.randint(k_x, (), 0, w - crop_w + 1)
  scales = out_size / jnp.stack([crop_h, crop_w]).astype(jnp.float32)
  translation = -jnp.stack([top, left]).astype(jnp.float32) * scales
  return jax.image.scale_and_translate(image.astype(jnp.float32), (out_size, out_size, c),
                                       (0, 1), scales, translation, method='linear',
                                       antialias=True)


def random_resized_crop(key: jax.Array, images: jax.Array, out_size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
  """Inception-style crop: a random box of random area and aspect, resized to out_size.

  The box covers `scale` of the image area with log-uniform aspect `ratio` (w / h); its sides
  are clipped to the image (torchvision resamples instead). Bilinear, antialiased resize.

  Args:
    key: PRNG key.
    images: (B, H, W, C).
    out_size: side of the square output (static).
    scale: range of the box area as a fraction of H * W.
    ratio: range of the box aspect ratio.

  Returns:
    (B, out_size, out_size, C) float32.
  """
  chex.assert_rank(images, 4)
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, img: _resized_crop_one(k, img, out_size, scale, ratio))(keys, images)


def _mix_with_lam(images, targets, lam):
  """Mixup of each example with its partner in the flipped batch, weight `lam` on itself."""
  return (lam * images + (1.0 - lam) * images[::-1],
          lam * targets + (1.0 - lam) * targets[::-1])


def _cutmix_with_lam(key, images, targets, lam):
  """Cutmix with a box of area about (1 - lam) * H * W; targets use the box's exact area."""
  _, h, w, _ = images.shape
  cut = jnp.sqrt(1.0 - lam)
  cut_h = (h * cut).astype(jnp.int32)
  cut_w = (w * cut).astype(jnp.int32)
  k_y, k_x = jax.random.split(key)
  cy = jax.random.randint(k_y, (), 0, h)
  cx = jax.random.randint(k_x, (), 0, w)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
  rows, cols = jnp.arange(h), jnp.arange(w)
  inside = (((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :])
  mixed = jnp.where(inside[None, :, :, None], images[::-1], images)
  lam_box = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
  return mixed, lam_box * targets + (1.0 - lam_box) * targets[::-1]


def mixup(key: jax.Array, images: jax.Array, targets: jax.Array,
          alpha: float) -> tuple[jax.Array, jax.Array]:
  """Mixup (Zhang et al. 2018) with the reversed batch as partner, as timm does.

  Args:
    key: PRNG key.
    images: (B, H, W, C) float.
    targets: (B, K) one-hot or smoothed targets.
    alpha: Beta(alpha, alpha) parameter of the batch-level weight lam.

  Returns:
    `lam * x + (1 - lam) * x[::-1]` for both images and targets.
  """
  chex.assert_rank([images, targets], [4, 2])
  return _mix_with_lam(images, targets, jax.random.beta(key, alpha, alpha))


def cutmix(key: jax.Array, images: jax.Array, targets: jax.Array,
           alpha: float) -> tuple[jax.Array, jax.Array]:
  """CutMix (Yun et al. 2019): paste a box from the reversed batch, as timm does.

  lam ~ Beta(alpha, alpha) sets the box size; the box is clipped at the border, and the targets
  are weighted by the fraction of pixels actually kept, not by the drawn lam.

  Args:
    key: PRNG key.
    images: (B, H, W, C).
    targets: (B, K) one-hot or smoothed targets.
    alpha: Beta parameter.

  Returns:
    (images, targets) after cutmix.
  """
  chex.assert_rank([images, targets], [4, 2])
  k_lam, k_box = jax.random.split(key)
  return _cutmix_with_lam(k_box, images, targets, jax.random.beta(k_lam, alpha, alpha))


def _mixup_or_cutmix(key, images, targets, mixup_alpha, cutmix_alpha, active):
  """timm's Mixup: one of mixup / cutmix per batch (even odds when both are on).

  `active` is a traced bool; lam = 1 makes both an exact identity, so switching off needs no
  recompilation.
  """
  k_mix, k_cut, k_box, k_switch = jax.random.split(key, 4)
  if mixup_alpha > 0:
    lam = jnp.where(active, jax.random.beta(k_mix, mixup_alpha, mixup_alpha), 1.0)
    mixed = _mix_with_lam(images, targets, lam)
  if cutmix_alpha > 0:
    lam = jnp.where(active, jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha), 1.0)
    cut = _cutmix_with_lam(k_box, images, targets, lam)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cut = jax.random.bernoulli(k_switch)
    return jax.tree.map(lambda c, m: jnp.where(use_cut, c, m), cut, mixed)
  return cut if cutmix_alpha > 0 else mixed


def augment_batch(key: jax.Array, batch: Mapping[str, jax.Array],
                  config: ml_collections.ConfigDict, *, epoch: Any, mean: Any, std: Any,
                  num_classes: int, train: bool) -> tuple[jax.Array, jax.Array]:
  """Turns a host batch into model inputs and soft targets, as `config.data` says.

  Train: random-resized-crop to `config.model.image_size` if `data.random_resized_crop`, else
  pad-and-crop by `data.crop_padding`; then hflip if `data.hflip`; RandAugment if
  `data.randaugment_num_layers` > 0 (`data.randaugment_magnitude`, `_magnitude_std`, `_prob`;
  geometric ops fill with the mean colour); normalise; random erasing with probability
  `data.random_erasing_prob` (the box set to 0, the mean colour); label smoothing
  `data.label_smoothing`; then mixup (`data.mixup_alpha`) and / or cutmix (`data.cutmix_alpha`)
  while `epoch < data.mixup_off_epoch`. Eval: normalise and one-hot only. Configs without the
  RandAugment and erasing keys (older runs) have both off.

  Bind `config`, `num_classes` and `train` with functools.partial before jax.jit; `epoch` is
  traced, so switching mixup off does not recompile.

  Args:
    key: PRNG key of this step (unused when `train` is False).
    batch: {'image': (B, H, W, C) uint8 or float pixels, 'label': (B,) int}.
    config: the experiment config (reads `config.data` and `config.model.image_size`).
    epoch: scalar, the current (possibly fractional) epoch.
    mean: (C,) normalisation means, in pixel units.
    std: (C,) normalisation stds, in pixel units.
    num_classes: K.
    train: whether to augment.

  Returns:
    images (B, H', W', C) float32 normalised, targets (B, K) float32 whose rows sum to 1.
  """
  images, labels = batch['image'], batch['label']
  chex.assert_rank([images, labels], [4, 1])
  if not train:
    return normalize(images, mean, std), jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  data = config.data
  k_crop, k_flip, k_mix = jax.random.split(key, 3)
  x = images.astype(jnp.float32)
  if data.random_resized_crop:
    x = random_resized_crop(k_crop, x, config.model.image_size)
  else:
    x = random_crop_with_padding(k_crop, x, data.crop_padding)
  if data.hflip:
    x = random_hflip(k_flip, x)
  # Keys of their own, folded out of the step's key, so that the crop, flip and mixup draws
  # stay what they were before these two existed.
  k_rand, k_erase = jax.random.split(jax.random.fold_in(key, 1))
  if data.get('randaugment_num_layers', 0) > 0:
    x = randaugment.rand_augment(
        k_rand, x, num_layers=data.randaugment_num_layers, magnitude=data.randaugment_magnitude,
        magnitude_std=data.randaugment_magnitude_std, prob=data.randaugment_prob,
        fill=jnp.round(jnp.asarray(mean, jnp.float32)))
  x = normalize(x, mean, std)
  if data.get('random_erasing_prob', 0.0) > 0:
    x = randaugment.random_erasing(k_erase, x, data.random_erasing_prob)
  targets = smooth_labels(labels, num_classes, data.label_smoothing)
  if data.mixup_alpha > 0 or data.cutmix_alpha > 0:
    x, targets = _mixup_or_cutmix(k_mix, x, targets, data.mixup_alpha, data.cutmix_alpha,
                                  jnp.asarray(epoch) < data.mixup_off_epoch)
  return x, targets
