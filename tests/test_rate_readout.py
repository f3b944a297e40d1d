"""The rate readout (`model.halt.readout = 'rate'`): by hand, against Spikformer's readout, and
on the early-exit path."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from stas_jax import early_exit
from stas_jax import halting
from stas_jax import model as model_lib
from stas_jax.model_config import spec_from_config
from test_halting import _images, _variables


def test_rate_update_by_hand():
  total = jnp.array([[2., 4.], [0., 0.]])       # two tokens, D = 2
  count = jnp.array([2., 0.])
  z = jnp.array([[1., 1.], [3., 5.]])
  # token 0 processed now: (2 + 1, 4 + 1) / 3; token 1 processed for the first time: itself
  total, count, mean = halting.rate_update(total, count, z, jnp.array([1., 1.]))
  np.testing.assert_allclose(mean, [[1., 5 / 3], [3., 5.]], rtol=1e-6)
  np.testing.assert_array_equal(count, [3., 1.])
  # A masked token keeps its sum and count; its mean is that of the timesteps it was run.
  total, count, mean = halting.rate_update(total, count, jnp.full((2, 2), 9.), jnp.array([0., 1.]))
  np.testing.assert_allclose(mean, [[1., 5 / 3], [6., 7.]], rtol=1e-6)
  np.testing.assert_array_equal(count, [3., 2.])


def test_act_with_rate_values_by_hand():
  # One token over three cells, h = 0.5 each: weights 0.5, 0.5 (R = 0.5 reaches 1 - eps at the
  # second cell). With values = running means of z = 2, 4, 6 the readout is
  # 0.5 * 2 + 0.5 * 3 = 2.5 (with the cell values it would be 0.5 * 2 + 0.5 * 4 = 3).
  state = halting.init_state(1, 1, 1)
  total, count = jnp.zeros((1, 1, 1)), jnp.zeros((1, 1))
  for k, zk in enumerate((2., 4., 6.)):
    z = jnp.full((1, 1, 1), zk)
    total, count, mean = halting.rate_update(total, count, z, state.mask)
    state, _ = halting.act_step(state, mean, jnp.full((1, 1), 0.5), 0.01, final=k == 2)
  np.testing.assert_allclose(state.out[0, 0, 0], 2.5, rtol=1e-6)


def test_no_halting_is_spikformers_readout():
  # beta so negative that h is 0: no token halts and the last cell gets weight 1, so the rate
  # readout is the time-mean of the last block's outputs, exactly what mode none reads.
  images = _images(seed=1)
  variables = _variables()
  rate = model_lib.create_model(tiny_model_config(
      **{'halt.mode': 'spatiotemporal', 'halt.beta': -1e4, 'halt.readout': 'rate'}))
  cell = model_lib.create_model(tiny_model_config(
      **{'halt.mode': 'spatiotemporal', 'halt.beta': -1e4}))
  none = model_lib.create_model(tiny_model_config(**{'halt.mode': 'none'}))
  logits_rate, aux = rate.apply(variables, images)
  logits_none, _ = none.apply(variables, images)
  logits_cell, _ = cell.apply(variables, images)
  np.testing.assert_array_equal(aux['active'], 1.0)
  np.testing.assert_allclose(logits_rate, logits_none, atol=1e-5)
  assert np.abs(np.asarray(logits_cell) - np.asarray(logits_none)).max() > 1e-3, \
      'the cell readout should differ: it reads the last cell only'


@pytest.mark.parametrize('mode', ['spatiotemporal', 'temporal'])
def test_early_exit_matches_the_dense_path(mode):
  model = model_lib.create_model(tiny_model_config(
      **{'halt.mode': mode, 'halt.beta': -1.0, 'halt.readout': 'rate', 'patch_embed': 'isps'}))
  images = _images(seed=3, batch=4)
  logits, aux = jax.jit(lambda v, x: model.apply(v, x))(_variables(), images)
  fast = functools.partial(early_exit.apply, model, fractions=(0.25, 0.5, 0.95))
  logits_ee, aux_ee = jax.jit(fast)(_variables(), images)
  np.testing.assert_allclose(logits_ee, logits, atol=1e-5)
  np.testing.assert_array_equal(aux_ee['active'], aux['active'])
  np.testing.assert_allclose(aux_ee['cell_weight'], aux['cell_weight'], atol=1e-6)
  assert 0 < float(aux['active'].mean()) < 1, 'the test needs partly halted tokens'
  assert float(aux_ee['rows_ratio']) < 1, 'no work was skipped'


def test_spatial_mode_rejects_the_rate_readout():
  with pytest.raises(ValueError, match="readout='rate'"):
    spec_from_config(tiny_model_config(**{'halt.mode': 'spatial', 'halt.readout': 'rate'}))
  with pytest.raises(ValueError, match='model.halt.readout'):
    spec_from_config(tiny_model_config(**{'halt.readout': 'mean'}))
