"""Early-exit inference: halted tokens and fully halted timesteps cost no compute.

The dense path (`STAS.__call__`) zeroes halted tokens with multiplies, which saves energy on
neuromorphic hardware but no time on a CPU/GPU. This path gives the same predictions while
stopping the timestep loop once every token has halted (`lax.while_loop`) and running each
block only on its active tokens, gathered into a buffer whose size is the smallest of a few
static capacities that holds them (`lax.switch`), so every shape stays static.
"""
import functools
import math
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp

from stas_jax import halting
from stas_jax import layers
from stas_jax.model import STAS

DEFAULT_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def capacities(num_tokens: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Tuple[int]:
  """Sorted static buffer sizes: 0 (skip the block), ceil(f * N) for each fraction, and N."""
  caps = {0, num_tokens} | {min(num_tokens, math.ceil(f * num_tokens)) for f in fractions}
  return tuple(sorted(caps))


def _gathered_block(block: layers.SSABlock, block_vars, caps: Tuple[int], z, mask, mem):
  """Runs `block` on the active tokens only, in the smallest buffer that holds every image's."""
  batch, n = mask.shape
  active = mask > 0
  need = jnp.max(jnp.sum(active, axis=1))
  bucket = jnp.searchsorted(jnp.asarray(caps), need, side='left')
  # Active tokens first, each image keeping its token order (a stable sort).
  order = jnp.argsort(~active, axis=1, stable=True)
  rows = jnp.arange(batch)[:, None]
  stats_shape = jax.eval_shape(lambda: block.apply(block_vars, z, mask, mem)[2])

  def run(cap):
    if cap == 0:
      return z, mem, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)
    if cap == n:
      return block.apply(block_vars, z, mask, mem)
    idx = order[:, :cap]
    take = lambda a: a[rows, idx]
    z_c, mem_c, stats = block.apply(block_vars, take(z), take(mask), jax.tree.map(take, mem))
    put = lambda full, part: full.at[rows, idx].set(part)
    return put(z, z_c), jax.tree.map(put, mem, mem_c), stats

  return jax.lax.switch(bucket, [functools.partial(run, c) for c in caps])


def apply(model: STAS, variables: Dict[str, Any], images: jax.Array,
          fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Tuple[jax.Array, Dict[str, Any]]:
  """Eval-mode forward pass that skips halted work; same outputs as `model.apply`.

  Args:
    model: the network (`stas_jax.model.create_model`).
    variables: {'params', 'batch_stats'}.
    images: (B, H, W, C) normalised images.
    fractions: buffer capacities as fractions of the token count.

  Returns:
    (logits, aux) with the dense path's `active`, `cell_weight`, `ponder`, `block_stats`,
    `sps_stats` (cells never run are inactive with zero statistics), plus `timesteps_run`, the
    number of timesteps the loop executed.
  """
  spec = model.spec
  T, L = spec.timesteps, spec.depth
  u, sps_aux = model.apply(variables, images, False, method=STAS.embed)
  gamma, beta = model.apply(variables, method=STAS.halting_params)
  stacked = {k: variables[k]['encoder']['blocks']['block'] for k in ('params', 'batch_stats')}
  block = layers.SSABlock(spec, train=False)
  caps = capacities(spec.num_tokens, tuple(fractions))
  batch = images.shape[0]

  def cell(carry, xs):
    z, hs, t = carry
    block_vars, mem, l = xs
    active = hs.mask
    z_out, mem, stats = _gathered_block(block, block_vars, caps, z, active, mem)
    hs, weight = halting.cell_update(spec.halt, hs, z_out, t, l, T, L, gamma, beta)
    return (z_out, hs, t), (mem, {'active': active, 'weight': weight, 'stats': stats})

  def timestep(carry):
    t, mem, hs, record = carry
    if spec.halt.mode == 'spatial':
      hs = halting.reset_for_timestep(hs)
    u_t = jax.lax.dynamic_index_in_dim(u, t, keepdims=False)
    (_, hs, _), (mem, ys) = jax.lax.scan(cell, (u_t, hs, t), (stacked, mem, jnp.arange(L)))
    record = jax.tree.map(lambda r, y: jax.lax.dynamic_update_index_in_dim(r, y, t, 0),
                          record, ys)
    return t + 1, mem, hs, record

  def keep_going(carry):
    t, _, hs, _ = carry
    # Spatial mode re-activates every token at each timestep, so it always runs all T.
    pending = True if spec.halt.mode == 'spatial' else jnp.any(hs.mask > 0)
    return (t < T) & pending

  one = layers.block_membranes(spec, batch)
  mem0 = jax.tree.map(lambda a: jnp.broadcast_to(a, (L,) + a.shape), one)
  hs0 = halting.init_state(batch, spec.num_tokens, spec.dim)
  step_shape = jax.eval_shape(lambda: jax.lax.scan(cell, (u[0], hs0, 0),
                                                   (stacked, mem0, jnp.arange(L)))[1][1])
  record0 = jax.tree.map(lambda s: jnp.zeros((T,) + s.shape, s.dtype), step_shape)
  t_run, _, hs, record = jax.lax.while_loop(keep_going, timestep,
                                            (jnp.int32(0), mem0, hs0, record0))
  logits = model.apply(variables, hs.out, method=STAS.classify)
  cells = halting.scoring_cells(spec.halt.mode, T, L)
  aux = {
      'active': record['active'],
      'cell_weight': record['weight'],
      'ponder': hs.rho,
      'halt_loss_terms': {
          'ponder': halting.ponder_loss(hs.rho, T, L),
          'distribution': halting.distribution_prior_loss(
              record['weight'], cells, spec.halt.target_cell, spec.halt.target_sigma),
      },
      'block_stats': record['stats'],
      'sps_stats': sps_aux,
      'timesteps_run': t_run,
  }
  return logits, aux
