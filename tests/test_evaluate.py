"""stas_jax.evaluate on a smoke checkpoint: the report files, their keys, agreement with the
training loop's own evaluation, early exit, plots and the command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import smoke
from conftest import persistent_compilation_cache
from stas_jax import evaluate
from stas_jax import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_KEYS = ('step', 'total_steps', 'count', 'top1', 'top5', 'loss', 'token_ratio', 'timesteps',
            'energy_mj', 'energy_split_mj', 'sops', 'firing_rates', 'token_ratio_per_cell',
            'temporal_similarity', 'temporal_similarity_all_tokens', 'config',
            'eval_wall_time_s')


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for this module and its subprocess."""
  cache = str(tmp_path_factory.getbasetemp() / 'jax_cache_studies')
  with persistent_compilation_cache(cache):
    yield cache


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory, compilation_cache):
  del compilation_cache
  workdir = str(tmp_path_factory.mktemp('smoke_run'))
  final = train_lib.train_and_evaluate(smoke.get_config(), workdir)
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
  result = subprocess.run([sys.executable, '-m', 'stas_jax.evaluate', f'--workdir={workdir}',
                           '--config=configs/smoke.py', '--max_batches=1'],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| top-1 accuracy |' in result.stdout
  with open(os.path.join(workdir, 'eval.json')) as f:
    written = json.load(f)
  assert written['count'] == smoke.get_config().eval_batch_size
  assert 'early_exit' not in written and 'plots' not in written
  assert os.path.exists(os.path.join(workdir, 'eval.md'))
