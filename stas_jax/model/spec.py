"""Typed, validated view of the `model` config group, hashable so Flax modules can hold it.

`spec_from_config` turns the ml_collections `config.model` into a frozen `ModelSpec` and rejects
unknown keys and impossible values with a message that says what is allowed.
"""
import dataclasses
import math
from typing import Any
from collections.abc import Mapping

from stas_jax.model import halting
from stas_jax.model import neurons

GEOMETRIES = ('cifar', 'imagenet')
# The spiking Transformer the halting encoder belongs to (docs/method.md section 3): Spikformer,
# the Spike-driven Transformer v1 (stas_jax/model/sdt.py) and QKFormer (stas_jax/model/qkformer.py).
BACKBONES = ('spikformer', 'sdt', 'qkformer')
PATCH_EMBEDS = ('sps', 'isps')
ISPS_REDUCES = ('mean', 'sum')
ISPS_INTEGRATE_AT = ('first_lif', 'sps_output')
ISPS_TAILS = ('single_step', 'any_spike', 'multi_step')
# The network's LIF layers, named as in the PyTorch Spikformer state_dict: the patch embedding's
# five, then a block's attention and MLP neurons.
SPS_LIFS = ('proj_lif', 'proj_lif1', 'proj_lif2', 'proj_lif3', 'rpe_lif')
ATTN_LIFS = ('q_lif', 'k_lif', 'v_lif', 'attn_lif', 'proj_lif')
MLP_LIFS = ('fc1_lif', 'fc2_lif')
BLOCK_LIFS = ATTN_LIFS + MLP_LIFS
# The I-SPS tail's LIF layers, in order; `model.isps.tail` may name a mode for each.
ISPS_TAIL_LIFS = SPS_LIFS[1:]
# Keys that were options once and are gone, with the one behaviour left: an old run's
# config.json that holds them with that value still loads; another value cannot be built.
RETIRED_KEYS = {'halt': {'score': 'channel', 'readout': 'cell'}}
DTYPES = ('float32', 'bfloat16')
# jax.checkpoint_policies used with model.remat: recompute everything, or keep matmul outputs.
REMAT_POLICIES = ('nothing_saveable', 'dots_saveable')


@dataclasses.dataclass(frozen=True)
class NeuronSpec:
  """LIF constants shared by every neuron of the network (see `neurons.LIFParams`)."""
  tau: float = 2.0
  v_threshold: float = 1.0
  attn_v_threshold: float = 0.5   # threshold of the attention LIF (Spikformer's attn_lif)
  v_reset: float = 0.0
  surrogate: str = 'sigmoid'      # 'sigmoid' | 'atan'
  alpha: float = 4.0
  detach_reset: bool = True


@dataclasses.dataclass(frozen=True)
class ISPSSpec:
  """How I-SPS integrates the spikes of its first LIF (docs/method.md section 4).

  tail: how the tail's neurons (after conv1-3 and the RPE conv, which run once) fire:
    'single_step' (one LIF step) | 'any_spike' (1 if T LIF steps on the constant current fire)
    | 'multi_step' (the T steps' spikes integrated by `reduce`). One mode for the four tail LIFs,
    or four comma-separated modes for LIF1, LIF2, LIF3 and the RPE LIF in turn (e.g.
    'multi_step,single_step,single_step,single_step'); LIF3 and the RPE LIF, whose outputs add
    up to the token map, must both be multi_step or both not. SDT reads the first three (its
    LIF1-3; MS_SPS has no RPE LIF), QKFormer the first three for its patch embeddings 1-3.
  tail_steps: how many steps the any_spike and multi_step tail neurons run on their constant
    current (0: T, the timesteps). A neuron of tau 2 on a constant current I fires 0, 1, 2 or 4
    times over 4 steps (from I = 16/15, 4/3 and 2 on) and 0, 1 or 2 times over 2 steps (from 4/3
    and 2 on), so 2 steps keep the strong and middle currents apart at about half the spikes.
    LIF0 always runs T steps.
  """
  reduce: str = 'mean'            # 'mean' | 'sum' over the spikes of an integrating LIF
  integrate_at: str = 'first_lif'  # 'first_lif' | 'sps_output'
  tail: str = 'single_step'       # 'single_step' | 'any_spike' | 'multi_step', or 4 of them
  tail_steps: int = 0             # steps of the any_spike / multi_step tail LIFs; 0 = T

  @property
  def tail_modes(self) -> tuple[str, ...]:
    """The mode of each tail LIF (`ISPS_TAIL_LIFS` order)."""
    modes = tuple(m.strip() for m in self.tail.split(','))
    return modes * len(ISPS_TAIL_LIFS) if len(modes) == 1 else modes


@dataclasses.dataclass(frozen=True)
class HaltSpec:
  """Token halting: mode, halting score h = sigmoid(gamma * z[channel] + beta), loss weights."""
  mode: str = 'none'              # 'none' | 'spatial' | 'temporal' | 'spatiotemporal'
  eps: float = 0.01
  channel: int = 0
  gamma: float = 1.0
  beta: float = -3.0
  learnable: bool = False
  soft_mask: bool = False         # differentiable relaxation of the halting mask (studies)
  soft_temperature: float = 0.05  # soft-mask temperature at step 0 (see config.halt_anneal_steps)
  prior: str = 'act_weight'       # 'act_weight' (spec section 6) | 'avit' (A-ViT's form)
  target_cell: float = 0.75       # centre of the Gaussian prior: fraction of the T*L cells, or of
                                  # the T timesteps with prior 'avit'
  target_sigma: float = 1.0
  alpha_p: float = 5e-4           # ponder loss weight
  alpha_d: float = 0.1            # distribution-prior loss weight
  # Token-ratio budget controller (docs/method.md section 6.1): hold the training token ratio
  # at this target in (0, 1] by dual ascent on an offset added to beta (stop-gradient, kept in
  # the train state's `halt_control`); 0 = off.
  target_token_ratio: float = 0.0
  ratio_gain: float = 0.5         # offset += ratio_gain * (batch token ratio - target) per step
  # Which token ratio of the step's batch the controller reads: 'eval' (a forward pass in eval
  # mode, BatchNorm on its running statistics: the ratio inference will have) or 'train' (the
  # training forward's own, free, but 0.04-0.07 above the test ratio on the demo).
  ratio_source: str = 'eval'

  @property
  def controlled(self) -> bool:
    """Whether the token-ratio controller runs (a target is set and halting is on)."""
    return self.target_token_ratio > 0

  @property
  def prior_reads_scores(self) -> bool:
    """Whether the distribution prior takes the raw halting scores (A-ViT's form, halting on),
    which the model then returns as `aux['cell_score']`."""
    return self.mode != 'none' and self.prior == 'avit'


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything the network's shape and dynamics depend on (spec sections 2-5).

  These field defaults are the defaults of `config.model` (`configs/default.py` builds the
  group from them).
  """
  backbone: str = 'spikformer'    # 'spikformer' | 'sdt' | 'qkformer' (BACKBONES)
  geometry: str = 'cifar'         # 'cifar' (Linear blocks) | 'imagenet' (1x1 convs, no qkv bias)
  image_size: int = 32
  in_channels: int = 3
  num_classes: int = 10
  patch_size: int = 4             # 2 ** (number of max-pools in the SPS); cifar 4, imagenet 16
  dim: int = 384
  depth: int = 4
  heads: int = 12
  mlp_ratio: int = 4
  timesteps: int = 4
  patch_embed: str = 'sps'        # 'sps' (Spikformer) | 'isps' (integrated, STAS)
  attn_scale: float = 0.125
  bn_momentum: float = 0.9        # flax convention: 1 - PyTorch momentum (0.1)
  bn_epsilon: float = 1e-5
  bn_cross_replica: bool = False  # pmean batch statistics over the 'batch' axis (pmap)
  # Matmul/conv operands: 'float32' | 'bfloat16' (mixed precision: float32 accumulation, params,
  # BN and LIF; stas_jax/model/matmul.py).
  dtype: str = 'float32'
  remat: bool = True              # jax.checkpoint each encoder cell, keeping what the policy says
  # 'dots_saveable' keeps matmul outputs and recomputes BatchNorm/LIF/mask work;
  # 'nothing_saveable' recomputes all.
  remat_policy: str = 'dots_saveable'
  unroll_time: bool = True        # unroll the T-step time scan, the block scan stays rolled
  unroll_scans: bool = False      # unroll the block scan too (implies unroll_time; longer compile)
  # QKFormer only: its reference applies the stage-3 proj_lif to a (T * B, C, N) tensor, so the
  # LIF's time axis runs over the images too and its membrane passes from each image to the next
  # (layers.lif_over_batch). True reproduces that (parity with official checkpoints); False runs it
  # per image like every other LIF (docs/method.md section 3).
  proj_lif_over_batch: bool = False
  neuron: NeuronSpec = NeuronSpec()
  isps: ISPSSpec = ISPSSpec()
  halt: HaltSpec = HaltSpec()

  @property
  def num_pools(self) -> int:
    return int(round(math.log2(self.patch_size)))

  @property
  def encoder_depth(self) -> int:
    """Blocks in the halting encoder, the L of the (T, L) grid: `depth`, except for QKFormer,
    whose `depth` counts its one stage-1 and one stage-2 block too (the official `depths`) and
    whose encoder is stage 3 (docs/method.md section 3)."""
    return self.depth - 2 if self.backbone == 'qkformer' else self.depth

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size ** 2

  @property
  def head_dim(self) -> int:
    return self.dim // self.heads

  @property
  def hidden_dim(self) -> int:
    return int(self.dim * self.mlp_ratio)

  @property
  def qkv_bias(self) -> bool:
    # Reference CIFAR blocks use nn.Linear (bias); ImageNet's use bias-free Conv1d for q, k, v,
    # as do every SDT and QKFormer attention.
    return self.geometry == 'cifar' and self.backbone == 'spikformer'

  @property
  def sps_channels(self):
    d = self.dim
    return (d // 8, d // 4, d // 2, d)

  @property
  def isps_once(self) -> bool:
    """I-SPS integrated at LIF0: conv1-3 and the RPE conv run once, not once per timestep."""
    return self.patch_embed == 'isps' and self.isps.integrate_at == 'first_lif'

  @property
  def spikes_per_unit(self) -> int:
    """Spikes in one unit of an integrated I-SPS value: T for a mean of T spike trains, else 1.

    A mean of T spikes folds its 1/T into the next layer's weights, so a value v of it is
    T * v spikes (energy.py counts inputs as spikes).
    """
    return self.timesteps if self.isps.reduce == 'mean' else 1

  @property
  def tail_steps(self) -> int:
    """Steps of the I-SPS tail neurons that run on their constant current (`isps.tail_steps`)."""
    return self.isps.tail_steps or self.timesteps

  @property
  def tail_spikes_per_unit(self) -> int:
    """Spikes in one unit of a multi_step tail output: `tail_steps` for a mean, else 1."""
    return self.tail_steps if self.isps.reduce == 'mean' else 1

  @property
  def token_spikes_per_unit(self) -> int:
    """Spikes in one unit of the encoder input U (1 when U holds spike counts or spikes)."""
    if self.patch_embed != 'isps':
      return 1
    if self.isps.integrate_at == 'sps_output':
      return self.spikes_per_unit
    # The LIFs that make U: Spikformer's RPE LIF (and LIF3), QKFormer's patch_embed3.
    last = self.isps.tail_modes[2 if self.backbone == 'qkformer' else 3]
    if last == 'multi_step':
      return self.tail_spikes_per_unit
    return 1

  def lif(self) -> neurons.LIFParams:
    n = self.neuron
    return neurons.LIFParams(tau=n.tau, v_threshold=n.v_threshold, v_reset=n.v_reset,
                             surrogate=n.surrogate, alpha=n.alpha, detach_reset=n.detach_reset)

  def attn_lif(self) -> neurons.LIFParams:
    return dataclasses.replace(self.lif(), v_threshold=self.neuron.attn_v_threshold)


def _check_keys(cls, values: Mapping[str, Any], where: str):
  allowed = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - allowed)
  if unknown:
    raise ValueError(f'unknown key(s) {unknown} in {where}; allowed keys: {sorted(allowed)}')


def _choice(value, allowed, key):
  if value not in allowed:
    raise ValueError(f'{key}={value!r} is not valid; choose one of {allowed}')


def _drop_retired(group: str, values: dict[str, Any]) -> dict[str, Any]:
  """`values` without the retired keys of `config.model.<group>` that hold their one remaining
  behaviour (`RETIRED_KEYS`); any other value of a retired key is an error that says so."""
  out = dict(values)
  for key, kept in RETIRED_KEYS.get(group, {}).items():
    if key in out:
      value = out.pop(key)
      if value != kept:
        raise ValueError(f'model.{group}.{key}={value!r} was retired (after commit 8aa8881, '
                         'docs/studies/halting_scores.md); only the behaviour of '
                         f'{key}={kept!r} is left: drop the key, or check out 8aa8881')
  return out


def spec_from_config(cfg) -> ModelSpec:
  """Builds a validated `ModelSpec` from `config.model` (a ConfigDict or a plain dict)."""
  if isinstance(cfg, ModelSpec):
    return cfg
  values = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
  _check_keys(ModelSpec, values, 'config.model')
  nested = {}
  for key, cls in (('neuron', NeuronSpec), ('isps', ISPSSpec), ('halt', HaltSpec)):
    sub = _drop_retired(key, dict(values.pop(key, {}) or {}))
    _check_keys(cls, sub, f'config.model.{key}')
    nested[key] = cls(**sub)
  spec = ModelSpec(**values, **nested)
  _validate(spec)
  return spec


def _validate_tail(isps: ISPSSpec, backbone: str):
  modes = isps.tail_modes
  if len(modes) != len(ISPS_TAIL_LIFS):
    raise ValueError(f'model.isps.tail={isps.tail!r}: give one mode or {len(ISPS_TAIL_LIFS)} '
                     f'comma-separated modes (for {", ".join(ISPS_TAIL_LIFS)})')
  for mode in modes:
    _choice(mode, ISPS_TAILS, 'model.isps.tail')
  if not isinstance(isps.tail_steps, int) or isps.tail_steps < 0:
    raise ValueError(f'model.isps.tail_steps={isps.tail_steps!r}: give a number of steps >= 1, '
                     'or 0 for T (model.timesteps)')
  if backbone == 'spikformer' and (modes[2] == 'multi_step') != (modes[3] == 'multi_step'):
    raise ValueError(f'model.isps.tail={isps.tail!r}: proj_lif3 and rpe_lif add up to the token '
                     'map, so they must both be multi_step (a spike count) or both not (spikes)')


def _validate(s: ModelSpec):
  _choice(s.geometry, GEOMETRIES, 'model.geometry')
  _choice(s.patch_embed, PATCH_EMBEDS, 'model.patch_embed')
  _choice(s.isps.reduce, ISPS_REDUCES, 'model.isps.reduce')
  _choice(s.isps.integrate_at, ISPS_INTEGRATE_AT, 'model.isps.integrate_at')
  _choice(s.backbone, BACKBONES, 'model.backbone')
  _validate_tail(s.isps, s.backbone)
  _choice(s.halt.mode, halting.MODES, 'model.halt.mode')
  _choice(s.halt.prior, halting.PRIORS, 'model.halt.prior')
  _choice(s.neuron.surrogate, neurons.SURROGATES, 'model.neuron.surrogate')
  _choice(s.dtype, DTYPES, 'model.dtype')
  _choice(s.remat_policy, REMAT_POLICIES, 'model.remat_policy')
  p = s.patch_size
  if p < 2 or p > 16 or p & (p - 1):
    raise ValueError(f'model.patch_size={p}: the SPS down-samples with 1 to 4 max-pools, so the '
                     'patch size must be 2, 4, 8 or 16')
  if s.image_size % p:
    raise ValueError(f'model.image_size={s.image_size} is not a multiple of patch_size={p}')
  if s.dim % 8:
    raise ValueError(f'model.dim={s.dim} must be a multiple of 8 (the SPS uses dim/8 channels)')
  if s.dim % s.heads:
    raise ValueError(f'model.dim={s.dim} is not divisible by model.heads={s.heads}')
  for key in ('depth', 'timesteps', 'heads', 'num_classes', 'in_channels'):
    if getattr(s, key) < 1:
      raise ValueError(f'model.{key} must be >= 1, got {getattr(s, key)}')
  _validate_backbone(s)
  if not 0 <= s.halt.channel < s.dim:
    raise ValueError(f'model.halt.channel={s.halt.channel} is outside [0, dim={s.dim})')
  if not 0 < s.halt.eps < 1:
    raise ValueError(f'model.halt.eps={s.halt.eps} must lie in (0, 1)')
  _validate_controller(s.halt)


def _validate_controller(hp: HaltSpec):
  """The token-ratio controller's keys (`HaltSpec.target_token_ratio`, `ratio_gain`)."""
  target = hp.target_token_ratio
  if not 0 <= target <= 1:
    raise ValueError(f'model.halt.target_token_ratio={target!r} must lie in (0, 1] (the share '
                     'of (token, cell) slots processed), or be 0 to turn the controller off')
  if target > 0 and hp.mode == 'none':
    raise ValueError(f'model.halt.target_token_ratio={target!r} needs halting: set '
                     "model.halt.mode (e.g. 'spatiotemporal'), or the target to 0")
  if not hp.ratio_gain > 0:
    raise ValueError(f'model.halt.ratio_gain={hp.ratio_gain!r} must be > 0 (the step of the '
                     'offset per unit of token-ratio error)')
  if hp.ratio_source not in ('eval', 'train'):
    raise ValueError(f"model.halt.ratio_source={hp.ratio_source!r}: use 'eval' (the eval-mode "
                     "token ratio of the training batch) or 'train' (the training forward's)")


def _validate_backbone(s: ModelSpec):
  """The sizes SDT and QKFormer need beyond Spikformer's (docs/method.md section 3)."""
  if s.proj_lif_over_batch and s.backbone != 'qkformer':
    raise ValueError('model.proj_lif_over_batch reproduces a quirk of the QKFormer reference; '
                     f"it has no meaning for model.backbone={s.backbone!r}")
  if s.backbone == 'spikformer':
    return
  if s.geometry != 'cifar':
    raise ValueError(f'model.backbone={s.backbone!r} has one block layout (1x1 convolutions); '
                     "model.geometry names Spikformer's CIFAR or ImageNet layout: keep 'cifar'")
  if s.backbone != 'qkformer':
    return
  if s.patch_size < 4:
    raise ValueError(f'model.patch_size={s.patch_size}: QKFormer down-samples twice (patch '
                     'embeddings 2 and 3), so the patch size is 4, or 8 or 16 with max-pools in '
                     'patch_embed1')
  if s.depth < 3:
    raise ValueError(f'model.depth={s.depth}: QKFormer has one block in each of stages 1 and 2 '
                     'and depth - 2 in stage 3, the halting encoder; give depth >= 3 (the '
                     'demo-sized QKFormer: configs/demo_qkformer.py)')
  if (s.dim // 4) % s.heads or s.dim % 4:
    raise ValueError(f'model.dim={s.dim}: QKFormer stage 1 is dim / 4 wide and splits it into '
                     f'model.heads={s.heads} heads; make dim / 4 a multiple of heads (the '
                     'official code uses 8 heads whatever num_heads says)')
