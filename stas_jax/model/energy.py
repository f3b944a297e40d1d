"""Energy accounting: synaptic operations, energy, token ratio, timesteps per token and
per-layer firing rates, all computed from the sums the model returns in its aux dict.

The counting rules (what costs a MAC, what an accumulate, how integer spike counts and I-SPS
rates count) are docs/method.md section 7; `estimate` implements them.
"""
from typing import Any
from collections.abc import Mapping

import jax
import jax.numpy as jnp

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
  accepts jax or numpy arrays.

  Args:
    aux: the aux dict of `STAS.__call__`; uses `active` (T, L, B, N), `block_stats`
      {name: (T, L, B)} and `sps_stats` {name: (B,)}.
    model_config: `config.model` (ConfigDict, dict or ModelSpec) of the model that made aux.
    e_mac_pj: energy of one multiply-accumulate, picojoules.
    e_ac_pj: energy of one accumulate, picojoules.
    weights: optional (B,) weight of each image in the pooled firing rates (e.g. the 0/1 mask
      of a padded eval batch); None weighs every image 1. Per-image outputs ignore it.

  Returns:
    energy_mj (B,): E_MAC * MACs + E_AC * SOPs, millijoules per image.
    energy_split_mj: {'patch_embed', 'attention', 'mlp', 'head'} (B,), summing to energy_mj;
      patch_embed includes conv0's MACs.
    sops: (B,) per group ('patch_embed', 'attention', 'mlp'), 'total', and per layer
      (`SPS_SOP_LAYERS`, `ATTENTION_SOP_LAYERS`, `MLP_SOP_LAYERS`; block layers summed over
      blocks and timesteps).
    macs: {'patch_embed.proj_conv', 'head'} (B,).
    token_ratio (B,): active token-cells / (T * L * N).
    timesteps (B,): token mean of the number of timesteps in which the token was processed by
      at least one block.
    firing_rates: {layer: scalar} spikes / (neurons * timesteps run), pooled over the batch;
      block layers count only active tokens ('block.{l}.attn.q_lif', 'block.{l}.mlp.fc1_lif',
      ...), SPS layers every position ('patch_embed.proj_lif' ... 'patch_embed.rpe_lif'). A
      block no token reached gets rate 0.
  """
  s = spec_from_config(model_config)
  _require(aux, ('active', 'block_stats', 'sps_stats'), 'aux')
  _require(aux['block_stats'], _BLOCK_KEYS, 'aux["block_stats"]')
  _require(aux['sps_stats'], _SPS_KEYS, 'aux["sps_stats"]')
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  active = f32(aux['active'])
  steps, depth, batch, tokens = active.shape
  if (steps, depth, tokens) != (s.timesteps, s.depth, s.num_tokens):
    raise ValueError(f'aux["active"] has shape {active.shape}, expected (T, L, B, N) = '
                     f'({s.timesteps}, {s.depth}, B, {s.num_tokens}) for this model config')
  bs = {k: f32(aux['block_stats'][k]) for k in _BLOCK_KEYS}
  ss = {k: f32(aux['sps_stats'][k]) for k in _SPS_KEYS}
  n_active = jnp.sum(active, axis=3)                                 # (T, L, B)
  unit = s.token_spikes_per_unit
  if unit != 1:  # U is a rate: its part of the residual stream is unit * U spikes
    _require(aux['sps_stats'], ('token_values',), 'aux["sps_stats"]')
    u_part = jnp.einsum('tlbn,tbn->tlb', active, f32(aux['sps_stats']['token_values']))
    for key in ('x_in', 'x_mid'):
      bs[key] = bs[key] + (unit - 1) * u_part
  per_image = lambda a: jnp.sum(a, axis=(0, 1))                      # (T, L, B) -> (B,)

  c = s.sps_channels
  sops = {
      'patch_embed.proj_conv1': ss['conv1_in'] * 9 * c[1],
      'patch_embed.proj_conv2': ss['conv2_in'] * 9 * c[2],
      'patch_embed.proj_conv3': ss['conv3_in'] * 9 * c[3],
      'patch_embed.rpe_conv': ss['rpe_in'] * 9 * s.dim,
      'attention.q_linear': per_image(bs['x_in']) * s.dim,
      'attention.k_linear': per_image(bs['x_in']) * s.dim,
      'attention.v_linear': per_image(bs['x_in']) * s.dim,
      'attention.qk': per_image(bs['q_lif'] * n_active),
      'attention.qk_v': per_image(bs['qk_map']) * s.head_dim,
      'attention.proj_linear': per_image(bs['attn_lif']) * s.dim,
      'mlp.fc1_linear': per_image(bs['x_mid']) * s.hidden_dim,
      'mlp.fc2_linear': per_image(bs['fc1_lif']) * s.dim,
  }
  layers_of = {'patch_embed': SPS_SOP_LAYERS, 'attention': ATTENTION_SOP_LAYERS,
               'mlp': MLP_SOP_LAYERS}
  for group, names in layers_of.items():
    sops[group] = sum(sops[n] for n in names)
  sops['total'] = sum(sops[g] for g in GROUPS)

  ones = jnp.ones((batch,), jnp.float32)
  macs = {
      'patch_embed.proj_conv': ones * (s.image_size ** 2 * s.in_channels * c[0] * 9),
      'head': ones * (s.dim * s.num_classes),
  }
  split_pj = {
      'patch_embed': e_mac_pj * macs['patch_embed.proj_conv'] + e_ac_pj * sops['patch_embed'],
      'attention': e_ac_pj * sops['attention'],
      'mlp': e_ac_pj * sops['mlp'],
      'head': e_mac_pj * macs['head'],
  }
  split = {k: v / PJ_PER_MJ for k, v in split_pj.items()}

  # A token counts for timestep t if any block processed it then (spatial mode re-activates
  # every token at each timestep; soft masks give fractional values).
  per_step = jnp.max(active, axis=1)                                 # (T, B, N)
  out = {
      'energy_mj': sum(split_pj.values()) / PJ_PER_MJ,
      'energy_split_mj': split,
      'sops': sops,
      'macs': macs,
      'token_ratio': jnp.sum(active, axis=(0, 1, 3)) / (steps * depth * tokens),
      'timesteps': jnp.mean(jnp.sum(per_step, axis=0), axis=-1),
      'firing_rates': _firing_rates(s, bs, ss, n_active,
                                    ones if weights is None else f32(weights)),
  }
  return out


def _firing_rates(s: ModelSpec, bs, ss, n_active, weights) -> dict[str, jax.Array]:
  """Spikes / neurons pooled over the images, each image weighted by `weights` (B,)."""
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
