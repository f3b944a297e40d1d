"""The train state and the pure training step (the evaluation step is in evaluation.py).

Both strategies of `parallel.py` jit or pmap `train_step` with its `StepContext` bound.
"""
import dataclasses
from typing import Any

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
  """Flax TrainState plus the BatchNorm running statistics."""
  batch_stats: Any

  @property
  def variables(self) -> dict[str, Any]:
    """{'params', 'batch_stats'}: what `model.apply` takes."""
    return {'params': self.params, 'batch_stats': self.batch_stats}


def create_train_state(model: network.STAS, rng: jax.Array,
                       tx: optax.GradientTransformation) -> TrainState:
  """Fresh, unreplicated state: initial parameters and statistics, zeroed optimiser state."""
  variables = network.init_variables(model, rng)
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables['batch_stats'])


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
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'], **halt_kwargs)
    loss, terms = losses.total_loss(logits, targets, aux, ctx.spec,
                                     energy_weight=energy_weight)
    return loss, (terms, logits, aux['active'], mutated['batch_stats'])

  grads, (terms, logits, active, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  aux = {'terms': terms, 'logits': logits, 'active': active, 'batch_stats': batch_stats}
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

  Returns:
    (new state, metrics): loss terms, accuracy, token ratio, grad norm, learning rate (and
    the soft halting-mask temperature when annealed).
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
  return new_state, metrics
