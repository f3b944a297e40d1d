"""Several seeds in one program (`loop.train_and_evaluate_replicas`, `parallel` with replicas):
a replica's step is its separate run's step, each run's directory is a run's directory, a
killed joint study resumes, and a replica whose loss turns non-finite stops alone."""
import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import smoke
from conftest import COLLECTIVE_TIMEOUT_FLAG
from conftest import persistent_compilation_cache
from stas_jax.data import pipeline
from stas_jax.model import network
from stas_jax.train import checkpoint
from stas_jax.train import loop
from stas_jax.train import optim
from stas_jax.train import parallel
from stas_jax.train import steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1)


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for this module and its subprocesses."""
  cache = str(tmp_path_factory.mktemp('jax_cache_replicas'))
  with persistent_compilation_cache(cache):
    yield cache


def _smoke(seed=0, **overrides):
  config = smoke.get_config()
  config.seed = seed
  config.update_from_flattened_dict(overrides)
  return config


def _first_batches(configs):
  return [next(pipeline.create_datasets(c, process_index=0, process_count=1).train_iter)
          for c in configs]


def _context(config):
  data = pipeline.create_datasets(config, process_index=0, process_count=1)
  return steps.StepContext(config=config, mean=data.mean, std=data.std,
                           num_classes=data.num_classes,
                           schedule=optim.learning_rate_schedule(config, 50, 100))


_SHARED = {}


def _fresh(config, ctx):
  """A run's fresh state and augmentation key, with one model and one optimiser object for
  every run, as the loop has: states stack only with the same static fields."""
  model, tx = _SHARED.setdefault(id(ctx), (network.create_model(config.model),
                                           optim.create_optimizer(config, ctx.schedule)))
  init_key, aug_key = jax.random.split(jax.random.key(config.seed))
  return steps.create_train_state(model, init_key, tx), aug_key


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def test_replica_gradients_equal_each_separate_runs():
  """vmap over replicas: each replica's loss and gradients are its own run's (1e-5)."""
  configs = [_smoke(seed) for seed in SEEDS]
  ctx = _context(configs[0])
  fresh = [_fresh(c, ctx) for c in configs]
  batches = _first_batches(configs)
  epoch = np.float32(0)
  grads_fn = functools.partial(steps.gradients, ctx=ctx)
  joint_grads, joint_aux = jax.jit(jax.vmap(grads_fn, in_axes=(0, 0, 0, None)))(
      _stack([s for s, _ in fresh]), _stack(batches), jax.numpy.stack([k for _, k in fresh]),
      epoch)
  for r, ((state, key), batch) in enumerate(zip(fresh, batches)):
    grads, aux = jax.jit(grads_fn)(state, batch, key, epoch)
    np.testing.assert_allclose(joint_aux['terms']['loss'][r], aux['terms']['loss'], rtol=1e-5)
    jax.tree.map(lambda j, g: np.testing.assert_allclose(j[r], g, rtol=1e-5, atol=1e-7),
                 joint_grads, grads)
  # Different seeds: different initialisations, data and augmentation, hence losses.
  assert joint_aux['terms']['loss'][0] != joint_aux['terms']['loss'][1]


@pytest.mark.parametrize('layout', parallel.PARALLEL_MODES)
def test_replicated_step_equals_separate_steps_on_every_layout(layout):
  """The pmap and jit strategies with replicas: one step over 8 devices gives each replica
  the parameters and metrics its own strategy gives it."""
  configs = [_smoke(seed, parallel=layout) for seed in SEEDS]
  ctx = _context(configs[0])
  fresh = [_fresh(c, ctx) for c in configs]
  batches = _first_batches(configs)
  epoch = np.float32(0)
  joint = parallel.create_strategy(ctx, replicas=len(SEEDS))
  state, metrics = joint.train_step(joint.put_state(_stack([s for s, _ in fresh])),
                                    _stack(batches), jax.numpy.stack([k for _, k in fresh]),
                                    epoch)
  joint_state = jax.device_get(joint.get_state(state))
  joint_metrics = joint.host_metrics(metrics)
  single = parallel.create_strategy(ctx)
  # Adam's first update is about lr * sign(gradient): a parameter whose gradient is rounding
  # noise (a bias before a BatchNorm) may move either way by lr, whatever the layout.
  lr = float(ctx.schedule(0))
  for r, ((fresh_state, key), batch) in enumerate(zip(fresh, batches)):
    one, one_metrics = single.train_step(single.put_state(fresh_state), batch, key, epoch)
    one = jax.device_get(single.get_state(one))
    jax.tree.map(lambda j, g: np.testing.assert_allclose(j[r], g, rtol=1e-5, atol=1e-6),
                 joint_state.batch_stats, one.batch_stats)
    jax.tree.map(lambda j, g: np.testing.assert_allclose(j[r], g, rtol=0, atol=2.01 * lr),
                 joint_state.params, one.params)
    for name, value in single.host_metrics(one_metrics).items():
      np.testing.assert_allclose(joint_metrics[name][r], value, rtol=1e-5, err_msg=name)
  # The eval sums: one per replica, each that replica's.
  eval_batch = next(pipeline.create_datasets(configs[0], process_index=0,
                                             process_count=1).make_eval_iter())
  sums = jax.device_get(joint.eval_sums(state, eval_batch))
  assert sums['count'].shape == (len(SEEDS),)
  np.testing.assert_array_equal(sums['count'], np.sum(eval_batch['mask']))


def test_joint_runs_write_their_own_directories(tmp_path):
  """Two seeds side by side: each directory holds a run as train_and_evaluate writes one, with
  the figures of that seed's separate run."""
  overrides = {'num_train_steps': 4, 'checkpoint_every_steps': 2, 'log_every_steps': 2}
  configs = [_smoke(seed, **overrides) for seed in SEEDS]
  dirs = [str(tmp_path / f'seed{seed}') for seed in SEEDS]
  finals = loop.train_and_evaluate_replicas(configs, dirs)
  separate = loop.train_and_evaluate(configs[1], str(tmp_path / 'alone'))
  for final, workdir, config in zip(finals, dirs, configs):
    assert final['failure'] is None and final['step'] == 4
    with open(os.path.join(workdir, 'config.json')) as f:
      assert json.load(f)['seed'] == config.seed
    records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    assert [r['kind'] for r in records] == ['train', 'train', 'eval']
    with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
      assert ckpt.all_steps() == [2, 4]
  for key in ('train/loss', 'eval/top1', 'eval/energy_mj', 'eval/token_ratio'):
    np.testing.assert_allclose(finals[1][key], separate[key], rtol=1e-4, err_msg=key)
  assert finals[0]['train/loss'] != finals[1]['train/loss']


def test_configs_that_change_the_program_cannot_train_together(tmp_path):
  with pytest.raises(ValueError, match='model.dim'):
    loop.train_and_evaluate_replicas([_smoke(0), _smoke(1, **{'model.dim': 32})],
                                     [str(tmp_path / 'a'), str(tmp_path / 'b')])


def _poisoned_first_stage(tmp_path):
  """A run directory whose checkpoint holds an infinite parameter: a second stage started from
  it (`init_from`) turns non-finite at its first step."""
  source = str(tmp_path / 'first_stage')
  config = _smoke(1, num_train_steps=1, checkpoint_every_steps=1)
  loop.train_and_evaluate(config, source)
  ctx = _context(config)
  target, _ = _fresh(config, ctx)
  with checkpoint.Checkpointer(os.path.join(source, 'checkpoints'), async_save=False) as ckpt:
    state, meta = ckpt.restore(1, target)
    params = jax.tree.map(lambda a: np.full_like(a, np.inf), state.params)
    ckpt.save(2, state.replace(params=params), meta, force=True)
  return source


@pytest.mark.slow
def test_a_replica_that_turns_non_finite_stops_alone(tmp_path):
  source = _poisoned_first_stage(tmp_path)
  overrides = {'num_train_steps': 4, 'checkpoint_every_steps': 2, 'log_every_steps': 1}
  configs = [_smoke(0, **overrides), _smoke(1, init_from=source, **overrides)]
  dirs = [str(tmp_path / 'good'), str(tmp_path / 'bad')]
  good, bad = loop.train_and_evaluate_replicas(configs, dirs)
  assert good['failure'] is None and good['step'] == 4 and np.isfinite(good['eval/top1'])
  assert 'Non-finite training metrics' in bad['failure'] and 'at step 1' in bad['failure']
  with checkpoint.Checkpointer(os.path.join(dirs[0], 'checkpoints')) as ckpt:
    assert ckpt.all_steps() == [2, 4]
  with checkpoint.Checkpointer(os.path.join(dirs[1], 'checkpoints')) as ckpt:
    assert ckpt.all_steps() == []
  # Every run non-finite: the program stops with the reasons.
  with pytest.raises(loop.NonFiniteLossError, match='Every run of the joint program'):
    loop.train_and_evaluate_replicas(
        [_smoke(s, init_from=source, **overrides) for s in SEEDS],
        [str(tmp_path / 'bad0'), str(tmp_path / 'bad1')])


# ----------------------------------------------------------------------------- a joint study


STUDY = ['--config=configs/smoke.py', '--rows=isps-spatiotemporal', '--t_sweep=',
         '--seeds=0,1', '--config.num_train_steps=24', '--config.checkpoint_every_steps=4',
         '--config.keep_checkpoints=10', '--config.log_every_steps=4']


def _ablate(out, cache, extra=()):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count=1 '
                                   f'{COLLECTIVE_TIMEOUT_FLAG}',
             JAX_DISABLE_MOST_OPTIMIZATIONS='true', JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', PYTHONPATH=REPO)
  return [sys.executable, '-m', 'stas_jax.tools.ablate', f'--out={out}'] + STUDY + list(extra), env


def _seed_lines(out):
  return {seed: open(os.path.join(out, 'isps-spatiotemporal', f'seed{seed}',
                                  'metrics.jsonl')).read().splitlines() for seed in SEEDS}


@pytest.mark.slow
def test_killed_joint_study_resumes_to_the_uninterrupted_result(compilation_cache, tmp_path):
  reference = str(tmp_path / 'reference')
  cmd, env = _ablate(reference, compilation_cache)
  done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'side by side in one program' in done.stderr
  info = json.load(open(os.path.join(reference, 'isps-spatiotemporal', 'seed1',
                                     'ablation_row.json')))
  assert info['joint_runs'] == 2
  killed = str(tmp_path / 'killed')
  cmd, env = _ablate(killed, compilation_cache)
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  ckpt_dirs = [os.path.join(killed, 'isps-spatiotemporal', f'seed{s}', 'checkpoints')
               for s in SEEDS]
  try:
    deadline = time.monotonic() + 300
    while not all(os.path.isdir(d) and '8' in os.listdir(d) for d in ckpt_dirs):
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      assert time.monotonic() < deadline, 'no checkpoint of step 8 within 300 s'
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  resumed = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed' in resumed.stderr
  assert _seed_lines(killed) == _seed_lines(reference)
