"""Stopping a run cleanly on SIGTERM / SIGINT: the loop saves a checkpoint after the current
step and raises `TrainingInterrupted`."""
import signal
import threading
from typing import Callable

from absl import logging
import jax


class TrainingInterrupted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of `step` was saved before stopping."""

  def __init__(self, signum: int, step: int, workdir: str):
    self.signum, self.step = signum, step
    super().__init__(f'{signal.Signals(signum).name} received: saved a checkpoint of step {step} '
                     f'in {workdir}; run the same command again to resume.')


class StopFlag:
  """Records SIGTERM / SIGINT instead of dying mid-step; a second SIGINT interrupts at once.

  With several processes, a signal reaches each at a different step, and one process saving
  while the others train would deadlock their collectives. There, SIGTERM is left to orbax's
  preemption support (`reached_preemption`, JAX's preemption sync point), which makes every
  process stop after the same step, and SIGINT keeps its default: the process stops, and the
  others exit with the distributed runtime's error.

  Args:
    reached_preemption: step -> whether every process reached the preemption sync point
      (`checkpoint.Checkpointer.reached_preemption`); used with several processes only.
  """

  def __init__(self, reached_preemption: Callable[[int], bool]):
    self.signum = None
    self._previous = {}
    self._multiprocess = jax.process_count() > 1
    self._reached_preemption = reached_preemption

  def stop_after(self, step: int) -> bool:
    """Whether to save and stop after `step`; every process must call it after every step."""
    if self._multiprocess and self._reached_preemption(step):
      logging.warning('SIGTERM received by a process: saving a checkpoint after step %d.', step)
      self.signum = signal.SIGTERM
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
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
