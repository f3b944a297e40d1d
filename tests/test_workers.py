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
def test_interrupted_worker_study_resumes_and_finishes(tmp_path):
  """SIGTERM reaches both workers, each saves a checkpoint, and the same command resumes them.
  (That a resumed run equals the uninterrupted one is test_train's sigterm test: a worker runs
  `loop.train_and_evaluate` as train.py does.)"""
  out = str(tmp_path / 'study')
  cmd, env = _cmd(out)
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  runs = [os.path.join(out, 'isps-spatiotemporal', f'seed{s}') for s in (0, 1)]
  try:
    deadline = time.monotonic() + 300
    while not all(os.path.isdir(os.path.join(r, 'checkpoints')) and
                  '4' in os.listdir(os.path.join(r, 'checkpoints')) for r in runs):
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
  # A worker on a less loaded core may have finished its 16 steps before the signal came.
  finished = [os.path.exists(os.path.join(r, workers.RESULT_FILE)) for r in runs]
  assert not all(finished), 'both runs finished before SIGTERM: nothing was interrupted'
  resumed = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  resumed_runs = 0
  for run, was_finished in zip(runs, finished):
    assert '16' in os.listdir(os.path.join(run, 'checkpoints'))
    # A run stopped after its last checkpoint (in its final evaluation) is finished: ablate
    # evaluates it without a worker, so only the others have a result of the second command.
    if was_finished or not os.path.exists(os.path.join(run, workers.RESULT_FILE)):
      continue
    result = json.load(open(os.path.join(run, workers.RESULT_FILE)))
    assert result['failure'] is None and result['step'] == 16
    log = open(os.path.join(run, workers.LOG_FILE)).read()
    assert 'Resumed from step' in log and 'STAS run summary' in log
    assert json.loads(_lines(out, run[-1])[-1])['step'] == 16
    resumed_runs += 1
  assert resumed_runs >= 1
  assert '| `isps-spatiotemporal` |' in open(os.path.join(out, 'ablation.md')).read()
