"""RandAugment and random erasing on the device in JAX, as the official Spikformer, SDT and QKFormer
CIFAR recipes use them through timm (`rand-m9-n1-mstd0.4-inc1`, `reprob 0.25, remode const`).

Every function takes an explicit PRNG key and keeps shapes static, like `augment.py`. Images
are float32 in pixel units, whole numbers in [0, 255] (what the host's uint8 batch holds), and
each op returns whole numbers in [0, 255] with PIL's rounding, so ops compose as on uint8
images. Geometric ops sample bilinearly (timm uses the recipe's bicubic) [ours: documented in
docs/training.md].
"""
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

# timm's `_RAND_INCREASING_TRANSFORMS`, in its order (the op index of `RandAugmentParams`).
OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
       'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
       'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
       'TranslateYRel')
MAX_LEVEL = 10.0           # timm's _LEVEL_DENOM: magnitudes are clipped to [0, 10]
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE_PCT = 0.45   # timm's default hparams['translate_pct']
MAX_SOLARIZE_ADD = 110
MAX_ENHANCE = 0.9          # enhance factors 1 +- 0.9 * m / 10


def _whole(x: jax.Array) -> jax.Array:
  """Truncation to a whole pixel value in [0, 255], as PIL stores a float result in uint8."""
  return jnp.clip(jnp.floor(x), 0.0, 255.0)


def _blend(degenerate: jax.Array, image: jax.Array, factor) -> jax.Array:
  """PIL's ImageEnhance: degenerate + factor * (image - degenerate), truncated to uint8."""
  return _whole(degenerate + factor * (image - degenerate))


def grayscale(image: jax.Array) -> jax.Array:
  """PIL's convert('L') of an (H, W, 3) image, (299 R + 587 G + 114 B) / 1000 rounded in
  fixed point; (H, W, 1) images are already gray. Returns (H, W, 1)."""
  if image.shape[-1] == 1:
    return image
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  weighted = r * 19595 + g * 38470 + b * 7471 + 0x8000
  return jnp.floor(weighted / 65536)[..., None]


def auto_contrast(image: jax.Array) -> jax.Array:
  """Per channel, stretch [min, max] to [0, 255] (PIL's autocontrast, cutoff 0): the lookup
  int(v * 255 / (max - min) - min * 255 / (max - min)); a constant channel is left alone."""
  lo = jnp.min(image, axis=(0, 1), keepdims=True)
  hi = jnp.max(image, axis=(0, 1), keepdims=True)
  scale = 255.0 / jnp.maximum(hi - lo, 1.0)
  return jnp.where(hi > lo, _whole(image * scale - lo * scale), image)


def _equalize_channel(channel: jax.Array) -> jax.Array:
  """PIL's equalize of one (H, W) channel: step = (pixels - count of the top value) // 255;
  value v -> (step // 2 + pixels below v) // step, clipped to 255; identity if step is 0 or
  the channel holds one value."""
  values = channel.astype(jnp.int32)
  hist = jnp.bincount(values.ravel(), length=256)
  top_count = hist[jnp.max(values)]
  step = (values.size - top_count) // 255
  below = jnp.cumsum(hist) - hist
  safe = jnp.maximum(step, 1)
  lut = jnp.minimum((step // 2 + below) // safe, 255)
  keep = (step == 0) | (jnp.sum(hist > 0) <= 1)
  return jnp.where(keep, channel, lut[values].astype(channel.dtype))


def equalize(image: jax.Array) -> jax.Array:
  """Histogram equalisation of each channel (PIL's ImageOps.equalize)."""
  return jnp.stack([_equalize_channel(image[..., c]) for c in range(image.shape[-1])], -1)


def invert(image: jax.Array) -> jax.Array:
  return 255.0 - image


def posterize(image: jax.Array, bits) -> jax.Array:
  """Keep the top `bits` bits of every value (0 bits: black)."""
  unit = 2.0 ** (8 - bits)
  return jnp.floor(image / unit) * unit


def solarize(image: jax.Array, threshold) -> jax.Array:
  """Invert the values >= threshold."""
  return jnp.where(image >= threshold, 255.0 - image, image)


def solarize_add(image: jax.Array, addition, threshold=128) -> jax.Array:
  """Add `addition` to the values below threshold, clipped at 255."""
  return jnp.where(image < threshold, jnp.minimum(image + addition, 255.0), image)


def color(image: jax.Array, factor) -> jax.Array:
  """Saturation: blend with the grayscale image (identity on one-channel images)."""
  return _blend(jnp.broadcast_to(grayscale(image), image.shape), image, factor)


def contrast(image: jax.Array, factor) -> jax.Array:
  """Blend with the mean gray level, rounded to a whole value (PIL's ImageEnhance.Contrast)."""
  mean = jnp.floor(jnp.mean(grayscale(image)) + 0.5)
  return _blend(jnp.full(image.shape, mean), image, factor)


def brightness(image: jax.Array, factor) -> jax.Array:
  """Blend with black."""
  return _blend(jnp.zeros_like(image), image, factor)


def sharpness(image: jax.Array, factor) -> jax.Array:
  """Blend with PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded) of the
  image, whose border pixels are the image's own."""
  h, w, _ = image.shape
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
  total = sum(padded[i:i + h, j:j + w] for i in range(3) for j in range(3)) + 4 * image
  smooth = jnp.floor((total + 6.0) / 13.0)  # PIL rounds the filtered value
  interior = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
  return _blend(jnp.where(interior, smooth, image), image, factor)


def affine(image: jax.Array, matrix: jax.Array, fill: jax.Array) -> jax.Array:
  """PIL's Image.transform(AFFINE, (a, b, c, d, e, f)) with bilinear sampling.

  The output pixel whose centre is (x, y) (x along the width, centres at index + 0.5) takes
  the input at (u, v) = (a x + b y + c, d x + e y + f): `fill` (C,) if (u, v) lies outside the
  image, else the bilinear mix of the four nearest pixel centres, clamped at the border.
  """
  h, w, _ = image.shape
  a, b, c, d, e, f = (matrix[i] for i in range(6))
  ys, xs = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5, indexing='ij')
  u = a * xs + b * ys + c
  v = d * xs + e * ys + f
  inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
  x0, y0 = jnp.floor(u - 0.5), jnp.floor(v - 0.5)
  fx, fy = u - 0.5 - x0, v - 0.5 - y0
  out = 0.0
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      yy = jnp.clip(y0 + dy, 0, h - 1).astype(jnp.int32)
      xx = jnp.clip(x0 + dx, 0, w - 1).astype(jnp.int32)
      out = out + (wy * wx)[..., None] * image[yy, xx]
  # Whole pixel values as PIL's uint8 result (halves round up); the weights sum to 1.
  return jnp.where(inside[..., None], jnp.clip(jnp.floor(out + 0.5), 0.0, 255.0), fill)


def rotation_matrix(degrees, height: int, width: int) -> jax.Array:
  """The affine data of PIL's Image.rotate(degrees) (counter-clockwise, about the centre)."""
  angle = -jnp.deg2rad(degrees)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cx, cy = width / 2.0, height / 2.0
  return jnp.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])


def _shear_x(factor):
  return jnp.stack([1.0, factor, 0.0, 0.0, 1.0, 0.0])


def _shear_y(factor):
  return jnp.stack([1.0, 0.0, 0.0, factor, 1.0, 0.0])


def _translate(dx, dy):
  return jnp.stack([1.0, 0.0, dx, 0.0, 1.0, dy])


def apply_op(image: jax.Array, op, magnitude, sign, fill: jax.Array) -> jax.Array:
  """One RandAugment op (index into `OPS`) at `magnitude` in [0, 10], timm's 'increasing'
  levels: a `sign` of -1 negates the signed ones (rotate, enhance, shear, translate).

  Args:
    image: (H, W, C) whole pixel values.
    op: int index into OPS (may be traced).
    magnitude: level in [0, 10].
    sign: +1 or -1.
    fill: (C,) value of the pixels that geometric ops bring in (the recipe's mean colour).
  """
  h, w, _ = image.shape
  level = magnitude / MAX_LEVEL
  enhance = 1.0 + sign * level * MAX_ENHANCE
  geometric = lambda m: affine(image, m, fill)
  branches = [
      lambda: auto_contrast(image),
      lambda: equalize(image),
      lambda: invert(image),
      lambda: geometric(rotation_matrix(sign * level * MAX_ROTATE_DEGREES, h, w)),
      lambda: posterize(image, 4 - jnp.floor(level * 4)),
      lambda: solarize(image, 256 - jnp.floor(level * 256)),
      lambda: solarize_add(image, jnp.floor(level * MAX_SOLARIZE_ADD)),
      lambda: color(image, enhance),
      lambda: contrast(image, enhance),
      lambda: brightness(image, enhance),
      lambda: sharpness(image, enhance),
      lambda: geometric(_shear_x(sign * level * MAX_SHEAR)),
      lambda: geometric(_shear_y(sign * level * MAX_SHEAR)),
      lambda: geometric(_translate(sign * level * MAX_TRANSLATE_PCT * w, 0.0)),
      lambda: geometric(_translate(0.0, sign * level * MAX_TRANSLATE_PCT * h)),
  ]
  assert len(branches) == len(OPS)
  return jax.lax.switch(op, branches)


class RandAugmentParams(NamedTuple):
  """What RandAugment draws for a batch: per image and layer (B, n) the op index, whether it
  is applied, its magnitude and its sign."""
  op: jax.Array
  apply: jax.Array
  magnitude: jax.Array
  sign: jax.Array


def draw_params(key: jax.Array, batch: int, num_layers: int, magnitude: float,
                magnitude_std: float, prob: float) -> RandAugmentParams:
  """timm's draws: ops uniformly with replacement, each applied with probability `prob`, its
  magnitude N(magnitude, magnitude_std) clipped to [0, 10] (uniform on [0, magnitude] for an
  infinite std), its sign +-1 evenly."""
  k_op, k_apply, k_mag, k_sign = jax.random.split(key, 4)
  shape = (batch, num_layers)
  op = jax.random.randint(k_op, shape, 0, len(OPS))
  apply = jax.random.bernoulli(k_apply, prob, shape)
  if math.isinf(magnitude_std):
    level = jax.random.uniform(k_mag, shape, maxval=magnitude)
  else:
    level = magnitude + magnitude_std * jax.random.normal(k_mag, shape)
  level = jnp.clip(level, 0.0, MAX_LEVEL)
  sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, shape), -1.0, 1.0)
  return RandAugmentParams(op, apply, level, sign)


def apply_params(images: jax.Array, params: RandAugmentParams, fill) -> jax.Array:
  """The drawn ops applied in layer order to each image (B, H, W, C)."""
  fill = jnp.broadcast_to(jnp.asarray(fill, jnp.float32), images.shape[-1:])

  def one(image, op, apply, magnitude, sign):
    for i in range(op.shape[0]):
      out = apply_op(image, op[i], magnitude[i], sign[i], fill)
      image = jnp.where(apply[i], out, image)
    return image

  return jax.vmap(one)(images, *params)


def rand_augment(key: jax.Array, images: jax.Array, *, num_layers: int, magnitude: float,
                 magnitude_std: float, prob: float, fill) -> jax.Array:
  """RandAugment (timm's rand-m{magnitude}-n{num_layers}-mstd{magnitude_std}-inc1).

  Args:
    key: PRNG key.
    images: (B, H, W, C) float32 whole pixel values in [0, 255].
    num_layers: ops per image.
    magnitude: mean level (timm's m, out of 10).
    magnitude_std: its standard deviation (timm's mstd).
    prob: probability that each drawn op is applied (timm: 0.5).
    fill: (C,) pixel value that geometric ops bring in (timm: the dataset mean, rounded).

  Returns:
    (B, H, W, C) float32 whole pixel values.
  """
  chex.assert_rank(images, 4)
  params = draw_params(key, images.shape[0], num_layers, magnitude, magnitude_std, prob)
  return apply_params(images, params, fill)


class ErasingBoxes(NamedTuple):
  """Per image (B,): whether it is erased and the box (top, left, height, width)."""
  erase: jax.Array
  top: jax.Array
  left: jax.Array
  height: jax.Array
  width: jax.Array


def draw_erasing(key: jax.Array, batch: int, height: int, width: int, prob: float,
                 area=(0.02, 1 / 3), log_aspect=(math.log(0.3), math.log(1 / 0.3)),
                 attempts: int = 10) -> ErasingBoxes:
  """timm's RandomErasing draws: with probability `prob` an image gets the first of
  `attempts` boxes that fits (area fraction uniform in `area`, log aspect uniform in
  `log_aspect`, sides rounded, both strictly smaller than the image's), at a uniform position;
  none fitting means no erasing."""
  k_apply, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
  shape = (batch, attempts)
  target = jax.random.uniform(k_area, shape, minval=area[0], maxval=area[1]) * height * width
  aspect = jnp.exp(jax.random.uniform(k_aspect, shape, minval=log_aspect[0],
                                      maxval=log_aspect[1]))
  box_h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
  box_w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (box_h < height) & (box_w < width)
  first = jnp.argmax(fits, axis=1)
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
  box_h, box_w = pick(box_h), pick(box_w)
  top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - box_h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - box_w + 1)).astype(jnp.int32)
  erase = jax.random.bernoulli(k_apply, prob, (batch,)) & jnp.any(fits, axis=1)
  return ErasingBoxes(erase, top, left, box_h, box_w)


def random_erasing(key: jax.Array, images: jax.Array, prob: float, value: float = 0.0
                   ) -> jax.Array:
  """Random erasing (timm's mode 'const', one box): the box set to `value`, 0 in the
  normalised images it runs on (the mean colour).

  Args:
    key: PRNG key.
    images: (B, H, W, C) normalised images.
    prob: probability that an image is erased.
    value: what the box is set to.

  Returns:
    (B, H, W, C), the same dtype.
  """
  chex.assert_rank(images, 4)
  b, h, w, _ = images.shape
  boxes = draw_erasing(key, b, h, w, prob)
  rows = jnp.arange(h)[None, :]
  cols = jnp.arange(w)[None, :]
  in_rows = (rows >= boxes.top[:, None]) & (rows < (boxes.top + boxes.height)[:, None])
  in_cols = (cols >= boxes.left[:, None]) & (cols < (boxes.left + boxes.width)[:, None])
  inside = in_rows[:, :, None] & in_cols[:, None, :] & boxes.erase[:, None, None]
  return jnp.where(inside[..., None], jnp.asarray(value, images.dtype), images)
