"""LIF neuron dynamics and surrogate-gradient spike functions, as pure JAX functions.

Matches SpikingJelly's MultiStepLIFNode as Spikformer uses it (spec section 2): decay_input,
hard reset to v_reset, detached reset, a spike when the membrane reaches the threshold.
"""
import dataclasses
import functools
import math


import jax
import jax.numpy as jnp

SURROGATES = ('sigmoid', 'atan')


@dataclasses.dataclass(frozen=True)
class LIFParams:
  """Constants of one LIF population; no defaults: `ModelSpec.lif()` builds them from the config.

  Attributes:
    tau: membrane time constant (decay 1/tau per step).
    v_threshold: firing threshold; a membrane exactly at threshold fires.
    v_reset: membrane value after a spike (hard reset).
    surrogate: 'sigmoid' (SpikingJelly Sigmoid) or 'atan' (SpikingJelly ATan).
    alpha: surrogate sharpness.
    detach_reset: stop the gradient through the reset (Spikformer does).
  """
  tau: float
  v_threshold: float
  v_reset: float
  surrogate: str
  alpha: float
  detach_reset: bool

  def __post_init__(self):
    if self.surrogate not in SURROGATES:
      raise ValueError(f'unknown surrogate {self.surrogate!r}; choose one of {SURROGATES}')
    if self.tau <= 0:
      raise ValueError(f'tau must be positive, got {self.tau}')


def surrogate_grad(x: jax.Array, surrogate: str, alpha: float) -> jax.Array:
  """d spike / d x of the smooth surrogate at x = H - v_threshold."""
  if surrogate == 'sigmoid':
    sg = jax.nn.sigmoid(alpha * x)
    return alpha * sg * (1.0 - sg)
  if surrogate == 'atan':
    return (alpha / 2.0) / (1.0 + (math.pi / 2.0 * alpha * x) ** 2)
  raise ValueError(f'unknown surrogate {surrogate!r}; choose one of {SURROGATES}')


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def spike(x: jax.Array, surrogate: str, alpha: float) -> jax.Array:
  """Heaviside step (x >= 0 -> 1) whose derivative is the surrogate's."""
  return (x >= 0).astype(x.dtype)


@spike.defjvp
def _spike_jvp(surrogate, alpha, primals, tangents):
  (x,), (dx,) = primals, tangents
  return spike(x, surrogate, alpha), surrogate_grad(x, surrogate, alpha).astype(x.dtype) * dx


def lif_charge(v: jax.Array, x: jax.Array, p: LIFParams) -> jax.Array:
  """Membrane after integrating input x (decay_input): H = V + (X - (V - v_reset)) / tau."""
  return v + (x - (v - p.v_reset)) / p.tau


def lif_step(v: jax.Array, x: jax.Array, p: LIFParams) -> tuple[jax.Array, jax.Array]:
  """One LIF step.

  Args:
    v: membrane V_{t-1}, any shape.
    x: input current X_t, same shape.
    p: neuron constants.

  Returns:
    (V_t, S_t): the membrane after the (hard) reset and the spikes in {0, 1}.
  """
  h = lif_charge(v, x, p)
  s = spike(h - p.v_threshold, p.surrogate, p.alpha)
  s_reset = jax.lax.stop_gradient(s) if p.detach_reset else s
  v_new = h * (1.0 - s_reset) + p.v_reset * s_reset
  return v_new, s


def lif_step_masked(v: jax.Array, x: jax.Array, mask: jax.Array,
                    p: LIFParams) -> tuple[jax.Array, jax.Array]:
  """LIF step whose masked-out entries (mask 0) keep their membrane and do not spike.

  The mask is applied as dense multiplies (it may be soft, in [0, 1]):
  V_t = m * V_new + (1 - m) * V_{t-1},  S_t = m * S_new.

  Args:
    v: membrane, shape S.
    x: input, shape S.
    mask: broadcastable to S; 1 = active.
    p: neuron constants.
  """
  v_new, s = lif_step(v, x, p)
  return mask * v_new + (1.0 - mask) * v, mask * s


def lif_multistep(x_seq: jax.Array, p: LIFParams, v0: jax.Array | None = None,
                  unroll: int | bool = True) -> tuple[jax.Array, jax.Array]:
  """Runs LIF over the leading time axis with `lax.scan`.

  Args:
    x_seq: inputs (T, ...).
    p: neuron constants.
    v0: initial membrane (...); zeros (the reset state) by default.
    unroll: `lax.scan`'s unroll. Fully unrolled by default: the step is elementwise, so XLA
      fuses the T steps and their gradient into a few loops instead of writing each step's
      residuals into stacked buffers (2.3-3.7x faster forward + backward on a CPU for the
      SPS sizes, T = 4; `benchmarks/kernels.py`).

  Returns:
    (spikes (T, ...), final membrane (...)).
  """
  if v0 is None:
    v0 = jnp.zeros(x_seq.shape[1:], x_seq.dtype)

  def step(v, x):
    v, s = lif_step(v, x, p)
    return v, s

  v_last, s_seq = jax.lax.scan(step, v0, x_seq, unroll=unroll)
  return s_seq, v_last


def lif_constant_input(x: jax.Array, steps: int, p: LIFParams) -> jax.Array:
  """Spikes (steps, ...) of a LIF from rest driven `steps` steps by the constant input x.

  The I-SPS tail's neurons see such an input: their convolution ran once, on integrated spikes.
  On a constant input the membrane from rest is x * (1 - (1 - 1/tau) ** t) until the first
  spike, so the neuron fires within `steps` steps iff x >= v_th / (1 - (1 - 1/tau) ** steps)
  (v_reset 0).
  """
  seq = jnp.broadcast_to(x, (steps,) + x.shape).astype(jnp.float32)
  return lif_multistep(seq, p)[0]


def fired_any(spikes: jax.Array) -> jax.Array:
  """1 where a binary spike train (T, ...) holds at least one spike: 1 - prod_t (1 - s_t).

  The product form is the logical or, with the surrogate gradient of every step.
  """
  return 1.0 - jnp.prod(1.0 - spikes, axis=0)
