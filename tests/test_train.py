"""Tests for train.py and stas_jax.train.loop: steps, parallel modes, resume, failures."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from configs import cifar100
from configs import smoke
from conftest import COLLECTIVE_TIMEOUT_FLAG
from stas_jax.train import checkpoint
from stas_jax.data import pipeline
from stas_jax.model import network
from stas_jax.train import optim
from stas_jax.train import parallel
from stas_jax.train import steps
from stas_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The resume tests: long enough that a SIGKILL sent right after the first checkpoint lands
# well before the end.
RUN_STEPS, CKPT_EVERY = 120, 20
RUN_OVERRIDES = {'num_train_steps': RUN_STEPS, 'checkpoint_every_steps': CKPT_EVERY,
                 'log_every_steps': 10, 'keep_checkpoints': 10}


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(session_compilation_cache):
  """The session's persistent compilation cache (tests/conftest.py), also for subprocesses."""
  return session_compilation_cache


def _smoke(**overrides):
  config = smoke.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def _subprocess_env(cache, devices=1):
  env = dict(os.environ)  # conftest's JAX_PLATFORMS
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                       f'{COLLECTIVE_TIMEOUT_FLAG}',
             JAX_DISABLE_MOST_OPTIMIZATIONS='true', JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', PYTHONPATH=REPO)
  return env


def _train_cmd(workdir, overrides, config='configs/smoke.py'):
  return ([sys.executable, os.path.join(REPO, 'train.py'), f'--config={config}',
           f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in overrides.items()])


def _lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return f.read().splitlines()


def _abstract_state(config):
  model = network.create_model(config.model)
  tx = optim.create_optimizer(config, optax.constant_schedule(1e-3))
  return jax.eval_shape(lambda: steps.create_train_state(model, jax.random.key(0), tx))


def _restore(workdir, step, config):
  """Params and batch stats of one saved step."""
  target = _abstract_state(config)
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    state, meta = ckpt.restore(step, target)
  return jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}), meta


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------- units


def test_weight_decay_mask_selects_kernels_only():
  config = _smoke()
  config.model.halt.learnable = True
  params = _abstract_state(config).params
  mask = optim.weight_decay_mask(params)
  for path, decays in jax.tree_util.tree_leaves_with_path(mask):
    name = jax.tree_util.keystr(path)
    assert decays == name.endswith("['kernel']"), name


def test_learning_rate_warms_up_then_decays_to_minimum():
  config = _smoke()
  config.optim.update(learning_rate=1e-3, warmup_init_learning_rate=1e-5, min_learning_rate=1e-5,
                      warmup_epochs=2)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)
  lrs = np.array([schedule(s) for s in range(101)])
  np.testing.assert_allclose(lrs[[0, 20, 100]], [1e-5, 1e-3, 1e-5], rtol=1e-5)
  assert np.all(np.diff(lrs[:21]) > 0) and np.all(np.diff(lrs[20:]) < 0)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def mock_cifar(monkeypatch):
  # mock_data turns download_and_prepare into a no-op, so preparing "works" without TensorFlow.
  monkeypatch.setattr(pipeline, '_tensorflow_available', lambda: True)
  with tfds.testing.mock_data(num_examples=16):
    yield


@pytest.mark.slow
def test_cifar100_recipe_end_to_end_on_mock_data(mock_cifar, tmp_path):
  """The cifar100 config (mixup, label smoothing, per-device BN under pmap on 8 devices) with a
  tiny model: train steps, an epoch-end evaluation, a checkpoint and the logs."""
  del mock_cifar
  config = cifar100.get_config()
  config.update_from_flattened_dict({
      'model.dim': 16, 'model.depth': 1, 'model.heads': 2, 'model.mlp_ratio': 2,
      'model.timesteps': 2, 'batch_size': 8, 'eval_batch_size': 8, 'num_train_steps': 2,
      'log_every_steps': 1, 'data.data_dir': str(tmp_path / 'tfds')})
  workdir = str(tmp_path / 'run')
  final = loop.train_and_evaluate(config, workdir)
  assert final['step'] == 2 and final['epoch'] == 1.0  # 16 mock examples: 2 steps per epoch
  assert final['eval/count'] == 16
  for key in ('eval/top1', 'eval/top5', 'eval/energy_mj', 'eval/token_ratio', 'eval/timesteps',
              'train/loss', 'train/ce', 'train/ponder', 'train/distribution'):
    assert np.isfinite(final[key]), key
  assert 0 < final['eval/energy_mj'] and 0 < final['eval/token_ratio'] <= 1
  records = [json.loads(line) for line in _lines(workdir)]
  assert [r['kind'] for r in records] == ['train', 'train', 'eval']
  assert os.listdir(os.path.join(workdir, 'tb'))
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2'))


def _equivalence_config():
  """Cross-replica BN, no augmentation, no distribution prior (pmap computes it per device):
  every parallel layout computes the same update."""
  config = _smoke(**{'model.bn_cross_replica': True, 'data.crop_padding': 0,
                     'model.halt.alpha_d': 0.0})
  config.optim.warmup_epochs = 0
  return config


def _run_steps(config, devices, num_steps=3, batch_size=16, energy_weight=None):
  rng = np.random.default_rng(0)
  batches = [{'image': rng.integers(0, 256, (batch_size, 32, 32, 1), dtype=np.uint8),
              'label': rng.integers(0, 10, (batch_size,), dtype=np.int32)}
             for _ in range(num_steps)]
  schedule = optim.learning_rate_schedule(config, 100, 100)
  ctx = steps.StepContext(config=config, mean=np.float32([33.]), std=np.float32([78.]),
                          num_classes=10, schedule=schedule, energy_weight=energy_weight)
  strategy = parallel.create_strategy(ctx, devices)
  model = network.create_model(config.model, bn_axis_name=parallel.bn_axis_name(config))
  # Plain SGD: Adam would turn the numerically-zero gradients of the biases in front of
  # BatchNorm into arbitrary +-lr steps, which differ between layouts.
  state = strategy.put_state(steps.create_train_state(model, jax.random.key(0),
                                                          optax.sgd(0.1)))
  history = []
  for batch in batches:
    state, metrics = strategy.train_step(state, batch, jax.random.key(1), np.float32(0))
    history.append(strategy.host_metrics(metrics))
  state = jax.device_get(strategy.get_state(strategy.sync_batch_stats(state)))
  return {'params': state.params, 'batch_stats': state.batch_stats}, history


@pytest.mark.slow
def test_pmap_and_jit_match_single_device():
  config = _equivalence_config()
  single, single_metrics = _run_steps(config, jax.devices()[:1])
  pmapped, pmap_metrics = _run_steps(config, jax.devices())
  config.parallel = 'jit'
  jitted, jit_metrics = _run_steps(config, jax.devices())
  for other, other_metrics in ((pmapped, pmap_metrics), (jitted, jit_metrics)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 other, single)
    for got, want in zip(other_metrics, single_metrics):
      for key in ('loss', 'ce', 'grad_norm', 'accuracy', 'token_ratio'):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


def test_energy_loss_weight_reaches_the_train_step():
  """`config.energy_loss_weight` is read by the train step on every layout: the step reports
  the `energy` term, and its loss is the unpenalised loss plus weight x energy (first step: same
  parameters, same key)."""
  config = _equivalence_config()
  _, plain = _run_steps(config, jax.devices(), num_steps=1)
  config.energy_loss_weight = 0.5
  _, penalised = _run_steps(config, jax.devices(), num_steps=1)
  assert 'energy' not in plain[0] and float(penalised[0]['energy']) > 0
  np.testing.assert_allclose(penalised[0]['loss'],
                             plain[0]['loss'] + 0.5 * penalised[0]['energy'], rtol=1e-5)
  np.testing.assert_allclose(penalised[0]['ce'], plain[0]['ce'], rtol=1e-6)


def test_energy_weight_schedule():
  """The warm-up rises linearly from 0 to the weight over `energy_loss_warmup_steps` (-1: the
  whole run) and stays there; without a warm-up or without the loss there is no schedule."""
  config = _smoke()
  config.energy_loss_weight = 0.4
  config.energy_loss_warmup_steps = 4
  schedule = optim.energy_weight_schedule(config, total_steps=100)
  np.testing.assert_allclose([schedule(s) for s in (0, 1, 2, 4, 50)],
                             [0.0, 0.1, 0.2, 0.4, 0.4], atol=1e-7)
  config.energy_loss_warmup_steps = -1
  whole_run = optim.energy_weight_schedule(config, total_steps=10)
  np.testing.assert_allclose([whole_run(s) for s in (0, 5, 10)], [0.0, 0.2, 0.4], atol=1e-7)
  config.energy_loss_warmup_steps = 0
  assert optim.energy_weight_schedule(config, total_steps=10) is None
  config.energy_loss_warmup_steps = 4
  config.energy_loss_weight = 0.0
  assert optim.energy_weight_schedule(config, total_steps=10) is None
  config.energy_loss_warmup_steps = -2
  with pytest.raises(ValueError, match='energy_loss_warmup_steps must be >= -1'):
    optim.energy_weight_schedule(config, total_steps=10)


def test_energy_loss_warmup_reaches_the_train_step():
  """With a warm-up the step's loss is the rest of the loss plus the scheduled weight (0, then
  half, then all of it for a 2-step warm-up) times the energy, which every step reports; a
  warm-up without the schedule in the step context is an error, not a silent constant."""
  config = _equivalence_config()
  config.energy_loss_weight = 0.5
  config.energy_loss_warmup_steps = 2
  schedule = optim.energy_weight_schedule(config, total_steps=100)
  _, history = _run_steps(config, jax.devices()[:1], num_steps=3, energy_weight=schedule)
  halt = config.model.halt
  for m, weight in zip(history, (0.0, 0.25, 0.5)):
    assert float(m['energy']) > 0
    np.testing.assert_allclose(m['energy_weight'], weight, atol=1e-7)
    rest = m['ce'] + halt.alpha_p * m['ponder'] + halt.alpha_d * m['distribution']
    np.testing.assert_allclose(m['loss'], rest + weight * m['energy'], rtol=1e-5)
  with pytest.raises(ValueError, match='needs StepContext.energy_weight'):
    _run_steps(config, jax.devices()[:1], num_steps=1)


def _eval_sums(config, devices, batch_size=16):
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (batch_size, 32, 32, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, (batch_size,), dtype=np.int32),
           'mask': np.arange(batch_size) < batch_size - 3}  # a padded last batch
  ctx = steps.StepContext(config=config, mean=np.float32([33.]), std=np.float32([78.]),
                          num_classes=10, schedule=optax.constant_schedule(1e-3))
  strategy = parallel.create_strategy(ctx, devices)
  model = network.create_model(config.model)
  state = strategy.put_state(steps.create_train_state(model, jax.random.key(0),
                                                          optax.sgd(0.1)))
  return strategy.eval_sums(state, batch)


@pytest.mark.parametrize('layout', parallel.PARALLEL_MODES)
def test_eval_sums_are_added_over_devices_onto_one(layout):
  """Both layouts give the eval sums of the whole batch, on one device. Under pmap the
  per-device sums are added inside the pmapped step: a reduction over the pmap's sharded output
  afterwards is another multi-device program, and several of those in flight deadlocked
  XLA:CPU's collective rendezvous (CI abort)."""
  config = _smoke(parallel=layout)
  single = jax.device_get(_eval_sums(config, jax.devices()[:1]))
  sums = _eval_sums(config, jax.devices())
  for key, value in sums.items():
    assert len(value.devices()) == 1, key
  assert single['count'] == 13
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), jax.device_get(sums),
               single)


def test_batch_that_does_not_split_over_devices_is_rejected():
  config = _smoke(batch_size=12)
  ctx = steps.StepContext(config=config, mean=0., std=1., num_classes=10,
                          schedule=optax.constant_schedule(1e-3))
  with pytest.raises(ValueError, match='batch_size=12 must divide evenly over the 8 devices'):
    parallel.create_strategy(ctx)


# ----------------------------------------------------------------------------- resume & failures
# These run train.py in subprocesses on one CPU device: they test the process (signals, exit
# codes, files), not parallelism, and one device keeps them fast.


def _run_train(workdir, overrides, cache, **kwargs):
  return subprocess.run(_train_cmd(workdir, overrides), env=_subprocess_env(cache, devices=1),
                        capture_output=True, text=True, timeout=300, cwd=REPO, **kwargs)


@pytest.fixture(scope='module')
def reference_run(compilation_cache, tmp_path_factory):
  """An uninterrupted smoke run of RUN_STEPS steps."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = _run_train(workdir, RUN_OVERRIDES, compilation_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _start_and_stop_after_first_checkpoint(workdir, cache, sig):
  """Starts a run and sends `sig` as soon as its first checkpoint is on disk."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  proc = subprocess.Popen(_train_cmd(workdir, RUN_OVERRIDES), env=_subprocess_env(cache, 1),
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 180
    while not (os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))):
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      assert time.monotonic() < deadline, 'no checkpoint within 180 s'
      time.sleep(0.01)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.returncode, stderr


def _assert_same_as_reference(workdir, ref_dir):
  got, _ = _restore(workdir, RUN_STEPS, _smoke())
  want, _ = _restore(ref_dir, RUN_STEPS, _smoke())
  _assert_trees_equal(got, want)
  assert _lines(workdir) == _lines(ref_dir)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(reference_run, compilation_cache, tmp_path):
  workdir = str(tmp_path / 'killed')
  returncode, _ = _start_and_stop_after_first_checkpoint(workdir, compilation_cache,
                                                         signal.SIGKILL)
  assert returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert max(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) < RUN_STEPS
  resumed = _run_train(workdir, RUN_OVERRIDES, compilation_cache)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from step' in resumed.stderr
  _assert_same_as_reference(workdir, reference_run)


@pytest.mark.slow
def test_sigterm_saves_then_resume_equals_uninterrupted_run(reference_run, compilation_cache,
                                                             tmp_path):
  workdir = str(tmp_path / 'terminated')
  returncode, stderr = _start_and_stop_after_first_checkpoint(workdir, compilation_cache,
                                                              signal.SIGTERM)
  assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert 'SIGTERM received: saved a checkpoint of step' in stderr
  saved = max(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())
  assert f'saved a checkpoint of step {saved} ' in stderr
  resumed = _run_train(workdir, RUN_OVERRIDES, compilation_cache)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from step {saved} ' in resumed.stderr
  _assert_same_as_reference(workdir, reference_run)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(reference_run, compilation_cache,
                                                          tmp_path):
  workdir = str(tmp_path / 'corrupt')
  shutil.copytree(reference_run, workdir)
  latest = os.path.join(workdir, 'checkpoints', str(RUN_STEPS))
  data_files = [os.path.join(root, f) for root, _, files in os.walk(os.path.join(latest, 'state'))
                for f in files if os.sep + 'd' + os.sep in os.path.join(root, f)]
  with open(max(data_files, key=os.path.getsize), 'r+b') as f:
    f.truncate(3)
  result = _run_train(workdir, RUN_OVERRIDES, compilation_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Skipping unreadable checkpoint (will try an older step): Cannot restore {latest}' in (
      ' '.join(result.stderr.split()))
  assert f'Resumed from step {RUN_STEPS - CKPT_EVERY} ' in result.stderr
  _assert_same_as_reference(workdir, reference_run)


# train.py with NaN pixels in the train batch of one (1-based) step: the test's own data.
_POISONED_TRAIN = """
import runpy, sys
import numpy as np
from stas_jax.data import pipeline

BAD_STEP = int(sys.argv[1])  # argv: -c BAD_STEP train.py FLAGS...
sys.argv = sys.argv[2:]
real_create_datasets = pipeline.create_datasets


class Poisoned:
  \"\"\"The real train iterator (its checkpoint state included), but batch BAD_STEP is NaN.\"\"\"

  def __init__(self, it):
    self._it, self._served = it, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self._served += 1
    if self._served == BAD_STEP:
      batch = dict(batch, image=np.full(batch['image'].shape, np.nan, np.float32))
    return batch

  def __getattr__(self, name):  # get_state, set_state, start_prefetch, ...
    return getattr(self._it, name)


def create_datasets(*args, **kwargs):
  data = real_create_datasets(*args, **kwargs)
  data.train_iter = Poisoned(data.train_iter)
  return data


pipeline.create_datasets = create_datasets
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.mark.slow
def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(reference_run, compilation_cache,
                                                           tmp_path):
  workdir = str(tmp_path / 'nan')
  bad_step = CKPT_EVERY + 5
  train_cmd = _train_cmd(workdir, RUN_OVERRIDES)
  result = subprocess.run([train_cmd[0], '-c', _POISONED_TRAIN, str(bad_step)] + train_cmd[1:],
                          env=_subprocess_env(compilation_cache, devices=1),
                          capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Non-finite training metrics' in result.stderr
  assert f'at step {bad_step} (epoch' in result.stderr
  assert 'Traceback' not in result.stderr
  saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())
  assert saved == [CKPT_EVERY]
  got, meta = _restore(workdir, CKPT_EVERY, _smoke())
  want, _ = _restore(reference_run, CKPT_EVERY, _smoke())
  _assert_trees_equal(got, want)
  assert meta['step'] == CKPT_EVERY


# ----------------------------------------------------------------------------- command line


@pytest.mark.slow
def test_missing_dataset_fails_fast_with_instructions(compilation_cache, tmp_path):
  empty = tmp_path / 'no_data'
  empty.mkdir()
  env = _subprocess_env(compilation_cache, devices=1)
  env['TFDS_DATA_DIR'] = str(empty)
  start = time.monotonic()
  result = subprocess.run(_train_cmd(str(tmp_path / 'run'), {'data.data_dir': str(empty)},
                                     config='configs/cifar100.py'),
                          env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
  assert time.monotonic() - start < 30
  assert result.returncode != 0
  assert "Dataset 'cifar100' is not available" in result.stderr
  assert 'tfds build cifar100' in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_misspelled_override_fails_clearly(compilation_cache, tmp_path):
  result = subprocess.run(_train_cmd(str(tmp_path / 'run'), {'batch_sise': 3}),
                          env=_subprocess_env(compilation_cache, 1), capture_output=True, text=True,
                          timeout=60, cwd=REPO)
  assert result.returncode != 0
  assert 'unknown config key in --config.batch_sise=3' in result.stderr
  assert 'Did you mean "batch_size"' in result.stderr
  assert 'Traceback' not in result.stderr
