"""stas_jax.tools.evaluate on a smoke checkpoint: the report files, their keys, agreement with the
training loop's own evaluation, early exit, plots and the command line; `stas_jax.load_run`."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from configs import smoke
import stas_jax
from stas_jax.data import pipeline
from stas_jax.tools import evaluate
from stas_jax.train import evaluation
from stas_jax.train import loop
from stas_jax.train import steps

# Every test here trains, spawns processes or exports programs.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_KEYS = ('step', 'total_steps', 'count', 'top1', 'top5', 'loss', 'token_ratio', 'timesteps',
            'energy_mj', 'energy_split_mj', 'sops', 'firing_rates', 'token_ratio_per_cell',
            'temporal_similarity', 'temporal_similarity_all_tokens', 'config',
            'eval_wall_time_s')


@pytest.fixture(scope='module')
def compilation_cache(session_compilation_cache):
  """The session's persistent compilation cache (tests/conftest.py), also for subprocesses."""
  return session_compilation_cache


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory, compilation_cache):
  del compilation_cache
  workdir = str(tmp_path_factory.mktemp('smoke_run'))
  final = loop.train_and_evaluate(smoke.get_config(), workdir)
  return workdir, final


@pytest.fixture(scope='module')
def report(smoke_run):
  workdir, _ = smoke_run
  return evaluate.evaluate_run(workdir, with_early_exit=True, with_plots=True)


def test_writes_both_files_with_expected_keys(smoke_run, report):
  workdir, _ = smoke_run
  with open(os.path.join(workdir, 'eval.json')) as f:
    written = json.load(f)
  for key in TOP_KEYS + ('early_exit', 'plots'):
    assert key in written, key
  assert written['step'] == written['total_steps'] == 6
  assert set(written['energy_split_mj']) == {'patch_embed', 'attention', 'mlp', 'head'}
  np.testing.assert_allclose(sum(written['energy_split_mj'].values()), written['energy_mj'],
                             rtol=1e-5)
  cfg = smoke.get_config().model
  steps, depth = cfg.timesteps, cfg.depth
  assert np.shape(written['token_ratio_per_cell']) == (steps, depth)
  assert np.shape(written['temporal_similarity']) == (depth, steps - 1)
  assert 'block.0.attn.q_lif' in written['firing_rates']
  assert 'patch_embed.proj_lif' in written['firing_rates']
  # I-SPS feeds every timestep the same token map: block 1's inputs are identical over time.
  np.testing.assert_allclose(written['temporal_similarity_all_tokens'][0], 1.0, atol=1e-5)
  with open(os.path.join(workdir, 'eval.md')) as f:
    md = f.read()
  for text in ('top-1 accuracy', 'Energy split', 'Token ratio per (timestep, block) cell',
               'Temporal similarity', 'Firing rates', 'Early-exit inference',
               'plots/halting_heatmap.png'):
    assert text in md, text


def test_agrees_with_the_training_loops_evaluation(smoke_run, report):
  _, final = smoke_run
  assert report['count'] == final['eval/count']
  for key in ('top1', 'top5', 'loss', 'token_ratio', 'timesteps', 'energy_mj'):
    np.testing.assert_allclose(report[key], final[f'eval/{key}'], rtol=1e-5, err_msg=key)
  for part, value in report['energy_split_mj'].items():
    np.testing.assert_allclose(value, final[f'eval/energy_split_mj/{part}'], rtol=1e-5)
  cells = np.asarray(report['token_ratio_per_cell'])
  np.testing.assert_allclose(cells.mean(), report['token_ratio'], rtol=1e-5)


def test_early_exit_gives_the_same_predictions(report):
  e = report['early_exit']
  assert e['prediction_agreement'] == 1.0
  assert e['max_abs_logit_diff'] < 1e-4
  assert e['dense_wall_time_s'] > 0 and e['early_exit_wall_time_s'] > 0


def test_plots_are_small_pngs(smoke_run, report):
  workdir, _ = smoke_run
  assert set(report['plots']) == {'halting_heatmap', 'temporal_similarity', 'token_ratio_cells'}
  for rel in report['plots'].values():
    path = os.path.join(workdir, rel)
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.path.getsize(path) < 200_000


def test_command_line(smoke_run, compilation_cache):
  workdir, _ = smoke_run
  env = dict(os.environ, PYTHONPATH=REPO, JAX_DISABLE_MOST_OPTIMIZATIONS='true',
             JAX_COMPILATION_CACHE_DIR=compilation_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  os.remove(os.path.join(workdir, 'eval.md'))
  result = subprocess.run([sys.executable, '-m', 'stas_jax.tools.evaluate', f'--workdir={workdir}',
                           '--config=configs/smoke.py', '--max_batches=1'],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| top-1 accuracy |' in result.stdout
  with open(os.path.join(workdir, 'eval.json')) as f:
    written = json.load(f)
  assert written['count'] == smoke.get_config().eval_batch_size
  assert 'early_exit' not in written and 'plots' not in written
  assert os.path.exists(os.path.join(workdir, 'eval.md'))


def test_load_run_classifies_as_the_evaluation_does(smoke_run):
  """`stas_jax.load_run(dir)(uint8 images)` gives the eval step's logits, masks and energy."""
  workdir, _ = smoke_run
  clf = stas_jax.load_run(workdir)
  config = smoke.get_config()
  data = pipeline.create_datasets(config, process_index=0, process_count=1)
  batch = next(data.make_eval_iter())
  out = clf(batch['image'])
  cfg, b = config.model, batch['image'].shape[0]
  tokens = (cfg.image_size // cfg.patch_size) ** 2
  assert clf.step == 6
  assert out.logits.shape == (b, cfg.num_classes)
  assert out.active.shape == (cfg.timesteps, cfg.depth, b, tokens)
  np.testing.assert_array_equal(out.predictions, out.logits.argmax(-1))
  ctx = steps.StepContext(config=config, mean=data.mean, std=data.std,
                          num_classes=data.num_classes)
  images, _ = evaluation.model_inputs(batch, ctx)
  logits, aux = evaluation.forward(clf.model.apply, clf.variables, images, config)
  np.testing.assert_allclose(out.logits, logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.active, aux['active'])
  sums = jax.jit(lambda v: evaluation.eval_step(
      steps.TrainState.create(apply_fn=clf.model.apply, params=v['params'],
                              batch_stats=v['batch_stats'], tx=optax.identity()),
      batch, ctx=ctx))(clf.variables)
  mask = batch['mask'] > 0
  np.testing.assert_allclose(np.sum(out.energy_mj[mask]), sums['energy_mj'], rtol=1e-5)
  np.testing.assert_allclose(np.sum(out.token_ratio[mask]), sums['token_ratio'], rtol=1e-5)
  # The demo's digits are 28 x 28 padded to 32 x 32: the unpadded digits (B, H, W) give the same.
  unpadded = clf(batch['image'][:4, 2:30, 2:30, 0])
  np.testing.assert_array_equal(unpadded.logits, out.logits[:4])
  with pytest.raises(ValueError, match='uint8'):
    clf(batch['image'].astype(np.float32))
  with pytest.raises(ValueError, match='with H, W <= 32'):
    clf(np.zeros((2, 40, 40, 1), np.uint8))
