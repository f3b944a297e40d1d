"""Training and evaluation of STAS: pure train / eval steps, pmap or jit data parallelism,
resumable checkpoints, logs (absl, TensorBoard, metrics.jsonl) and the closing summary.
"""
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from stas_jax import augment
from stas_jax import checkpoint
from stas_jax import energy
from stas_jax import input_pipeline
from stas_jax import losses
from stas_jax import model as model_lib

AXIS = 'batch'  # the one collective axis name (pmap) and mesh axis (jit)
PARALLEL_MODES = ('pmap', 'jit')
# Parameters under this module path carry nn.scan's leading depth axis.
STACKED_SCOPES = (('encoder', 'blocks'),)


class TrainState(train_state.TrainState):
  """Flax TrainState plus the BatchNorm running statistics."""
  batch_stats: Any


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; the message names the first such step."""


class TrainingInterrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of `step` was saved before stopping."""

  def __init__(self, signum: int, step: int, workdir: str):
    self.signum, self.step = signum, step
    super().__init__(f'{signal.Signals(signum).name} received: saved a checkpoint of step {step} '
                     f'in {workdir}; run the same command again to resume.')


# --------------------------------------------------------------------------- optimisation


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


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The step at which training ends: `num_train_steps` if > 0, else `num_epochs` epochs."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * steps_per_epoch)


def halt_temperature_schedule(config: ml_collections.ConfigDict,
                              total_steps: int) -> Optional[optax.Schedule]:
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


def create_train_state(model: model_lib.STAS, rng: jax.Array,
                       tx: optax.GradientTransformation) -> TrainState:
  """Fresh, unreplicated state: initial parameters and statistics, zeroed optimiser state."""
  variables = model_lib.init_variables(model, rng)
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables['batch_stats'])


def restore_for_eval(config: ml_collections.ConfigDict, workdir: str
                     ) -> Tuple[model_lib.STAS, Dict[str, Any], int]:
  """The newest readable checkpoint of a run, for inference.

  Returns:
    (model, {'params', 'batch_stats'}, step).

  Raises:
    FileNotFoundError: `workdir/checkpoints` holds no checkpoint.
    checkpoint.CheckpointError: checkpoints exist but none can be restored.
  """
  model = model_lib.create_model(config.model)
  # The optimiser state only has to match in structure, so any schedule will do.
  tx = create_optimizer(config, optax.constant_schedule(0.0))
  target = jax.eval_shape(lambda: create_train_state(model, jax.random.key(0), tx))
  directory = os.path.join(workdir, 'checkpoints')
  with checkpoint.Checkpointer(directory, async_save=False) as ckpt:
    restored = ckpt.restore_latest(target)
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {directory}')
  state, _, step = restored
  return model, {'params': state.params, 'batch_stats': state.batch_stats}, step


# --------------------------------------------------------------------------- steps


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What the steps need besides state and batch; bound with functools.partial before jit."""
  config: ml_collections.ConfigDict
  mean: Any
  std: Any
  num_classes: int
  schedule: optax.Schedule
  # Soft halting-mask temperature per step (`halt_temperature_schedule`); None: hard mask.
  halt_temperature: Optional[optax.Schedule] = None

  @property
  def spec(self):
    return model_lib.spec_from_config(self.config.model)


def train_step(state: TrainState, batch: Dict[str, jax.Array], base_key: jax.Array,
               epoch: jax.Array, *, ctx: StepContext, axis_name: Optional[str] = None):
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
  config = ctx.config
  key = jax.random.fold_in(base_key, state.step)
  if axis_name is not None:
    key = jax.random.fold_in(key, lax.axis_index(axis_name))
  images, targets = augment.augment_batch(key, batch, config, epoch=epoch, mean=ctx.mean,
                                          std=ctx.std, num_classes=ctx.num_classes, train=True)
  if config.debug.nan_at_step > 0:  # test hook: poison the inputs of one (1-based) step
    images = jnp.where(state.step + 1 == config.debug.nan_at_step, jnp.nan, images)

  halt_kwargs = {}
  if ctx.halt_temperature is not None:  # traced: annealing never recompiles
    halt_kwargs['halt_temperature'] = ctx.halt_temperature(state.step)

  def loss_fn(params):
    (logits, aux), mutated = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'], **halt_kwargs)
    loss, terms = losses.total_loss(logits, targets, aux, ctx.spec)
    return loss, (terms, logits, aux['active'], mutated['batch_stats'])

  grads, (terms, logits, active, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads = lax.pmean(grads, axis_name)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = dict(terms)
  metrics['accuracy'] = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  metrics['token_ratio'] = jnp.mean(active)
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['learning_rate'] = ctx.schedule(state.step)
  if halt_kwargs:
    metrics['halt_temperature'] = halt_kwargs['halt_temperature']
  if axis_name is not None:
    metrics = lax.pmean(metrics, axis_name)
  return new_state, metrics


def eval_step(state: TrainState, batch: Dict[str, jax.Array], *,
              ctx: StepContext) -> Dict[str, jax.Array]:
  """Masked sums over one eval batch (`masked_eval_sums`); no collectives: the caller adds
  devices and batches."""
  images, targets = augment.augment_batch(None, batch, ctx.config, epoch=0, mean=ctx.mean,
                                          std=ctx.std, num_classes=ctx.num_classes, train=False)
  # Evaluation always uses the hard halting mask (temperature 0), also after soft training.
  hard = {'halt_temperature': 0.0} if ctx.config.model.halt.soft_mask else {}
  logits, aux = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                               images, train=False, **hard)
  return masked_eval_sums(logits, targets, batch['label'], batch['mask'], aux, ctx.spec)


def masked_eval_sums(logits: jax.Array, targets: jax.Array, labels: jax.Array,
                     mask: jax.Array, aux: Dict[str, Any], spec,
                     rates_prefix: str = 'firing_rate/') -> Dict[str, jax.Array]:
  """Sums over the real (mask 1) examples of a batch, so that batches and devices add up.

  Returns:
    {'count', 'top1', 'top5', 'loss', 'energy_mj', 'token_ratio', 'timesteps',
    'energy_split_mj/<group>'}: sums over real examples; '<rates_prefix><layer>': the batch's
    pooled firing rate (padding excluded) times count, a count-weighted average over batches.
  """
  mask = mask.astype(jnp.float32)
  _, top = lax.top_k(logits, min(5, logits.shape[-1]))
  e = energy.estimate(aux, spec, weights=mask)
  per_image = {
      'top1': (top[:, 0] == labels).astype(jnp.float32),
      'top5': jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32),
      'loss': optax.softmax_cross_entropy(logits, targets),
      'energy_mj': e['energy_mj'],
      'token_ratio': e['token_ratio'],
      'timesteps': e['timesteps'],
  }
  per_image.update({f'energy_split_mj/{k}': v for k, v in e['energy_split_mj'].items()})
  per_image.update({f'sops/{k}': v for k, v in e['sops'].items()})
  count = jnp.sum(mask)
  sums = {k: jnp.sum(v * mask) for k, v in per_image.items()}
  sums.update({f'{rates_prefix}{k}': v * count for k, v in e['firing_rates'].items()})
  sums['count'] = count
  return sums


# --------------------------------------------------------------------------- parallelism


def _local_value(x: Any) -> np.ndarray:
  """The value of a replicated leaf on this process: numpy, a local or a global jax.Array."""
  return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)


def _replicated_array(x: Any, sharding: jax.sharding.NamedSharding) -> jax.Array:
  """x copied to every device of `sharding` (replicated), built from this process's copy:
  unlike jax.device_put, no cross-process check that every process passed the same value."""
  value = _local_value(x)
  local = [d for d in sharding.mesh.devices.flat if d.process_index == jax.process_index()]
  return jax.make_array_from_single_device_arrays(
      value.shape, sharding, [jax.device_put(value, d) for d in local])


def _check_divisible(config: ml_collections.ConfigDict, devices: int):
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % devices:
      raise ValueError(f'config.{key}={config[key]} must divide evenly over the {devices} '
                       f'devices (set --config.{key} to a multiple of {devices}).')


class PmapStrategy:
  """jax.pmap over the devices of every process: replicated state, each process's batch split
  over its own devices (local devices, per_device).

  Gradients and train metrics are pmean'd over AXIS. BatchNorm statistics are per device
  (as in the PyTorch reference) unless model.bn_cross_replica; per-device running statistics
  are averaged (`sync_batch_stats`) before every evaluation and checkpoint. Because the
  running-average update is linear, these averages do not depend on when earlier syncs happened.
  The halting distribution prior (a non-linear function of the batch's halting distribution) is
  computed per device, as A-ViT does per GPU; under jit it sees the global batch.

  With several processes, the pmapped functions take and return arrays of this process's
  devices, and their collectives span all processes; `get_state` gives global arrays, which
  orbax saves and restores across processes.
  """

  def __init__(self, ctx: StepContext, devices: Optional[List[Any]] = None):
    # pmap needs the same list of every process's devices on each process.
    self.global_devices = list(devices or jax.devices())
    self.devices = [d for d in self.global_devices if d.process_index == jax.process_index()]
    self.num, self.num_global = len(self.devices), len(self.global_devices)
    self.replicated = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(self.global_devices), (AXIS,)), jax.sharding.PartitionSpec())
    self.cross_replica = bool(ctx.config.model.bn_cross_replica)
    self._train = jax.pmap(functools.partial(train_step, ctx=ctx, axis_name=AXIS),
                           axis_name=AXIS, in_axes=(0, 0, None, None), donate_argnums=(0,),
                           devices=self.global_devices)
    # Devices are added inside the pmap: reducing its sharded output afterwards would run one
    # more multi-device program per metric, and on CPU such programs, queued behind the pmap,
    # can deadlock in XLA's collective rendezvous.
    self._eval = jax.pmap(lambda state, batch: lax.psum(eval_step(state, batch, ctx=ctx), AXIS),
                          axis_name=AXIS, devices=self.global_devices)
    self._pmean = jax.pmap(lambda t: lax.pmean(t, AXIS), axis_name=AXIS,
                           devices=self.global_devices)

  def put_state(self, state: TrainState) -> TrainState:
    """One copy per local device, laid out exactly as the pmapped step returns the state: any
    other layout (flax's replicate uses another mesh axis name) makes the step compile twice.
    Takes what `get_state` or `create_train_state` returns."""
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(self.devices), (AXIS,)),
                                          jax.sharding.PartitionSpec(AXIS))
    return jax.tree.map(lambda x: jax.device_put(np.stack([_local_value(x)] * self.num),
                                                 sharding), state)

  def get_state(self, state: TrainState) -> TrainState:
    """The unreplicated state, one copy on each of the pmap's devices (a global array when
    there are several processes), for checkpoints and inspection. Nothing crosses devices: each
    keeps its own replica, which `sync_batch_stats` makes equal to the others."""
    # Not flax's unreplicate: for a one-device pmap it returns the (1, ...) array as is.
    def unreplicate(x):
      return jax.make_array_from_single_device_arrays(
          x.shape[1:], self.replicated, [s.data[0] for s in x.addressable_shards])
    return jax.tree.map(unreplicate, state)

  def put_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    def split(x):
      if x.shape[0] % self.num:
        raise ValueError(f'a batch of {x.shape[0]} does not split over {self.num} devices')
      return x.reshape((self.num, x.shape[0] // self.num) + x.shape[1:])
    return jax.tree.map(split, batch)

  def train_step(self, state, batch, base_key, epoch):
    return self._train(state, self.put_batch(batch), base_key, epoch)

  def eval_sums(self, state, batch):
    return jax.tree.map(lambda x: x.addressable_shards[0].data[0],
                        self._eval(state, self.put_batch(batch)))

  def host_metrics(self, metrics) -> Dict[str, float]:
    return {k: float(v[0]) for k, v in jax.device_get(metrics).items()}

  def sync_batch_stats(self, state: TrainState) -> TrainState:
    if self.cross_replica:
      return state  # already identical on every device
    return state.replace(batch_stats=self._pmean(state.batch_stats))


class JitStrategy:
  """jax.jit over a 1-D mesh ('batch'): batch sharded, state replicated; XLA adds collectives.

  BatchNorm statistics are those of the global batch (as with bn_cross_replica under pmap).
  """

  def __init__(self, ctx: StepContext, devices: Optional[List[Any]] = None):
    devices = list(devices or jax.devices())
    self.num = self.num_global = len(devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
    r, s = self.replicated, self.sharded
    self._train = jax.jit(functools.partial(train_step, ctx=ctx, axis_name=None),
                          in_shardings=(r, s, r, r), out_shardings=(r, r), donate_argnums=(0,))
    self._eval = jax.jit(functools.partial(eval_step, ctx=ctx), in_shardings=(r, s),
                         out_shardings=r)

  def put_state(self, state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: _replicated_array(x, self.replicated), state)

  def get_state(self, state: TrainState) -> TrainState:
    return state

  def put_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
    # Each process holds its own shard of the global batch.
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.sharded, np.asarray(x)), batch)

  def train_step(self, state, batch, base_key, epoch):
    return self._train(state, self.put_batch(batch), base_key, epoch)

  def eval_sums(self, state, batch):
    # This process's copy of the replicated sums: adding them up runs no multi-process program.
    return jax.tree.map(lambda x: x.addressable_data(0), self._eval(state, self.put_batch(batch)))

  def host_metrics(self, metrics) -> Dict[str, float]:
    local = jax.device_get({k: v.addressable_data(0) for k, v in metrics.items()})
    return {k: float(v) for k, v in local.items()}

  def sync_batch_stats(self, state: TrainState) -> TrainState:
    return state


def create_strategy(ctx: StepContext, devices: Optional[List[Any]] = None):
  """The `config.parallel` strategy; checks that the batch sizes split over the devices."""
  mode = ctx.config.parallel
  if mode not in PARALLEL_MODES:
    raise ValueError(f'config.parallel={mode!r}; choose one of {PARALLEL_MODES}')
  strategy = (PmapStrategy if mode == 'pmap' else JitStrategy)(ctx, devices)
  _check_divisible(ctx.config, strategy.num_global)
  return strategy


def bn_axis_name(config: ml_collections.ConfigDict) -> Optional[str]:
  """The BatchNorm collective axis: AXIS under pmap with model.bn_cross_replica, else None."""
  return AXIS if config.parallel == 'pmap' and config.model.bn_cross_replica else None


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
  """How this process joins a multi-process run (train.py's flags); None: JAX finds out.

  Attributes:
    coordinator_address: host:port of process 0, which runs JAX's coordination service
      (also read from $JAX_COORDINATOR_ADDRESS).
    num_processes: how many processes take part.
    process_id: this process's index, 0 .. num_processes - 1.
    heartbeat_timeout_s: a process silent for this long counts as dead; the others then exit
      with an error instead of waiting for it.
    shutdown_timeout_s: how long a finishing process waits for the others at exit.
    initialization_timeout_s: how long to wait for every process to connect.
  """
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  heartbeat_timeout_s: int = 100
  shutdown_timeout_s: int = 300
  initialization_timeout_s: int = 300

  @property
  def requested(self) -> bool:
    return (any(v is not None for v in (self.coordinator_address, self.num_processes,
                                        self.process_id))
            or bool(os.environ.get('JAX_COORDINATOR_ADDRESS')))


def maybe_initialize_distributed(config: ml_collections.ConfigDict,
                                 options: DistributedOptions = DistributedOptions()) -> bool:
  """jax.distributed.initialize() for multi-process runs; call before any other JAX use.

  Runs when `options` name any part of the run (or $JAX_COORDINATOR_ADDRESS is set), or with
  config.distributed, where JAX detects the rest on the clusters it knows (SLURM, Open MPI,
  Cloud TPU, ...). Collectives go over NCCL on GPUs, ICI on TPUs and gloo on CPUs.

  Returns:
    Whether it initialised the distributed runtime.
  """
  if not (config.get('distributed', False) or options.requested):
    return False
  try:
    jax.distributed.initialize(
        coordinator_address=options.coordinator_address, num_processes=options.num_processes,
        process_id=options.process_id, initialization_timeout=options.initialization_timeout_s,
        heartbeat_timeout_seconds=options.heartbeat_timeout_s,
        shutdown_timeout_seconds=options.shutdown_timeout_s)
  except ValueError as e:  # some of the three missing, and no cluster to detect them from
    raise ValueError(
        f'{e} Start every process with --coordinator_address=HOST:PORT (of process 0), '
        '--num_processes=N and its own --process_id=I, or, under SLURM, Open MPI or on a '
        'Cloud TPU pod, with --config.distributed=True (README, "Multi-process training").'
    ) from e
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices. If a process '
               'dies, the others stop within %d s (JAX: "Terminating process because the JAX '
               'distributed service detected fatal errors"); then rerun every process to '
               'resume from the last checkpoint.', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), options.heartbeat_timeout_s)
  return True


# --------------------------------------------------------------------------- evaluation


def evaluate(strategy, state: TrainState, data: input_pipeline.DataBundle,
             max_batches: int = -1) -> Dict[str, float]:
  """Runs the eval split once (each example counted once via the mask).

  Returns:
    {'top1', 'top5', 'loss', 'energy_mj', 'token_ratio', 'timesteps', 'energy_split_mj/...',
    'firing_rate/...', 'count'}: means over the evaluated examples.
  """
  totals = None
  for i, batch in enumerate(data.make_eval_iter()):
    if 0 <= max_batches <= i:
      break
    sums = strategy.eval_sums(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = max(totals.pop('count'), 1.0)
  out = {k: v / count for k, v in totals.items()}
  out['count'] = count
  return out


# --------------------------------------------------------------------------- logging


class _History:
  """metrics.jsonl (one JSON object per logged step and per evaluation) and TensorBoard."""

  def __init__(self, workdir: str, enabled: bool, resume_lines: Optional[int], start_step: int):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.lines = 0
    self.writer = None
    if not enabled:
      return
    existing = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        existing = f.read().splitlines()
    # A resumed run drops what the interrupted run logged after its checkpoint.
    keep = existing[:resume_lines] if resume_lines is not None else []
    with open(self.path, 'w') as f:
      f.writelines(line + '\n' for line in keep)
    self.lines = len(keep)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.writer = SummaryWriter(os.path.join(workdir, 'tb'),
                                purge_step=start_step + 1 if start_step else None)

  def write(self, record: Dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    self.lines += 1
    step = record['step']
    for key, value in record.items():
      if key not in ('step', 'kind') and isinstance(value, (int, float)):
        self.writer.add_scalar(key, value, step)
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def format_summary(metrics: Dict[str, Any], timesteps: int) -> str:
  """The end-of-run table: accuracy, token ratio, energy per image, timesteps per token."""
  rows = [('top-1 accuracy', f"{100 * metrics['eval/top1']:.2f} %"),
          ('top-5 accuracy', f"{100 * metrics['eval/top5']:.2f} %"),
          ('token ratio', f"{metrics['eval/token_ratio']:.4f}"),
          ('energy', f"{metrics['eval/energy_mj']:.5f} mJ / image"),
          ('timesteps per token', f"{metrics['eval/timesteps']:.3f} of {timesteps}"),
          ('test images', f"{int(metrics['eval/count'])}"),
          ('steps', f"{metrics['step']} ({metrics['epoch']:.2f} epochs)"),
          ('wall time', _format_duration(metrics['wall_time_s']))]
  width = max(len(name) for name, _ in rows)
  lines = ['=' * 44, 'STAS run summary', '-' * 44]
  lines += [f'{name:<{width}}  {value}' for name, value in rows]
  lines.append('=' * 44)
  return '\n'.join(lines)


# --------------------------------------------------------------------------- signals


class _StopFlag:
  """Records SIGTERM / SIGINT instead of dying mid-step; a second SIGINT interrupts at once.

  With several processes, a signal reaches each at a different step, and one process saving
  while the others train would deadlock their collectives. There, SIGTERM is left to JAX's
  preemption notifier, which makes every process stop after the same step
  (`multihost_utils.reached_preemption_sync_point`), and SIGINT keeps its default: the process
  stops, and the others exit with the distributed runtime's error.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}
    self._multiprocess = jax.process_count() > 1

  def stop_after(self, step: int) -> bool:
    """Whether to save and stop after `step`; every process must call it after every step."""
    if self._multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        logging.warning('SIGTERM received by a process: saving a checkpoint after step %d.', step)
        self.signum = signal.SIGTERM
    return self.signum is not None

  def _handle(self, signum, frame):
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning('%s received: saving a checkpoint after the current step.',
                    signal.Signals(signum).name)
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and not self._multiprocess:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc_info):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# --------------------------------------------------------------------------- the loop


def _config_json(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def _gather_iterator_states(state: str) -> List[str]:
  """Every process's train-iterator state (all processes must call this together)."""
  if jax.process_count() == 1:
    return [state]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(state.encode(), np.uint8)
  longest = int(np.max(multihost_utils.process_allgather(np.int32(raw.size))))
  padded = np.zeros((longest,), np.uint8)
  padded[:raw.size] = raw
  gathered = multihost_utils.process_allgather(padded)
  return [bytes(row).rstrip(b'\0').decode() for row in np.asarray(gathered)]


def _check_data(config: ml_collections.ConfigDict, data: input_pipeline.DataBundle):
  m = config.model
  if data.num_classes != m.num_classes:
    raise ValueError(f'{config.data.dataset} has {data.num_classes} classes but '
                     f'config.model.num_classes={m.num_classes}.')
  want = (m.image_size, m.image_size, m.in_channels)
  if tuple(data.image_shape) != want:
    raise ValueError(f'{config.data.dataset} gives images of shape {tuple(data.image_shape)} '
                     f'but the model expects {want} (config.model.image_size / in_channels).')


def _mean_metrics(records: List[Dict[str, float]]) -> Dict[str, float]:
  return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains (resuming from `workdir/checkpoints` if present), evaluates, and summarises.

  Args:
    config: experiment config (see configs/default.py).
    workdir: where checkpoints, metrics.jsonl, tb/ and config.json go.

  Returns:
    The final metrics: 'eval/...' of the last evaluation, 'train/...' of the last logged
    window, 'step', 'epoch', 'start_step' (the restored step, 0 for a fresh run), 'wall_time_s'.

  Raises:
    input_pipeline.DatasetUnavailableError: the dataset is missing and cannot be prepared.
    NonFiniteLossError: the loss became NaN / inf (no checkpoint is written after that).
    TrainingInterrupted: SIGTERM / SIGINT; a checkpoint was saved first.
  """
  wall_start = time.monotonic()
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  data = input_pipeline.create_datasets(config, process_index=jax.process_index(),
                                        process_count=jax.process_count())
  _check_data(config, data)
  steps_per_epoch = data.steps_per_epoch
  if steps_per_epoch < 1:
    raise ValueError(f'config.batch_size={config.batch_size} exceeds the '
                     f'{data.num_train_examples} training examples.')
  total_steps = total_train_steps(config, steps_per_epoch)
  schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
  ctx = StepContext(config=config, mean=data.mean, std=data.std,
                    num_classes=data.num_classes, schedule=schedule,
                    halt_temperature=halt_temperature_schedule(config, total_steps))
  strategy = create_strategy(ctx)
  model = model_lib.create_model(config.model, bn_axis_name=bn_axis_name(config))
  init_key, aug_key = jax.random.split(jax.random.key(config.seed))
  state = strategy.put_state(create_train_state(model, init_key, create_optimizer(config,
                                                                                  schedule)))
  if primary:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(_config_json(config), f, indent=2)
  logging.info('%d parameters; %d steps (%d per epoch), global batch %d on %d devices (%s).',
               sum(x.size for x in jax.tree.leaves(strategy.get_state(state).params)),
               total_steps, steps_per_epoch, config.batch_size, jax.device_count(),
               config.parallel)

  # On CPU, saves gain little from running in the background, and there the background copies
  # can starve XLA's in-process collectives of threads (a rendezvous abort with virtual devices).
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 max_to_keep=config.keep_checkpoints,
                                 async_save=jax.default_backend() != 'cpu')
  try:
    restored = ckpt.restore_latest(strategy.get_state(state))
    step, pending, resume_lines = 0, [], None
    if restored is not None:
      host_state, meta, step = restored
      state = strategy.put_state(host_state)
      iterator_states = meta['data_iterator_states']
      if len(iterator_states) != jax.process_count():
        raise checkpoint.CheckpointError(
            f'The checkpoint of step {step} in {ckpt.directory} was written by '
            f'{len(iterator_states)} process(es), each with its own data-iterator position; '
            f'resume it with {len(iterator_states)} (--num_processes), not '
            f'{jax.process_count()}, or point --workdir elsewhere to start afresh.')
      input_pipeline.set_iterator_state(data.train_iter, iterator_states[jax.process_index()])
      pending, resume_lines = meta['pending_train_metrics'], meta['metrics_lines']
      if meta['config'] != _config_json(config):
        logging.warning('Resuming with a config that differs from the checkpoint\'s.')
      logging.info('Resumed from step %d (epoch %.2f).', step, step / steps_per_epoch)
    history = _History(workdir, primary, resume_lines, step)
    try:
      with _StopFlag() as stop:
        return _train_loop(config, workdir, data, strategy, state, ckpt, history, stop, step,
                           total_steps, pending, aug_key, wall_start)
    finally:
      history.close()
  finally:
    ckpt.close()


def _train_loop(config, workdir, data, strategy, state, ckpt, history, stop, step,
                total_steps, pending, aug_key, wall_start):
  """The loop proper; see train_and_evaluate."""
  steps_per_epoch = data.steps_per_epoch
  start_step = step
  device_metrics = []  # (step, metrics on device) not yet checked and averaged
  train_summary, eval_metrics = {}, {}
  last_saved = step if step else None
  window_start, window_steps = time.monotonic(), 0

  def drain():
    """Fetches the queued step metrics and stops at the first non-finite loss."""
    for s, m in device_metrics:
      host = strategy.host_metrics(m)
      if not all(math.isfinite(v) for v in host.values()):
        bad = sorted(k for k, v in host.items() if not math.isfinite(v))
        raise NonFiniteLossError(
            f'Non-finite training metrics {bad} (loss={host["loss"]}) at step {s} '
            f'(epoch {s / steps_per_epoch:.2f}); stopping. Checkpoints after the last good one '
            f'were not written (latest: {ckpt.latest_step()}); lower optim.learning_rate or '
            'set optim.grad_clip_norm, then rerun to resume from it.')
      pending.append(host)
    device_metrics.clear()

  def save():
    nonlocal state, last_saved
    drain()
    state = strategy.sync_batch_stats(state)
    meta = {'config': _config_json(config), 'step': step, 'epoch': step / steps_per_epoch,
            'data_iterator_states': _gather_iterator_states(
                input_pipeline.get_iterator_state(data.train_iter)),
            'pending_train_metrics': pending, 'metrics_lines': history.lines}
    ckpt.save(step, strategy.get_state(state), meta, force=True)
    last_saved = step

  if step >= total_steps:
    logging.info('Step %d >= %d: training is complete; evaluating only.', step, total_steps)
  while step < total_steps:
    batch = next(data.train_iter)
    epoch = np.float32(step // steps_per_epoch)
    state, metrics = strategy.train_step(state, batch, aug_key, epoch)
    step += 1
    window_steps += 1
    device_metrics.append((step, metrics))

    if step % config.log_every_steps == 0 or step == total_steps:
      drain()
      train_summary = {f'train/{k}': v for k, v in _mean_metrics(pending).items()}
      pending.clear()
      history.write({'step': step, 'epoch': step / steps_per_epoch, 'kind': 'train',
                     **train_summary})
      elapsed = time.monotonic() - window_start
      step_time = elapsed / max(window_steps, 1)
      t = train_summary
      logging.info(
          'step %d/%d (epoch %.2f): loss %.4f (ce %.4f ponder %.3f dist %.3f) acc %.3f '
          'tokens %.3f lr %.2e | %.1f img/s, ETA %s', step, total_steps, step / steps_per_epoch,
          t['train/loss'], t['train/ce'], t['train/ponder'], t['train/distribution'],
          t['train/accuracy'], t['train/token_ratio'], t['train/learning_rate'],
          config.batch_size / max(step_time, 1e-9),
          _format_duration(step_time * (total_steps - step)))
      window_start, window_steps = time.monotonic(), 0

    epoch_end = step % steps_per_epoch == 0
    if (epoch_end and (step // steps_per_epoch) % config.eval_every_epochs == 0
        or step == total_steps):
      drain()
      state = strategy.sync_batch_stats(state)
      eval_start = time.monotonic()
      eval_metrics = {f'eval/{k}': v for k, v in
                      evaluate(strategy, state, data, config.steps_per_eval).items()}
      history.write({'step': step, 'epoch': step / steps_per_epoch, 'kind': 'eval',
                     **eval_metrics})
      logging.info('eval at step %d (epoch %.2f): top-1 %.4f top-5 %.4f loss %.4f tokens %.3f '
                   'energy %.5f mJ timesteps %.2f (%d images, %.1fs)', step,
                   step / steps_per_epoch, eval_metrics['eval/top1'], eval_metrics['eval/top5'],
                   eval_metrics['eval/loss'], eval_metrics['eval/token_ratio'],
                   eval_metrics['eval/energy_mj'], eval_metrics['eval/timesteps'],
                   eval_metrics['eval/count'], time.monotonic() - eval_start)
      window_start = time.monotonic()  # keep eval time out of the throughput

    if step % config.checkpoint_every_steps == 0 or step == total_steps:
      save()
    if stop.stop_after(step):
      if last_saved != step:
        save()
      ckpt.wait_until_finished()
      raise TrainingInterrupted(stop.signum, step, workdir)

  if not eval_metrics:  # nothing trained in this session
    state = strategy.sync_batch_stats(state)
    eval_metrics = {f'eval/{k}': v for k, v in
                    evaluate(strategy, state, data, config.steps_per_eval).items()}
  final = {**train_summary, **eval_metrics, 'step': step, 'epoch': step / steps_per_epoch,
           'start_step': start_step, 'wall_time_s': time.monotonic() - wall_start}
  logging.info('\n%s', format_summary(final, config.model.timesteps))
  return final
