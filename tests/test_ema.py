"""The weight EMA (`config.ema_decay`): its decay schedule and update by hand, the train step's
EMA, evaluation of both weights during training, checkpoints and older run directories, and
`stas_jax.tools.evaluate --weights=ema`."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import smoke
from conftest import persistent_compilation_cache
from stas_jax.model import network
from stas_jax.tools import evaluate
from stas_jax.train import checkpoint
from stas_jax.train import evaluation
from stas_jax.train import loop
from stas_jax.train import optim
from stas_jax.train import parallel
from stas_jax.train import steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'old_run')


def test_decay_warms_up_then_holds():
  # min(decay, (1 + t) / (10 + t)): 1/10 at t = 0, 6/15 at t = 5, then the decay itself.
  for step, decay, want in ((0, 0.999, 0.1), (5, 0.999, 0.4), (5, 0.3, 0.3),
                            (10_000, 0.999, 0.999)):
    np.testing.assert_allclose(steps.ema_decay_at(step, decay), want, rtol=1e-6)


def test_update_by_hand():
  ema = {'a': jnp.float32(1.0), 'b': jnp.array([0.0, 4.0])}
  new = {'a': jnp.float32(3.0), 'b': jnp.array([2.0, 0.0])}
  got = steps.ema_update(ema, new, jnp.float32(0.25))
  np.testing.assert_allclose(got['a'], 0.25 * 1 + 0.75 * 3)
  np.testing.assert_allclose(got['b'], [1.5, 1.0])


@pytest.mark.parametrize('value', [-0.1, 1.0, 1.5])
def test_decay_outside_range_is_an_error(value):
  config = smoke.get_config()
  config.ema_decay = value
  with pytest.raises(ValueError, match=r'must lie in \[0, 1\)'):
    steps.ema_decay(config)


def _context(config):
  return steps.StepContext(config=config, mean=np.float32([33.]), std=np.float32([78.]),
                           num_classes=10, schedule=optax.constant_schedule(1e-2))


def _batches(num, batch_size=16):
  rng = np.random.default_rng(0)
  return [{'image': rng.integers(0, 256, (batch_size, 32, 32, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, (batch_size,), dtype=np.int32)} for _ in range(num)]


def _run_steps(decay, layout='jit', devices=1, num=2):
  """Fresh state and the states after each of `num` steps (host copies, statistics synced)."""
  config = smoke.get_config()
  config.update_from_flattened_dict({'ema_decay': decay, 'parallel': layout})
  ctx = _context(config)
  strategy = parallel.create_strategy(ctx, jax.devices()[:devices])
  model = network.create_model(config.model)
  fresh = steps.create_train_state(model, jax.random.key(0),
                                   optim.create_optimizer(config, ctx.schedule), ema=True)
  state = strategy.put_state(fresh)
  states = []
  for batch in _batches(num):
    state, _ = strategy.train_step(state, batch, jax.random.key(1), np.float32(0))
    states.append(jax.device_get(strategy.get_state(strategy.sync_batch_stats(state))))
  return jax.device_get(fresh), states


def _weights(state):
  return {'params': state.params, 'batch_stats': state.batch_stats}


def _close(got, want, **kw):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **kw), got, want)


@pytest.mark.parametrize('layout,devices', [('jit', 1), ('pmap', 8)])
def test_train_steps_average_params_and_statistics(layout, devices):
  """Step 1 (t = 0) mixes 0.1 of the initial weights with 0.9 of the new ones; step 2 (t = 1)
  uses 2/11. Under pmap the per-device statistics' EMA is averaged with the statistics."""
  fresh, (one, two) = _run_steps(0.999, layout, devices)
  assert fresh.ema and set(fresh.ema) == {'params', 'batch_stats'}
  _close(fresh.ema, _weights(fresh), rtol=0)
  want_one = jax.tree.map(lambda e, x: 0.1 * e + 0.9 * x, _weights(fresh), _weights(one))
  _close(one.ema, want_one, rtol=1e-5, atol=1e-7)
  d = 2 / 11
  want_two = jax.tree.map(lambda e, x: d * e + (1 - d) * x, one.ema, _weights(two))
  _close(two.ema, want_two, rtol=1e-5, atol=1e-7)


def test_tiny_decay_follows_the_weights():
  """A decay of about 0 makes the EMA the weights themselves (up to rounding)."""
  _, states = _run_steps(1e-7, num=1)
  _close(states[0].ema, _weights(states[0]), rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_and_older_steps(tmp_path):
  config = smoke.get_config()
  ctx = _context(config)
  model = network.create_model(config.model)
  tx = optim.create_optimizer(config, ctx.schedule)
  state = steps.create_train_state(model, jax.random.key(0), tx, ema=True)
  state = state.replace(ema=jax.tree.map(lambda x: x + 1.0, state.ema))
  target = steps.create_train_state(model, jax.random.key(5), tx, ema=True)
  with checkpoint.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, state, {'step': 1})
    restored, meta = ckpt.restore(1, target)
  assert checkpoint.MISSING_FIELDS_KEY not in meta
  _close(restored.ema, state.ema, rtol=0)
  # A step saved before the EMA existed: it starts at the restored weights.
  with checkpoint.Checkpointer(os.path.join(FIXTURE, 'checkpoints')) as ckpt:
    old, meta = ckpt.restore(4, target)
  assert meta[checkpoint.MISSING_FIELDS_KEY] == ['ema']
  old = steps.complete_restored(old, meta[checkpoint.MISSING_FIELDS_KEY])
  _close(old.ema, _weights(old), rtol=0)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old.params),
                                                      jax.tree.leaves(target.params)))


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp('jax_cache_ema'))
  with persistent_compilation_cache(cache):
    yield cache


def _old_run_config(num_train_steps, ema_decay=0.9):
  """tests/fixtures/old_run's config (test_old_checkpoints.py) with the EMA on."""
  config = smoke.get_config()
  config.update_from_flattened_dict({
      'checkpoint_every_steps': 2, 'optim.min_learning_rate': 1e-3, 'parallel': 'jit',
      'num_train_steps': num_train_steps, 'ema_decay': ema_decay})
  return config


@pytest.fixture(scope='module')
def resumed_old_run(tmp_path_factory, compilation_cache):
  """The fixture (saved before the EMA existed) trained on to step 6 with an EMA."""
  workdir = str(tmp_path_factory.mktemp('ema') / 'run')
  shutil.copytree(FIXTURE, workdir)
  summary = loop.train_and_evaluate(_old_run_config(6), workdir)
  return workdir, summary


@pytest.mark.slow
def test_old_run_resumes_and_evaluates_both_weights(resumed_old_run):
  workdir, summary = resumed_old_run
  assert summary['start_step'] == 4 and summary['step'] == 6
  for name in ('top1', 'top5', 'loss', 'token_ratio', 'energy_mj', 'count'):
    assert f'eval/{name}' in summary and f'eval_ema/{name}' in summary
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    last_eval = [r for r in map(json.loads, f) if r['kind'] == 'eval'][-1]
  assert last_eval['step'] == 6
  assert {k: v for k, v in last_eval.items() if k.startswith('eval')} == {
      k: v for k, v in summary.items() if k.startswith('eval')}
  # The checkpoint holds an EMA of its own, apart from the raw weights.
  config = _old_run_config(6)
  target = jax.eval_shape(lambda: steps.create_train_state(
      network.create_model(config.model), jax.random.key(0),
      optim.create_optimizer(config, optax.constant_schedule(0.0)), ema=True))
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    end, meta = ckpt.restore(6, target)
  assert checkpoint.MISSING_FIELDS_KEY not in meta
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(end.ema['params']),
                                                      jax.tree.leaves(end.params)))


@pytest.mark.slow
def test_evaluate_ema_weights(resumed_old_run):
  workdir, summary = resumed_old_run
  config = _old_run_config(6)
  raw = evaluate.evaluate_run(workdir, config)
  ema = evaluate.evaluate_run(workdir, config, weights='ema')
  assert raw['weights'] == 'raw' and ema['weights'] == 'ema'
  for name in ('top1', 'loss', 'token_ratio'):
    np.testing.assert_allclose(raw[name], summary[f'eval/{name}'], rtol=1e-5)
    np.testing.assert_allclose(ema[name], summary[f'eval_ema/{name}'], rtol=1e-5)
  assert raw['loss'] != ema['loss']
  with open(os.path.join(workdir, 'eval_ema.json')) as f:
    assert json.load(f)['weights'] == 'ema'
  with open(os.path.join(workdir, 'eval.json')) as f:
    assert json.load(f)['weights'] == 'raw'


@pytest.mark.slow
def test_ema_of_a_run_without_one_is_a_clear_error(tmp_path, compilation_cache):
  workdir = str(tmp_path / 'run')
  shutil.copytree(FIXTURE, workdir)  # its config.json has no ema_decay
  with pytest.raises(evaluation.NoEMAWeightsError, match='--weights=raw'):
    evaluate.evaluate_run(workdir, weights='ema')
  out = subprocess.run([sys.executable, '-m', 'stas_jax.tools.evaluate', f'--workdir={workdir}',
                        '--weights=ema'], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode != 0
  assert 'has no EMA weights' in out.stderr and '--weights=raw' in out.stderr
