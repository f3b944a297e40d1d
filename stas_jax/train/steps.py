"""The train state and the pure training step (the evaluation step is in evaluation.py).

Both strategies of `parallel.py` jit or pmap `train_step` with its `StepContext` bound.
"""
import dataclasses
from typing import Any

from absl import logging
from flax import struct
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import optax

from stas_jax.data import augment
from stas_jax.train import losses
from stas_jax.model import network


class TrainState(train_state.TrainState):
  """Flax TrainState plus the BatchNorm running statistics and two optional training states.

  Attributes:
    batch_stats: the BatchNorm running statistics.
    halt_control: the token-ratio controller's state {'offset': () float32}
      (`model.halt.target_token_ratio`; `network.HALT_CONTROL`), {} without it. Updated by
      `train_step` (`control_offset`), never by the optimiser.
    ema: {'params', 'batch_stats'}, the exponential moving average of both
      (`config.ema_decay`, `ema_update`), {} without it.
  """
  batch_stats: Any
  halt_control: Any = struct.field(default_factory=dict)
  ema: Any = struct.field(default_factory=dict)

  @property
  def variables(self) -> dict[str, Any]:
    """{'params', 'batch_stats'} (and the controller's state if any): what `model.apply`
    takes."""
    variables = {'params': self.params, 'batch_stats': self.batch_stats}
    if self.halt_control:
      variables[network.HALT_CONTROL] = self.halt_control
    return variables

  def ema_view(self) -> 'TrainState':
    """This state with the EMA weights in place of params and batch_stats, for evaluation (the
    same tree structure, so compiled eval steps take it as they are)."""
    if not self.ema:
      raise ValueError('this state keeps no EMA weights (config.ema_decay = 0)')
    return self.replace(params=self.ema['params'], batch_stats=self.ema['batch_stats'])


def ema_decay(config: ml_collections.ConfigDict) -> float:
  """`config.ema_decay` (0 = no EMA), checked to lie in [0, 1)."""
  decay = config.get('ema_decay', 0.0)
  if not 0 <= decay < 1:
    raise ValueError(f'config.ema_decay={decay!r} must lie in [0, 1) (e.g. 0.999), or be 0 to '
                     'keep no weight EMA')
  return float(decay)


def create_train_state(model: network.STAS, rng: jax.Array, tx: optax.GradientTransformation,
                       *, ema: bool = False) -> TrainState:
  """Fresh, unreplicated state: initial parameters and statistics, zeroed optimiser state, a
  zero controller offset with `model.halt.target_token_ratio`, and with `ema` an EMA equal to
  the initial parameters and statistics."""
  variables = network.init_variables(model, rng)
  params, batch_stats = variables['params'], variables['batch_stats']
  return TrainState.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats,
      halt_control=dict(variables.get(network.HALT_CONTROL, {})),
      ema={'params': params, 'batch_stats': batch_stats} if ema else {})


def complete_restored(state: TrainState, missing: list[str] | tuple[str, ...]) -> TrainState:
  """A state restored from a checkpoint written without some fields (older code, or another
  config) with those fields started afresh: the controller offset at 0 (as the fresh target
  gives it) and the EMA at the restored weights.

  Args:
    state: as `checkpoint.Checkpointer.restore` returns it (missing fields from its target).
    missing: the names of the fields the checkpoint lacked (`checkpoint.MISSING_FIELDS_KEY`).
  """
  if 'ema' in missing and state.ema:
    logging.info('The checkpoint holds no weight EMA: it starts from the restored weights.')
    state = state.replace(ema={'params': state.params, 'batch_stats': state.batch_stats})
  return state


def control_offset(offset: jax.Array, token_ratio: jax.Array, target: float,
                   gain: float) -> jax.Array:
  """One dual-ascent step of the token-ratio controller: offset + gain * (ratio - target).

  The offset adds to the halting score's beta (`network.STAS.halting_params`): a ratio above
  the target raises it, so tokens halt earlier and the ratio falls.
  """
  return offset + gain * (token_ratio - target)


def eval_token_ratio(state: TrainState, images: jax.Array, soft_mask: bool) -> jax.Array:
  """The token ratio of `images` in eval mode (BatchNorm on its running statistics, the hard
  halting mask) with the state's weights and offset: what evaluation and inference will see,
  which the training forward's ratio (batch statistics) overstates. The soft-mask switch is
  `evaluation.forward`'s, restated here because evaluation imports this module."""
  hard = {'halt_temperature': 0.0} if soft_mask else {}
  _, aux = state.apply_fn(state.variables, lax.stop_gradient(images), train=False, **hard)
  return jnp.mean(aux['active'])


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """The EMA decay of the update after optimiser step `step` (counted from 0): the warm-up
  min(decay, (1 + step) / (10 + step)), which lets early averages forget the initial weights."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, new: Any, decay: jax.Array) -> Any:
  """decay * ema + (1 - decay) * new, leaf by leaf (two pytrees of one structure)."""
  return jax.tree.map(lambda e, x: decay * e + (1.0 - decay) * x, ema, new)


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What the steps need besides state and batch; bound with functools.partial before jit.

  Attributes:
    config: the experiment config.
    mean, std: (C,) normalisation constants of the dataset, in pixel units.
    num_classes: K.
    schedule: learning rate per step (None where nothing trains: evaluation, benchmarks).
    halt_temperature: soft halting-mask temperature per step
      (`optim.halt_temperature_schedule`); None: the hard mask.
    energy_weight: energy-loss weight per step during a warm-up
      (`optim.energy_weight_schedule`); None: the constant `config.energy_loss_weight`.
  """
  config: ml_collections.ConfigDict
  mean: Any
  std: Any
  num_classes: int
  schedule: optax.Schedule | None = None
  halt_temperature: optax.Schedule | None = None
  energy_weight: optax.Schedule | None = None

  @property
  def spec(self):
    return network.spec_from_config(self.config.model)


def gradients(state: TrainState, batch: dict[str, jax.Array], base_key: jax.Array,
              epoch: jax.Array, *, ctx: StepContext, axis_name: str | None = None):
  """The loss gradient of one (per-device) batch, before any averaging over devices.

  Arguments as `train_step`.

  Returns:
    (grads, aux): aux holds the loss 'terms', the 'logits', the token mask 'active', the
    updated 'batch_stats' and the traced 'halt_temperature' / 'energy_weight' where the
    schedules set them.
  """
  key = jax.random.fold_in(base_key, state.step)
  if axis_name is not None:
    key = jax.random.fold_in(key, lax.axis_index(axis_name))
  images, targets = augment.augment_batch(key, batch, ctx.config, epoch=epoch, mean=ctx.mean,
                                          std=ctx.std, num_classes=ctx.num_classes, train=True)
  halt_kwargs = {}
  if ctx.halt_temperature is not None:  # traced: annealing never recompiles
    halt_kwargs['halt_temperature'] = ctx.halt_temperature(state.step)

  energy_weight = ctx.config.get('energy_loss_weight', 0.0)
  if ctx.energy_weight is not None:  # traced: the warm-up never recompiles
    energy_weight = jnp.asarray(ctx.energy_weight(state.step), jnp.float32)
  elif energy_weight > 0 and ctx.config.get('energy_loss_warmup_steps', 0) != 0:
    raise ValueError('config.energy_loss_warmup_steps needs StepContext.energy_weight '
                     '(optim.energy_weight_schedule(config, total_steps))')

  def loss_fn(params):
    (logits, aux), mutated = state.apply_fn(
        {**state.variables, 'params': params}, images, train=True,
        mutable=['batch_stats'], **halt_kwargs)
    loss, terms = losses.total_loss(logits, targets, aux, ctx.spec,
                                     energy_weight=energy_weight)
    return loss, (terms, logits, aux['active'], mutated['batch_stats'])

  grads, (terms, logits, active, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  aux = {'terms': terms, 'logits': logits, 'active': active, 'batch_stats': batch_stats,
         'images': images}
  aux.update(halt_kwargs)
  if ctx.energy_weight is not None:
    aux['energy_weight'] = energy_weight
  return grads, aux


def train_step(state: TrainState, batch: dict[str, jax.Array], base_key: jax.Array,
               epoch: jax.Array, *, ctx: StepContext, axis_name: str | None = None):
  """One optimiser update on a (per-device) batch.

  Args:
    state: train state (one replica's, under pmap).
    batch: {'image': (B, H, W, C) pixels, 'label': (B,) int}.
    base_key: the run's augmentation key; this step uses fold_in(base_key, state.step) (and the
      device index under pmap), so the run is reproducible and resumable.
    epoch: completed epochs, traced (switches mixup off without recompiling).
    ctx: static context.
    axis_name: the pmap axis to average gradients and metrics over; None under jit, where
      the sharded arrays are global and XLA inserts the collectives.

  After the optimiser update, the token-ratio controller (if on) moves its offset by the
  batch's token ratio (`model.halt.ratio_source`: in eval mode by default, logged as
  'token_ratio_eval', or the training forward's; averaged over devices) and the EMA (if kept)
  takes in the new parameters and statistics with the decay `ema_decay_at(state.step)`.

  Returns:
    (new state, metrics): loss terms, accuracy, token ratio, grad norm, learning rate (and
    the soft halting-mask temperature when annealed, the controller's offset 'halt_offset' that
    this step ran with when controlled).
  """
  grads, aux = gradients(state, batch, base_key, epoch, ctx=ctx, axis_name=axis_name)
  if axis_name is not None:
    grads = lax.pmean(grads, axis_name)
  new_state = state.apply_gradients(grads=grads, batch_stats=aux['batch_stats'])
  metrics = dict(aux['terms'])
  metrics['accuracy'] = jnp.mean(jnp.argmax(aux['logits'], -1) == batch['label'])
  metrics['token_ratio'] = jnp.mean(aux['active'])
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['learning_rate'] = ctx.schedule(state.step)
  for key in ('halt_temperature', 'energy_weight'):
    if key in aux:
      metrics[key] = aux[key]
  if axis_name is not None:
    metrics = lax.pmean(metrics, axis_name)
  if state.halt_control:
    hp = ctx.spec.halt
    offset = state.halt_control['offset']
    ratio = metrics['token_ratio']
    if hp.ratio_source == 'eval':
      ratio = eval_token_ratio(state, aux['images'], hp.soft_mask)
      if axis_name is not None:
        ratio = lax.pmean(ratio, axis_name)
      metrics['token_ratio_eval'] = ratio
    new_state = new_state.replace(halt_control={'offset': control_offset(
        offset, lax.stop_gradient(ratio), hp.target_token_ratio, hp.ratio_gain)})
    metrics['halt_offset'] = offset
  if state.ema:
    decay = ema_decay_at(state.step, ema_decay(ctx.config))
    new_state = new_state.replace(ema=ema_update(
        state.ema, {'params': new_state.params, 'batch_stats': new_state.batch_stats}, decay))
  return new_state, metrics
