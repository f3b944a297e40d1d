"""Data-parallel layouts of the train and eval steps: `jax.pmap` (the default) or `jax.jit` over
a 1-D mesh. The two differ only in how they place the state and the batch and in where the
gradient / metric reduction happens; the steps, the eval sums and the loop are shared.

With `replicas=R`, both train R runs of one model side by side: the state and each train
batch carry a leading replica axis, and the steps are `jax.vmap`-ped over it (inside the
pmap, or inside the jit), so every run keeps its own parameters, optimiser state, BatchNorm
statistics and augmentation key, while the test batches are shared.
"""
import functools
from typing import Any

import jax
from jax import lax
import ml_collections
import numpy as np

from stas_jax.train import evaluation
from stas_jax.train import steps

AXIS = 'batch'  # the one collective axis name (pmap) and mesh axis (jit)
PARALLEL_MODES = ('pmap', 'jit')


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


def _train_fn(ctx: steps.StepContext, axis_name: str | None, replicas: int | None):
  """The train step, vmapped over the replica axis of state, batch and key if `replicas`."""
  fn = functools.partial(steps.train_step, ctx=ctx, axis_name=axis_name)
  return jax.vmap(fn, in_axes=(0, 0, 0, None)) if replicas else fn


def _eval_fn(ctx: steps.StepContext, replicas: int | None):
  """The eval sums of one batch, vmapped over the replica axis of the state if `replicas`."""
  fn = functools.partial(evaluation.eval_step, ctx=ctx)
  return jax.vmap(fn, in_axes=(0, None)) if replicas else fn


def _check_divisible(config: ml_collections.ConfigDict, devices: int):
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] % devices:
      raise ValueError(f'config.{key}={config[key]} must divide evenly over the {devices} '
                       f'devices (set --config.{key} to a multiple of {devices}).')


class _Strategy:
  """What both layouts share. A subclass sets `_train` and `_eval` (the compiled steps) and
  defines put_state / get_state / put_batch / sync_batch_stats and `_local` (this process's
  copy of a reduced, replicated output)."""
  num: int          # devices of this process
  num_global: int   # devices of every process

  replicas: int | None  # runs side by side (leading axis of state and train batch), or None

  def train_step(self, state: steps.TrainState, batch: dict[str, np.ndarray],
                 base_key: jax.Array, epoch: np.ndarray):
    """One update: (new state, metrics averaged over devices, still on device). With
    replicas, `batch` and `base_key` carry the leading replica axis, and so do the metrics."""
    return self._train(state, self.put_batch(batch, self.replicas is not None), base_key, epoch)

  def eval_sums(self, state: steps.TrainState, batch: dict[str, np.ndarray]):
    """`evaluation.masked_sums` of one global batch (the same for every replica), added over
    devices, on one device; with replicas each sum has a leading replica axis."""
    return jax.tree.map(self._local, self._eval(state, self.put_batch(batch, False)))

  def host_metrics(self, metrics) -> dict[str, np.ndarray]:
    """Train-step metrics as numpy values: scalars, or (R,) with replicas."""
    return {k: np.asarray(v) for k, v in jax.device_get(jax.tree.map(self._local,
                                                                      metrics)).items()}


class PmapStrategy(_Strategy):
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

  def __init__(self, ctx: steps.StepContext, devices: list[Any] | None = None,
               replicas: int | None = None):
    # pmap needs the same list of every process's devices on each process.
    self.replicas = replicas
    self.global_devices = list(devices or jax.devices())
    self.devices = [d for d in self.global_devices if d.process_index == jax.process_index()]
    self.num, self.num_global = len(self.devices), len(self.global_devices)
    self.replicated = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(self.global_devices), (AXIS,)), jax.sharding.PartitionSpec())
    self.cross_replica = bool(ctx.config.model.bn_cross_replica)
    self._train = jax.pmap(_train_fn(ctx, AXIS, replicas), axis_name=AXIS,
                           in_axes=(0, 0, None, None), donate_argnums=(0,),
                           devices=self.global_devices)
    # Devices are added inside the pmap: reducing its sharded output afterwards would run one
    # more multi-device program per metric, and on CPU such programs, queued behind the pmap,
    # can deadlock in XLA's collective rendezvous.
    eval_fn = _eval_fn(ctx, replicas)
    self._eval = jax.pmap(lambda state, batch: lax.psum(eval_fn(state, batch), AXIS),
                          axis_name=AXIS, devices=self.global_devices)
    self._pmean = jax.pmap(lambda t: lax.pmean(t, AXIS), axis_name=AXIS,
                           devices=self.global_devices)

  @staticmethod
  def _local(x):
    return x.addressable_shards[0].data[0]

  def put_state(self, state: steps.TrainState) -> steps.TrainState:
    """One copy per local device, laid out exactly as the pmapped step returns the state: any
    other layout (flax's replicate uses another mesh axis name) makes the step compile twice.
    Takes what `get_state` or `create_train_state` returns."""
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(self.devices), (AXIS,)),
                                          jax.sharding.PartitionSpec(AXIS))
    return jax.tree.map(lambda x: jax.device_put(np.stack([_local_value(x)] * self.num),
                                                 sharding), state)

  def get_state(self, state: steps.TrainState) -> steps.TrainState:
    """The unreplicated state, one copy on each of the pmap's devices (a global array when
    there are several processes), for checkpoints and inspection. Nothing crosses devices: each
    keeps its own replica, which `sync_batch_stats` makes equal to the others."""
    # Not flax's unreplicate: for a one-device pmap it returns the (1, ...) array as is.
    def unreplicate(x):
      return jax.make_array_from_single_device_arrays(
          x.shape[1:], self.replicated, [s.data[0] for s in x.addressable_shards])
    return jax.tree.map(unreplicate, state)

  def put_batch(self, batch: dict[str, np.ndarray],
                stacked: bool = False) -> dict[str, np.ndarray]:
    """Splits the batch axis (axis 1 of a `stacked` (R, B, ...) batch) over the local devices,
    which become the leading axis."""
    def split(x):
      axis = int(stacked)
      if x.shape[axis] % self.num:
        raise ValueError(f'a batch of {x.shape[axis]} does not split over {self.num} devices')
      parts = x.reshape(x.shape[:axis] + (self.num, x.shape[axis] // self.num)
                        + x.shape[axis + 1:])
      return np.moveaxis(parts, axis, 0)
    return jax.tree.map(split, batch)

  def sync_batch_stats(self, state: steps.TrainState) -> steps.TrainState:
    """Averages the per-device statistics (and their EMA, which is linear in them)."""
    if self.cross_replica:
      return state  # already identical on every device
    if not state.ema:
      return state.replace(batch_stats=self._pmean(state.batch_stats))
    batch_stats, ema_stats = self._pmean((state.batch_stats, state.ema['batch_stats']))
    return state.replace(batch_stats=batch_stats, ema={**state.ema, 'batch_stats': ema_stats})


class JitStrategy(_Strategy):
  """jax.jit over a 1-D mesh ('batch'): batch sharded, state replicated; XLA adds collectives.

  BatchNorm statistics are those of the global batch (as with bn_cross_replica under pmap).
  """

  def __init__(self, ctx: steps.StepContext, devices: list[Any] | None = None,
               replicas: int | None = None):
    self.replicas = replicas
    devices = list(devices or jax.devices())
    self.num = self.num_global = len(devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
    # A stacked (R, B, ...) train batch is split along B.
    self.sharded_stacked = jax.sharding.NamedSharding(mesh,
                                                      jax.sharding.PartitionSpec(None, AXIS))
    r, s = self.replicated, self.sharded
    train_batch = self.sharded_stacked if replicas else s
    self._train = jax.jit(_train_fn(ctx, None, replicas), in_shardings=(r, train_batch, r, r),
                          out_shardings=(r, r), donate_argnums=(0,))
    self._eval = jax.jit(_eval_fn(ctx, replicas), in_shardings=(r, s), out_shardings=r)

  @staticmethod
  def _local(x):
    # This process's copy of a replicated value: using it runs no multi-process program.
    return x.addressable_data(0)

  def put_state(self, state: steps.TrainState) -> steps.TrainState:
    return jax.tree.map(lambda x: _replicated_array(x, self.replicated), state)

  def get_state(self, state: steps.TrainState) -> steps.TrainState:
    return state

  def put_batch(self, batch: dict[str, np.ndarray],
                stacked: bool = False) -> dict[str, jax.Array]:
    # Each process holds its own shard of the global batch.
    sharding = self.sharded_stacked if stacked else self.sharded
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

  def sync_batch_stats(self, state: steps.TrainState) -> steps.TrainState:
    return state


def create_strategy(ctx: steps.StepContext, devices: list[Any] | None = None,
                    replicas: int | None = None) -> _Strategy:
  """The `config.parallel` strategy; checks that the batch sizes split over the devices.

  Args:
    ctx: the steps' context.
    devices: the devices to use (default: all).
    replicas: train this many runs side by side (see the module docstring); None: one.
  """
  mode = ctx.config.parallel
  if mode not in PARALLEL_MODES:
    raise ValueError(f'config.parallel={mode!r}; choose one of {PARALLEL_MODES}')
  strategy = (PmapStrategy if mode == 'pmap' else JitStrategy)(ctx, devices, replicas)
  _check_divisible(ctx.config, strategy.num_global)
  return strategy


def bn_axis_name(config: ml_collections.ConfigDict) -> str | None:
  """The BatchNorm collective axis: AXIS under pmap with model.bn_cross_replica, else None."""
  return AXIS if config.parallel == 'pmap' and config.model.bn_cross_replica else None
