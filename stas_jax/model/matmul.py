"""The network's matmuls and 3x3 convs, in float32 or in mixed precision (`model.dtype`).

Mixed precision: the operands are bfloat16 and every product accumulates and returns in float32,
forward and backward, so BatchNorm and the LIF thresholds see float32 values. Spikes and the
integer spike counts that attention multiplies are exact in bfloat16; the rounding falls on the
weights, the analog image and the gradients. On CPUs with AMX and on GPU/TPU the bfloat16
products run on the matrix units; plain bfloat16 outputs (flax's `dtype=`) would not: XLA:CPU
runs those at the float32 rate and rounds the result.
"""
import jax
import jax.numpy as jnp

F32 = jnp.float32


def compute_dtype(name: str):
  """`model.dtype` ('float32' | 'bfloat16') -> the operand dtype of matmuls and convs."""
  return jnp.bfloat16 if name == 'bfloat16' else F32


def dot(x: jax.Array, w: jax.Array) -> jax.Array:
  """x (..., K) @ w (K, F) -> float32 (..., F), with x and w of the same dtype.

  float32 is a plain `jnp.dot`. Narrower operands take a custom VJP whose gradient products also
  use narrow operands (the cotangent is rounded to their dtype) with float32 accumulation;
  plain autodiff would multiply the float32 cotangent by a narrow operand at the float32 rate.
  """
  if x.dtype == F32 and w.dtype == F32:
    return jnp.dot(x, w)
  return _narrow_dot(x, w)


@jax.custom_vjp
def _narrow_dot(x, w):
  return jnp.dot(x, w, preferred_element_type=F32)


def _narrow_dot_fwd(x, w):
  return _narrow_dot(x, w), (x, w)


def _narrow_dot_bwd(res, g):
  x, w = res
  g = g.astype(x.dtype)
  dx = jnp.dot(g, w.T, preferred_element_type=F32).astype(x.dtype)
  dw = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]),
               preferred_element_type=F32).astype(w.dtype)
  return dx, dw


_narrow_dot.defvjp(_narrow_dot_fwd, _narrow_dot_bwd)


def einsum(spec: str, *operands: jax.Array) -> jax.Array:
  """`jnp.einsum` with float32 accumulation and result, whatever the operands' dtype."""
  return jnp.einsum(spec, *operands, preferred_element_type=F32)


def xla_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv3x3` by XLA's own convolution, gradient included (a reference for tests, benchmarks)."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      preferred_element_type=F32)


@jax.custom_batching.custom_vmap
def _conv3x3_per_replica(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`xla_conv3x3` whose batching rule runs one convolution per replica.

  Several runs trained side by side (`jax.vmap` over a replica axis, `stas_jax.train.parallel`)
  batch the kernel too; XLA would turn that into one grouped convolution, which XLA:CPU runs
  3-4x slower than the replicas' convolutions one by one. Replicas of the input alone fold into
  the images' axis. Used inside `conv3x3`'s custom VJP, which defines the gradient.
  """
  return xla_conv3x3(x, kernel)


@_conv3x3_per_replica.def_vmap
def _conv3x3_vmap(axis_size, in_batched, x, kernel):
  x_batched, kernel_batched = in_batched
  if not kernel_batched:
    x = x if x_batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
    y = _conv3x3_per_replica(x.reshape((-1,) + x.shape[2:]), kernel)
    return y.reshape((axis_size, -1) + y.shape[1:]), True
  outs = [_conv3x3_per_replica(x[r] if x_batched else x, kernel[r]) for r in range(axis_size)]
  return jnp.stack(outs), True


def kernel_grad_taps(x: jax.Array, dy: jax.Array) -> jax.Array:
  """Kernel gradient of `conv3x3` as nine per-tap GEMMs: x (M, H, W, C), dy (M, H, W, F) ->
  float32 (3, 3, C, F), tap (i, j) = (x shifted by (i - 1, j - 1))^T dy. Used on CPU."""
  m, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  d = dy.reshape(-1, dy.shape[-1])
  dk = jnp.stack([jnp.dot(xp[:, i:i + h, j:j + w, :].reshape(-1, c).T, d,
                          preferred_element_type=F32)
                  for i in range(3) for j in range(3)])
  return dk.reshape((3, 3, c, d.shape[-1]))


def kernel_grad_conv(x: jax.Array, dy: jax.Array) -> jax.Array:
  """`kernel_grad_taps` as one convolution (what XLA's autodiff emits): the images' axis M is
  contracted like a feature axis and dy is the window. Used on GPU and TPU."""
  return jax.lax.conv_general_dilated(x, dy, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('CHWN', 'IHWO', 'HWNC'),
                                      preferred_element_type=F32)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 convolution, stride 1, zero padding 1; x (M, H, W, C), kernel (3, 3, C, F) -> float32.

  x and kernel share a dtype; products accumulate in float32, also in the gradient, whose
  products take the cotangent rounded to that dtype. The forward and input gradient are
  ordinary convolutions. The kernel gradient depends on the backend (`lax.platform_dependent`):
  on CPU it is nine GEMMs, one per kernel tap, of the shifted input with the output gradient
  (`kernel_grad_taps`): 1.9-3.3x faster than the convolution XLA:CPU would use for it, and
  1.2-1.7x faster than one GEMM on the unfolded (im2col) input, whose concatenation costs more
  than it saves (`benchmarks/kernels.py`). On GPU and TPU it is that one convolution
  (`kernel_grad_conv`), which cuDNN and the TPU compiler implement natively, without the nine
  shifted copies of the input. Under `jax.vmap` over replicas each replica's convolution runs
  on its own (`_conv3x3_per_replica`).
  """
  return _conv3x3_per_replica(x, kernel)


def _conv3x3_fwd(x, kernel):
  return _conv3x3_per_replica(x, kernel), (x, kernel)


def _conv3x3_bwd(res, dy):
  x, kernel = res
  dy = dy.astype(x.dtype)
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)     # (3, 3, F, C)
  dx = _conv3x3_per_replica(dy, flipped).astype(x.dtype)
  dk = jax.lax.platform_dependent(x, dy, cpu=kernel_grad_taps, default=kernel_grad_conv)
  return dx, dk.astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)

