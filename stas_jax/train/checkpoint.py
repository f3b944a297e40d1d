"""Saving and restoring training state with orbax: one `Checkpointer` per run directory.

Each step holds the unreplicated train state (`StandardSave`), a JSON `meta` dict and, when a
grain iterator is given, its position (`data`: grain's own orbax handler, one
`process_<i>-of-<n>.json` per process). Steps written before the `data` item existed keep every
process's position in `meta['data_iterator_states']`, and still restore.
With several processes, every process calls every method together, on one directory that all
of them see; arrays must be global (`parallel`'s strategies give them so).
"""
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import time
from typing import Any

from absl import logging
from etils import epath
import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

# Some error texts embed whole tensorstore specs; a log line only needs their start.
_MAX_ERROR_CHARS = 400
_DATA = 'data'  # the item that holds the data-iterator position
_DATA_FILE = re.compile(r'process_\d+-of-(\d+)\.json')  # one process's file (grain)
_LEGACY_DATA_KEY = 'data_iterator_states'  # meta key of steps written without a `data` item
# Key of the meta dict `restore` returns when the saved state lacked some of the target's
# top-level fields (a list of their names), e.g. a step written before the field existed.
MISSING_FIELDS_KEY = 'state_fields_not_saved'


class CheckpointError(RuntimeError):
  """A checkpoint directory is unusable or no saved step could be restored."""


class ProcessCountError(CheckpointError):
  """The data-iterator positions of a step were written by another number of processes."""


class _DrainingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that ends its leftover tasks before it closes, as `asyncio.run` does.

  orbax 0.12.8 runs each restore in a fresh loop and closes it as soon as the restore returns
  (`asyncio_utils._run_sync_via_new_loop`). When one array of a broken step fails, the reads of
  the others are still in flight: closing under them prints "RuntimeError: Event loop is
  closed" tracebacks from tensorstore's threads, and their coroutines, collected later, print
  "Exception ignored in ... Encountered error while reading array index" (orbax turns the
  GeneratorExit into an Exception). Cancelled and awaited here, they end quietly.
  """

  def close(self) -> None:
    if not self.is_running() and not self.is_closed():
      pending = [task for task in asyncio.all_tasks(self) if not task.done()]
      for task in pending:
        task.cancel()
      if pending:
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
      self.run_until_complete(self.shutdown_default_executor())
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  """The default policy, but its new loops are `_DrainingEventLoop`s."""

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingEventLoop()


@contextlib.contextmanager
def _draining_event_loops():
  """Within the block, new event loops (orbax's) end their leftover tasks when closed."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


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


def _fields(tree: Any) -> dict[str, Any] | None:
  """The top-level fields of a state: a dict's items or a (flax struct) dataclass's pytree
  fields; None for any other pytree."""
  if isinstance(tree, dict):
    return dict(tree)
  if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
    return {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)
            if f.metadata.get('pytree_node', True)}
  return None


def _with_fields(tree: Any, fields: dict[str, Any]) -> Any:
  """`tree` (a dict or dataclass, see `_fields`) with its top-level fields replaced."""
  return {**tree, **fields} if isinstance(tree, dict) else dataclasses.replace(tree, **fields)


def _concrete(leaf: Any) -> Any:
  """An abstract leaf (`jax.ShapeDtypeStruct`) as zeros of its shape, dtype and sharding."""
  if not isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  zeros = np.zeros(leaf.shape, leaf.dtype)
  return jax.device_put(zeros, leaf.sharding) if leaf.sharding is not None else jnp.asarray(zeros)


def _has_leaves(tree: Any) -> bool:
  return bool(jax.tree.leaves(tree))


def _saved_empty(entry: Any) -> bool:
  """Whether a saved subtree's metadata is an empty container: orbax writes an empty dict as
  a placeholder entry (`skip_deserialize`), not as a dict."""
  if isinstance(entry, dict):
    return all(_saved_empty(v) for v in entry.values())
  return bool(getattr(entry, 'skip_deserialize', False))


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
    # Newer steps that restore_latest skipped, and why ('unreadable' or 'superseded'); set
    # aside on the next save.
    self._unreadable: list[int] = []
    self._set_aside_as = 'unreadable'

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def latest_step(self) -> int | None:
    """Returns the newest saved step (including one still being written), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Returns the saved steps, oldest first; unfinished temporary saves are not included."""
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    """Returns the directory that holds `step`."""
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, meta: dict[str, Any], *,
           data_iterator: Any = None, force: bool = False) -> bool:
    """Saves `state`, `meta` and the position of `data_iterator` as `step` (in the background
    if async; the iterator's position is taken before this returns).

    Orbax skips (returns False for) a step that is not newer than the latest saved one;
    errors from a background save surface at the next save, wait or close.

    Args:
      step: training step; names the checkpoint.
      state: unreplicated pytree of arrays (e.g. a flax TrainState).
      meta: JSON-serialisable dict (config, metrics, ...).
      data_iterator: a grain `DataLoader` iterator; each process saves its own position.
      force: save even if orbax's save policy would skip this step; saving a step
        that already exists still raises.

    Returns:
      Whether a save was started.

    Raises:
      TypeError: if `meta` is not JSON-serialisable.
    """
    json.dumps(meta)  # Fail here, not later in the background thread.
    self._set_aside_unreadable()
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items[_DATA] = grain.PyGrainCheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, target_state: Any, *,
              data_iterator: Any = None) -> tuple[Any, dict[str, Any]]:
    """Restores one step into the structure, dtypes and shardings of `target_state`.

    Args:
      step: a step from `all_steps()`.
      target_state: pytree like the saved state: concrete arrays or ShapeDtypeStructs.
      data_iterator: a fresh grain iterator of the same pipeline, moved to the saved position
        (from the `data` item, or from `meta['data_iterator_states']` in older steps).

    A top-level field of `target_state` (a dict or dataclass) that the step lacks or holds
    empty (a step written before the field existed, or with its option off) is not read: it
    keeps the target's value (zeros where the target is abstract); if that value is not empty,
    one line says so and the returned meta names the field under `MISSING_FIELDS_KEY`
    (`steps.complete_restored` starts such fields afresh).

    Returns:
      `(state, meta)`: state has `target_state`'s structure with jax array leaves.

    Raises:
      ProcessCountError: the step's iterator positions are for another number of processes.
      CheckpointError: if the step does not exist or cannot be read.
    """
    self.wait_until_finished()
    if step not in self._manager.all_steps():
      raise CheckpointError(
          f'No checkpoint for step {step} in {self.directory}; '
          f'saved steps: {self.all_steps()}.')
    try:
      saved, missing = self._missing_fields(step, target_state)
    except Exception as e:  # An unreadable step: its metadata too may be broken.
      raise CheckpointError(f'Cannot restore {self.step_dir(step)}: {_short(e)}') from e
    fields = _fields(target_state)
    unread = [k for k in fields or {} if k not in saved or k in missing]
    target = target_state
    if unread:
      # The saved tree's structure: fields it holds empty stay empty, absent ones are left out.
      target = {k: {} if k in missing else v for k, v in fields.items() if k in saved}
    items = {'state': ocp.args.StandardRestore(abstract_target(target)),
             'meta': ocp.args.JsonRestore()}
    data_dir = os.path.join(self.step_dir(step), _DATA)
    with_data = data_iterator is not None and os.path.isdir(data_dir)
    if with_data:
      written_by = {int(m.group(1)) for m in map(_DATA_FILE.fullmatch, os.listdir(data_dir))
                    if m}
      if len(written_by) == 1:
        self._check_process_count(step, written_by.pop())
      items[_DATA] = grain.PyGrainCheckpointRestore(data_iterator)
    try:
      with _draining_event_loops():
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      if data_iterator is not None and not with_data:
        self._set_legacy_position(step, restored.meta, data_iterator)
    except CheckpointError:
      raise
    except Exception as e:  # Orbax, tensorstore and grain raise many types for bad files.
      raise CheckpointError(
          f'Cannot restore {self.step_dir(step)}: {_short(e)}') from e
    if not unread:
      return restored.state, restored.meta
    kept = {k: jax.tree.map(_concrete, fields[k]) for k in unread}
    state = _with_fields(target_state, {**restored.state, **kept})
    if not missing:  # only fields that are empty in the target too
      return state, restored.meta
    logging.info('Step %d of %s has no saved %s: taken from the fresh state.', step,
                 self.directory, ', '.join(missing))
    return state, {**restored.meta, MISSING_FIELDS_KEY: missing}

  def _missing_fields(self, step: int, target_state: Any) -> tuple[set[str], list[str]]:
    """The names of the top-level fields saved at `step`, and those of the non-empty fields of
    `target_state` that the step cannot fill (absent there, or empty there); (set(), []) for
    a target without fields."""
    fields = _fields(target_state)
    if fields is None:
      return set(), []
    saved = ocp.StandardCheckpointHandler().metadata(epath.Path(self.step_dir(step)) / 'state')
    saved = dict(saved.items()) if hasattr(saved, 'items') else {}
    missing = sorted(k for k, v in fields.items()
                     if _has_leaves(v) and (k not in saved or _saved_empty(saved[k])))
    return set(saved), missing

  def _check_process_count(self, step: int, written_by: int) -> None:
    if written_by != jax.process_count():
      raise ProcessCountError(
          f'The checkpoint of step {step} in {self.directory} was written by '
          f'{written_by} process(es), each with its own data-iterator position; '
          f'resume it with {written_by} (--num_processes), not '
          f'{jax.process_count()}, or point --workdir elsewhere to start afresh.')

  def _set_legacy_position(self, step: int, meta: dict[str, Any], data_iterator: Any) -> None:
    """Moves `data_iterator` to this process's entry of a step saved without a `data` item."""
    states = meta.get(_LEGACY_DATA_KEY)
    if not isinstance(states, list):
      raise CheckpointError(
          f'{self.step_dir(step)} holds no data-iterator position (neither a {_DATA!r} item '
          f'nor meta[{_LEGACY_DATA_KEY!r}]).')
    self._check_process_count(step, len(states))
    data_iterator.set_state(states[jax.process_index()].encode())

  def restore_latest(self, target_state: Any, *, data_iterator: Any = None,
                     max_step: int | None = None) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest step that can be read, falling back to older ones.

    Each unreadable step gets one warning and stays on disk; the next `save` renames it to
    `<step>.unreadable-<time>` so that it neither blocks new saves nor gets deleted. With
    several processes, a step counts as readable only if every process could restore it, so
    that all of them resume from the same one.

    Args:
      target_state: pytree like the saved state: concrete arrays or ShapeDtypeStructs.
      data_iterator: as in `restore`; left at the restored step's position.
      max_step: restore no step after this one (runs trained together resume from a step
        that all of them saved); the steps after it are set aside as
        `<step>.superseded-<time>` at the next save.

    Returns:
      `(state, meta, step)`, or None when the directory holds no checkpoint (none at or
      before `max_step`).

    Raises:
      ProcessCountError: the newest readable step is for another number of processes.
      CheckpointError: if checkpoints exist but none can be restored.
    """
    self.wait_until_finished()
    steps = self.all_steps()
    self._set_aside_as = 'unreadable'
    if max_step is not None and any(s > max_step for s in steps):
      self._unreadable = [s for s in steps if s > max_step]
      self._set_aside_as = 'superseded'
      steps = [s for s in steps if s <= max_step]
    if not steps:
      return None
    failures = []
    for step in reversed(steps):
      error = None
      try:
        state, meta = self.restore(step, target_state, data_iterator=data_iterator)
      except ProcessCountError:
        raise
      except CheckpointError as e:
        error = str(e)
      everywhere = _on_every_process(error is None)  # every process calls it, every step
      if error is None and not everywhere:
        error = f'{self.step_dir(step)} could not be restored on another process'
      if error is None:
        if failures:
          logging.info('Restored step %d after skipping %d newer unreadable checkpoint(s).',
                       step, len(failures))
        if failures:
          self._set_aside_as = 'unreadable'
        self._unreadable = [s for s in self.all_steps() if s > step]
        return state, meta, step
      logging.warning('Skipping unreadable checkpoint (will try an older step): %s', error)
      failures.append(error)
    tried = '\n  '.join(failures)
    raise CheckpointError(
        f'None of the {len(steps)} checkpoints in {self.directory} could be restored:\n'
        f'  {tried}\n'
        'If every step fails the same way, the target state probably does not match the '
        'saved one (changed config or model). Otherwise move the broken step '
        'directories aside, or point --workdir elsewhere to start afresh.')

  def reached_preemption(self, step: int) -> bool:
    """Whether to save and stop after `step` because a process got SIGTERM (orbax's
    `CheckpointManager.reached_preemption`, JAX's preemption sync point): True on every
    process at the same step. False without `jax.distributed`; every process must call it
    after every step."""
    return self._manager.reached_preemption(step)

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
          dest = f'{source}.{self._set_aside_as}-{stamp}'
          os.rename(source, dest)
          logging.info('Renamed %s checkpoint %s to %s; delete it when no longer needed.',
                       self._set_aside_as, source, dest)
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
