"""Early-exit inference gives the dense path's outputs while skipping halted work."""
import functools

import jax
import numpy as np
import pytest

from conftest import tiny_model_config
from stas_jax.model import early_exit
from stas_jax.model import network
from test_halting import _images, _variables


def test_capacities():
  assert early_exit.capacities(64, (0.25, 0.5)) == (64, 32, 16)
  assert early_exit.capacities(10, (0.125, 0.5, 1.0)) == (10, 5, 2)
  assert early_exit.capacities(4, (0.01,)) == (4, 1)


# Fewer capacities than the default (quicker to compile); 0.95 holds the 238 of 256 tokens
# that stay active after the first halts here, so the tests run a compacted buffer.
FRACTIONS = (0.25, 0.5, 0.95)


@functools.lru_cache(maxsize=None)
def _both(mode, beta):
  cfg = tiny_model_config(**{'halt.mode': mode, 'halt.beta': beta, 'patch_embed': 'isps'})
  model = network.create_model(cfg)
  images = _images(seed=3, batch=4)
  dense = jax.jit(lambda v, x: model.apply(v, x))(_variables(), images)
  fast = jax.jit(functools.partial(early_exit.apply, model, fractions=FRACTIONS))(
      _variables(), images)
  return jax.tree.map(np.asarray, (dense, fast))


def _expected_rows_ratio(active, mode):
  """The work the buffer scheme should do, from the dense path's masks (T, L, B, N).

  Each timestep runs in the smallest capacity that holds the tokens active at its start
  (spatial: always all tokens), and a block runs only when one of them is still active.
  """
  steps, depth, batch, tokens = active.shape
  pool = batch * tokens
  caps = early_exit.capacities(pool, FRACTIONS)
  rows = 0
  for t in range(steps):
    count = pool if mode == 'spatial' else int((active[t, 0] > 0).sum())
    cap = min(c for c in caps if c >= count) if count else 0
    rows += cap * sum(bool((active[t, l] > 0).any()) for l in range(depth))
  return rows / (steps * depth * pool)


@pytest.mark.parametrize('mode,beta', [('spatiotemporal', -1.0), ('temporal', 0.0),
                                       ('spatial', -1.0), ('none', 0.0)])
def test_same_outputs_as_dense_path(mode, beta):
  (logits, aux), (logits_ee, aux_ee) = _both(mode, beta)
  np.testing.assert_allclose(logits_ee, logits, atol=1e-5)
  np.testing.assert_array_equal(logits_ee.argmax(-1), logits.argmax(-1))
  np.testing.assert_array_equal(aux_ee['active'], aux['active'])
  np.testing.assert_allclose(aux_ee['cell_weight'], aux['cell_weight'], atol=1e-6)
  for name, value in aux['block_stats'].items():
    np.testing.assert_allclose(aux_ee['block_stats'][name], value, atol=1e-4, err_msg=name)
  np.testing.assert_allclose(aux_ee['rows_ratio'], _expected_rows_ratio(aux['active'], mode),
                             rtol=1e-6)
  assert aux['active'].mean() <= aux_ee['rows_ratio'] <= 1.0
  if mode in ('spatiotemporal', 'temporal'):
    assert 0 < aux['active'].mean() < 1, 'the test needs partly halted tokens'
    assert aux_ee['rows_ratio'] < 1, 'no work was skipped'


def test_loop_stops_when_every_token_has_halted():
  (logits, aux), (logits_ee, aux_ee) = _both('spatiotemporal', 50.0)
  assert int(aux_ee['timesteps_run']) == 1
  # Every token halts at the first cell, so only the first block of the first timestep runs.
  steps, depth = aux['active'].shape[:2]
  assert aux_ee['rows_ratio'] == pytest.approx(1 / (steps * depth))
  np.testing.assert_allclose(logits_ee, logits, atol=1e-5)
  (_, _), (_, aux_ee) = _both('spatiotemporal', -50.0)
  assert int(aux_ee['timesteps_run']) == 3
