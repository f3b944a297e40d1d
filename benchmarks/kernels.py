"""Micro-benchmarks behind two implementation choices, timed in one run (compare ratios):

  * the 3x3 conv kernel gradient (`matmul.conv3x3`): XLA's own transposed convolution, one GEMM
    on the unfolded (im2col) input, or nine GEMMs, one per kernel tap (what the model uses on
    CPU; GPU/TPU get the first);
  * the multi-step LIF over T (`neurons.lif_multistep`), forward + backward: `lax.scan` rolled
    or unrolled (what the model uses).

  python benchmarks/kernels.py [--batch=128] [--json=OUT.json]

Shapes are those of the Spikformer-4-384 CIFAR patch embedding with time folded into the batch
(--batch = T * images). GFLOP/s for the conv gradients; milliseconds for the LIF.
"""
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stas_jax.model import matmul  # noqa: E402  pylint: disable=g-import-not-at-top
from stas_jax.model import neurons  # noqa: E402  pylint: disable=g-import-not-at-top
from stas_jax.model.spec import ModelSpec  # noqa: E402  pylint: disable=g-import-not-at-top

_BATCH = flags.DEFINE_integer('batch', 128, 'Conv batch (timesteps x images).')
_REPEATS = flags.DEFINE_integer('repeats', 4, 'Timed repetitions (the minimum is reported).')
_JSON = flags.DEFINE_string('json', None, 'Write the results here as JSON.')

# (H = W, C_in, C_out) of proj_conv1, proj_conv2, proj_conv3 and rpe_conv at 4-384 / 32 px.
CONV_SHAPES = ((32, 48, 96), (32, 96, 192), (16, 192, 384), (8, 384, 384))


def kernel_grad_xla(x, dy, kernel):
  """XLA's own transposed convolution (what `matmul.conv3x3` uses on GPU/TPU)."""
  del kernel
  return matmul.kernel_grad_conv(x, dy)


def kernel_grad_im2col(x, dy, kernel):
  m, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], -1)
  dk = jnp.dot(cols.reshape(-1, 9 * c).T, dy.reshape(-1, dy.shape[-1]))
  return dk.reshape(kernel.shape)


def kernel_grad_taps(x, dy, kernel):
  """Nine per-tap GEMMs (what `matmul.conv3x3` uses on CPU)."""
  del kernel
  return matmul.kernel_grad_taps(x, dy)


def _best(fn, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  m = _BATCH.value
  result = {'conv_kernel_grad_gflops': {}, 'lif_fwd_bwd_ms': {}}
  variants = {'xla': kernel_grad_xla, 'im2col': kernel_grad_im2col, 'taps': kernel_grad_taps}
  for h, c, f in CONV_SHAPES:
    x = jnp.asarray(rng.random((m, h, h, c)) < 0.2, jnp.float32)     # spikes
    dy = jnp.asarray(rng.normal(size=(m, h, h, f)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, c, f)), jnp.float32)
    gflop = 2 * m * h * h * c * f * 9 / 1e9
    want = jax.jit(kernel_grad_xla)(x, dy, kernel)
    row = {}
    for name, fn in variants.items():
      jitted = jax.jit(fn)
      np.testing.assert_allclose(jitted(x, dy, kernel), want, rtol=2e-3, atol=2e-2)
      row[name] = gflop / _best(jitted, x, dy, kernel)
    result['conv_kernel_grad_gflops'][f'{h}x{h} {c}->{f}'] = row
  p = ModelSpec().lif()  # the default model's neurons
  for h, _, f in CONV_SHAPES[1:3]:
    seq = jnp.asarray(rng.normal(size=(4, m // 4, h, h, f)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=seq.shape), jnp.float32)
    row = {}
    for name, unroll in (('scan', 1), ('unrolled', True)):
      loss = lambda s, u=unroll: jnp.sum(neurons.lif_multistep(s, p, unroll=u)[0] * weights)
      row[name] = 1e3 * _best(jax.jit(jax.grad(loss)), seq)
    result['lif_fwd_bwd_ms'][f'T=4 x {m // 4} x {h}x{h}x{f}'] = row
  result['backend'] = jax.default_backend()
  print(json.dumps(result, indent=2))
  if _JSON.value:
    with open(_JSON.value, 'w') as fh:
      json.dump(result, fh, indent=2)


if __name__ == '__main__':
  app.run(main)
