"""ablate --workers: runs trained in worker processes pinned to their share of the cores."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import COLLECTIVE_TIMEOUT_FLAG
from stas_jax.tools import workers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = ['--config=configs/smoke.py', '--rows=isps-spatiotemporal', '--t_sweep=',
         '--seeds=0,1', '--workers=2', '--config.num_train_steps=16',
         '--config.checkpoint_every_steps=4', '--config.keep_checkpoints=10',
         '--config.log_every_steps=4']


def test_core_groups_split_the_cores_evenly():
  assert workers.core_groups(2, {0, 1, 2}) == [[0, 1], [2]]
  assert workers.core_groups(2, {4, 7}) == [[4], [7]]
  assert workers.core_groups(3, {0, 1}) == [[0], [1]]        # never more workers than cores
  assert workers.core_groups(1, {0, 1, 2, 3}) == [[0, 1, 2, 3]]


def _cmd(out):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count=1 '
                                   f'{COLLECTIVE_TIMEOUT_FLAG}',
             JAX_DISABLE_MOST_OPTIMIZATIONS='true', PYTHONPATH=REPO)
  return [sys.executable, '-m', 'stas_jax.tools.ablate', f'--out={out}'] + STUDY, env


def _lines(out, seed):
  with open(os.path.join(out, 'isps-spatiotemporal', f'seed{seed}', 'metrics.jsonl')) as f:
    return f.read().splitlines()


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason='needs two cores')
def test_interrupted_worker_study_resumes_to_the_uninterrupted_result(tmp_path):
  reference = str(tmp_path / 'reference')
  cmd, env = _cmd(reference)
  done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  for seed in (0, 1):
    run = os.path.join(reference, 'isps-spatiotemporal', f'seed{seed}')
    result = json.load(open(os.path.join(run, workers.RESULT_FILE)))
    assert result['failure'] is None and result['step'] == 16
    assert 'STAS run summary' in open(os.path.join(run, workers.LOG_FILE)).read()
  assert '| `isps-spatiotemporal` |' in open(os.path.join(reference, 'ablation.md')).read()

  interrupted = str(tmp_path / 'interrupted')
  cmd, env = _cmd(interrupted)
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  ckpts = [os.path.join(interrupted, 'isps-spatiotemporal', f'seed{s}', 'checkpoints')
           for s in (0, 1)]
  try:
    deadline = time.monotonic() + 300
    while not all(os.path.isdir(d) and '4' in os.listdir(d) for d in ckpts):
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      assert time.monotonic() < deadline, 'no checkpoint of step 4 within 300 s'
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)   # the workers save a checkpoint each, then stop
    _, stderr = proc.communicate(timeout=180)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode != 0 and 'rerun the same ablate command' in stderr, stderr[-3000:]
  resumed = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for seed in (0, 1):
    log = open(os.path.join(interrupted, 'isps-spatiotemporal', f'seed{seed}',
                            workers.LOG_FILE)).read()
    assert 'Resumed from step' in log
    assert _lines(interrupted, seed) == _lines(reference, seed)
