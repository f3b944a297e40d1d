"""The 'npz' dataset of the pipeline: your own images from one .npz file, read without
unpickling and checked against config.model, with error messages that say what to change."""
import os
import zipfile
import zlib

from absl import logging
import ml_collections
import numpy as np

from stas_jax.data.errors import InvalidDatasetError

NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')
NPZ_FORMAT = ('one .npz file with uint8 images x_train, x_test of shape (N, H, W) or '
              '(N, H, W, C) and integer class indices y_train, y_test of shape (N,), '
              'e.g. np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)')


def channel_mean_std(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(C,) float32 mean and std over all pixels of (N, H, W, C) images, accumulated in float64."""
  mean = images.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
  std = images.std(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
  return mean, std


def _npz_error(path: str, problem: str) -> InvalidDatasetError:
  return InvalidDatasetError(f"Dataset 'npz' ({path}): {problem}")


# What np.load and reading an entry raise for a file that is not a sound .npz archive.
_NPZ_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays NPZ_KEYS of the .npz file at absolute `path`, read without unpickling.

  Raises:
    InvalidDatasetError: no such file, not an .npz archive, a key missing or unreadable.
  """
  if not os.path.isfile(path):
    raise _npz_error(path, 'no such file; check --config.data.npz_path.')
  try:
    archive = np.load(path, allow_pickle=False)
  except _NPZ_READ_ERRORS as e:  # numpy's own text misleads here (e.g. "pickled data")
    raise _npz_error(path, f'not a valid .npz archive ({type(e).__name__}); expected '
                     f'{NPZ_FORMAT}.') from e
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise _npz_error(path, f'a single .npy array, not an .npz archive; expected {NPZ_FORMAT}.')
  try:
    missing = [k for k in NPZ_KEYS if k not in archive.files]
    if missing:
      raise _npz_error(path, f'missing {", ".join(missing)}; required: {", ".join(NPZ_KEYS)}; '
                       f'found: {", ".join(archive.files) or "nothing"}.')
    arrays = {}
    for key in NPZ_KEYS:
      try:
        arrays[key] = archive[key]
      except _NPZ_READ_ERRORS as e:
        raise _npz_error(path, f'cannot read {key} ({e}); save plain numeric arrays.') from e
    return arrays
  finally:
    archive.close()


def _npz_split(path: str, arrays: dict[str, np.ndarray],
               split: str) -> tuple[np.ndarray, np.ndarray]:
  """Checks one split's arrays; returns (N, H, W, C) uint8 images and (N,) labels, unconverted.

  Raises:
    InvalidDatasetError: wrong dtype or rank, x and y of different lengths, no examples, or a
      negative label.
  """
  x_key, y_key = f'x_{split}', f'y_{split}'
  images, labels = arrays[x_key], arrays[y_key]
  if images.dtype != np.uint8:
    raise _npz_error(path, f'{x_key} has dtype {images.dtype}; images must be uint8 pixels '
                     '0..255 (floats in [0, 1]: np.round(x * 255).astype(np.uint8)).')
  if images.ndim not in (3, 4):
    raise _npz_error(path, f'{x_key} has shape {images.shape}; expected (N, H, W) or '
                     '(N, H, W, C).')
  if not np.issubdtype(labels.dtype, np.integer):
    raise _npz_error(path, f'{y_key} has dtype {labels.dtype}; labels must be integer class '
                     'indices 0..K-1.')
  if labels.ndim != 1:
    raise _npz_error(path, f'{y_key} has shape {labels.shape}; expected (N,) class indices '
                     '(one-hot labels: y.argmax(-1)).')
  if len(images) != len(labels):
    raise _npz_error(path, f'{x_key} has {len(images)} images but {y_key} has {len(labels)} '
                     'labels; they must match one to one.')
  if not len(labels):
    raise _npz_error(path, f'the {split} split is empty ({x_key} and {y_key} have no examples).')
  if labels.min() < 0:
    raise _npz_error(path, f'{y_key} has negative labels (min {labels.min()}); labels must be '
                     'class indices 0..K-1.')
  return (images if images.ndim == 4 else images[..., None]), labels


def _npz_check_model(path: str, image_shape: tuple[int, ...], num_labels: int,
                     model: ml_collections.ConfigDict) -> None:
  """Raises InvalidDatasetError, naming overrides that work, unless config.model fits images of
  `image_shape` (H, W, C): the channels match and the images are no larger than
  `model.image_size` (smaller ones are padded to it, `pad_to_size`)."""
  h, w, c = image_shape
  size, patch = model.image_size, model.patch_size
  fixes = []
  if max(h, w) > size:
    # The smallest model size that holds the images and splits into whole patches; the images
    # are then padded up to it.
    fixes.append(f'--config.model.image_size={-(-max(h, w) // patch) * patch}')
  if c != model.in_channels:
    fixes.append(f'--config.model.in_channels={c}')
  if fixes:
    raise _npz_error(path, f'images are {h}x{w}x{c} but config.model has image_size={size}, '
                     f'in_channels={model.in_channels} (patch_size={patch}): set '
                     f'{" ".join(fixes)} (smaller images are padded to model.image_size).')
  if num_labels > model.num_classes:
    raise _npz_error(path, f'labels go up to {num_labels - 1} ({num_labels} classes) but '
                     f'config.model.num_classes={model.num_classes}: set '
                     f'--config.model.num_classes={num_labels}.')


def pad_to_size(images: np.ndarray, size: int) -> np.ndarray:
  """(N, H, W, C) images zero-padded on every side to (N, size, size, C), centred (an odd
  difference puts the extra row / column at the bottom / right), as the demo pads MNIST's 28 x 28
  digits to 32 x 32."""
  _, h, w, _ = images.shape
  top, left = (size - h) // 2, (size - w) // 2
  return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def load_npz(path: str, model: ml_collections.ConfigDict
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                        tuple[int, int, int]]:
  """The train and test arrays of the .npz file `path` (held in memory), checked against `model`.

  Images smaller than `model.image_size` are zero-padded to it (`pad_to_size`) before the
  channel statistics are taken, so padding counts in the normalisation as the demo's does.

  Returns:
    (train images (N, S, S, C) uint8, train labels (N,) int32, test images, test labels,
    (C,) train-set means, (C,) stds, image shape (S, S, C)), S = model.image_size.

  Raises:
    InvalidDatasetError: no path, the file is unusable (see _read_npz, _npz_split), the splits'
      image shapes differ, a channel is constant, or config.model does not fit
      (_npz_check_model).
  """
  if not path:
    raise InvalidDatasetError(
        "Dataset 'npz' needs a file: set --config.data.npz_path=FILE, where FILE is "
        f'{NPZ_FORMAT}.')
  path = os.path.abspath(os.path.expanduser(path))
  arrays = _read_npz(path)
  x_train, y_train = _npz_split(path, arrays, 'train')
  x_test, y_test = _npz_split(path, arrays, 'test')
  if x_train.shape[1:] != x_test.shape[1:]:
    raise _npz_error(path, f'x_train images are {x_train.shape[1:]} but x_test images are '
                     f'{x_test.shape[1:]} (H, W, C); both splits need the same shape.')
  num_labels = int(max(y_train.max(), y_test.max())) + 1
  _npz_check_model(path, x_train.shape[1:], num_labels, model)
  size = model.image_size
  if x_train.shape[1:3] != (size, size):
    logging.info('npz %s: padding the %dx%d images with zeros to %dx%d (centred), the model\'s '
                 'image_size; the normalisation statistics are those of the padded training '
                 'images.', path, *x_train.shape[1:3], size, size)
    x_train, x_test = pad_to_size(x_train, size), pad_to_size(x_test, size)
  mean, std = channel_mean_std(x_train)
  if not np.all(std > 0):
    raise _npz_error(path, f'x_train channel(s) {np.flatnonzero(std <= 0).tolist()} have the '
                     'same value in every pixel, so they cannot be normalised; drop them.')
  logging.info('npz %s: %d train / %d test images of %s, labels 0..%d (model: %d classes).',
               path, len(y_train), len(y_test), x_train.shape[1:], num_labels - 1,
               model.num_classes)
  return (x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32), mean, std,
          tuple(x_train.shape[1:]))
