"""The STAS network: (I-)SPS patch embedding, encoder scanned over timesteps and blocks with
token halting, readout and head. `create_model(config.model)` is the entry point.
"""
import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stas_jax.model import halting
from stas_jax.model import layers
from stas_jax.model import qkformer
from stas_jax.model import sdt
from stas_jax.model.spec import ModelSpec, spec_from_config

# The variable collection of the token-ratio controller's state (its 'offset'), present only
# with `model.halt.target_token_ratio` > 0: an input of the forward pass that the training step,
# not the optimiser, updates.
HALT_CONTROL = 'halt_control'


def block_module(spec: ModelSpec) -> type[nn.Module]:
  """The encoder block of the backbone: Spikformer's SSA block (also QKFormer's stage 3) or
  SDT's membrane-shortcut block. Both take (z, mask, membranes[, layout])."""
  return sdt.SDTBlock if spec.backbone == 'sdt' else layers.SSABlock


def initial_membranes(spec: ModelSpec, batch: int) -> dict[str, jax.Array]:
  """Zero (reset) membranes of one encoder block."""
  if spec.backbone == 'sdt':
    return sdt.block_membranes(spec, batch)
  return layers.block_membranes(spec, batch)


class EncoderCell(nn.Module):
  """Grid cell (t, l): block l at timestep t, then the halting update for the mode.

  Scanned over blocks (params stacked on a leading depth axis). Carry: (z, halt state, t,
  `halting.HaltParams`); scanned input: (block l's LIF membranes, l).
  """
  spec: ModelSpec
  train: bool = False
  capture: bool = False
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, carry, xs):
    z, hs, t, halt_params = carry
    membranes, l = xs
    s = self.spec
    hp = s.halt
    active = hs.mask
    z_out, membranes, stats = block_module(s)(s, self.train, self.bn_axis_name, self.capture,
                                              name='block')(z, active, membranes)
    position = halting.CellPosition.at(t, l, s.timesteps, s.encoder_depth)
    hs, weight = halting.cell_update(hp, hs, z_out, position, halt_params)
    ys = {'active': active, 'weight': weight, 'stats': stats}
    if s.backbone == 'sdt':
      step_w = sdt.step_weight(hp.mode, weight, position.last_block, s.timesteps)
      ys['step_readout'] = sdt.step_readout(z_out, step_w)
    if hp.prior_reads_scores:
      ys['score'] = halting.halting_score(z_out, halt_params.gamma, halt_params.beta, hp.channel)
    if self.capture:
      ys['z_in'] = z
      ys['z_mid'] = stats.pop('z_mid')
      ys['z_out'] = z_out
    return (z_out, hs, t, halt_params), (membranes, ys)


class Encoder(nn.Module):
  """Scans `EncoderCell` over blocks (inner) and timesteps (outer): raster order of (t, l)."""
  spec: ModelSpec
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, u: jax.Array, halt_params, train: bool = False,
               capture: bool = False) -> tuple[halting.HaltState, dict[str, Any]]:
    """Runs the (t, l) grid.

    Args:
      u: (T, B, N, D) encoder input per timestep.
      halt_params: `halting.HaltParams` for `halting.cell_update`.
      train, capture: batch statistics; keep block inputs/outputs in the aux.

    Returns:
      The final halting state and per-cell aux with leading (T, L) axes.
    """
    s = self.spec
    batch = u.shape[1]
    if s.remat:
      cell = nn.remat(EncoderCell, policy=getattr(jax.checkpoint_policies, s.remat_policy))
    else:
      cell = EncoderCell
    scan_blocks = nn.scan(cell, variable_axes={'params': 0, 'batch_stats': 0},
                          split_rngs={'params': True}, in_axes=0, out_axes=0,
                          length=s.encoder_depth, unroll=s.encoder_depth if s.unroll_scans else 1)
    blocks = scan_blocks(s, train, capture, self.bn_axis_name, name='blocks')

    def time_step(mdl, carry, xs):
      membranes, hs = carry
      u_t, t = xs
      if s.halt.mode == 'spatial':
        hs = halting.reset_for_timestep(hs)
      (_, hs, _, _), (membranes, ys) = mdl((u_t, hs, t, halt_params),
                                           (membranes, jnp.arange(s.encoder_depth)))
      return (membranes, hs), ys

    one_block = initial_membranes(s, batch)
    mem0 = jax.tree.map(lambda a: jnp.broadcast_to(a, (s.encoder_depth,) + a.shape), one_block)
    hs0 = halting.init_state(batch, s.num_tokens, s.dim)
    ts = jnp.arange(s.timesteps)
    if self.is_initializing():
      # Create params and batch_stats before the time scan, whose carry must keep its structure.
      time_step(blocks, (mem0, hs0), (u[0], ts[0]))
    # Training updates the running statistics at every timestep, so they are carried; in eval
    # they are read-only, and carrying an immutable collection breaks the scan's carry structure.
    if train:
      collections = dict(variable_broadcast='params', variable_carry='batch_stats')
    else:
      collections = dict(variable_broadcast=['params', 'batch_stats'])
    scan_time = nn.scan(time_step, split_rngs={'params': False}, in_axes=0, out_axes=0,
                        length=s.timesteps,
                        unroll=s.timesteps if (s.unroll_time or s.unroll_scans) else 1,
                        **collections)
    (_, hs), ys = scan_time(blocks, (mem0, hs0), (u, ts))
    return hs, ys


class STAS(nn.Module):
  """A spiking Transformer (`model.backbone`: Spikformer, SDT or QKFormer) with I-SPS and A-SSA
  halting; the backbone itself with sps + mode none.

  `__call__(images, train=False, capture=False)` takes NHWC float32 images and returns
  `(logits, aux)`. Variables: 'params', 'batch_stats' and, with the token-ratio controller,
  `HALT_CONTROL` {'offset': ()} (see `halting_params`). aux keys:
    active (T, L, B, N): mask in effect when block l ran at timestep t.
    cell_weight (T, L, B, N): ACT weight each cell's output got in the readout.
    ponder (B, N): ponder cost rho (`stas_jax.train.losses` turns it and cell_weight into the
      losses).
    cell_score (T, L, B, N): the raw halting score h of every token at every cell, only with
      halting on and `model.halt.prior = 'avit'` (that prior's input).
    block_stats: {name: (T, L, B)} input sums and spike counts per block layer.
    sps_stats: {name: (B,)} input sums and spike counts of the patch embedding (QKFormer:
      of everything before stage 3), and token_values (T, B, N) (see `embed`).
    head_stats: SDT only, {'head_lif': (B,)} spikes of the head LIF.
    embed (T, B, N, D): encoder input per timestep.
    with capture=True also block_inputs, block_mids (after the attention's residual add) and
    block_outputs (T, L, B, N, D); SDT: head_spikes (T, B, D); QKFormer: embed_captures, the
    outputs of its stages before the encoder (`qkformer.Tokenizer`).
  """
  spec: ModelSpec
  bn_axis_name: str | None = None

  def _check_images(self, images: jax.Array):
    s = self.spec
    want = (s.image_size, s.image_size, s.in_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(
          f'images must be NHWC with (H, W, C) = {want} for this model config, got shape '
          f'{tuple(images.shape)}; set model.image_size / model.in_channels to match the data '
          '(or resize the images)')

  def setup(self):
    s = self.spec
    if s.backbone == 'qkformer':
      self.patch_embed = qkformer.Tokenizer(s, self.bn_axis_name)
    elif s.backbone == 'sdt':
      self.patch_embed = sdt.MSSPS(s, self.bn_axis_name)
    else:
      self.patch_embed = layers.SPS(s, self.bn_axis_name)
    self.encoder = Encoder(s, self.bn_axis_name)
    self.head = nn.Dense(s.num_classes, kernel_init=layers.dense_init)
    if s.halt.learnable:
      self.halt_gamma = self.param('halt_gamma', nn.initializers.constant(s.halt.gamma), ())
      self.halt_beta = self.param('halt_beta', nn.initializers.constant(s.halt.beta), ())
    if s.halt.controlled:
      # The token-ratio controller's offset: an input (collection 'halt_control'), never a
      # parameter; the training step updates it (stas_jax.train.steps.control_offset).
      self.halt_offset = self.variable(HALT_CONTROL, 'offset', jnp.zeros, (), jnp.float32)

  def halting_params(self) -> tuple[jax.Array, jax.Array]:
    """(gamma, beta) of the halting score: parameters if learnable, else config constants.

    With the token-ratio controller (`model.halt.target_token_ratio`) beta is shifted by its
    offset, without a gradient: h = sigmoid(gamma * z + beta + offset), so a positive offset
    raises every halting score and tokens halt earlier (a lower token ratio).
    """
    if self.spec.halt.learnable:
      gamma, beta = self.halt_gamma, self.halt_beta
    else:
      gamma, beta = jnp.float32(self.spec.halt.gamma), jnp.float32(self.spec.halt.beta)
    if self.spec.halt.controlled:
      beta = beta + jax.lax.stop_gradient(self.halt_offset.value)
    return gamma, beta

  def embed(self, images: jax.Array, train: bool,
            capture: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Patch embedding: (B, H, W, C) -> encoder input (T, B, N, D) and its aux sums.

    aux: per-image (B,) spike sums of every SPS layer (see `SPS.tail`; QKFormer:
    `qkformer.Tokenizer`) and `token_values` (T, B, N), the sum of each token of U, which
    energy.py needs when U is a rate; with `capture`, QKFormer's stage outputs ('captures').
    """
    s = self.spec
    self._check_images(images)
    if s.backbone == 'qkformer':
      u, aux = self.patch_embed(images, train, capture)
      chex.assert_shape(u, (s.timesteps, images.shape[0], s.num_tokens, s.dim))
      return u, aux
    sps = self.patch_embed
    batch, steps = images.shape[0], s.timesteps
    s0 = sps.first_spikes(sps.stem(images, train))              # (T, B, H, W, C0)
    aux = {'proj_lif': jnp.sum(s0, axis=(0, 2, 3, 4))}
    if s.isps_once:
      tokens, tail_aux = sps.tail(sps.pool0(sps.integrate(s0)), 1, train,
                                  s.spikes_per_unit)        # (B, N, D), convs run once
      u = jnp.broadcast_to(tokens, (steps,) + tokens.shape)
    else:
      x0 = sps.pool0(s0.reshape((steps * batch,) + s0.shape[2:]))
      tokens, tail_aux = sps.tail(x0, steps, train)
      u = tokens.reshape((steps, batch) + tokens.shape[1:])
      if s.patch_embed == 'isps':  # integrate_at == 'sps_output': integrate the SPS output
        u = jnp.broadcast_to(sps.integrate(u), u.shape)
    aux.update(tail_aux)
    aux['token_values'] = jnp.sum(u, axis=-1)                  # (T, B, N), for energy.py
    chex.assert_shape(u, (steps, batch, s.num_tokens, s.dim))
    return u, aux

  def classify(self, out: jax.Array) -> jax.Array:
    """Head on the halting-weighted token outputs (B, N, D) -> logits (B, K)."""
    return self.head(halting.readout(out))

  def head_logits(self, out: jax.Array, step_readouts: jax.Array | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits from the encoder's readouts, for every backbone.

    Args:
      out: (B, N, D) halting-weighted token outputs (`halting.HaltState.out`).
      step_readouts: SDT only, (T, B, D) the head LIF's input per timestep
        (`sdt.step_weight`): its spikes go through the Linear head, averaged over T.

    Returns:
      (logits (B, K), head stats: SDT's {'head_lif': (B,) spike counts, 'head_spikes':
      (T, B, D)}, else {}).
    """
    if self.spec.backbone != 'sdt':
      return self.classify(out), {}
    spikes = sdt.head_spikes(step_readouts, self.spec)
    return jnp.mean(self.head(spikes), axis=0), {'head_lif': jnp.sum(spikes, axis=(0, 2)),
                                                 'head_spikes': spikes}

  def __call__(self, images: jax.Array, train: bool = False, capture: bool = False,
               halt_temperature=None):
    """Forward pass.

    Args:
      images: (B, H, W, C) normalised images.
      train: batch statistics (mutable 'batch_stats') instead of running averages.
      capture: also return every block's input and output (T, L, B, N, D).
      halt_temperature: with `model.halt.soft_mask`, the (traced) soft-mask temperature,
        annealed by the training loop; defaults to `model.halt.soft_temperature`; 0 gives the
        hard mask. Ignored without soft_mask.

    Returns:
      (logits (B, K), aux) as described in the class docstring.
    """
    s = self.spec
    hp = s.halt
    u, sps_aux = self.embed(images, train, capture)
    captures = sps_aux.pop('captures', None)
    gamma, beta = self.halting_params()
    temperature = None
    if hp.soft_mask:
      temperature = jnp.float32(hp.soft_temperature if halt_temperature is None
                                else halt_temperature)
    hs, ys = self.encoder(u, halting.HaltParams(gamma, beta, temperature), train=train,
                          capture=capture)
    step_readouts = jnp.sum(ys['step_readout'], axis=1) if 'step_readout' in ys else None
    logits, head_stats = self.head_logits(hs.out, step_readouts)
    extra = {}
    if head_stats:
      extra['head_stats'] = {'head_lif': head_stats['head_lif']}
    aux = forward_aux(ys['active'], ys['weight'], hs.rho, ys['stats'], sps_aux, embed=u, **extra)
    if 'score' in ys:
      aux['cell_score'] = ys['score']
    if capture:
      aux['block_inputs'] = ys['z_in']
      aux['block_mids'] = ys['z_mid']
      aux['block_outputs'] = ys['z_out']
      if head_stats:
        aux['head_spikes'] = head_stats['head_spikes']
      if captures is not None:
        aux['embed_captures'] = captures
    return logits, aux


def forward_aux(active: jax.Array, cell_weight: jax.Array, ponder: jax.Array,
                block_stats: dict[str, jax.Array], sps_stats: dict[str, jax.Array],
                **extra) -> dict[str, Any]:
  """The aux dict of a forward pass (keys in `STAS`'s docstring), shared by
  `stas_jax.model.early_exit`.

  Args:
    active, cell_weight: (T, L, B, N) mask and ACT weight of every cell.
    ponder: (B, N) ponder cost rho.
    block_stats: {name: (T, L, B)} per-block sums.
    sps_stats: the patch embedding's sums (`STAS.embed`).
    **extra: further entries of the path that computed them (e.g. `embed`).
  """
  chex.assert_equal_shape((active, cell_weight))
  chex.assert_shape(ponder, active.shape[2:])
  return {'active': active, 'cell_weight': cell_weight, 'ponder': ponder,
          'block_stats': block_stats, 'sps_stats': sps_stats, **extra}


def create_model(model_config, *, bn_axis_name: str | None = None) -> STAS:
  """Builds the network from `config.model` (ConfigDict, dict or ModelSpec).

  Args:
    model_config: the model group of a config.
    bn_axis_name: collective axis for cross-replica BatchNorm (the train loop passes 'batch' under
      pmap when `model.bn_cross_replica` is set); None keeps per-device statistics.
  """
  return STAS(spec_from_config(model_config), bn_axis_name=bn_axis_name)


def init_variables(model: STAS, rng: jax.Array, batch_size: int = 1) -> dict[str, Any]:
  """Initial {'params', 'batch_stats'} from a zero batch of the model's image shape, and
  {HALT_CONTROL: {'offset': 0.0}} with the token-ratio controller."""
  return dict(_init_fn(model, batch_size)(rng))


@functools.lru_cache(maxsize=8)
def _init_fn(model: STAS, batch_size: int):
  """The jitted `model.init` (one compile per model, whatever the number of runs or seeds)."""
  s = model.spec
  # A NumPy array, not jnp: a jnp constant made while some caller is being traced would be a
  # tracer, and the cache would hand it to every later caller (UnexpectedTracerError).
  images = np.zeros((batch_size, s.image_size, s.image_size, s.in_channels), np.float32)
  return jax.jit(lambda r: model.init(r, images, train=False))
