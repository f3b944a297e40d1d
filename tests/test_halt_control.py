"""The token-ratio controller (`model.halt.target_token_ratio`): its update rule by hand, its
sign, no gradient into its offset, nothing changed when it is off, its config checks, and its
state through jit, pmap, joint replicas, checkpoints and older run directories."""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import smoke
from conftest import tiny_model_config
from stas_jax.model import network
from stas_jax.model import spec as model_spec
from stas_jax.train import checkpoint
from stas_jax.train import evaluation
from stas_jax.train import loop
from stas_jax.train import optim
from stas_jax.train import parallel
from stas_jax.train import steps

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'old_run')
TARGET, GAIN = 0.6, 0.5


def test_update_rule_by_hand():
  offset = jnp.float32(0.0)
  for ratio, want in ((0.8, 0.1), (0.7, 0.15), (0.4, 0.05)):
    offset = steps.control_offset(offset, jnp.float32(ratio), TARGET, GAIN)
    np.testing.assert_allclose(offset, want, rtol=1e-6)


def _images(batch=4):
  return jax.random.uniform(jax.random.key(1), (batch, 32, 32, 3))


def _controlled_model(**overrides):
  cfg = tiny_model_config(**{'halt.mode': 'spatiotemporal', 'halt.beta': -1.0,
                             'halt.target_token_ratio': 0.5, **overrides})
  model = network.create_model(cfg)
  return model, network.init_variables(model, jax.random.key(0))


def _with_offset(variables, offset):
  return {**variables, network.HALT_CONTROL: {'offset': jnp.float32(offset)}}


def test_positive_offset_lowers_the_token_ratio():
  model, variables = _controlled_model()
  assert jax.tree.map(jnp.shape, variables[network.HALT_CONTROL]) == {'offset': ()}
  ratios = [float(jnp.mean(model.apply(_with_offset(variables, o), _images())[1]['active']))
            for o in (-2.0, 0.0, 2.0)]
  assert ratios[0] > ratios[1] > ratios[2], ratios


def test_no_gradient_reaches_the_offset():
  model, variables = _controlled_model(**{'halt.learnable': True})

  def loss(params, control):
    logits, aux = model.apply({**variables, 'params': params,
                               network.HALT_CONTROL: control}, _images())
    return jnp.sum(logits) + jnp.sum(aux['ponder'])

  g_params, g_control = jax.grad(loss, argnums=(0, 1))(variables['params'],
                                                       {'offset': jnp.float32(0.3)})
  assert float(g_control['offset']) == 0.0
  assert float(g_params['halt_beta']) != 0.0  # the same path carries a gradient to beta


def test_off_changes_nothing():
  """Target 0: no controller variable or state field, and the forward pass of a controlled
  model at offset 0 is bit for bit that of the uncontrolled one (same parameters)."""
  model_on, on = _controlled_model()
  model_off, off = _controlled_model(**{'halt.target_token_ratio': 0.0})
  assert set(off) == {'params', 'batch_stats'}
  jax.tree.map(np.testing.assert_array_equal, on['params'], off['params'])
  got = model_on.apply(on, _images())
  want = model_off.apply(off, _images())
  jax.tree.map(np.testing.assert_array_equal, got, want)
  state = steps.create_train_state(model_off, jax.random.key(0), optax.sgd(0.1))
  assert state.halt_control == {} and state.ema == {}
  assert set(state.variables) == {'params', 'batch_stats'}


@pytest.mark.parametrize('key,value,match', [
    ('halt.target_token_ratio', 1.5, r'must lie in \(0, 1\]'),
    ('halt.target_token_ratio', -0.1, r'must lie in \(0, 1\]'),
    ('halt.ratio_gain', 0.0, 'must be > 0'),
    ('halt.ratio_gain', -1.0, 'must be > 0'),
])
def test_config_errors(key, value, match):
  cfg = tiny_model_config(**{'halt.mode': 'spatiotemporal', 'halt.target_token_ratio': 0.5,
                             key: value})
  with pytest.raises(ValueError, match=match):
    model_spec.spec_from_config(cfg)


def test_target_without_halting_is_an_error():
  cfg = tiny_model_config(**{'halt.target_token_ratio': 0.5})  # mode 'none'
  with pytest.raises(ValueError, match='needs halting'):
    model_spec.spec_from_config(cfg)


def _smoke(**overrides):
  config = smoke.get_config()
  # beta 3: some tokens halt at the first cell, so the token ratio moves with the offset.
  config.update_from_flattened_dict({'model.halt.beta': 3.0,
                                     'model.halt.target_token_ratio': TARGET,
                                     'model.halt.ratio_gain': GAIN, **overrides})
  return config


def _context(config):
  return steps.StepContext(config=config, mean=np.float32([33.]), std=np.float32([78.]),
                           num_classes=10, schedule=optax.constant_schedule(1e-3))


def _batches(num, seed=0, batch_size=8):
  rng = np.random.default_rng(seed)
  return [{'image': rng.integers(0, 256, (batch_size, 32, 32, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, (batch_size,), dtype=np.int32)} for _ in range(num)]


_SHARED = {}


def _fresh(config, ctx, seed=0):
  """A fresh state; one model and optimiser object per context, so that states stack."""
  model, tx = _SHARED.setdefault(id(ctx), (network.create_model(config.model),
                                           optim.create_optimizer(config, ctx.schedule)))
  return steps.create_train_state(model, jax.random.key(seed), tx)


def _measured(metrics):
  """The ratio the controller read: the eval-mode one where logged (ratio_source 'eval')."""
  return float(metrics.get('token_ratio_eval', metrics['token_ratio']))


def _assert_rule(history, offsets):
  """Each step ran with the offset before it and moved it by the rule, from 0."""
  want = 0.0
  for metrics, offset in zip(history, offsets):
    np.testing.assert_allclose(metrics['halt_offset'], want, atol=1e-6)
    want = want + GAIN * (_measured(metrics) - TARGET)
    np.testing.assert_allclose(offset, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('layout,devices,source', [('jit', 1, 'eval'), ('pmap', 8, 'eval'),
                                                   ('jit', 1, 'train')])
def test_train_steps_follow_the_rule(layout, devices, source):
  """Three steps: the offset moves by gain x (the step's token ratio, as logged - target);
  under pmap the ratio is the devices' mean and every device holds the same offset."""
  config = _smoke(parallel=layout, **{'model.halt.ratio_source': source})
  ctx = _context(config)
  strategy = parallel.create_strategy(ctx, jax.devices()[:devices])
  state = strategy.put_state(_fresh(config, ctx))
  history, offsets = [], []
  for batch in _batches(3, batch_size=16):
    state, metrics = strategy.train_step(state, batch, jax.random.key(1), np.float32(0))
    history.append(strategy.host_metrics(metrics))
    offsets.append(float(jax.device_get(strategy.get_state(state)).halt_control['offset']))
  _assert_rule(history, offsets)
  assert ('token_ratio_eval' in history[0]) == (source == 'eval')
  # Not vacuous: the training ratio moves; in eval mode (BatchNorm at its initial running
  # statistics) every token of this fresh model halts at the same cell, so the offset still moves.
  ratios = [float(m['token_ratio']) for m in history]
  assert len(set(ratios)) > 1 and 0 < min(ratios) < 1, ratios
  assert len(set(offsets)) == 3, offsets
  if layout == 'pmap':
    np.testing.assert_array_equal(np.asarray(state.halt_control['offset']),
                                  np.full(devices, offsets[-1], np.float32))


def test_eval_source_reads_the_eval_mode_ratio_of_the_batch():
  """With ratio_source 'eval' the offset moves by the token ratio that evaluation measures on
  the step's images (no augmentation here), with the weights and offset before the update."""
  config = _smoke(parallel='jit', **{'data.crop_padding': 0, 'data.hflip': False,
                                     'data.mixup_alpha': 0.0})
  ctx = _context(config)
  state = _fresh(config, ctx)
  # beta 3 + offset 1: in eval mode no token halts yet, in train mode some do.
  state = state.replace(halt_control={'offset': jnp.float32(1.0)})
  batch = _batches(1, batch_size=16)[0]
  images, _ = evaluation.model_inputs(batch, ctx)
  _, aux = evaluation.forward(state.apply_fn, state.variables, images, config)
  want_ratio = float(jnp.mean(aux['active']))
  new, metrics = jax.jit(functools.partial(steps.train_step, ctx=ctx))(
      state, batch, jax.random.key(1), jnp.float32(0))
  np.testing.assert_allclose(float(metrics['token_ratio_eval']), want_ratio, rtol=1e-5)
  assert abs(float(metrics['token_ratio']) - want_ratio) > 1e-3  # batch statistics differ
  np.testing.assert_allclose(float(new.halt_control['offset']),
                             1.0 + GAIN * (want_ratio - TARGET), rtol=1e-5)


def test_joint_replicas_keep_their_own_offsets():
  # The training ratio: in eval mode both fresh replicas read 1.0 and the offsets would agree.
  config = _smoke(parallel='jit', **{'model.halt.ratio_source': 'train'})
  ctx = _context(config)
  fresh = [_fresh(config, ctx, seed) for seed in (0, 1)]
  batches = [_batches(2, seed) for seed in (0, 1)]
  keys = jnp.stack([jax.random.key(10), jax.random.key(11)])
  joint = parallel.create_strategy(ctx, replicas=2)
  state = joint.put_state(jax.tree.map(lambda *x: np.stack(x), *fresh))
  history, offsets = [], []
  for b0, b1 in zip(*batches):
    batch = {k: np.stack([b0[k], b1[k]]) for k in b0}
    state, metrics = joint.train_step(state, batch, keys, np.float32(0))
    history.append(joint.host_metrics(metrics))
    offsets.append(np.asarray(jax.device_get(joint.get_state(state)).halt_control['offset']))
  for r in range(2):
    _assert_rule([{k: v[r] for k, v in m.items()} for m in history], [o[r] for o in offsets])
  assert offsets[-1][0] != offsets[-1][1]


def test_checkpoint_round_trip(tmp_path):
  config = _smoke()
  state = _fresh(config, _context(config))
  state = state.replace(halt_control={'offset': jnp.float32(0.7)})
  with checkpoint.Checkpointer(str(tmp_path), async_save=False) as ckpt:
    ckpt.save(1, state, {'step': 1})
    restored, meta = ckpt.restore(1, _fresh(config, _context(config)))
  assert float(restored.halt_control['offset']) == np.float32(0.7)
  assert checkpoint.MISSING_FIELDS_KEY not in meta


def _old_run_config(num_train_steps):
  """tests/fixtures/old_run's config (test_old_checkpoints.py) with the controller on."""
  config = smoke.get_config()
  config.update_from_flattened_dict({
      'checkpoint_every_steps': 2, 'optim.min_learning_rate': 1e-3, 'parallel': 'jit',
      'num_train_steps': num_train_steps, 'model.halt.target_token_ratio': TARGET,
      'model.halt.ratio_gain': GAIN})
  return config


def test_old_checkpoint_restores_with_a_zero_offset(tmp_path):
  config = _old_run_config(4)
  target = _fresh(config, _context(config))
  with checkpoint.Checkpointer(os.path.join(FIXTURE, 'checkpoints')) as ckpt:
    state, meta, step = ckpt.restore_latest(target)
  assert step == 4 and int(state.step) == 4
  assert float(state.halt_control['offset']) == 0.0
  assert 'halt_control' in meta[checkpoint.MISSING_FIELDS_KEY]


@pytest.mark.slow
def test_old_run_resumes_with_the_controller(tmp_path):
  """The fixture (saved before the controller existed) trains on to step 6 with it: the
  offset starts at 0, moves by the rule over steps 5 and 6, and is checkpointed."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(FIXTURE, workdir)
  config = _old_run_config(6)
  summary = loop.train_and_evaluate(config, workdir)
  assert summary['start_step'] == 4 and summary['step'] == 6
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    last = [r for r in map(json.loads, f) if r['kind'] == 'train'][-1]
  assert last['step'] == 6
  # Steps 5 and 6 ran with offsets 0 and gain * (r5 - target); the line holds their means.
  ratios_sum = 2 * last['train/token_ratio_eval']
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    state, _ = ckpt.restore(6, _fresh(config, _context(config)))
  np.testing.assert_allclose(float(state.halt_control['offset']),
                             GAIN * (ratios_sum - 2 * TARGET), rtol=1e-5, atol=1e-6)
  # The logged offset is the mean of those two: between 0 and the offset after step 5.
  assert 'train/halt_offset' in summary
