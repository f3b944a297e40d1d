"""Wall-clock timing of several computations in turn, for speed comparisons on a busy machine
(`evaluate --early_exit`, `benchmarks/bench.py`)."""
import time
from typing import Any, Callable, Sequence

import jax


def alternating(fns: Sequence[Callable[[], Any]],
                repeats: int) -> tuple[list[list[float]], list[Any]]:
  """Calls the fns in turn, `repeats` rounds, so that a drifting load affects them alike.

  Args:
    fns: zero-argument callables, already compiled and warmed up; their outputs are waited for
      (`jax.block_until_ready`) inside the timed span.
    repeats: rounds.

  Returns:
    (seconds of each call, per fn; the output of each fn's last call).
  """
  times, outs = [[] for _ in fns], [None] * len(fns)
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      outs[i] = jax.block_until_ready(fn())
      times[i].append(time.perf_counter() - start)
  return times, outs
