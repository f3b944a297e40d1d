"""Differentiable halting: with the soft mask, the loss is smooth in the halting parameters,
and training anneals the mask's temperature to the hard mask that evaluation uses.

Spikes are Heaviside functions with surrogate gradients, so the whole network's gradient is not
the derivative of its forward pass. With the block outputs held fixed, the rest (ACT over the
(t, l) grid, readout, head, cross-entropy) is smooth, and jax.grad must match finite
differences there, in float64.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import smoke
from conftest import tiny_model_config
from stas_jax.model import halting
from stas_jax.train import losses
from stas_jax.model import network
from stas_jax.train import evaluation
from stas_jax.train import optim
from stas_jax.train import parallel
from stas_jax.train import steps
from stas_jax.model.spec import spec_from_config
from test_halting import _images, _variables

# beta per mode such that the (soft) masks are well below 1 on the test network.
BETAS = {'spatiotemporal': -1.2, 'spatial': 1.0, 'temporal': 0.0}
MODES = tuple(BETAS)
GAMMA, TEMPERATURE = 0.8, 0.2
LABELS = jnp.array([3, 7])


def _soft_config(mode):
  return tiny_model_config(**{'halt.mode': mode, 'halt.learnable': True, 'halt.soft_mask': True,
                              'halt.gamma': GAMMA, 'halt.beta': BETAS[mode], 'patch_embed': 'isps',
                              'halt.alpha_p': 0.1, 'halt.alpha_d': 0.1})


def _params(mode):
  return dict(_variables()['params'], halt_gamma=jnp.float32(GAMMA),
              halt_beta=jnp.float32(BETAS[mode]))


@functools.lru_cache(maxsize=None)
def _captured(mode):
  """Logits and block outputs (T, L, B, N, D) of the soft-mask model at TEMPERATURE."""
  model = network.create_model(_soft_config(mode))
  variables = {'params': _params(mode), 'batch_stats': _variables()['batch_stats']}
  logits, aux = jax.jit(lambda v, x: model.apply(v, x, capture=True,
                                                 halt_temperature=TEMPERATURE))(
                                                     variables, _images())
  return model, np.asarray(logits), np.asarray(aux['block_outputs']), np.asarray(aux['active'])


def _readout_logits(model, block_outputs, gamma, beta, temperature):
  """The model's halting, readout and head replayed over fixed block outputs."""
  spec = model.spec
  timesteps, depth, batch, tokens, dim = block_outputs.shape
  dtype = block_outputs.dtype
  hs = halting.init_state(batch, tokens, dim, dtype)
  for t in range(timesteps):
    if spec.halt.mode == 'spatial':
      hs = halting.reset_for_timestep(hs)
    for l in range(depth):
      hs, _ = halting.cell_update(spec.halt, hs, block_outputs[t, l],
                                  halting.CellPosition.at(t, l, timesteps, depth),
                                  halting.HaltParams(gamma, beta, temperature))
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), {'params': _params(spec.halt.mode)})
  return model.apply(params, hs.out, method=network.STAS.classify)


@pytest.mark.parametrize('mode', MODES)
def test_readout_gradient_matches_finite_differences(mode):
  model, logits, block_outputs, active = _captured(mode)
  assert active.mean() < 0.95, f'the test needs partly halted tokens, got {active.mean()}'
  beta = BETAS[mode]
  # The replay reproduces the model's own logits (float32).
  replay = _readout_logits(model, jnp.asarray(block_outputs), GAMMA, beta, TEMPERATURE)
  np.testing.assert_allclose(np.asarray(replay), logits, rtol=1e-5, atol=1e-5)

  with jax.enable_x64(True):
    z = jnp.asarray(block_outputs, jnp.float64)

    def loss(gb):
      out = _readout_logits(model, z, gb[0], gb[1], jnp.float64(TEMPERATURE))
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, LABELS))

    gb = jnp.array([GAMMA, beta], jnp.float64)
    grad = np.asarray(jax.jit(jax.grad(loss))(gb))
    step = 1e-5
    fd = [float(loss(gb + step * e) - loss(gb - step * e)) / (2 * step)
          for e in np.eye(2)]
  assert np.all(np.abs(grad) > 1e-6), grad
  np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-9)


def test_model_gradient_reaches_halting_params_in_soft_mode():
  mode = 'spatiotemporal'  # test_halting checks every mode with the hard mask
  cfg = _soft_config(mode)
  model = network.create_model(cfg)
  spec = spec_from_config(cfg)
  targets = jax.nn.one_hot(LABELS, 10)

  def loss_fn(params, temperature):
    (logits, aux), _ = model.apply({'params': params, 'batch_stats': _variables()['batch_stats']},
                                   _images(), train=True, mutable=['batch_stats'],
                                   halt_temperature=temperature)
    return losses.total_loss(logits, targets, aux, spec)[0]

  grad_fn = jax.jit(jax.grad(loss_fn))
  grads = grad_fn(_params(mode), jnp.float32(TEMPERATURE))
  for name in ('halt_gamma', 'halt_beta'):
    g = float(grads[name])
    assert np.isfinite(g) and g != 0, (name, g)
  # The same compiled function serves any temperature (it is traced), including the hard mask.
  hard = grad_fn(_params(mode), jnp.float32(0.0))
  assert np.isfinite(float(hard['halt_gamma']))


# ----------------------------------------------------------------------------- annealing


def _annealed_config(anneal_steps):
  config = smoke.get_config()
  config.model.halt.update(soft_mask=True, learnable=True, soft_temperature=0.3, beta=-1.0,
                           alpha_p=0.1)
  config.halt_anneal_steps = anneal_steps
  return config


def test_temperature_schedule():
  schedule = optim.halt_temperature_schedule(_annealed_config(4), total_steps=100)
  np.testing.assert_allclose([schedule(s) for s in (0, 1, 2, 4, 50)],
                             [0.3, 0.225, 0.15, 0.0, 0.0], atol=1e-7)
  whole_run = optim.halt_temperature_schedule(_annealed_config(-1), total_steps=10)
  np.testing.assert_allclose([whole_run(s) for s in (0, 5, 10)], [0.3, 0.15, 0.0], atol=1e-7)
  constant = optim.halt_temperature_schedule(_annealed_config(0), total_steps=10)
  assert float(constant(7)) == np.float32(0.3)
  hard = _annealed_config(4)
  hard.model.halt.soft_mask = False
  assert optim.halt_temperature_schedule(hard, total_steps=10) is None


@pytest.mark.slow
def test_annealed_training_and_hard_mask_evaluation():
  config = _annealed_config(2)
  lr = optim.learning_rate_schedule(config, 100, 100)
  ctx = steps.StepContext(config=config, mean=np.float32([33.]), std=np.float32([78.]),
                          num_classes=10, schedule=lr,
                          halt_temperature=optim.halt_temperature_schedule(config, 100))
  strategy = parallel.create_strategy(ctx, jax.devices()[:1])
  model = network.create_model(config.model)
  state = strategy.put_state(steps.create_train_state(
      model, jax.random.key(0), optim.create_optimizer(config, lr)))
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8),
           'label': rng.integers(0, 10, (8,), dtype=np.int32)}
  temperatures = []
  for _ in range(3):
    state, metrics = strategy.train_step(state, batch, jax.random.key(1), np.float32(0))
    temperatures.append(strategy.host_metrics(metrics)['halt_temperature'])
  np.testing.assert_allclose(temperatures, [0.3, 0.15, 0.0], atol=1e-7)
  params = strategy.get_state(state).params
  assert float(params['halt_beta']) != -1.0, 'the soft mask passed no gradient to beta'

  # Evaluation uses the hard mask: the same sums as the model without soft_mask.
  hard_config = _annealed_config(2)
  hard_config.model.halt.soft_mask = False
  host_state = jax.device_get(strategy.get_state(state))
  eval_batch = dict(batch, mask=np.ones((8,), np.float32))
  sums = {}
  for name, cfg in (('soft', config), ('hard', hard_config)):
    eval_ctx = steps.StepContext(config=cfg, mean=ctx.mean, std=ctx.std, num_classes=10,
                                 schedule=lr)
    cfg_state = host_state.replace(apply_fn=network.create_model(cfg.model).apply)
    sums[name] = jax.jit(functools.partial(evaluation.eval_step, ctx=eval_ctx))(cfg_state,
                                                                                eval_batch)
  for key, value in sums['hard'].items():
    np.testing.assert_allclose(sums['soft'][key], value, rtol=1e-6, err_msg=key)
