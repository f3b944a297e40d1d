"""Multi-process training on JAX's distributed runtime: train.py in two local processes (gloo
collectives, 2 CPU devices each) against one process on 4 devices; kill and resume; SIGTERM;
a dead peer.

Every child runs in its own process group and is killed by its pid when a test ends; every
wait has a timeout, so a hang fails the test instead of stalling CI.
"""
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from configs import smoke
from conftest import COLLECTIVE_TIMEOUT_FLAG
from stas_jax.train import checkpoint
from stas_jax.model import network
from stas_jax.train import optim
from stas_jax.train import steps

# Every test here trains, spawns processes or exports programs.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES, DEVICES_PER_PROCESS = 2, 2
STEPS, CKPT_EVERY, LOG_EVERY = 25, 5, 5
# Evaluate on the whole test split: with steps_per_eval > 0 each process would evaluate the
# first batches of its own shard, other images than one process sees.
OVERRIDES = {'num_train_steps': STEPS, 'checkpoint_every_steps': CKPT_EVERY,
             'log_every_steps': LOG_EVERY, 'keep_checkpoints': 10, 'steps_per_eval': -1}
HEARTBEAT_S = 5
# Waits that end a test instead of letting it hang; the runs take a fraction of them.
RUN_TIMEOUT_S, PEER_EXIT_TIMEOUT_S = 300, 90
JAX_DEATH_MESSAGE = 'Terminating process because the JAX distributed service detected fatal errors'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _Job:
  """`processes` train.py processes on one workdir, each with `devices` CPU devices."""

  def __init__(self, workdir, cache, processes=PROCESSES, devices=DEVICES_PER_PROCESS):
    self.workdir, self.procs, self.logs = workdir, [], []
    env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COORDINATOR')}
    # The parent's 8 devices (conftest) are not what the children should see.
    env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
                         f'{COLLECTIVE_TIMEOUT_FLAG}',
               JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='true',
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', PYTHONPATH=REPO,
               PYTHONUNBUFFERED='1')  # everything logged before an abort reaches the log
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), '--config=configs/smoke.py',
           f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
    port = _free_port()
    try:
      for i in range(processes):
        flags = []
        if processes > 1:
          flags = [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
                   f'--process_id={i}', f'--heartbeat_timeout_s={HEARTBEAT_S}',
                   '--shutdown_timeout_s=10', '--initialization_timeout_s=60']
        log_path = f'{workdir}.process{i}.log'
        self.logs.append(log_path)
        with open(log_path, 'w') as log:
          self.procs.append(subprocess.Popen(cmd + flags, cwd=REPO, env=env, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True))
    except BaseException:
      self.kill_all()
      raise

  def log(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def tails(self) -> str:
    return '\n'.join(f'--- process {i} ---\n{self.log(i)[-3000:]}' for i in range(len(self.procs)))

  def wait(self, timeout=RUN_TIMEOUT_S) -> list:
    deadline = time.monotonic() + timeout
    for p in self.procs:
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        pytest.fail(f'train.py still running after {timeout} s:\n{self.tails()}')
    return [p.returncode for p in self.procs]

  def wait_for_checkpoint(self, step: int) -> None:
    """Until `step` is saved (orbax renames a finished save to its step number)."""
    path = os.path.join(self.workdir, 'checkpoints', str(step))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not os.path.isdir(path):
      if any(p.poll() is not None for p in self.procs):
        pytest.fail(f'a process exited before checkpoint {step}:\n{self.tails()}')
      if time.monotonic() > deadline:
        pytest.fail(f'no checkpoint {step} within {RUN_TIMEOUT_S} s:\n{self.tails()}')
      time.sleep(0.01)

  def kill(self, i: int) -> None:
    if self.procs[i].poll() is None:
      os.killpg(self.procs[i].pid, signal.SIGKILL)
      self.procs[i].wait(timeout=30)

  def kill_all(self) -> None:
    for i in range(len(self.procs)):
      self.kill(i)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  """A persistent compilation cache that the runs of one layout share."""
  return str(tmp_path_factory.mktemp('jax_cache'))


def _run(workdir, cache, **kwargs):
  job = _Job(workdir, cache, **kwargs)
  try:
    returncodes = job.wait()
  finally:
    job.kill_all()
  assert returncodes == [0] * len(job.procs), job.tails()
  return job


@pytest.fixture(scope='module')
def single_process_run(cache, tmp_path_factory):
  """One process on PROCESSES * DEVICES_PER_PROCESS devices, the same global batch."""
  workdir = str(tmp_path_factory.mktemp('single') / 'run')
  _run(workdir, cache, processes=1, devices=PROCESSES * DEVICES_PER_PROCESS)
  return workdir


@pytest.fixture(scope='module')
def two_process_run(cache, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('two') / 'run')
  job = _run(workdir, cache)
  return workdir, job


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _final_state(workdir):
  config = smoke.get_config()
  model = network.create_model(config.model)
  tx = optim.create_optimizer(config, optax.constant_schedule(1e-3))
  target = jax.eval_shape(lambda: steps.create_train_state(model, jax.random.key(0), tx))
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False) as ckpt:
    state, meta = ckpt.restore(STEPS, target)
  return jax.device_get(state), meta


def _bias_in_front_of_batchnorm(params) -> set:
  """Key paths of each Linear bias that feeds a BatchNorm (`x_linear` beside `x_bn`) and of
  that BatchNorm's running mean."""
  found = set()

  def walk(node, prefix):
    for name, child in node.items():
      if name.endswith('_linear') and name.replace('_linear', '_bn') in node:
        found.update({prefix + (name, 'bias'), prefix + (name.replace('_linear', '_bn'), 'mean')})
      if isinstance(child, dict):
        walk(child, prefix + (name,))
  walk(params, ())
  return found


def test_two_processes_train_as_one_process_on_as_many_devices(single_process_run,
                                                               two_process_run):
  """Same global batches, same per-device split: the same parameters, metrics and eval."""
  workdir, job = two_process_run
  assert 'process 1 of 2, 2 local / 4 global devices' in job.log(1)
  got, got_meta = _final_state(workdir)
  want, want_meta = _final_state(single_process_run)
  # The two runs add gradients in another order. Adam moves each parameter by up to the
  # learning rate per step however small its gradient, and the bias of a Linear in front of a
  # BatchNorm has a gradient of pure float noise (BatchNorm subtracts the bias again): those
  # biases, and the running means behind them, may drift apart by that much. Everything else
  # must agree to float tolerance.
  drift = STEPS * smoke.get_config().optim.learning_rate
  drifting = _bias_in_front_of_batchnorm(want.params)
  assert len(drifting) == 12  # q, k, v, proj, fc1, fc2 in the one block: bias and mean each
  for tree in ('params', 'batch_stats', 'opt_state'):
    got_leaves = jax.tree_util.tree_leaves_with_path(getattr(got, tree))
    want_leaves = jax.tree_util.tree_leaves_with_path(getattr(want, tree))
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, a), (_, b) in zip(got_leaves, want_leaves):
      keys = tuple(getattr(k, 'key', k) for k in path)
      atol = drift if tree != 'opt_state' and keys in drifting else 1e-6
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol,
                                 err_msg=f'{tree}{jax.tree_util.keystr(path)}')
  assert int(got.step) == STEPS
  # One writer: the metrics of process 0 alone, each step once.
  got_records, want_records = _records(workdir), _records(single_process_run)
  assert [(r['step'], r['kind']) for r in got_records] == (
      [(s, 'train') for s in range(LOG_EVERY, STEPS + 1, LOG_EVERY)] + [(STEPS, 'eval')])
  assert [(r['step'], r['kind']) for r in want_records] == [
      (r['step'], r['kind']) for r in got_records]
  for g, w in zip(got_records, want_records):
    assert g.keys() == w.keys()
    for key in g:
      if key == 'kind':
        continue
      # An untrained model's top-5 has near-ties that float noise may flip for an image.
      atol = 2 / 1000 if key.startswith('eval/top') else 1e-7
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=atol, err_msg=key)
  assert got_records[-1]['eval/count'] == 1000
  # Each process saved its own data-iterator position (grain's handler: a file per process).
  assert _iterator_files(workdir) == [f'process_{i}-of-{PROCESSES}.json'
                                      for i in range(PROCESSES)]
  assert _iterator_files(single_process_run) == ['process_0-of-1.json']
  assert got_meta['step'] == want_meta['step']


def _iterator_files(workdir):
  data = os.path.join(workdir, 'checkpoints', str(STEPS), 'data')
  return sorted(f for f in os.listdir(data) if f.endswith('.json'))


def _latest_step(workdir):
  return max(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def test_kill_both_then_resume_equals_uninterrupted_run(two_process_run, cache, tmp_path):
  """SIGKILL both processes after their second checkpoint; corrupt the newest one; the
  relaunched pair renames it once (process 0), resumes from the one before and ends where
  the uninterrupted run ended, bit for bit."""
  reference, _ = two_process_run
  workdir = str(tmp_path / 'run')
  job = _Job(workdir, cache)
  try:
    job.wait_for_checkpoint(2 * CKPT_EVERY)
  finally:
    job.kill_all()
  latest = _latest_step(workdir)
  assert latest < STEPS, 'the run finished before it could be killed'
  state_dir = os.path.join(workdir, 'checkpoints', str(latest), 'state')
  data_files = [f for f in glob.glob(os.path.join(state_dir, '**', '*'), recursive=True)
                if os.path.isfile(f) and f'{os.sep}d{os.sep}' in f]
  with open(max(data_files, key=os.path.getsize), 'r+b') as f:
    f.truncate(3)

  resumed = _run(workdir, cache)
  resume_from = latest - CKPT_EVERY
  for i in range(PROCESSES):
    assert f'Resumed from step {resume_from} ' in resumed.log(i), resumed.tails()
  assert 'Renamed unreadable checkpoint' in resumed.log(0)
  assert 'Renamed unreadable checkpoint' not in resumed.log(1)
  assert len(glob.glob(os.path.join(workdir, 'checkpoints', f'{latest}.unreadable-*'))) == 1

  got, _ = _final_state(workdir)
  want, _ = _final_state(reference)
  for field in ('step', 'params', 'batch_stats', 'opt_state'):
    jax.tree.map(np.testing.assert_array_equal, getattr(got, field), getattr(want, field))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f, \
       open(os.path.join(reference, 'metrics.jsonl')) as g:
    assert f.read() == g.read()


def test_sigterm_stops_both_after_one_step_and_a_dead_process_stops_the_other(cache, tmp_path):
  """SIGTERM to process 1 alone: both save the same step and exit (JAX's preemption sync).
  Relaunched, they resume from it; then SIGKILL process 1: process 0, blocked in a collective
  with it, exits with JAX's error once the heartbeats stop instead of waiting forever."""
  workdir = str(tmp_path / 'run')
  job = _Job(workdir, cache)
  try:
    job.wait_for_checkpoint(CKPT_EVERY)
    job.procs[1].send_signal(signal.SIGTERM)
    returncodes = job.wait()
  finally:
    job.kill_all()
  assert returncodes == [128 + signal.SIGTERM] * PROCESSES, job.tails()
  saved = [re.findall(r'SIGTERM received: saved a checkpoint of step (\d+) ', job.log(i))
           for i in range(PROCESSES)]
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  stopped = int(saved[0][0])
  assert CKPT_EVERY <= stopped < STEPS and _latest_step(workdir) == stopped

  job = _Job(workdir, cache)
  try:
    job.wait_for_checkpoint((stopped // CKPT_EVERY + 1) * CKPT_EVERY)
    job.kill(1)
    try:
      returncode = job.procs[0].wait(timeout=PEER_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      pytest.fail(f'process 0 still running {PEER_EXIT_TIMEOUT_S} s after process 1 died:\n'
                  f'{job.tails()}')
  finally:
    job.kill_all()
  log = job.log(0)
  assert f'Resumed from step {stopped} ' in log
  assert returncode != 0
  assert JAX_DEATH_MESSAGE in log, log[-3000:]
  assert 'stopped sending heartbeats' in log
  assert 'STAS run summary' not in log
