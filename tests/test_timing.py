"""The alternating timer's contract: turn order, outputs, one time per call (no speeds)."""
import jax.numpy as jnp

from stas_jax.tools import timing


def test_alternating_takes_turns_and_returns_last_outputs():
  calls = []

  def make(name):
    def fn():
      calls.append(name)
      return jnp.float32(len(calls))
    return fn

  times, outs = timing.alternating((make('a'), make('b')), repeats=3)
  assert calls == ['a', 'b'] * 3
  assert [float(o) for o in outs] == [5.0, 6.0]
  assert [len(t) for t in times] == [3, 3] and all(x >= 0 for t in times for x in t)
