"""Early-exit inference: halted tokens and fully halted timesteps cost no compute.

The dense path (`STAS.__call__`) zeroes halted tokens with multiplies, which saves energy on
neuromorphic hardware but no time on a CPU/GPU. This path gives the same predictions while
running blocks only on the tokens still active, and stopping once every token has halted.

How: the active tokens of the whole batch sit in a buffer of C rows (`layers.TokenLayout` says
where each row sits in the (B, N) grid), and a `lax.while_loop` runs one timestep per
iteration, its L blocks unrolled (static parameters, no per-cell slicing). C is one of a few
static capacities (fractions of B * N), so every shape stays static. Under spatiotemporal and
temporal halting a halted token never becomes active again, so the buffer only shrinks: after
a timestep whose active tokens fit a smaller capacity, they are compacted into it (a stable
sort keeps grid order) and the loop goes on there; once none is left it stops. A block whose
buffer holds no active token is skipped (`lax.cond`). Tokens that halt inside a timestep stay
in the buffer, masked, until the timestep ends. Spatial halting re-activates every token at
each timestep, so it runs in the full buffer and saves only the skipped blocks.

The membranes of every block stay in grid layout: the full buffer uses them as they are, a
compacted one gathers its rows before the block and scatters them back after it, so that a
compaction moves only the small per-token halting state. Attention, the one step that mixes
tokens, runs on the grid; the linear layers, BatchNorms and LIFs, nearly all of the work, run
on the buffer.
"""
import math
from typing import Any, Dict, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp

from stas_jax import halting
from stas_jax import layers
from stas_jax.model import STAS

DEFAULT_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def capacities(num_tokens: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Tuple[int]:
  """Buffer sizes, largest first: num_tokens, then ceil(f * num_tokens) for each fraction."""
  caps = {num_tokens} | {min(num_tokens, math.ceil(f * num_tokens)) for f in fractions}
  return tuple(sorted((c for c in caps if c > 0), reverse=True))


class _Buffer(NamedTuple):
  """The tokens being processed, in C rows."""
  rows: jax.Array          # (C,) flat grid index of each row (see layers.TokenLayout)
  hs: halting.HaltState    # (C,) fields, out (C, D)


def _take_rows(buf: _Buffer, idx: jax.Array) -> _Buffer:
  return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), buf)


def _write_home(home_hs: halting.HaltState, buf: _Buffer,
                lay: layers.TokenLayout) -> halting.HaltState:
  """The halting state of the buffer's tokens written into the (B * N,) grid state."""
  return jax.tree.map(lay.put, home_hs, buf.hs)


def apply(model: STAS, variables: Dict[str, Any], images: jax.Array,
          fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Tuple[jax.Array, Dict[str, Any]]:
  """Eval-mode forward pass that skips halted work; same outputs as `model.apply`.

  Args:
    model: the network (`stas_jax.model.create_model`).
    variables: {'params', 'batch_stats'}.
    images: (B, H, W, C) normalised images.
    fractions: buffer capacities as fractions of the batch's token count B * N.

  Returns:
    (logits, aux) with the dense path's `active`, `cell_weight`, `ponder`, `halt_loss_terms`,
    `block_stats`, `sps_stats` (cells never run are inactive with zero statistics), plus
    `timesteps_run`, the number of timesteps in which any block ran, and `rows_ratio`, the
    share of the grid's B * N * T * L token-cells that went through a block (padding rows of
    the buffer included): the work done, which the token ratio bounds from below.
  """
  spec = model.spec
  hp = spec.halt
  T, L, N, D = spec.timesteps, spec.depth, spec.num_tokens, spec.dim
  u, sps_aux = model.apply(variables, images, False, method=STAS.embed)
  gamma, beta = model.apply(variables, method=STAS.halting_params)
  stacked = {k: variables[k]['encoder']['blocks']['block'] for k in ('params', 'batch_stats')}
  block = layers.SSABlock(spec, train=False)
  batch = images.shape[0]
  pool = batch * N
  caps = capacities(pool, tuple(fractions))
  u = u.reshape((T, pool, D))
  # Spatial halting restarts every timestep; the other modes only ever halt more tokens.
  spatial = hp.mode == 'spatial'

  blocks = [jax.tree.map(lambda a, l=l: a[l], stacked) for l in range(L)]
  stats_shape = jax.eval_shape(lambda: block.apply(
      blocks[0], u[0].reshape((batch, N, D)), jnp.ones((batch, N)),
      layers.block_membranes(spec, batch))[2])
  grid = lambda a: a.reshape((batch, N) + a.shape[1:])
  flat = lambda a: a.reshape((pool,) + a.shape[2:])

  def run_timestep(lay, t, buf, mem, rec, run):
    """The L blocks at timestep t on the buffer rows; `mem` holds every token's membranes."""
    full = buf.rows.shape[0] == pool  # the full buffer is the grid in order: no gathers
    hs = halting.reset_for_timestep(buf.hs) if spatial else buf.hs
    z = u[t] if full else lay.take(u[t])
    new_mem = []
    for l, params in enumerate(blocks):

      def run_block(z, hs, mem_l, params=params):
        if full:
          z, mem_l, stats = block.apply(params, grid(z), grid(hs.mask),
                                        jax.tree.map(grid, mem_l))
          return flat(z), jax.tree.map(flat, mem_l), stats
        held = jax.tree.map(lay.take, mem_l)
        z, held, stats = block.apply(params, z, hs.mask, held, lay)
        return z, jax.tree.map(lay.put, mem_l, held), stats

      def skip_block(z, hs, mem_l):  # every token has halted: the block would change nothing
        return z, mem_l, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)

      pending = jnp.any(hs.mask > 0)
      z, mem_l, stats = jax.lax.cond(pending, run_block, skip_block, z, hs, mem[l])
      run = run + pending * buf.rows.shape[0]
      new_mem.append(mem_l)
      on_grid = (lambda a: a) if full else lay.spread
      active = hs.mask
      hs, weight = halting.cell_update(hp, hs, z, t, l, T, L, gamma, beta)
      cell = {'active': on_grid(active), 'weight': on_grid(weight), 'stats': stats}
      rec = jax.tree.map(lambda r, y: jax.lax.dynamic_update_index_in_dim(r, y, t * L + l, 0),
                         rec, cell)
    return t + 1, _Buffer(buf.rows, hs), tuple(new_mem), rec, run

  def run_phases(i, t, buf, home_hs, mem, rec, run):
    """Runs timesteps t.. in capacity caps[i] while the active tokens need it, then smaller."""
    smaller = caps[i + 1] if i + 1 < len(caps) else 0
    lay = layers.TokenLayout.of_rows(buf.rows, batch, N)

    def more(carry):
      t, buf = carry[:2]
      pending = jnp.sum(buf.hs.mask > 0) > smaller
      # Spatial halting re-activates every token at each timestep: it never shrinks.
      return (t < T) & (True if spatial else pending)

    t, buf, mem, rec, run = jax.lax.while_loop(more, lambda c: run_timestep(lay, *c),
                                               (t, buf, mem, rec, run))
    home_hs = _write_home(home_hs, buf, lay)
    if not smaller or spatial:
      return t, home_hs, rec, run

    def compact():
      order = jnp.argsort(buf.hs.mask <= 0, stable=True)[:smaller]
      return run_phases(i + 1, t, _take_rows(buf, order), home_hs, mem, rec, run)

    return jax.lax.cond(t < T, compact, lambda: (t, home_hs, rec, run))

  hs0 = jax.tree.map(lambda a: a.reshape((pool,) + a.shape[2:]),
                     halting.init_state(batch, N, D))
  mem0 = tuple({k: jnp.zeros((pool, a.shape[-1]), a.dtype)
                for k, a in layers.block_membranes(spec, 1).items()} for _ in range(L))
  start = _Buffer(jnp.arange(pool, dtype=jnp.int32), hs0)
  rec0 = {'active': jnp.zeros((T * L, pool), jnp.float32),
          'weight': jnp.zeros((T * L, pool), jnp.float32),
          'stats': jax.tree.map(lambda s: jnp.zeros((T * L,) + s.shape, s.dtype), stats_shape)}
  timesteps_run, home_hs, rec, rows_run = run_phases(0, 0, start, hs0, mem0, rec0,
                                                     jnp.int32(0))

  active = rec['active'].reshape((T, L, batch, N))
  weight = rec['weight'].reshape((T, L, batch, N))
  rho = home_hs.rho.reshape((batch, N))
  logits = model.apply(variables, home_hs.out.reshape((batch, N, D)), method=STAS.classify)
  cells = halting.scoring_cells(hp.mode, T, L)
  aux = {
      'active': active,
      'cell_weight': weight,
      'ponder': rho,
      'halt_loss_terms': {
          'ponder': halting.ponder_loss(rho, T, L),
          'distribution': halting.distribution_prior_loss(
              weight, cells, hp.target_cell, hp.target_sigma),
      },
      'block_stats': jax.tree.map(lambda a: a.reshape((T, L) + a.shape[1:]), rec['stats']),
      'sps_stats': sps_aux,
      'timesteps_run': timesteps_run,
      'rows_ratio': rows_run / (T * L * pool),
  }
  return logits, aux
