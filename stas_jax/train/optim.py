"""Optimiser and schedules: AdamW with masked weight decay, the warm-up + cosine learning rate,
the soft halting-mask temperature, the energy-loss weight, and the step at which training ends."""
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

# Parameters under this module path carry nn.scan's leading depth axis.
STACKED_SCOPES = (('encoder', 'blocks'),)


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The step at which training ends: `num_train_steps` if > 0, else `num_epochs` epochs."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * steps_per_epoch)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """Per-step linear warm-up from `optim.warmup_init_learning_rate` to `optim.learning_rate`
  over `optim.warmup_epochs`, then cosine decay to `optim.min_learning_rate` at `total_steps`."""
  o = config.optim
  warmup = min(int(round(o.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=o.warmup_init_learning_rate, peak_value=o.learning_rate,
      warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=o.min_learning_rate)


def halt_temperature_schedule(config: ml_collections.ConfigDict,
                              total_steps: int) -> optax.Schedule | None:
  """Soft halting-mask temperature per step, or None without `model.halt.soft_mask`.

  Decays linearly from `model.halt.soft_temperature` to 0 (the hard mask) over
  `config.halt_anneal_steps` steps (-1: the whole run; 0: no annealing, a constant).
  """
  halt = config.model.halt
  if not halt.soft_mask:
    return None
  steps = config.get('halt_anneal_steps', 0)
  if steps < 0:
    steps = total_steps
  if steps == 0:
    return optax.constant_schedule(halt.soft_temperature)
  return optax.linear_schedule(halt.soft_temperature, 0.0, steps)


def energy_weight_schedule(config: ml_collections.ConfigDict,
                           total_steps: int) -> optax.Schedule | None:
  """Weight of the energy loss per step while it warms up, or None where it does not.

  Rises linearly from 0 to `config.energy_loss_weight` over `config.energy_loss_warmup_steps`
  steps (-1: the whole run), then stays there. None for a warm-up of 0 steps or a weight of 0:
  the train step then uses the constant weight as a Python number (the loss is off at 0).
  """
  weight = config.get('energy_loss_weight', 0.0)
  if weight < 0:
    raise ValueError(f'energy_loss_weight must be >= 0, got {weight}')
  steps = config.get('energy_loss_warmup_steps', 0)
  if steps < -1:
    raise ValueError(f'energy_loss_warmup_steps must be >= -1 (-1: the whole run), got {steps}')
  if weight == 0 or steps == 0:
    return None
  return optax.linear_schedule(0.0, weight, total_steps if steps < 0 else steps)


def weight_decay_mask(params: Any) -> Any:
  """True for the weights that get weight decay: those with >= 2 dims per layer (kernels).

  Biases, BatchNorm scales and the halting scalars are exempt; the depth axis that nn.scan adds
  to encoder-block parameters does not count as a dimension.
  """
  def decays(path, leaf):
    keys = tuple(getattr(k, 'key', k) for k in path)
    stacked = any(keys[:len(scope)] == scope for scope in STACKED_SCOPES)
    return np.ndim(leaf) - int(stacked) >= 2
  return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with masked weight decay, optionally after global-norm gradient clipping."""
  o = config.optim
  tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                   mask=weight_decay_mask)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx
