"""Energy accounting: synaptic operations, energy, token ratio, timesteps per token and
per-layer firing rates, all computed from the sums the model returns in its aux dict.

The counting rules (what costs a MAC, what an accumulate, how integer spike counts and I-SPS
rates count) are docs/method.md section 7; `estimate` implements them.
"""
from typing import Any
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from stas_jax.model import qkformer
from stas_jax.model import sdt
from stas_jax.model.spec import ATTN_LIFS, MLP_LIFS, SPS_LIFS, ModelSpec, spec_from_config

E_MAC_PJ = 4.6
E_AC_PJ = 0.9
PJ_PER_MJ = 1e9

GROUPS = ('patch_embed', 'attention', 'mlp')
SPLIT = GROUPS + ('head',)
# Per-layer SOP keys: '<group>.<layer>', block layers summed over blocks and timesteps.
SPS_SOP_LAYERS = ('patch_embed.proj_conv1', 'patch_embed.proj_conv2', 'patch_embed.proj_conv3',
                  'patch_embed.rpe_conv')
ATTENTION_SOP_LAYERS = ('attention.q_linear', 'attention.k_linear', 'attention.v_linear',
                        'attention.qk', 'attention.qk_v', 'attention.proj_linear')
MLP_SOP_LAYERS = ('mlp.fc1_linear', 'mlp.fc2_linear')

_BLOCK_KEYS = ('x_in', 'q_lif', 'k_lif', 'v_lif', 'qk_map', 'attn_lif', 'proj_lif', 'x_mid',
               'fc1_lif', 'fc2_lif')
_SPS_KEYS = ('conv1_in', 'conv2_in', 'conv3_in', 'rpe_in') + SPS_LIFS


def _sps_layout(s: ModelSpec) -> tuple[dict[str, int], dict[str, int]]:
  """Neurons per timestep of each SPS LIF, and the timesteps it ran for one image.

  Stage i's conv keeps the spatial size of its input; a max-pool (3, 2, 1) after stage i
  (i >= 4 - num_pools) halves it, rounding up.
  """
  channels = s.sps_channels
  size = s.image_size
  cells = {}
  for i, name in enumerate(SPS_LIFS[:4]):
    cells[name] = size * size * channels[i]
    if i >= 4 - s.num_pools:
      size = -(-size // 2)
  cells['rpe_lif'] = size * size * s.dim
  # LIF0 always runs T steps. Under I-SPS (first_lif) the tail runs once: its neurons fire
  # once (single_step, any_spike) or run `tail_steps` steps on a constant current
  # (multi_step). Each tail LIF has its own mode (`ModelSpec.isps.tail_modes`).
  steps = {'proj_lif': s.timesteps}
  for name, mode in zip(SPS_LIFS[1:], s.isps.tail_modes):
    if not s.isps_once:
      steps[name] = s.timesteps
    else:
      steps[name] = s.tail_steps if mode == 'multi_step' else 1
  return cells, steps


def _require(group: Mapping[str, Any], keys, where: str):
  missing = [k for k in keys if k not in group]
  if missing:
    raise KeyError(f'{where} lacks {missing}; estimate() needs the sums that '
                   'stas_jax.model.network.STAS returns (see its docstring)')


def estimate(aux: Mapping[str, Any], model_config, *, e_mac_pj: float = E_MAC_PJ,
             e_ac_pj: float = E_AC_PJ, weights: Any | None = None) -> dict[str, Any]:
  """Per-image energy, operation counts, token usage and firing rates from the model's aux.

  Pure jnp and jit-able (close over the config: `jax.jit(lambda a: estimate(a, cfg))`);
  accepts jax or numpy arrays. The rules are docs/method.md section 7, for every backbone.

  Args:
    aux: the aux dict of `STAS.__call__`; uses `active` (T, L, B, N), `block_stats`
      {name: (T, L, B)}, `sps_stats` {name: (B,)} and, for SDT, `head_stats`.
    model_config: `config.model` (ConfigDict, dict or ModelSpec) of the model that made aux.
    e_mac_pj: energy of one multiply-accumulate, picojoules.
    e_ac_pj: energy of one accumulate, picojoules.
    weights: optional (B,) weight of each image in the pooled firing rates (e.g. the 0/1 mask
      of a padded eval batch); None weighs every image 1. Per-image outputs ignore it.

  Returns:
    energy_mj (B,): E_MAC * MACs + E_AC * SOPs, millijoules per image.
    energy_split_mj: {'patch_embed', 'attention', 'mlp', 'head'} (B,), summing to energy_mj;
      patch_embed includes conv0's MACs (QKFormer: stages 1 and 2 count as attention and mlp).
    sops: (B,) per group ('patch_embed', 'attention', 'mlp'; SDT also 'head'), 'total', and
      per layer ('<group>.<layer>'; Spikformer: `SPS_SOP_LAYERS`, `ATTENTION_SOP_LAYERS`,
      `MLP_SOP_LAYERS`; encoder layers summed over blocks and timesteps).
    macs: {'patch_embed.proj_conv', 'head'} (B,).
    token_ratio (B,): active token-cells / (T * L * N).
    timesteps (B,): token mean of the number of timesteps in which the token was processed by
      at least one block.
    firing_rates: {layer: scalar} spikes / (neurons * timesteps run), pooled over the batch,
      keyed like the reference's LIF modules ('block.{l}.attn.q_lif', 'patch_embed.proj_lif',
      SDT's 'head_lif', QKFormer's 'stage1.0.tssa.attn_lif', ...); encoder layers count only
      active tokens (a block no token reached gets rate 0), the others every position.
  """
  s = spec_from_config(model_config)
  _require(aux, ('active', 'block_stats', 'sps_stats'), 'aux')
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  active = f32(aux['active'])
  steps, depth, batch, tokens = active.shape
  if (steps, depth, tokens) != (s.timesteps, s.encoder_depth, s.num_tokens):
    raise ValueError(f'aux["active"] has shape {active.shape}, expected (T, L, B, N) = '
                     f'({s.timesteps}, {s.encoder_depth}, B, {s.num_tokens}) for this model '
                     'config')
  ones = jnp.ones((batch,), jnp.float32)
  weights = ones if weights is None else f32(weights)
  counts = {'spikformer': _spikformer_counts, 'sdt': _sdt_counts,
            'qkformer': _qkformer_counts}[s.backbone]
  sops, macs, rates = counts(s, aux, active, weights)
  for group in SPLIT:
    names = [k for k in sops if k.startswith(group + '.')]
    if names:
      sops[group] = sum(sops[n] for n in names)
  sops['total'] = sum(sops[g] for g in SPLIT if g in sops)
  split_pj = {}
  for group in SPLIT:
    group_macs = [v for k, v in macs.items() if k.startswith(group + '.') or k == group]
    pj = e_mac_pj * sum(group_macs) if group_macs else 0.0
    if group in sops:
      pj = pj + e_ac_pj * sops[group] if group_macs else e_ac_pj * sops[group]
    split_pj[group] = pj * ones
  split = {k: v / PJ_PER_MJ for k, v in split_pj.items()}

  # A token counts for timestep t if any block processed it then (spatial mode re-activates
  # every token at each timestep; soft masks give fractional values).
  per_step = jnp.max(active, axis=1)                                 # (T, B, N)
  return {
      'energy_mj': sum(split_pj.values()) / PJ_PER_MJ,
      'energy_split_mj': split,
      'sops': sops,
      'macs': macs,
      'token_ratio': jnp.sum(active, axis=(0, 1, 3)) / (steps * depth * tokens),
      'timesteps': jnp.mean(jnp.sum(per_step, axis=0), axis=-1),
      'firing_rates': rates,
  }


def _stats(aux, group: str, keys) -> dict[str, jax.Array]:
  """aux[group][k] as float32 for every k of `keys`, which must all be there."""
  _require(aux[group], keys, f'aux["{group}"]')
  return {k: jnp.asarray(aux[group][k], jnp.float32) for k in keys}


def _per_image(a: jax.Array) -> jax.Array:
  """(T, L, B) -> (B,): summed over timesteps and blocks."""
  return jnp.sum(a, axis=(0, 1))


def _conv0_macs(s: ModelSpec, batch_ones: jax.Array) -> jax.Array:
  """conv0 on the analog image, counted once: H * W * C_in * C0 * 9 multiply-accumulates."""
  return batch_ones * (s.image_size ** 2 * s.in_channels * s.sps_channels[0] * 9)


def _encoder_counts(s: ModelSpec, bs: dict[str, jax.Array], aux, active: jax.Array
                    ) -> dict[str, jax.Array]:
  """SOPs of Spikformer's SSA blocks (also QKFormer's stage 3), per layer (B,)."""
  n_active = jnp.sum(active, axis=3)                                 # (T, L, B)
  unit = s.token_spikes_per_unit
  if unit != 1:  # U is a rate: its part of the residual stream is unit * U spikes
    _require(aux['sps_stats'], ('token_values',), 'aux["sps_stats"]')
    u_part = jnp.einsum('tlbn,tbn->tlb', active,
                        jnp.asarray(aux['sps_stats']['token_values'], jnp.float32))
    bs = dict(bs)
    for key in ('x_in', 'x_mid'):
      bs[key] = bs[key] + (unit - 1) * u_part
  return {
      'q_linear': _per_image(bs['x_in']) * s.dim,
      'k_linear': _per_image(bs['x_in']) * s.dim,
      'v_linear': _per_image(bs['x_in']) * s.dim,
      'qk': _per_image(bs['q_lif'] * n_active),
      'qk_v': _per_image(bs['qk_map']) * s.head_dim,
      'proj_linear': _per_image(bs['attn_lif']) * s.dim,
      'fc1_linear': _per_image(bs['x_mid']) * s.hidden_dim,
      'fc2_linear': _per_image(bs['fc1_lif']) * s.dim,
  }


def _block_rates(s: ModelSpec, bs, active, weights, names) -> dict[str, jax.Array]:
  """Rates of the encoder's per-token LIFs, over active tokens; `names` maps a stats key to
  (rate key with '{l}' for the block, neurons per token)."""
  n_active = jnp.sum(active, axis=3)
  token_steps = jnp.sum(n_active * weights, axis=(0, 2))             # (L,) active token-steps
  rates = {}
  for l in range(s.encoder_depth):
    for key, (name, width) in names.items():
      spikes = jnp.sum(bs[key][:, l] * weights)
      rates[name.format(l=l)] = spikes / jnp.maximum(token_steps[l] * width, 1e-12)
  return rates


def _spikformer_counts(s: ModelSpec, aux, active, weights):
  """Spikformer: SOPs per layer, MACs and firing rates (docs/method.md section 7)."""
  bs = _stats(aux, 'block_stats', _BLOCK_KEYS)
  ss = _stats(aux, 'sps_stats', _SPS_KEYS)
  c = s.sps_channels
  enc = _encoder_counts(s, bs, aux, active)
  sops = {
      'patch_embed.proj_conv1': ss['conv1_in'] * 9 * c[1],
      'patch_embed.proj_conv2': ss['conv2_in'] * 9 * c[2],
      'patch_embed.proj_conv3': ss['conv3_in'] * 9 * c[3],
      'patch_embed.rpe_conv': ss['rpe_in'] * 9 * s.dim,
      **{f'attention.{k}': enc[k] for k in ('q_linear', 'k_linear', 'v_linear', 'qk', 'qk_v',
                                            'proj_linear')},
      'mlp.fc1_linear': enc['fc1_linear'],
      'mlp.fc2_linear': enc['fc2_linear'],
  }
  ones = jnp.ones_like(weights)
  macs = {'patch_embed.proj_conv': _conv0_macs(s, ones),
          'head': ones * (s.dim * s.num_classes)}
  return sops, macs, _firing_rates(s, bs, ss, jnp.sum(active, axis=3), weights)


def _firing_rates(s: ModelSpec, bs, ss, n_active, weights) -> dict[str, jax.Array]:
  """Spikformer's spikes / neurons pooled over the images, each image weighted by `weights`."""
  rates = {}
  cells, steps = _sps_layout(s)
  images = jnp.maximum(jnp.sum(weights), 1e-12)
  for name in SPS_LIFS:
    rates[f'patch_embed.{name}'] = (jnp.sum(ss[name] * weights) /
                                    (images * steps[name] * cells[name]))
  token_steps = jnp.sum(n_active * weights, axis=(0, 2))             # (L,) active token-steps
  width = {'fc1_lif': s.hidden_dim}
  for l in range(s.depth):
    for part, names in (('attn', ATTN_LIFS), ('mlp', MLP_LIFS)):
      for name in names:
        neurons = token_steps[l] * width.get(name, s.dim)
        spikes = jnp.sum(bs[name][:, l] * weights)
        rates[f'block.{l}.{part}.{name}'] = spikes / jnp.maximum(neurons, 1e-12)
  return rates


def _tail_steps(s: ModelSpec, mode: str) -> int:
  """Steps a patch-embedding LIF after the integration point runs: T per timestep (SPS), else
  once, or `tail_steps` for a multi_step I-SPS tail neuron."""
  if not s.isps_once:
    return s.timesteps
  return s.tail_steps if mode == 'multi_step' else 1


def _pooled_rates(spikes: Mapping[str, jax.Array], neurons: Mapping[str, int],
                  weights: jax.Array) -> dict[str, jax.Array]:
  """{name: spikes (B,) / neurons per image}, pooled over images weighted by `weights`."""
  images = jnp.maximum(jnp.sum(weights), 1e-12)
  return {k: jnp.sum(spikes[k] * weights) / (images * neurons[k]) for k in neurons}


_SDT_BLOCK_KEYS = ('shortcut_lif', 'q_lif', 'k_lif', 'v_lif', 'kv_and', 'talking_heads_lif',
                   'qkv', 'fc1_lif', 'fc2_lif')
_SDT_SPS_KEYS = ('conv1_in', 'conv2_in', 'conv3_in', 'rpe_in', 'proj_lif', 'proj_lif1',
                 'proj_lif2', 'proj_lif3')


def _sdt_counts(s: ModelSpec, aux, active, weights):
  """SDT: SOPs per layer, MACs and firing rates.

  Every conv after conv0 and the head take spikes (ACs: spikes x fan-out); the Hadamard
  products of spikes cost one AC per spike of their full-size operand (k in k * v, q in
  q * kv) and the column sum one per summand k * v = 1; the real-valued residual adds (two per
  block, three with the MLP's extra residual, and MS_SPS's rpe + f) one AC per element added.
  """
  bs = _stats(aux, 'block_stats', _SDT_BLOCK_KEYS)
  ss = _stats(aux, 'sps_stats', _SDT_SPS_KEYS)
  _require(aux, ('head_stats',), 'aux')
  head = _stats(aux, 'head_stats', ('head_lif',))['head_lif']
  c, d, hid = s.sps_channels, s.dim, s.hidden_dim
  n_active = jnp.sum(active, axis=3)                                 # (T, L, B)
  embed_runs = 1 if s.isps_once else s.timesteps
  ones = jnp.ones_like(weights)
  sops = {
      'patch_embed.proj_conv1': ss['conv1_in'] * 9 * c[1],
      'patch_embed.proj_conv2': ss['conv2_in'] * 9 * c[2],
      'patch_embed.proj_conv3': ss['conv3_in'] * 9 * c[3],
      'patch_embed.rpe_conv': ss['rpe_in'] * 9 * d,
      'patch_embed.rpe_add': ones * (embed_runs * s.num_tokens * d),
      'attention.q_conv': _per_image(bs['shortcut_lif']) * d,
      'attention.k_conv': _per_image(bs['shortcut_lif']) * d,
      'attention.v_conv': _per_image(bs['shortcut_lif']) * d,
      'attention.kv_and': _per_image(bs['k_lif']),
      'attention.kv_sum': _per_image(bs['kv_and']),
      'attention.q_kv': _per_image(bs['q_lif']),
      'attention.proj_conv': _per_image(bs['qkv']) * d,
      'attention.residual_add': _per_image(n_active) * d,
      'mlp.fc1_conv': _per_image(bs['fc1_lif']) * hid,
      'mlp.fc2_conv': _per_image(bs['fc2_lif']) * d,
      'mlp.residual_add': _per_image(n_active) * d * (2 if hid == d else 1),
      'head.linear': head * s.num_classes,
  }
  macs = {'patch_embed.proj_conv': _conv0_macs(s, ones), 'head': ones * 0.0}
  # Neurons per image of each patch-embedding LIF times the steps it ran.
  side, neurons = s.image_size, {}
  modes = ('', *s.isps.tail_modes[:3])
  for i, name in enumerate(sdt.SPS_LIFS):
    if i == 3 and i >= 4 - s.num_pools:  # LIF3 fires on the pooled BatchNorm output
      side = -(-side // 2)
    steps = s.timesteps if i == 0 else _tail_steps(s, modes[i])
    neurons[name] = side * side * c[i] * steps
    if i < 3 and i >= 4 - s.num_pools:
      side = -(-side // 2)
  rates = {f'patch_embed.{k}': v for k, v in _pooled_rates(ss, neurons, weights).items()}
  width = {name: d for name in sdt.BLOCK_LIFS}
  width['fc2_lif'] = hid
  names = {k: (f'block.{{l}}.{"mlp" if k in sdt.MLP_LIFS else "attn"}.{k}', width[k])
           for k in sdt.BLOCK_LIFS if k != 'talking_heads_lif'}
  rates.update(_block_rates(s, bs, active, weights, names))
  image_steps = jnp.sum(jnp.max(active, axis=3) * weights, axis=(0, 2))  # (L,) (t, image) runs
  for l in range(s.encoder_depth):
    spikes = jnp.sum(bs['talking_heads_lif'][:, l] * weights)
    rates[f'block.{l}.attn.talking_heads_lif'] = spikes / jnp.maximum(image_steps[l] * d, 1e-12)
  rates['head_lif'] = _pooled_rates({'head_lif': head}, {'head_lif': s.timesteps * d},
                                    weights)['head_lif']
  return sops, macs, rates


def _qkformer_counts(s: ModelSpec, aux, active, weights):
  """QKFormer: SOPs per layer, MACs and firing rates.

  The patch embeddings' and stages' inputs are spike counts (ACs: count x fan-out, a 3x3 conv
  fanning out to 9 C, a 1x1 conv to C); the token attention's per-head sum of q costs one AC
  per q spike and its mask times k one per k spike; stage 3 follows Spikformer's rules.
  """
  bs = _stats(aux, 'block_stats', _BLOCK_KEYS)
  ss = {k: jnp.asarray(v, jnp.float32) for k, v in aux['sps_stats'].items()
        if k != 'token_values'}
  w = qkformer.stage_widths(s)
  sides = qkformer.stage_sides(s)
  modes = s.isps.tail_modes
  tail = lambda i: _tail_steps(s, modes[i])
  need = ['patch_embed1.proj_lif', 'patch_embed1.conv_in', 'patch_embed1.proj1_lif',
          'patch_embed1.proj_res_lif']
  neurons = {'patch_embed1.proj_lif': s.image_size ** 2 * s.sps_channels[0] * s.timesteps,
             'patch_embed1.proj1_lif': sides[0] ** 2 * w[0] * tail(0),
             'patch_embed1.proj_res_lif': sides[0] ** 2 * w[0] * tail(0)}
  for i in (1, 2):
    st, pe, c, side = f'stage{i}.0', f'patch_embed{i + 1}', w[i - 1], sides[i - 1]
    hid = int(c * s.mlp_ratio)
    need += [f'{st}.tssa.{k}' for k in ('x_in', 'y') + qkformer.TOKEN_ATTN_LIFS]
    need += [f'{st}.mlp.{k}' for k in ('x_mid',) + qkformer.MLP_LIFS]
    need += [f'{pe}.{k}' for k in ('conv3_in', 'conv4_in', 'res_in') + qkformer.EMBED_STAGE_LIFS]
    for k in ('q_lif', 'k_lif', 'proj_lif'):
      neurons[f'{st}.tssa.{k}'] = side * side * c * s.timesteps
    neurons[f'{st}.tssa.attn_lif'] = side * side * s.heads * s.timesteps
    neurons[f'{st}.mlp.mlp1_lif'] = side * side * hid * s.timesteps
    neurons[f'{st}.mlp.mlp2_lif'] = side * side * c * s.timesteps
    neurons[f'{pe}.proj3_lif'] = side * side * w[i] * tail(i)
    neurons[f'{pe}.proj4_lif'] = sides[i] ** 2 * w[i] * tail(i)
    neurons[f'{pe}.proj_res_lif'] = sides[i] ** 2 * w[i] * tail(i)
  _require(ss, need, 'aux["sps_stats"]')
  sops = {
      'patch_embed.patch_embed1.proj1_conv': ss['patch_embed1.conv_in'] * 9 * w[0],
      'patch_embed.patch_embed1.proj_res_conv': ss['patch_embed1.conv_in'] * w[0],
  }
  for i in (1, 2):
    st, pe, c = f'stage{i}.0', f'patch_embed{i + 1}', w[i - 1]
    sops.update({
        f'attention.stage{i}.q_conv': ss[f'{st}.tssa.x_in'] * c,
        f'attention.stage{i}.k_conv': ss[f'{st}.tssa.x_in'] * c,
        f'attention.stage{i}.head_sum': ss[f'{st}.tssa.q_lif'],
        f'attention.stage{i}.mask_k': ss[f'{st}.tssa.k_lif'],
        f'attention.stage{i}.proj_conv': ss[f'{st}.tssa.y'] * c,
        f'mlp.stage{i}.mlp1_conv': ss[f'{st}.mlp.x_mid'] * int(c * s.mlp_ratio),
        f'mlp.stage{i}.mlp2_conv': ss[f'{st}.mlp.mlp1_lif'] * c,
        f'patch_embed.{pe}.proj3_conv': ss[f'{pe}.conv3_in'] * 9 * w[i],
        f'patch_embed.{pe}.proj4_conv': ss[f'{pe}.conv4_in'] * 9 * w[i],
        f'patch_embed.{pe}.proj_res_conv': ss[f'{pe}.res_in'] * w[i],
    })
  enc = _encoder_counts(s, bs, aux, active)
  names = {'q_linear': 'q_conv', 'k_linear': 'k_conv', 'v_linear': 'v_conv', 'qk': 'qk',
           'qk_v': 'qk_v', 'proj_linear': 'proj_conv'}
  sops.update({f'attention.stage3.{v}': enc[k] for k, v in names.items()})
  sops['mlp.stage3.mlp1_conv'] = enc['fc1_linear']
  sops['mlp.stage3.mlp2_conv'] = enc['fc2_linear']
  ones = jnp.ones_like(weights)
  macs = {'patch_embed.proj_conv': _conv0_macs(s, ones), 'head': ones * (s.dim * s.num_classes)}
  rates = _pooled_rates(ss, neurons, weights)
  width = {'fc1_lif': s.hidden_dim}
  rates.update(_block_rates(s, bs, active, weights, {
      k: (f'stage3.{{l}}.{v}', width.get(k, s.dim))
      for k, v in qkformer.ENCODER_LIF_NAMES.items()}))
  return sops, macs, rates


def summarize(energy: Mapping[str, Any], prefix: str = '') -> dict[str, float]:
  """Flattens an `estimate` result to {'energy_mj': ..., 'sops/attention': ...} python floats,
  each the batch mean (firing rates are already pooled scalars)."""
  flat = {}
  for key, value in energy.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(summarize(value, f'{name}/'))
    else:
      flat[name] = float(jnp.mean(jnp.asarray(value)))
  return flat
