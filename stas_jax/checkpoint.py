"""Saving and restoring training state with orbax: one `Checkpointer` per run directory.

Each step holds the unreplicated train state (`StandardSave`) beside a JSON `meta` dict.
With several processes, every process calls every method together, on one directory that all
of them see; arrays must be global (`train_lib`'s strategies give them so).
"""
import json
import os
import time
from typing import Any, Optional

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

# Some error texts embed whole tensorstore specs; a log line only needs their start.
_MAX_ERROR_CHARS = 400


class CheckpointError(RuntimeError):
  """A checkpoint directory is unusable or no saved step could be restored."""


def _short(error: BaseException) -> str:
  """One line naming the root cause; tensorstore's own reason sits at the end of the chain."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = ' '.join(str(error).split())
  if len(text) > _MAX_ERROR_CHARS:
    text = text[:_MAX_ERROR_CHARS] + ' ...'
  return f'{type(error).__name__}: {text}'


def _on_every_process(ok: bool) -> bool:
  """Whether `ok` holds on every process; all processes must call this together."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _abstract_leaf(leaf: Any) -> jax.ShapeDtypeStruct:
  """Shape, dtype and sharding to restore one leaf into; default device if unsharded."""
  shape = leaf.shape if hasattr(leaf, 'shape') else np.shape(leaf)
  dtype = leaf.dtype if hasattr(leaf, 'dtype') else np.result_type(leaf)
  sharding = getattr(leaf, 'sharding', None)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(
      shape, jax.dtypes.canonicalize_dtype(dtype), sharding=sharding)


def abstract_target(target_state: Any) -> Any:
  """Maps a concrete or abstract pytree to `jax.ShapeDtypeStruct` leaves with shardings.

  Args:
    target_state: pytree of arrays, Python scalars or `jax.ShapeDtypeStruct`s.

  Returns:
    The same structure with `ShapeDtypeStruct` leaves; leaves without a sharding get the
    first local device.
  """
  return jax.tree.map(_abstract_leaf, target_state)


class Checkpointer:
  """Keeps the last few checkpoints of a run and restores the newest readable one.

  By default saves are asynchronous: `save` returns once the arrays are copied to host
  memory, and the files are written in the background. Every restore waits for pending saves first.
  Usable as a context manager, which closes it on exit.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    """Opens (or creates) a checkpoint directory.

    Args:
      directory: where the step subdirectories live, e.g. `<workdir>/checkpoints`.
      max_to_keep: how many of the newest steps to keep; older ones are deleted on save.
      async_save: write checkpoints in a background thread.

    Raises:
      CheckpointError: if `directory` exists but is not a directory.
    """
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(
          f'Checkpoint path {self.directory} exists but is not a directory; '
          'move it aside or point --workdir elsewhere.')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=1,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    # Newer steps that restore_latest had to skip; set aside on the next save.
    self._unreadable: list[int] = []

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def latest_step(self) -> Optional[int]:
    """Returns the newest saved step (including one still being written), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Returns the saved steps, oldest first; unfinished temporary saves are not included."""
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    """Returns the directory that holds `step`."""
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, meta: dict[str, Any], *,
           force: bool = False) -> bool:
    """Saves `state` and `meta` as `step` (in the background if async).

    Orbax skips (returns False for) a step that is not newer than the latest saved one;
    errors from a background save surface at the next save, wait or close.

    Args:
      step: training step; names the checkpoint.
      state: unreplicated pytree of arrays (e.g. a flax TrainState).
      meta: JSON-serialisable dict (config, data-iterator state, metrics, ...).
      force: save even if orbax's save policy would skip this step; saving a step
        that already exists still raises.

    Returns:
      Whether a save was started.

    Raises:
      TypeError: if `meta` is not JSON-serialisable.
    """
    json.dumps(meta)  # Fail here, not later in the background thread.
    self._set_aside_unreadable()
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force)

  def restore(self, step: int, target_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores one step into the structure, dtypes and shardings of `target_state`.

    Args:
      step: a step from `all_steps()`.
      target_state: pytree like the saved state: concrete arrays or ShapeDtypeStructs.

    Returns:
      `(state, meta)`: state has `target_state`'s structure with jax array leaves.

    Raises:
      CheckpointError: if the step does not exist or cannot be read.
    """
    self.wait_until_finished()
    if step not in self._manager.all_steps():
      raise CheckpointError(
          f'No checkpoint for step {step} in {self.directory}; '
          f'saved steps: {self.all_steps()}.')
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_target(target_state)),
              meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax and tensorstore raise many types for bad files.
      raise CheckpointError(
          f'Cannot restore {self.step_dir(step)}: {_short(e)}') from e
    return restored.state, restored.meta

  def restore_latest(self, target_state: Any) -> Optional[tuple[Any, dict[str, Any], int]]:
    """Restores the newest step that can be read, falling back to older ones.

    Unreadable steps are logged and left on disk; the next `save` renames them to
    `<step>.unreadable-<time>` so they neither block new saves nor get deleted. With several
    processes, a step counts as readable only if every process could restore it, so that all
    of them resume from the same one.

    Args:
      target_state: pytree like the saved state: concrete arrays or ShapeDtypeStructs.

    Returns:
      `(state, meta, step)`, or None when the directory holds no checkpoint.

    Raises:
      CheckpointError: if checkpoints exist but none can be restored.
    """
    self.wait_until_finished()
    steps = self.all_steps()
    if not steps:
      return None
    failures, unreadable = [], []
    for step in reversed(steps):
      error = None
      try:
        state, meta = self.restore(step, target_state)
      except CheckpointError as e:
        error = str(e)
      everywhere = _on_every_process(error is None)  # every process calls it, every step
      if error is None and not everywhere:
        error = f'{self.step_dir(step)} could not be restored on another process'
      if error is not None:
        logging.warning('Skipping unreadable checkpoint (will try an older step): %s', error)
        failures.append(error)
        unreadable.append(step)
        continue
      if failures:
        logging.warning('Restored step %d from %s after skipping %d newer unreadable '
                        'checkpoint(s).', step, self.step_dir(step), len(failures))
      self._unreadable = unreadable
      return state, meta, step
    tried = '\n  '.join(failures)
    raise CheckpointError(
        f'None of the {len(steps)} checkpoints in {self.directory} could be restored:\n'
        f'  {tried}\n'
        'If every step fails the same way, the target state probably does not match the '
        'saved one (changed config or model). Otherwise move the broken step '
        'directories aside, or point --workdir elsewhere to start afresh.')

  def _set_aside_unreadable(self) -> None:
    """Renames steps restore_latest skipped: orbax never saves a step <= its latest.

    Process 0 renames; the others wait for it, then all of them re-read the directory.
    """
    if not self._unreadable:
      return
    self.wait_until_finished()
    if jax.process_index() == 0:
      stamp = time.strftime('%Y%m%d-%H%M%S')
      for step in self._unreadable:
        source = self.step_dir(step)
        if os.path.isdir(source):
          dest = f'{source}.unreadable-{stamp}'
          os.rename(source, dest)
          logging.warning('Renamed unreadable checkpoint %s to %s; delete it when no '
                          'longer needed.', source, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('checkpoint: unreadable steps renamed')
    self._unreadable = []
    self._manager.reload()

  def wait_until_finished(self) -> None:
    """Blocks until pending saves are on disk; raises errors from background saves."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()
