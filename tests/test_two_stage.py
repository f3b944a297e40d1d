"""Two-stage training (`config.init_from`): a run that starts from another run's parameters."""
import os

import jax
import numpy as np
import pytest

from configs import smoke
from conftest import persistent_compilation_cache
from stas_jax.train import checkpoint
from stas_jax.train import loop
from stas_jax.train import steps

# Every test here trains, spawns processes or exports programs.
pytestmark = pytest.mark.slow


def _config(**overrides):
  config = smoke.get_config()
  config.update_from_flattened_dict({'parallel': 'jit', 'num_train_steps': 2,
                                     'checkpoint_every_steps': 2, **overrides})
  return config


def _setup(config, workdir):
  """What train_and_evaluate builds before it restores: (data, fresh unreplicated state)."""
  os.makedirs(workdir)
  replicas, _, model, tx, keys, _ = loop._setup([config], [workdir])
  return replicas[0].data, steps.create_train_state(model, keys[0][0], tx)


def _latest(workdir, target):
  """(state, step) of the newest checkpoint in `workdir`, in the structure of `target`."""
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    restored, _, step = ckpt.restore_latest(target)
  return restored, step


def _equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent cache for the module: each run builds new jitted steps, and the runs
  here share their shapes."""
  with persistent_compilation_cache(str(tmp_path_factory.mktemp('jax_cache'))) as cache:
    yield cache


@pytest.fixture(scope='module')
def first_stage(tmp_path_factory):
  """I-SPS without halting for 2 steps: the first stage of STAS's two-stage training."""
  workdir = str(tmp_path_factory.mktemp('two_stage') / 'stage1')
  loop.train_and_evaluate(_config(**{'model.halt.mode': 'none'}), workdir)
  return workdir


def test_second_stage_starts_from_first_stage_parameters(first_stage, tmp_path):
  config = _config(init_from=first_stage)  # spatiotemporal halting on top
  data, fresh = _setup(config, str(tmp_path / 'stage2'))
  started = loop._warm_start(config, str(tmp_path / 'stage2'), fresh)
  trained, step = _latest(first_stage, fresh)
  assert step == 2 and not _equal(trained.params, fresh.params)
  assert _equal(started.params, trained.params)
  assert _equal(started.batch_stats, trained.batch_stats)
  assert int(started.step) == 0 and _equal(started.opt_state, fresh.opt_state)
  other, _ = _setup(config, str(tmp_path / 'other'))
  assert data.train_iter.get_state() == other.train_iter.get_state()  # its data from the start


def test_second_stage_trains_and_resumes_from_its_own_checkpoint(first_stage, tmp_path):
  workdir = str(tmp_path / 'stage2')
  summary = loop.train_and_evaluate(_config(init_from=first_stage), workdir)
  assert summary['start_step'] == 0 and summary['step'] == 2
  assert np.isfinite(summary['train/loss']) and 0 < summary['eval/token_ratio'] <= 1
  # Resumed, it goes on from its own step 2, not from the first stage again.
  summary = loop.train_and_evaluate(
      _config(init_from=first_stage, num_train_steps=4), workdir)
  assert summary['start_step'] == 2 and summary['step'] == 4


def test_missing_first_stage_fails_clearly(tmp_path):
  config = _config(init_from=str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='train the first stage'):
    loop.train_and_evaluate(config, str(tmp_path / 'stage2'))
  os.makedirs(tmp_path / 'empty' / 'checkpoints')
  with pytest.raises(FileNotFoundError, match='holds no checkpoint'):
    loop.train_and_evaluate(_config(init_from=str(tmp_path / 'empty')),
                                 str(tmp_path / 'stage2b'))


def test_own_workdir_is_rejected(tmp_path):
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match="own --workdir"):
    loop.train_and_evaluate(_config(init_from=workdir), workdir)


def test_other_model_fails_clearly_and_keeps_the_first_stage(first_stage, tmp_path):
  before = sorted(os.listdir(os.path.join(first_stage, 'checkpoints')))
  with pytest.raises(checkpoint.CheckpointError, match='Both stages need the same model'):
    loop.train_and_evaluate(_config(init_from=first_stage, **{'model.dim': 32}),
                                 str(tmp_path / 'stage2'))
  assert sorted(os.listdir(os.path.join(first_stage, 'checkpoints'))) == before
