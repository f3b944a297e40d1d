"""LIF dynamics and surrogate gradients against hand-computed values."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from stas_jax.model import neurons

# The hand-computed values below assume these constants (today's model defaults too).
P = neurons.LIFParams(tau=2.0, v_threshold=1.0, v_reset=0.0, surrogate='sigmoid', alpha=4.0,
                      detach_reset=True)


def test_constant_input_spike_train_by_hand():
  # v: 0 -> H = 0.75 (no spike) -> H = 0.75 + (1.5 - 0.75) / 2 = 1.125 (spike, reset 0) -> ...
  x = jnp.full((6,), 1.5)
  s, v_last = neurons.lif_multistep(x[:, None], P)
  np.testing.assert_array_equal(np.asarray(s[:, 0]), [0, 1, 0, 1, 0, 1])
  assert float(v_last[0]) == 0.0


def test_membrane_values_by_hand():
  v, s = neurons.lif_step(jnp.float32(0.5), jnp.float32(0.3), P)
  assert float(s) == 0.0
  np.testing.assert_allclose(float(v), 0.5 + (0.3 - 0.5) / 2, rtol=0, atol=1e-7)


def test_threshold_equality_fires():
  # H = 0 + (2 - 0) / 2 = 1.0 exactly == v_threshold.
  v, s = neurons.lif_step(jnp.float32(0.0), jnp.float32(2.0), P)
  assert float(s) == 1.0 and float(v) == 0.0
  attn = dataclasses.replace(P, v_threshold=0.5)
  _, s = neurons.lif_step(jnp.float32(0.0), jnp.float32(1.0), attn)
  assert float(s) == 1.0
  _, s = neurons.lif_step(jnp.float32(0.0), jnp.float32(np.nextafter(2.0, 0, dtype=np.float32)), P)
  assert float(s) == 0.0


def test_nonzero_reset_and_tau():
  p = dataclasses.replace(P, tau=4.0, v_reset=-0.5, v_threshold=0.25)
  v, s = neurons.lif_step(jnp.float32(-0.5), jnp.float32(2.0), p)
  # H = -0.5 + (2 - (-0.5 + 0.5)) / 4 = 0.0 -> below 0.25, no spike.
  assert float(s) == 0.0 and float(v) == 0.0
  v, s = neurons.lif_step(v, jnp.float32(2.0), p)
  # H = 0 + (2 - 0.5) / 4 = 0.375 -> spike, reset to -0.5.
  assert float(s) == 1.0 and float(v) == -0.5


def test_multistep_matches_python_loop():
  x = jax.random.normal(jax.random.PRNGKey(0), (7, 5, 3)) * 2
  s, v_last = neurons.lif_multistep(x, P)
  v = np.zeros((5, 3), np.float32)
  for t in range(7):
    h = v + (np.asarray(x[t]) - v) / 2
    spike = (h >= 1.0).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(s[t]), spike)
    v = h * (1 - spike)
  np.testing.assert_allclose(np.asarray(v_last), v, atol=1e-6)


def test_masked_step_freezes_membrane_and_silences():
  v = jnp.array([0.9, 0.9, 0.2])
  x = jnp.array([3.0, 3.0, 0.0])
  mask = jnp.array([1.0, 0.0, 0.0])
  v_new, s = neurons.lif_step_masked(v, x, mask, P)
  np.testing.assert_array_equal(np.asarray(s), [1.0, 0.0, 0.0])
  np.testing.assert_allclose(np.asarray(v_new), [0.0, 0.9, 0.2])


@pytest.mark.parametrize('surrogate,alpha', [('sigmoid', 4.0), ('atan', 2.0)])
def test_surrogate_gradient_matches_formula(surrogate, alpha):
  xs = jnp.linspace(-2.0, 2.0, 41)
  g = jax.vmap(jax.grad(lambda x: neurons.spike(x, surrogate, alpha)))(xs)
  if surrogate == 'sigmoid':
    sig = 1 / (1 + np.exp(-alpha * np.asarray(xs)))
    want = alpha * sig * (1 - sig)
  else:
    want = alpha / 2 / (1 + (math.pi / 2 * alpha * np.asarray(xs)) ** 2)
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-7)
  # The forward pass stays a hard step.
  np.testing.assert_array_equal(np.asarray(neurons.spike(xs, surrogate, alpha)),
                                (np.asarray(xs) >= 0).astype(np.float32))


@pytest.mark.parametrize('surrogate,alpha', [('sigmoid', 4.0), ('atan', 2.0)])
def test_surrogate_is_derivative_of_its_smooth_primitive(surrogate, alpha):
  # The surrogate gradient is the exact derivative of sigmoid(alpha x) / the ATan primitive,
  # which check_grads verifies numerically (the step itself has no numeric derivative).
  if surrogate == 'sigmoid':
    prim = lambda x: jax.nn.sigmoid(alpha * x)
  else:
    prim = lambda x: jnp.arctan(math.pi / 2 * alpha * x) / math.pi + 0.5
  x = jnp.array([-0.7, -0.1, 0.0, 0.2, 1.3], jnp.float64 if jax.config.x64_enabled else jnp.float32)
  check_grads(prim, (x,), order=1, modes=['rev'], eps=1e-3, atol=1e-2, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(prim))(x)),
                             np.asarray(neurons.surrogate_grad(x, surrogate, alpha)), rtol=1e-5)


def test_lif_charge_gradients():
  v = jnp.array([0.1, 0.4])
  x = jnp.array([0.3, -0.2])
  check_grads(lambda v, x: neurons.lif_charge(v, x, P), (v, x), order=2, modes=['fwd', 'rev'])


def test_step_gradient_through_surrogate():
  # dS/dx = surrogate'(H - v_th) * dH/dx = surrogate'(x/2 - 1) / tau  (from v = 0).
  x = jnp.float32(1.7)
  g = jax.grad(lambda x: neurons.lif_step(jnp.float32(0.0), x, P)[1])(x)
  want = float(neurons.surrogate_grad(x / 2 - 1.0, 'sigmoid', 4.0)) / 2
  np.testing.assert_allclose(float(g), want, rtol=1e-6)


def test_detached_reset_changes_membrane_gradient():
  def v_after_two(x, detach):
    p = dataclasses.replace(P, detach_reset=detach)
    s, v = neurons.lif_multistep(jnp.stack([x, x]), p)
    return jnp.sum(v)

  x = jnp.array([2.4])
  g_detached = jax.grad(v_after_two)(x, True)
  g_attached = jax.grad(v_after_two)(x, False)
  assert np.all(np.isfinite(np.asarray(g_detached)))
  assert not np.allclose(np.asarray(g_detached), np.asarray(g_attached))


def test_unknown_surrogate_is_rejected():
  with pytest.raises(ValueError, match='surrogate'):
    dataclasses.replace(P, surrogate='relu')


def test_nonpositive_tau_is_rejected():
  with pytest.raises(ValueError, match='tau'):
    dataclasses.replace(P, tau=0.0)


# Constant currents (tau 2, v_th 1, reset 0) and their 4-step spike trains, by hand:
#   3.0: H = 1.5 every step -> 1 1 1 1;  1.5: 0.75, 1.125 (spike), 0.75, 1.125 -> 0 1 0 1;
#   1.2: 0.6, 0.9, 1.05 (spike), 0.6 -> 0 0 1 0;  1.05: 0.525, 0.7875, 0.91875, 0.984 -> none.
CONSTANT = {3.0: [1, 1, 1, 1], 1.5: [0, 1, 0, 1], 1.2: [0, 0, 1, 0], 1.05: [0, 0, 0, 0]}


def test_constant_input_trains_and_their_or_by_hand():
  x = jnp.array(list(CONSTANT), jnp.float32)
  s = neurons.lif_constant_input(x, 4, P)
  np.testing.assert_array_equal(np.asarray(s).T, list(CONSTANT.values()))
  np.testing.assert_array_equal(np.asarray(neurons.fired_any(s)), [1, 1, 1, 0])
  # Fires within T steps iff x >= v_th / (1 - (1 - 1/tau) ** T) = 16 / 15 for T = 4.
  onset = 16.0 / 15.0
  edge = jnp.array([np.nextafter(onset, 0, dtype=np.float32), onset + 1e-6], jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(neurons.fired_any(neurons.lif_constant_input(edge, 4, P))), [0, 1])


def test_fired_any_gradient_below_onset_is_the_sum_of_step_surrogates():
  # No spike yet: h_t = x (1 - 2^-t) and d/dx [1 - prod(1 - s_t)] = sum_t (1 - 2^-t) sg(h_t - 1),
  # sg(u) = 4 sigmoid(4 u) (1 - sigmoid(4 u)).
  x = 0.9
  grad = jax.grad(lambda v: neurons.fired_any(neurons.lif_constant_input(v, 4, P)))(
      jnp.float32(x))
  sig = lambda u: 1.0 / (1.0 + math.exp(-u))
  want = sum((1 - 2.0 ** -t) * 4 * sig(4 * (x * (1 - 2.0 ** -t) - 1))
             * (1 - sig(4 * (x * (1 - 2.0 ** -t) - 1))) for t in range(1, 5))
  np.testing.assert_allclose(float(grad), want, rtol=1e-5)
