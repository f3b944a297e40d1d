"""Flax modules of the spiking backbone: spiking patch splitting (SPS / I-SPS) and the SSA block.

Parameter names follow the PyTorch Spikformer state_dict (proj_conv1, q_linear, fc2_bn, ...), so
`stas_jax.tools.convert` maps checkpoints one to one. Shapes: B batch, T timesteps, N tokens, D dim.
"""
import functools
import math
from typing import Any, Protocol

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from stas_jax.model import matmul
from stas_jax.model import neurons
from stas_jax.model.spec import BLOCK_LIFS, ModelSpec

# PyTorch's default conv init (kaiming_uniform with a = sqrt(5)) is U(-1/sqrt(fan_in), +).
conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# Spikformer initialises every nn.Linear with trunc_normal(std=0.02) and zero bias.
dense_init = nn.initializers.truncated_normal(stddev=0.02)



def _dtype(spec: ModelSpec):
  return matmul.compute_dtype(spec.dtype)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis whose batch statistics may count only masked-in positions.

  Differs from flax's BatchNorm where halting needs it: a cell whose tokens have all halted
  (mask all 0) normalises with safe statistics and leaves the running averages untouched,
  instead of dividing by a zero count. Like PyTorch, the running variance is the unbiased one
  and the normalisation is folded into y = x * a + (bias - mean * a), a = scale / sqrt(var + eps).
  Variables are named like flax's (params scale/bias, batch_stats mean/var).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    feat = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (feat,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (feat,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (feat,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (feat,), jnp.float32)
    x = x.astype(jnp.float32)
    if not train:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      w = jnp.ones(x.shape[:-1] + (1,), x.dtype) if mask is None else jnp.broadcast_to(
          mask.astype(x.dtype), x.shape[:-1] + (1,))
      psum = (lambda a: jax.lax.psum(a, self.axis_name)) if self.axis_name else (lambda a: a)
      count = psum(jnp.sum(w))
      safe = jnp.maximum(count, 1.0)
      mean = psum(jnp.sum(x * w, axes)) / safe
      var = psum(jnp.sum(w * jnp.square(x - mean), axes)) / safe
      if not self.is_initializing():
        seen = count > 0
        unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
        m = self.momentum
        ra_mean.value = jnp.where(seen, m * ra_mean.value + (1 - m) * mean, ra_mean.value)
        ra_var.value = jnp.where(seen, m * ra_var.value + (1 - m) * unbiased, ra_var.value)
    a = scale / jnp.sqrt(var + self.epsilon)
    return x * a + (bias - mean * a)


def batch_norm(spec: ModelSpec, name: str, axis_name: str | None) -> BatchNorm:
  return BatchNorm(momentum=spec.bn_momentum, epsilon=spec.bn_epsilon, axis_name=axis_name,
                   name=name)


def _pool_views(x: jax.Array, fill) -> list:
  """The nine strided views of x padded by one, tap (i, j) at index 3 * i + j."""
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=fill)
  return [xp[:, i:i + h:2, j:j + w:2, :] for i in range(3) for j in range(3)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x: jax.Array, height: int, width: int) -> jax.Array:
  return _max_pool_fwd(x, height, width)[0]


def _max_pool_fwd(x, height, width):
  del height, width
  views = _pool_views(x, -jnp.inf)
  best, arg = views[0], jnp.zeros(views[0].shape, jnp.int8)
  for k, view in enumerate(views[1:], start=1):
    wins = view > best            # strictly greater: the first maximum keeps the gradient
    best = jnp.where(wins, view, best)
    arg = jnp.where(wins, jnp.int8(k), arg)
  return best, arg


def _shifted(a: jax.Array, rows: int, cols: int) -> jax.Array:
  """a[:, m + rows, n + cols], zero past the end (rows, cols in {0, 1})."""
  return jnp.pad(a, ((0, 0), (0, rows), (0, cols), (0, 0)))[:, rows:, cols:, :]


def _max_pool_bwd(height, width, arg, g):
  # Input row y gets the gradient of the windows whose tap i hits it: 2 r + i - 1 = y. An even
  # row 2m is tap 1 of window row m; an odd row 2m + 1 is tap 2 of row m and tap 0 of row
  # m + 1; likewise for columns. So each of the four (row, column) parities of the input is a
  # sum of at most four quarter-size tap gradients, added in tap order k = 3 i + j as a sum over
  # all nine taps would (the other taps add exact zeros), and the four interleave into the
  # input grid: one pass at full size instead of nine padded ones.
  tap = [jnp.where(arg == k, g, jnp.zeros_like(g)) for k in range(9)]
  even_even = tap[4]
  even_odd = _shifted(tap[3], 0, 1) + tap[5]
  odd_even = _shifted(tap[1], 1, 0) + tap[7]
  odd_odd = ((_shifted(tap[0], 1, 1) + _shifted(tap[2], 1, 0)) + _shifted(tap[6], 0, 1)) + tap[8]
  grid = jnp.stack([jnp.stack([even_even, even_odd]), jnp.stack([odd_even, odd_odd])])
  b, out_h, out_w, c = g.shape
  full = jnp.transpose(grid, (2, 3, 0, 4, 1, 5)).reshape(b, 2 * out_h, 2 * out_w, c)
  return (full[:, :height, :width, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array) -> jax.Array:
  """MaxPool2d(kernel 3, stride 2, padding 1) on NHWC, as a max over nine strided views.

  Same values as a reduce-window max (pads are -inf, so they never win). The gradient goes to
  the first maximum of each window in row-major order, as in PyTorch; with binary spikes,
  ties are the rule, and plain autodiff of `jnp.maximum` would split the gradient among them.
  The backward keeps only the winning tap (int8), not nine float masks, and works at the
  output's size, interleaving the four parities of the input grid once, instead of XLA's
  select-and-scatter, which is slow on CPU.
  """
  return _max_pool(x, x.shape[1], x.shape[2])


class Conv3x3(nn.Module):
  """Bias-free 3x3 'same' convolution (the SPS convs), parameter `kernel` (3, 3, C, F).

  `dtype` is the operand dtype (`matmul.compute_dtype`); the output is float32.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', conv_init, (3, 3, x.shape[-1], self.features), jnp.float32)
    return matmul.conv3x3(x.astype(self.dtype), kernel.astype(self.dtype))


class Linear(nn.Module):
  """x @ kernel + bias like `nn.Dense` (same parameter names and shapes), output float32.

  `dtype` is the operand dtype of the product (`matmul.compute_dtype`); the bias is added in
  float32.
  """
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', dense_init, (x.shape[-1], self.features), jnp.float32)
    y = matmul.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    return y


def multistep_lif(x: jax.Array, steps: int, p: neurons.LIFParams) -> jax.Array:
  """LIF over time folded into the batch: x (steps * B, ...) -> spikes of the same shape."""
  seq = x.reshape((steps, x.shape[0] // steps) + x.shape[1:])
  s, _ = neurons.lif_multistep(seq.astype(jnp.float32), p)
  return s.reshape(x.shape)


def integrate(spec: ModelSpec, spikes: jax.Array) -> jax.Array:
  """I-SPS integration over the leading time axis: `model.isps.reduce` (mean or sum)."""
  return jnp.sum(spikes, 0) if spec.isps.reduce == 'sum' else jnp.mean(spikes, 0)


def fire(spec: ModelSpec, current: jax.Array, steps: int,
         mode: str) -> tuple[jax.Array, jax.Array, int]:
  """A patch-embedding LIF on its BatchNorm output, per timestep or, under I-SPS, once.

  With `steps` = T > 1 (SPS) time is folded into the leading axis and the LIF runs over it.
  With `steps` = 1 (I-SPS, the conv ran once) the current is constant over time and `mode`
  (this stage's entry of `model.isps.tail`) says how the neuron turns it into the output:
    single_step: one LIF step from rest (fires for a current >= tau * v_th);
    any_spike: 1 where an S-step LIF on this current fires at least once (a current >=
      v_th / (1 - (1 - 1/tau) ** S)), else 0; the surrogate gradient flows through the S steps;
    multi_step: the S-step LIF's spikes integrated by `model.isps.reduce` (a count or a rate).
  S is `model.isps.tail_steps` (default T).

  Returns:
    (output like current, spikes emitted per image (B,), spikes in one unit of the output).
  """
  s = spec
  batch = current.shape[0] // steps
  if steps > 1 or mode == 'single_step':
    out = multistep_lif(current, steps, s.lif())
    return out, image_sums(out, batch), 1
  spikes = neurons.lif_constant_input(current, s.tail_steps, s.lif())
  if mode == 'any_spike':
    out = neurons.fired_any(spikes)
    return out, image_sums(out, batch), 1
  return (integrate(s, spikes), image_sums(spikes.reshape((-1,) + current.shape[1:]), batch),
          s.tail_spikes_per_unit)


class SPS(nn.Module):
  """Spiking patch splitting: four conv-BN-LIF stages with max-pools, then the conv RPE.

  `stem` (conv0 + BN0) runs once on the static image: repeating it over T, as the reference
  does, gives the same values. `tail` runs the remaining stages on spikes with time folded into
  the batch (`steps` = T), or once (`steps` = 1) on the I-SPS integrated map.
  """
  spec: ModelSpec
  bn_axis_name: str | None = None

  def setup(self):
    s = self.spec
    c = s.sps_channels
    dt = _dtype(s)
    conv = lambda f, name: Conv3x3(f, dt, name=name)
    self.proj_conv = conv(c[0], 'proj_conv')
    self.proj_bn = batch_norm(s, 'proj_bn', self.bn_axis_name)
    self.proj_conv1 = conv(c[1], 'proj_conv1')
    self.proj_bn1 = batch_norm(s, 'proj_bn1', self.bn_axis_name)
    self.proj_conv2 = conv(c[2], 'proj_conv2')
    self.proj_bn2 = batch_norm(s, 'proj_bn2', self.bn_axis_name)
    self.proj_conv3 = conv(c[3], 'proj_conv3')
    self.proj_bn3 = batch_norm(s, 'proj_bn3', self.bn_axis_name)
    self.rpe_conv = conv(c[3], 'rpe_conv')
    self.rpe_bn = batch_norm(s, 'rpe_bn', self.bn_axis_name)

  def _pool_after(self, stage: int) -> bool:
    # patch_size = 2 ** pools, placed on the last stages (cifar: 2 and 3; imagenet: all four).
    return stage >= 4 - self.spec.num_pools

  def stem(self, images: jax.Array, train: bool) -> jax.Array:
    """conv0 + BN0 on the analog image (B, H, W, C) -> input current (B, H, W, D/8)."""
    y = self.proj_conv(images)
    return self.proj_bn(y, train)

  def first_spikes(self, current: jax.Array) -> jax.Array:
    """LIF0 over T on the constant current: (B, H, W, C0) -> spikes (T, B, H, W, C0)."""
    return neurons.lif_constant_input(current, self.spec.timesteps, self.spec.lif())

  def pool0(self, s0: jax.Array) -> jax.Array:
    return max_pool(s0) if self._pool_after(0) else s0

  def integrate(self, spikes: jax.Array) -> jax.Array:
    """I-SPS integration over the leading time axis: `model.isps.reduce` (mean or sum)."""
    return integrate(self.spec, spikes)

  def fire(self, current: jax.Array, steps: int, mode: str) -> tuple[jax.Array, jax.Array, int]:
    """A tail stage's LIF on its BatchNorm output (`fire`)."""
    return fire(self.spec, current, steps, mode)

  def tail(self, x: jax.Array, steps: int, train: bool,
           x_spikes_per_unit: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stages 1-3 and the RPE on the (pooled) stage-0 output.

    Args:
      x: stage-0 output after its optional pool, (steps * B, h, w, D/8), time-major: spikes
        (SPS) or the integrated LIF0 spikes (I-SPS).
      steps: how many timesteps are folded into the leading axis (T, or 1 for I-SPS).
      train: batch statistics (True) or running averages.
      x_spikes_per_unit: spikes in one unit of x (S for a mean of S spikes).

    Returns:
      tokens (steps * B, N, D) (SPS and the binary I-SPS tails: values in {0, 1, 2}); per-image
      aux sums (B,): the spikes entering every conv after conv0 (`conv1_in` ... `rpe_in`; a value
      v of an integrated input counts v * spikes-per-unit) and the spikes of LIF1-3 and RPE.
    """
    batch = x.shape[0] // steps
    aux = {}
    stages = ((self.proj_conv1, self.proj_bn1, 'proj_lif1', 'conv1_in'),
              (self.proj_conv2, self.proj_bn2, 'proj_lif2', 'conv2_in'),
              (self.proj_conv3, self.proj_bn3, 'proj_lif3', 'conv3_in'))
    unit = x_spikes_per_unit
    modes = self.spec.isps.tail_modes
    for i, (conv, bn, lif_name, in_name) in enumerate(stages, start=1):
      aux[in_name] = image_sums(x, batch) * unit
      x, aux[lif_name], unit = self.fire(bn(conv(x), train), steps, modes[i - 1])
      if self._pool_after(i):
        x = max_pool(x)
    feat = x
    aux['rpe_in'] = image_sums(feat, batch) * unit
    rpe, aux['rpe_lif'], _ = self.fire(self.rpe_bn(self.rpe_conv(feat), train), steps, modes[3])
    tokens = einops.rearrange(rpe + feat, 'b h w d -> b (h w) d')
    return tokens, aux


def image_sums(a: jax.Array, batch: int) -> jax.Array:
  """Per-image sum of a time-major (steps * B, ...) array -> (B,)."""
  return jnp.sum(a.reshape((-1, batch, math.prod(a.shape[1:]))), axis=(0, 2))


class BufferLayout(Protocol):
  """Where the C rows of a token buffer sit in the (B, N) token grid.

  `SSABlock` runs on such a buffer for early-exit inference; `stas_jax.model.early_exit.TokenLayout`
  is the implementation. Attention mixes the tokens of one image, so it runs on the grid.
  """

  def to_grid(self, a: jax.Array) -> jax.Array:
    """(C, F) buffer rows -> (B, N, F), zeros where a token is not held."""

  def from_grid(self, g: jax.Array) -> jax.Array:
    """(B, N, F) -> (C, F) buffer rows, zeros in empty rows."""

  def per_image(self, a: jax.Array) -> jax.Array:
    """Sum of (C, F) rows per image -> (B,); empty rows count nowhere."""


class SSABlock(nn.Module):
  """One Spikformer block at one timestep, with halted tokens masked out as dense multiplies.

  Masked tokens (mask 0) have their Q, K, V spikes zeroed (they neither attend nor are
  attended), their LIF membranes frozen and their residual updates zeroed; BatchNorm batch
  statistics count active tokens only.
  """
  spec: ModelSpec
  train: bool = False
  bn_axis_name: str | None = None
  capture: bool = False           # also return z after the attention's residual add ('z_mid')

  def _dense(self, features: int, name: str, bias: bool = True) -> Linear:
    return Linear(features, use_bias=bias, dtype=_dtype(self.spec), name=name)

  def _lin_bn_lif(self, x, mask, membrane, features, prefix, p, bias=True):
    y = self._dense(features, f'{prefix}_linear', bias)(x)
    y = batch_norm(self.spec, f'{prefix}_bn', self.bn_axis_name)(y, self.train, mask > 0)
    return neurons.lif_step_masked(membrane, y, mask, p)

  @nn.compact
  def __call__(self, z: jax.Array, mask: jax.Array, membranes: dict[str, jax.Array],
               layout: BufferLayout | None = None) -> tuple[jax.Array, dict, dict]:
    """Runs the block.

    Args:
      z: block input (B, N, D), small non-negative integers; (C, D) buffer rows with `layout`.
      mask: (B, N) in [0, 1]; 1 = token processed; (C,) with `layout`.
      membranes: LIF membranes by name (`BLOCK_LIFS`), each (B, N, width); (C, width) with `layout`.
      layout: None for the (B, N) grid; else where the buffer rows sit in the grid.

    Returns:
      (z_out like z, new membranes, per-image stats (B,) for energy and firing rates; with
      `capture` also 'z_mid', z after the attention's residual add, like z).
    """
    s = self.spec
    lif, attn_lif = s.lif(), s.attn_lif()
    if layout is None:
      to_grid = from_grid = lambda a: a
      per_image = lambda a: jnp.sum(a, axis=(1, 2))
    else:
      to_grid, from_grid, per_image = layout.to_grid, layout.from_grid, layout.per_image
    m = mask[..., None]
    new = {}
    stats = {'x_in': per_image(z * m)}
    new['q_lif'], q = self._lin_bn_lif(z, m, membranes['q_lif'], s.dim, 'q', lif, s.qkv_bias)
    new['k_lif'], k = self._lin_bn_lif(z, m, membranes['k_lif'], s.dim, 'k', lif, s.qkv_bias)
    new['v_lif'], v = self._lin_bn_lif(z, m, membranes['v_lif'], s.dim, 'v', lif, s.qkv_bias)
    dt = _dtype(s)  # spikes are exact in bfloat16
    heads = lambda a: einops.rearrange(to_grid(a), 'b n (h d) -> b h n d', h=s.heads).astype(dt)
    qh, kh, vh = heads(q), heads(k), heads(v)
    # Spike counts summed over a length-n axis stay exact in bfloat16 for n <= 256.
    counts_dt = lambda n: dt if n <= 256 else jnp.float32
    # No softmax, so (Q K^T) V = Q (K^T V); take the cheaper order. Spike products are exact
    # integers and the scale is a power of two, so both orders give identical values.
    if s.num_tokens > s.head_dim:
      cdt = counts_dt(s.num_tokens)
      kv = matmul.einsum('bhmd,bhme->bhde', kh, vh).astype(cdt)
      y = matmul.einsum('bhnd,bhde->bhne', qh.astype(cdt), kv) * s.attn_scale
    else:
      cdt = counts_dt(s.head_dim)
      attn = (matmul.einsum('bhnd,bhmd->bhnm', qh, kh) * s.attn_scale).astype(cdt)
      y = matmul.einsum('bhnm,bhmd->bhnd', attn, vh.astype(cdt))
    y = from_grid(einops.rearrange(y, 'b h n d -> b n (h d)'))
    new['attn_lif'], a = neurons.lif_step_masked(membranes['attn_lif'], y, m, attn_lif)
    if s.proj_lif_over_batch:
      y = self._dense(s.dim, 'proj_linear')(a)
      y = batch_norm(s, 'proj_bn', self.bn_axis_name)(y, self.train, m > 0)
      new['proj_lif'], proj = lif_over_batch(membranes['proj_lif'], y, m, lif, to_grid,
                                             from_grid)
    else:
      new['proj_lif'], proj = self._lin_bn_lif(a, m, membranes['proj_lif'], s.dim, 'proj', lif)
    z_mid = z + m * proj
    new['fc1_lif'], h1 = self._lin_bn_lif(z_mid, m, membranes['fc1_lif'], s.hidden_dim, 'fc1', lif)
    new['fc2_lif'], h2 = self._lin_bn_lif(h1, m, membranes['fc2_lif'], s.dim, 'fc2', lif)
    z_out = z_mid + m * h2
    # Sum of the Q K^T map (for the energy of (Q K^T) V) without materialising it.
    qk_sum = jnp.einsum('bhd,bhd->b', jnp.sum(qh, axis=2, dtype=jnp.float32),
                        jnp.sum(kh, axis=2, dtype=jnp.float32))
    stats.update(q_lif=per_image(q), k_lif=per_image(k), v_lif=per_image(v),
                 qk_map=qk_sum, attn_lif=per_image(a), proj_lif=per_image(proj),
                 x_mid=per_image(z_mid * m), fc1_lif=per_image(h1), fc2_lif=per_image(h2))
    if self.capture:
      stats['z_mid'] = z_mid
    return z_out, new, stats


def lif_over_batch(v: jax.Array, y: jax.Array, m: jax.Array, p: neurons.LIFParams, to_grid,
                   from_grid) -> tuple[jax.Array, jax.Array]:
  """A LIF whose time axis runs over the images too, as QKFormer's stage-3 proj_lif does.

  The reference applies that LIF to its (T * B, C, N) input, so one (N, C) membrane passes
  through image 0, 1, ... B - 1 of timestep 0, then of timestep 1, ... (`model.proj_lif_over_batch`).

  Args:
    v: (N, C) membrane at the end of the previous timestep's last image.
    y: (B, N, C) input, or (rows, C) buffer rows that `to_grid` places in the grid.
    m: mask like y's leading axes plus one (1 = active); masked tokens keep the membrane.
    p: neuron constants.
    to_grid, from_grid: the block's maps between its rows and the (B, N) grid.

  Returns:
    (membrane (N, C) after image B - 1, spikes like y).
  """
  def step(v, ym):
    return neurons.lif_step_masked(v, ym[0], ym[1], p)

  v, spikes = jax.lax.scan(step, v, (to_grid(y), to_grid(m)))
  return v, from_grid(spikes)


def block_membranes(spec: ModelSpec, batch: int) -> dict[str, jax.Array]:
  """Zero (reset) membranes of every LIF in one block, keyed like `BLOCK_LIFS`; QKFormer's
  proj_lif over the batch (`lif_over_batch`) has one (N, D) membrane for all images."""
  n, d, hid = spec.num_tokens, spec.dim, spec.hidden_dim
  width = {'fc1_lif': hid}
  out = {k: jnp.zeros((batch, n, width.get(k, d)), jnp.float32) for k in BLOCK_LIFS}
  if spec.proj_lif_over_batch:
    out['proj_lif'] = jnp.zeros((n, d), jnp.float32)
  return out
