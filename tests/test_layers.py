"""Layer building blocks against independent references (lax autodiff, flax and PyTorch
pooling, hand-worked cases)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stas_jax.model import layers
from stas_jax.model import spec as model_spec


@pytest.mark.parametrize('size', [8, 7])
def test_max_pool_matches_reduce_window(size):
  x = jax.random.normal(jax.random.PRNGKey(2), (2, size, size, 3))
  ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(np.asarray(layers.max_pool(x)), np.asarray(ref(x)))
  g = jax.grad(lambda x: jnp.sum(layers.max_pool(x) ** 2))(x)
  g_ref = jax.grad(lambda x: jnp.sum(ref(x) ** 2))(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-6)


def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window():
  # All ones: every window is a tie. Output (r, c) covers rows 2r-1..2r+1 and columns
  # 2c-1..2c+1 (-1 is padding), so its first real element in row-major order is
  # (max(2r-1, 0), max(2c-1, 0)), worked by hand for 4 x 4 and 5 x 5 inputs.
  g4 = jax.grad(lambda x: jnp.sum(layers.max_pool(x)))(jnp.ones((1, 4, 4, 1)))[0, :, :, 0]
  want4 = np.zeros((4, 4))
  want4[np.ix_([0, 1], [0, 1])] = 1
  np.testing.assert_array_equal(np.asarray(g4), want4)
  g5 = jax.grad(lambda x: jnp.sum(layers.max_pool(x)))(jnp.ones((1, 5, 5, 1)))[0, :, :, 0]
  want5 = np.zeros((5, 5))
  want5[np.ix_([0, 1, 3], [0, 1, 3])] = 1
  np.testing.assert_array_equal(np.asarray(g5), want5)


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 7, 7, 3)])
def test_max_pool_gradient_on_spikes_matches_pytorch(shape):
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  x = (rng.random(shape) < 0.5).astype(np.float32)          # binary: ties in most windows
  w = rng.normal(size=(shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, shape[3]))
  w = w.astype(np.float32)
  g = jax.grad(lambda x: jnp.sum(layers.max_pool(x) * w))(jnp.asarray(x))
  xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
  y = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
  (y * torch.tensor(w).permute(0, 3, 1, 2)).sum().backward()
  np.testing.assert_array_equal(np.asarray(layers.max_pool(jnp.asarray(x))),
                                y.detach().permute(0, 2, 3, 1).numpy())
  np.testing.assert_allclose(np.asarray(g), xt.grad.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def _nine_pad_backward(height, width, arg, g):
  """The max-pool gradient as the sum, in tap order, of the nine tap gradients each padded back
  to the input grid (interior padding 1): the formulation `layers._max_pool_bwd` replaced."""
  out_h, out_w = g.shape[1:3]
  dxp = 0
  for k in range(9):
    i, j = divmod(k, 3)
    spread = [(0, 0, 0), (i, height + 2 - i - 2 * out_h + 1, 1),
              (j, width + 2 - j - 2 * out_w + 1, 1), (0, 0, 0)]
    dxp = dxp + jax.lax.pad(jnp.where(arg == k, g, 0.0), 0.0, spread)
  return dxp[:, 1:height + 1, 1:width + 1, :]


@pytest.mark.parametrize('size', [8, 7, 16, 1, 2])
def test_max_pool_backward_equals_the_nine_padded_taps_bit_for_bit(size):
  """The parity-interleaved backward adds the same terms in the same order (zeros aside)."""
  rng = np.random.default_rng(size)
  x = jnp.asarray((rng.random((2, size, size, 3)) < 0.4).astype(np.float32))   # many ties
  _, arg = layers._max_pool_fwd(x, size, size)
  g = jnp.asarray(rng.normal(size=arg.shape).astype(np.float32))
  got = layers._max_pool_bwd(size, size, arg, g)[0]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(_nine_pad_backward(size, size, arg, g)))


def test_masked_batch_norm_counts_active_rows_and_survives_all_halted():
  x = jnp.array([[1.0, 10.0], [3.0, 20.0], [100.0, -5.0]])[None]   # (1, 3 tokens, 2)
  mask = jnp.array([[1.0, 1.0, 0.0]])[..., None]
  bn = layers.BatchNorm(momentum=0.5)
  variables = bn.init(jax.random.PRNGKey(0), x, False)
  y, upd = bn.apply(variables, x, True, mask, mutable=['batch_stats'])
  # Statistics of the two active rows only: mean (2, 15), biased var (1, 25).
  a, b = 1 / np.sqrt(1 + 1e-5), 5 / np.sqrt(25 + 1e-5)
  np.testing.assert_allclose(np.asarray(y[0, :2]), [[-a, -b], [a, b]], rtol=1e-5)
  # Running stats: 0.5 * init + 0.5 * batch (unbiased var: 2 and 50).
  np.testing.assert_allclose(np.asarray(upd['batch_stats']['mean']), [1.0, 7.5])
  np.testing.assert_allclose(np.asarray(upd['batch_stats']['var']), [1.5, 25.5])
  y0, upd0 = bn.apply(variables, x, True, jnp.zeros_like(mask), mutable=['batch_stats'])
  assert np.all(np.isfinite(np.asarray(y0)))
  np.testing.assert_array_equal(np.asarray(upd0['batch_stats']['mean']),
                                np.asarray(variables['batch_stats']['mean']))


@pytest.mark.parametrize('tail, reduce, tail_steps, want, spikes, unit', [
    ('single_step', 'mean', 0, [1, 0, 0, 0], 1, 1),       # one step from rest: H = x / 2
    ('any_spike', 'mean', 0, [1, 1, 1, 0], 3, 1),         # fires in 4 steps iff x >= 16 / 15
    ('multi_step', 'mean', 0, [1, 0.5, 0.25, 0], 7, 4),   # 4-step counts 4, 2, 1, 0, as a rate
    ('multi_step', 'sum', 0, [4, 2, 1, 0], 7, 1),
    # 2 steps (H = x/2, then x/2 + H/2 unless it fired): trains 11, 01, 00, 00.
    ('any_spike', 'mean', 2, [1, 1, 0, 0], 2, 1),         # fires in 2 steps iff x >= 4 / 3
    ('multi_step', 'mean', 2, [1, 0.5, 0, 0], 3, 2),      # counts 2, 1, 0, 0 as a rate of 2
    ('multi_step', 'sum', 2, [2, 1, 0, 0], 3, 1),
    ('multi_step', 'sum', 4, [4, 2, 1, 0], 7, 1),         # 4 = T: the default
])
def test_isps_tail_neurons_on_constant_currents(tail, reduce, tail_steps, want, spikes, unit):
  # 4-step trains of 3.0, 1.5, 1.2, 1.05 (tests/test_neurons.py): 1111, 0101, 0010, 0000.
  spec = model_spec.spec_from_config(
      dict(patch_embed='isps', timesteps=4,
           isps=dict(tail=tail, reduce=reduce, tail_steps=tail_steps)))
  current = jnp.array([[3.0, 1.5, 1.2, 1.05]], jnp.float32)      # one image, four neurons
  out, count, per_unit = layers.SPS(spec).apply({}, current, 1, tail, method=layers.SPS.fire)
  np.testing.assert_allclose(np.asarray(out), [want], rtol=1e-7)
  np.testing.assert_array_equal(np.asarray(count), [spikes])
  assert per_unit == unit
  # The SPS (time folded into the batch, T = 4 rows) runs the ordinary multi-step LIF.
  seq = jnp.broadcast_to(current, (4, 4)).reshape(4, 4)
  out, count, per_unit = layers.SPS(spec).apply({}, seq, 4, tail, method=layers.SPS.fire)
  np.testing.assert_array_equal(np.asarray(out).T, [[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 1, 0],
                                                   [0, 0, 0, 0]])
  assert per_unit == 1 and int(count[0]) == 7
