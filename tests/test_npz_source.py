"""Tests for the 'npz' dataset of stas_jax.data.pipeline: your own images from one .npz file."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from configs import demo
from configs import smoke
from stas_jax.data import npz
from stas_jax.data import pipeline
from stas_jax.train import loop

NUM_TRAIN, NUM_TEST, SIZE, CLASSES = 64, 32, 16, 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _arrays(image_shape=(SIZE, SIZE), num_labels=CLASSES, seed=0):
  """A valid dataset: uint8 images of `image_shape` per example and int64 labels."""
  rng = np.random.default_rng(seed)
  return {'x_train': rng.integers(0, 256, (NUM_TRAIN,) + image_shape, dtype=np.uint8),
          'y_train': rng.integers(0, num_labels, (NUM_TRAIN,)),
          'x_test': rng.integers(0, 256, (NUM_TEST,) + image_shape, dtype=np.uint8),
          'y_test': rng.integers(0, num_labels, (NUM_TEST,))}


def _save(path, arrays):
  np.savez(path, **arrays)
  return str(path)


def _config(npz_path, image_size=SIZE, in_channels=1, num_classes=CLASSES):
  config = default.get_config()
  config.data.dataset, config.data.npz_path = 'npz', npz_path
  config.model.update(image_size=image_size, in_channels=in_channels, num_classes=num_classes)
  config.batch_size, config.eval_batch_size = 8, 24
  return config


def _create(config):
  return pipeline.create_datasets(config, process_index=0, process_count=1)


@pytest.fixture(scope='module')
def grey(tmp_path_factory):
  """A (N, H, W) grey-scale dataset on disk: (arrays, path)."""
  arrays = _arrays()
  return arrays, _save(tmp_path_factory.mktemp('npz') / 'grey.npz', arrays)


def test_grey_npz_batches_normalisation_and_eval_padding(grey):
  arrays, path = grey
  data = _create(_config(path))
  assert (data.num_train_examples, data.num_eval_examples) == (NUM_TRAIN, NUM_TEST)
  assert data.image_shape == (SIZE, SIZE, 1) and data.num_classes == CLASSES
  assert data.steps_per_epoch == NUM_TRAIN // 8
  np.testing.assert_allclose(data.mean, [arrays['x_train'].mean()], rtol=1e-5)
  np.testing.assert_allclose(data.std, [arrays['x_train'].std()], rtol=1e-5)
  batch = next(data.train_iter)
  assert batch['image'].shape == (8, SIZE, SIZE, 1) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  pairs = {(img.tobytes(), int(y)) for img, y in zip(arrays['x_train'], arrays['y_train'])}
  assert all((img[..., 0].tobytes(), int(y)) in pairs
             for img, y in zip(batch['image'], batch['label']))
  evals = list(data.make_eval_iter())
  assert len(evals) == data.num_eval_batches == 2  # 24 real, then 8 real + 16 padding
  assert all(b['image'].shape == (24, SIZE, SIZE, 1) for b in evals)
  np.testing.assert_array_equal(evals[1]['mask'], [1.0] * 8 + [0.0] * 16)
  assert evals[1]['image'][8:].max() == 0
  real = np.concatenate([b['image'] for b in evals])[:NUM_TEST, ..., 0]
  labels = np.concatenate([b['label'] for b in evals])[:NUM_TEST]
  np.testing.assert_array_equal(real, arrays['x_test'])  # every test image once, in order
  np.testing.assert_array_equal(labels, arrays['y_test'])


def test_rgb_npz_per_channel_stats_and_fewer_labels_than_model_classes(tmp_path):
  arrays = _arrays(image_shape=(8, 8, 3), num_labels=3)
  arrays['x_train'][..., 2] //= 4  # a darker third channel: its statistics must differ
  data = _create(_config(_save(tmp_path / 'rgb.npz', arrays), image_size=8, in_channels=3))
  assert data.image_shape == (8, 8, 3)
  assert data.num_classes == CLASSES  # targets match the model's outputs, not the max label
  np.testing.assert_allclose(data.mean, arrays['x_train'].mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(data.std, arrays['x_train'].std(axis=(0, 1, 2)), rtol=1e-5)
  assert data.mean[2] < data.mean[0] / 2
  assert next(data.train_iter)['image'].shape == (8, 8, 8, 3)


@pytest.mark.slow
def test_training_end_to_end_on_npz(grey, tmp_path):
  """The smoke recipe (tiny STAS, pmap over 8 devices) trains and evaluates on the npz file."""
  _, path = grey
  config = smoke.get_config()
  config.update_from_flattened_dict({
      'data.dataset': 'npz', 'data.npz_path': path, 'model.image_size': SIZE,
      'eval_batch_size': 16, 'steps_per_eval': -1, 'num_train_steps': 3,
      'checkpoint_every_steps': 3})
  final = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert final['step'] == 3 and final['eval/count'] == NUM_TEST
  for key in ('eval/top1', 'train/loss'):
    assert np.isfinite(final[key]), key


# ----------------------------------------------------------------------------- bad files
# Each case: how to write the file (None: no file), config.model overrides, what the message
# must say.


def _with(**changes):
  def write(path):
    arrays = _arrays()
    for key, value in changes.items():
      if value is None:
        del arrays[key]
      else:
        arrays[key] = value(arrays[key]) if callable(value) else value
    return _save(path, arrays)
  return write


def _raw(data):
  def write(path):
    path.write_bytes(data(path) if callable(data) else data)
    return str(path)
  return write


def _truncated_npz(path):
  _with()(path)
  return path.read_bytes()[:200]


def _npy(path):
  np.save(path.with_suffix('.npy'), np.zeros((4, 4), np.uint8))
  return path.with_suffix('.npy').read_bytes()


_BAD_FILES = {
    'empty_path': (None, {}, ['npz_path=FILE', 'x_train']),
    'missing_file': (lambda path: str(path), {}, ['no such file', '--config.data.npz_path']),
    'not_a_zip': (_raw(b'these are not the images you are looking for'), {},
                  ['not a valid .npz archive', 'np.savez']),
    'empty_file': (_raw(b''), {}, ['not a valid .npz archive']),
    'truncated': (_raw(_truncated_npz), {}, ['not a valid .npz archive']),
    'npy_not_npz': (_raw(_npy), {}, ['single .npy array, not an .npz archive']),
    'missing_keys': (_with(x_test=None, y_test=None, images=np.zeros(1)), {},
                     ['missing x_test, y_test', 'required: x_train, y_train, x_test, y_test',
                      'found: x_train, y_train, images']),
    'object_array': (_with(x_train=np.array([{}, {}], dtype=object)), {},
                     ['cannot read x_train', 'Object arrays']),
    'float_images': (_with(x_train=lambda x: x / 255.0), {},
                     ['x_train has dtype float64', 'must be uint8']),
    'float_labels': (_with(y_test=lambda y: y.astype(np.float32)), {},
                     ['y_test has dtype float32', 'must be integer']),
    'image_rank': (_with(x_train=lambda x: x[:, 0]), {},
                   ['x_train has shape (64, 16)', '(N, H, W) or (N, H, W, C)']),
    'one_hot_labels': (_with(y_train=lambda y: np.eye(CLASSES, dtype=np.int64)[y]), {},
                       ['y_train has shape (64, 10)', 'expected (N,)']),
    'negative_labels': (_with(y_train=lambda y: y - 1), {},
                        ['y_train has negative labels (min -1)']),
    'length_mismatch': (_with(y_test=lambda y: y[:-1]), {},
                        ['x_test has 32 images but y_test has 31 labels']),
    'empty_split': (_with(x_train=lambda x: x[:0], y_train=lambda y: y[:0]), {},
                    ['the train split is empty']),
    'splits_differ': (_with(x_test=lambda x: x[:, :8, :8]), {}, ['both splits']),
    'larger_than_model': (_with(), {'image_size': 8}, ['images are 16x16x1', 'image_size=8',
                                                       '--config.model.image_size=16']),
    'wider_than_model': (_with(x_train=lambda x: np.pad(x, ((0, 0), (0, 0), (0, 2))),
                               x_test=lambda x: np.pad(x, ((0, 0), (0, 0), (0, 2)))), {},
                         ['images are 16x18x1', '--config.model.image_size=20']),
    'wrong_channels': (_with(), {'in_channels': 3}, ['--config.model.in_channels=1']),
    'too_many_classes': (_with(y_test=lambda y: np.maximum(y, 11)), {},
                         ['labels go up to 11 (12 classes)', '--config.model.num_classes=12']),
    'constant_channel': (_with(x_train=lambda x: np.full_like(x, 7)), {},
                         ['cannot be normalised']),
}


@pytest.mark.parametrize('case', list(_BAD_FILES))
def test_bad_file_says_what_is_wrong(case, tmp_path):
  write, model_overrides, expected = _BAD_FILES[case]
  path = write(tmp_path / 'data.npz') if write else ''
  config = _config(path)
  config.model.update(model_overrides)
  with pytest.raises(pipeline.InvalidDatasetError) as err:
    _create(config)
  # train.py and ablate report a DatasetUnavailableError without a traceback.
  assert isinstance(err.value, pipeline.DatasetUnavailableError)
  assert isinstance(err.value, ValueError)
  for text in expected:
    assert text in str(err.value), (text, str(err.value))


# ----------------------------------------------------------------------------- padding


def test_smaller_images_are_padded_centred_and_normalised_padded(tmp_path, caplog):
  """28 x 28 digits in a 32 x 32 model: zero-padded by 2 on every side, as the demo pads MNIST,
  and the statistics are those of the padded training images."""
  arrays = _arrays(image_shape=(28, 28))
  config = _config(_save(tmp_path / 'digits.npz', arrays), image_size=32)
  with caplog.at_level('INFO'):
    data = _create(config)
  assert data.image_shape == (32, 32, 1)
  assert any('padding the 28x28 images with zeros to 32x32' in r.getMessage()
             for r in caplog.records)
  padded = np.pad(arrays['x_train'], ((0, 0), (2, 2), (2, 2)))[..., None]
  np.testing.assert_allclose(data.mean, [padded.mean()], rtol=1e-6)
  np.testing.assert_allclose(data.std, [padded.std()], rtol=1e-6)
  batch = next(data.make_eval_iter())
  np.testing.assert_array_equal(batch['image'][:, 2:30, 2:30, 0], arrays['x_test'][:24])
  assert not batch['image'][:, :2].any() and not batch['image'][:, 30:].any()


def test_odd_and_non_square_padding():
  images = np.ones((1, 3, 6, 1), np.uint8)
  out = npz.pad_to_size(images, 8)
  assert out.shape == (1, 8, 8, 1)
  # 5 rows to add: 2 on top, 3 below; 2 columns: one each side.
  np.testing.assert_array_equal(out[0, :, :, 0].sum(axis=1), [0, 0, 6, 6, 6, 0, 0, 0])
  np.testing.assert_array_equal(out[0, :, :, 0].sum(axis=0), [0, 3, 3, 3, 3, 3, 3, 0])


def test_advice_for_larger_images_works_when_followed(tmp_path):
  """36 x 36 images and the demo's patch 8: the advice is image_size 40 (a whole number of
  patches), and with it the file loads, padded to 40 x 40."""
  config = demo.get_config()
  config.data.dataset = 'npz'
  config.data.npz_path = _save(tmp_path / 'big.npz', _arrays(image_shape=(36, 36)))
  with pytest.raises(pipeline.InvalidDatasetError, match='--config.model.image_size=40'):
    _create(config)
  config.model.image_size = 40
  assert _create(config).image_shape == (40, 40, 1)


@pytest.mark.slow
def test_demo_trains_on_28x28_digits_with_only_the_dataset_flags(tmp_path):
  """`python train.py --config.data.dataset=npz --config.data.npz_path=FILE` on 28 x 28 x 1
  images: the demo model (32 x 32) trains to the end, the padding said in one log line."""
  rng = np.random.default_rng(0)
  arrays = {'x_train': rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8),
            'y_train': rng.integers(0, 10, (128,)),
            'x_test': rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8),
            'y_test': rng.integers(0, 10, (64,))}
  path = _save(tmp_path / 'digits28.npz', arrays)
  workdir = tmp_path / 'run'
  # Fewer XLA passes (as every test compiles): the point is the flags, not the program's speed.
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', JAX_DISABLE_MOST_OPTIMIZATIONS='true')
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'train.py'), '--config.data.dataset=npz',
       f'--config.data.npz_path={path}', f'--workdir={workdir}'],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.count('padding the 28x28 images with zeros to 32x32') == 1
  assert 'STAS run summary' in result.stdout + result.stderr
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert records[-1]['kind'] == 'eval' and records[-1]['eval/count'] == 64
