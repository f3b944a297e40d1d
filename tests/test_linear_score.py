"""The linear halting score (`model.halt.score = 'linear'`): by hand, in the model, early exit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from stas_jax import early_exit
from stas_jax import halting
from stas_jax import losses
from stas_jax import model as model_lib
from stas_jax import optim
from stas_jax.model_config import spec_from_config
from test_halting import _images, _variables


def test_linear_score_by_hand():
  z = jnp.array([[[1., 0., 2.], [0., 0., 0.]]])             # (B=1, N=2, D=3)
  w, b = jnp.array([0.5, -1.0, 0.25]), jnp.float32(-0.5)
  # token 0: 0.5 + 0.5 - 0.5 = 0.5; token 1: the bias alone, -0.5
  h = halting.halting_score(z, 2.0, 1.0, channel=0, head=(w, b))
  np.testing.assert_allclose(h, [[1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(0.0))]], rtol=1e-6)
  # The one-hot kernel at the channel and a zero bias is the channel rule.
  one_hot = (jnp.array([0., 0., 1.]), jnp.float32(0.0))
  np.testing.assert_allclose(halting.halting_score(z, 3.0, -3.0, 2, one_hot),
                             halting.halting_score(z, 3.0, -3.0, 2), rtol=1e-7)


def _linear_model(mode='spatiotemporal', beta=-1.0):
  cfg = tiny_model_config(**{'halt.mode': mode, 'halt.beta': beta, 'halt.score': 'linear',
                             'halt.channel': 3, 'patch_embed': 'isps'})
  return model_lib.create_model(cfg), cfg


def _with_head(variables, kernel, bias):
  params = dict(variables['params'], halt_score_kernel=kernel, halt_score_bias=bias)
  return {'params': params, 'batch_stats': variables['batch_stats']}


def test_linear_score_starts_as_the_channel_rule():
  model, _ = _linear_model()
  channel = model_lib.create_model(tiny_model_config(
      **{'halt.mode': 'spatiotemporal', 'halt.beta': -1.0, 'halt.channel': 3,
         'patch_embed': 'isps'}))
  images = _images(seed=1)
  base = _variables()
  init = model_lib.init_variables(model, jax.random.PRNGKey(0))
  kernel = init['params']['halt_score_kernel']
  np.testing.assert_array_equal(kernel, np.eye(kernel.shape[0])[3])
  assert float(init['params']['halt_score_bias']) == 0.0
  decay = optim.weight_decay_mask(init['params'])        # the spec: no weight decay on the head
  assert not decay['halt_score_kernel'] and not decay['halt_score_bias']
  logits_lin, aux_lin = model.apply(_with_head(base, kernel, init['params']['halt_score_bias']),
                                    images)
  logits_ch, aux_ch = channel.apply(base, images)
  np.testing.assert_allclose(logits_lin, logits_ch, atol=1e-6)
  np.testing.assert_array_equal(aux_lin['active'], aux_ch['active'])
  assert 0 < float(aux_ch['active'].mean()) < 1, 'the test needs partly halted tokens'


def test_the_kernel_and_bias_decide_who_halts():
  model, _ = _linear_model()
  images = _images(seed=1)
  dim = spec_from_config(_linear_model()[1]).dim
  zeros = jnp.zeros((dim,))
  # Bias 5: h = sigmoid(4) = 0.98 everywhere, so every token halts at its second cell; bias
  # -10: h = 0 up to rounding, so no token halts before the forced last cell.
  _, early = model.apply(_with_head(_variables(), zeros, jnp.float32(5.0)), images)
  _, late = model.apply(_with_head(_variables(), zeros, jnp.float32(-10.0)), images)
  active_early = np.asarray(early['active']).reshape(-1, *early['active'].shape[2:])
  np.testing.assert_array_equal(active_early[:2], 1.0)
  np.testing.assert_array_equal(active_early[2:], 0.0)
  np.testing.assert_array_equal(late['active'], 1.0)


def test_gradients_reach_the_kernel_and_bias():
  model, cfg = _linear_model()
  spec = spec_from_config(cfg)
  base = _variables()
  dim = spec.dim
  params = dict(base['params'], halt_score_kernel=jnp.eye(dim)[3],
                halt_score_bias=jnp.float32(0.0))
  targets = jax.nn.one_hot(jnp.arange(2) % 10, 10)

  def loss_fn(p):
    (logits, aux), _ = model.apply({'params': p, 'batch_stats': base['batch_stats']},
                                   _images(seed=1), train=True, mutable=['batch_stats'])
    return losses.total_loss(logits, targets, aux, spec)[0]

  grads = jax.jit(jax.grad(loss_fn))(params)
  assert np.all(np.isfinite(np.asarray(grads['halt_score_kernel'])))
  assert np.count_nonzero(np.asarray(grads['halt_score_kernel'])) > 1
  assert float(grads['halt_score_bias']) != 0.0


def test_no_score_parameters_without_halting():
  cfg = tiny_model_config(**{'halt.mode': 'none', 'halt.score': 'linear'})
  model = model_lib.create_model(cfg)
  params = model_lib.init_variables(model, jax.random.PRNGKey(0))['params']
  assert not any(k.startswith('halt_') for k in params)


def test_unknown_score_is_a_clear_error():
  with pytest.raises(ValueError, match='model.halt.score'):
    spec_from_config(tiny_model_config(**{'halt.score': 'mlp'}))


@pytest.mark.parametrize('mode', ['spatiotemporal', 'temporal'])
def test_early_exit_matches_the_dense_path(mode):
  model, cfg = _linear_model(mode, beta=-1.0)
  dim = spec_from_config(cfg).dim
  kernel = jax.random.normal(jax.random.PRNGKey(5), (dim,)) * 0.3
  variables = _with_head(_variables(), kernel, jnp.float32(0.2))
  images = _images(seed=3, batch=4)
  logits, aux = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
  fast = functools.partial(early_exit.apply, model, fractions=(0.25, 0.5, 0.95))
  logits_ee, aux_ee = jax.jit(fast)(variables, images)
  np.testing.assert_allclose(logits_ee, logits, atol=1e-5)
  np.testing.assert_array_equal(aux_ee['active'], aux['active'])
  assert 0 < float(aux['active'].mean()) < 1, 'the test needs partly halted tokens'
