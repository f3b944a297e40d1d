"""The Spike-driven Transformer v1 backbone (BICLab/Spike-Driven-Transformer, CIFAR mode): the
MS_SPS patch embedding, membrane-shortcut blocks with spike-driven self-attention, the head LIF.

Parameter names follow the PyTorch state_dict (q_conv, fc1_bn, ...; the 1x1 convs are `Linear`s),
so `stas_jax.tools.convert` maps checkpoints one to one. Shapes: B batch, N tokens, D dim.
"""
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from stas_jax.model import layers
from stas_jax.model import matmul
from stas_jax.model import neurons
from stas_jax.model.spec import ModelSpec

# SDT's LIF layers, named as in its state_dict. A block's attention and MLP neurons (a LIF opens
# every branch: the membrane shortcut), and the patch embedding's four (MS_SPS never calls its
# rpe_lif).
SPS_LIFS = ('proj_lif', 'proj_lif1', 'proj_lif2', 'proj_lif3')
ATTN_LIFS = ('shortcut_lif', 'q_lif', 'k_lif', 'v_lif', 'talking_heads_lif')
MLP_LIFS = ('fc1_lif', 'fc2_lif')
BLOCK_LIFS = ATTN_LIFS + MLP_LIFS
# Membranes of one neuron per image and channel, not per token: the column sum over tokens feeds
# the talking-heads LIF (early exit keeps these out of its token buffer).
IMAGE_MEMBRANES = ('talking_heads_lif',)


class MSSPS(layers.SPS):
  """MS_SPS: Spikformer's SPS (same convolutions, BatchNorms and pools) except its last stage.

  Stage 3 max-pools its BatchNorm output before LIF3 when a pool follows it, and the output is
  the real-valued `rpe_bn(rpe_conv(LIF3 spikes)) + f`, f the (pooled) BatchNorm output: there is
  no RPE LIF. `stem`, `first_spikes`, `pool0` and `integrate` are the SPS's.
  """

  def tail(self, x: jax.Array, steps: int, train: bool,
           x_spikes_per_unit: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stages 1-3 and the RPE on the (pooled) stage-0 output (`layers.SPS.tail`'s arguments).

    `model.isps.tail` modes apply to LIF1, LIF2 and LIF3 under I-SPS; the fourth (Spikformer's
    RPE LIF) names no SDT neuron.

    Returns:
      tokens (steps * B, N, D), real-valued; per-image aux sums (B,): spikes into every conv
      after conv0 (`conv1_in`, `conv2_in`, `conv3_in`, `rpe_in`) and of LIF1-3.
    """
    batch = x.shape[0] // steps
    aux = {}
    unit = x_spikes_per_unit
    modes = self.spec.isps.tail_modes
    stages = ((self.proj_conv1, self.proj_bn1, 'proj_lif1', 'conv1_in'),
              (self.proj_conv2, self.proj_bn2, 'proj_lif2', 'conv2_in'))
    for i, (conv, bn, lif_name, in_name) in enumerate(stages, start=1):
      aux[in_name] = layers.image_sums(x, batch) * unit
      x, aux[lif_name], unit = self.fire(bn(conv(x), train), steps, modes[i - 1])
      if self._pool_after(i):
        x = layers.max_pool(x)
    aux['conv3_in'] = layers.image_sums(x, batch) * unit
    feat = self.proj_bn3(self.proj_conv3(x), train)
    if self._pool_after(3):
      feat = layers.max_pool(feat)
    s3, aux['proj_lif3'], unit = self.fire(feat, steps, modes[2])
    aux['rpe_in'] = layers.image_sums(s3, batch) * unit
    out = self.rpe_bn(self.rpe_conv(s3), train) + feat
    return einops.rearrange(out, 'b h w d -> b (h w) d'), aux


class SDTBlock(nn.Module):
  """One MS_Block_Conv at one timestep, with halted tokens masked out as dense multiplies.

  The residual stream z is real-valued (a membrane shortcut): each branch opens with a LIF and
  ends in a BatchNorm. Spike-driven self-attention acts on each channel alone: the column sum
  over an image's tokens of k * v goes through the talking-heads LIF (threshold 0.5) and gates
  q; heads change nothing, there is no Q K^T and no scale. Masked tokens (mask 0) keep their
  membranes and residual stream, emit no spikes (so they add nothing to the column sum), and
  BatchNorm batch statistics count active tokens only; an image's talking-heads neurons run
  while any of its tokens is active.
  """
  spec: ModelSpec
  train: bool = False
  bn_axis_name: str | None = None
  capture: bool = False           # also return z after the attention's residual add ('z_mid')

  def _conv_bn(self, x, mask, features, prefix, bias=True):
    y = layers.Linear(features, use_bias=bias, dtype=matmul.compute_dtype(self.spec.dtype),
                      name=f'{prefix}_conv')(x)
    return layers.batch_norm(self.spec, f'{prefix}_bn', self.bn_axis_name)(y, self.train, mask > 0)

  @nn.compact
  def __call__(self, z: jax.Array, mask: jax.Array, membranes: dict[str, jax.Array],
               layout: layers.BufferLayout | None = None) -> tuple[jax.Array, dict, dict]:
    """Runs the block.

    Args:
      z: block input (B, N, D), real-valued; (C, D) buffer rows with `layout`.
      mask: (B, N) in [0, 1]; 1 = token processed; (C,) with `layout`.
      membranes: LIF membranes by name (`BLOCK_LIFS`): (B, N, width) per token, (C, width) with
        `layout`; the talking-heads LIF's (B, D) in both cases.
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
    new['shortcut_lif'], x = neurons.lif_step_masked(membranes['shortcut_lif'], z, m, lif)
    spikes = {}
    for name in ('q', 'k', 'v'):
      y = self._conv_bn(x, m, s.dim, name, bias=False)
      new[f'{name}_lif'], spikes[name] = neurons.lif_step_masked(membranes[f'{name}_lif'], y, m,
                                                                 lif)
    q, k, v = spikes['q'], spikes['k'], spikes['v']
    kv_and = k * v
    kv_sum = jnp.sum(to_grid(kv_and), axis=1)                        # (B, D), whole numbers
    image_active = jnp.max(to_grid(m), axis=1)                       # (B, 1)
    new['talking_heads_lif'], kv = neurons.lif_step_masked(membranes['talking_heads_lif'],
                                                           kv_sum, image_active, attn_lif)
    y = q * from_grid(jnp.broadcast_to(kv[:, None, :], (kv.shape[0], s.num_tokens, s.dim)))
    a = z + m * self._conv_bn(y, m, s.dim, 'proj')
    new['fc1_lif'], s1 = neurons.lif_step_masked(membranes['fc1_lif'], a, m, lif)
    h = self._conv_bn(s1, m, s.hidden_dim, 'fc1')
    identity = a
    if s.hidden_dim == s.dim:  # MS_MLP_Conv's extra residual when the hidden width is D
      h = identity + m * h
      identity = h
    new['fc2_lif'], s2 = neurons.lif_step_masked(membranes['fc2_lif'], h, m, lif)
    z_out = identity + m * self._conv_bn(s2, m, s.dim, 'fc2')
    stats = {'shortcut_lif': per_image(x), 'q_lif': per_image(q), 'k_lif': per_image(k),
             'v_lif': per_image(v), 'kv_and': per_image(kv_and),
             'talking_heads_lif': jnp.sum(kv, axis=-1), 'qkv': per_image(y),
             'fc1_lif': per_image(s1), 'fc2_lif': per_image(s2)}
    if self.capture:
      stats['z_mid'] = a
    return z_out, new, stats


def block_membranes(spec: ModelSpec, batch: int) -> dict[str, jax.Array]:
  """Zero (reset) membranes of every LIF in one SDT block, keyed like `BLOCK_LIFS`."""
  n, d, hid = spec.num_tokens, spec.dim, spec.hidden_dim
  out = {k: jnp.zeros((batch, n, d), jnp.float32) for k in BLOCK_LIFS}
  out['fc2_lif'] = jnp.zeros((batch, n, hid), jnp.float32)
  out['talking_heads_lif'] = jnp.zeros((batch, d), jnp.float32)
  return out


def step_weight(mode: str, weight: jax.Array, last_block, timesteps: int) -> jax.Array:
  """Each token's weight in the head LIF's input at this cell's timestep (docs/method.md 5).

  The head LIF needs one input per timestep, r_t = mean over tokens of sum_l w'_{t,l} z_{t,l},
  with w' the ACT weight scaled so that the mean over t of r_t is the ACT readout: times T
  (the weights of a token sum to 1 over the grid), times 1 under spatial halting (they sum to 1
  in each timestep, whose output the readout averages). Without halting w' is 1 on the last
  block, so r_t is SDT's own head input, the last block's token mean at timestep t.

  Args:
    mode: `model.halt.mode`.
    weight: (B, N) ACT weight of the cell (`halting.cell_update`).
    last_block: (traced) bool, l = L - 1.
    timesteps: T.
  """
  if mode == 'none':
    return jnp.broadcast_to(jnp.asarray(last_block, weight.dtype), weight.shape)
  return weight if mode == 'spatial' else weight * timesteps


def step_readout(z: jax.Array, step_w: jax.Array) -> jax.Array:
  """This cell's share of the head LIF input: mean over tokens of w' z, (B, N, D) -> (B, D)."""
  return jnp.mean(z * step_w[..., None], axis=1)


def head_spikes(readouts: jax.Array, spec: ModelSpec) -> jax.Array:
  """SDT's head_lif over the timesteps: readouts (T, B, D) -> spikes (T, B, D)."""
  return neurons.lif_multistep(readouts, spec.lif())[0]
