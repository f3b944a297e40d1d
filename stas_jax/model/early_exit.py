"""Early-exit inference: halted tokens and fully halted timesteps cost no compute.

The dense path (`STAS.__call__`) zeroes halted tokens with multiplies, which saves energy on
neuromorphic hardware but no time on a CPU/GPU. This path gives the same predictions while
running blocks only on the tokens still active, and stopping once every token has halted.

How: the active tokens of the whole batch sit in a buffer of C rows (`TokenLayout` says where
each row sits in the (B, N) grid), and a `lax.while_loop` runs one timestep per iteration, its
L blocks unrolled (static parameters, no per-cell slicing). C is one of a few
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
import dataclasses
import functools
import math
from typing import Any, NamedTuple
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from stas_jax.model import halting
from stas_jax.model import sdt
from stas_jax.model.network import STAS, block_module, forward_aux, initial_membranes
from stas_jax.model.spec import ModelSpec

DEFAULT_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def capacities(num_tokens: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[int]:
  """Buffer sizes, largest first: num_tokens, then ceil(f * num_tokens) for each fraction."""
  caps = {num_tokens} | {min(num_tokens, math.ceil(f * num_tokens)) for f in fractions}
  return tuple(sorted((c for c in caps if c > 0), reverse=True))


class TokenLayout(NamedTuple):
  """Where the rows of a compacted token buffer sit in the (B, N) token grid.

  Early-exit inference runs blocks on a buffer of C rows that holds the active tokens of the
  whole batch; attention, which mixes the tokens of one image, runs on the grid (the
  `layers.BufferLayout` methods). `rows` and `slot` are inverse maps; out-of-range entries mark
  empty places.

  Attributes:
    rows: (C,) int32, flat grid index b * N + n of each buffer row; B * N for an empty row.
    slot: (B * N,) int32, the buffer row that holds each token; C for a token not held.
    batch, tokens: B and N (static).
  """
  rows: jax.Array
  slot: jax.Array
  batch: int
  tokens: int

  @classmethod
  def of_rows(cls, rows: jax.Array, batch: int, tokens: int) -> 'TokenLayout':
    """The layout of a buffer whose row i holds grid token rows[i] (B * N: empty)."""
    held = jnp.arange(rows.shape[0], dtype=jnp.int32)
    slot = jnp.full((batch * tokens,), rows.shape[0], jnp.int32).at[rows].set(held, mode='drop')
    return cls(rows, slot, batch, tokens)

  def take(self, flat: jax.Array) -> jax.Array:
    """(B * N, ...) grid tokens -> (C, ...) buffer rows, zeros in empty rows."""
    return jnp.take(flat, self.rows, axis=0, mode='fill', fill_value=0)

  def spread(self, a: jax.Array) -> jax.Array:
    """(C, ...) buffer rows -> (B * N, ...) grid tokens, zeros where a token is not held."""
    return jnp.take(a, self.slot, axis=0, mode='fill', fill_value=0)

  def put(self, flat: jax.Array, a: jax.Array) -> jax.Array:
    """`flat` (B * N, ...) with the held tokens replaced by the buffer rows `a` (C, ...)."""
    return flat.at[self.rows].set(a, mode='drop')

  def to_grid(self, a: jax.Array) -> jax.Array:
    """(C, F) buffer rows -> (B, N, F), zeros where a token is not held."""
    return self.spread(a).reshape((self.batch, self.tokens) + a.shape[1:])

  def from_grid(self, g: jax.Array) -> jax.Array:
    """(B, N, F) -> (C, F) buffer rows, zeros in empty rows."""
    return self.take(g.reshape((self.batch * self.tokens,) + g.shape[2:]))

  def per_image(self, a: jax.Array) -> jax.Array:
    """Sum of (C, F) rows per image -> (B,); empty rows count nowhere."""
    return jnp.sum(self.spread(jnp.sum(a, -1)).reshape((self.batch, self.tokens)), axis=1)


class _Buffer(NamedTuple):
  """The tokens being processed, in C rows."""
  rows: jax.Array          # (C,) flat grid index of each row (see TokenLayout)
  hs: halting.HaltState    # (C,) fields, out (C, D)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What every timestep of one `apply` call shares: sizes, the block and its inputs."""
  spec: ModelSpec
  block: Any                          # the backbone's encoder block (`network.block_module`)
  blocks: tuple[dict[str, Any], ...]  # block l's {'params', 'batch_stats'}, l = 0 .. L - 1
  u: jax.Array                        # (T, B * N, D) encoder input
  halt_params: halting.HaltParams     # gamma and beta of the halting score
  batch: int
  caps: tuple[int, ...]               # buffer capacities, largest (B * N) first
  stats_shape: Any                    # shapes and dtypes of one block's stats

  @property
  def pool(self) -> int:
    return self.batch * self.spec.num_tokens

  @property
  def spatial(self) -> bool:
    """Spatial halting restarts every timestep; the other modes only ever halt more tokens."""
    return self.spec.halt.mode == 'spatial'

  def grid(self, a: jax.Array) -> jax.Array:
    """(B * N, ...) -> (B, N, ...)."""
    return a.reshape((self.batch, self.spec.num_tokens) + a.shape[1:])

  def flat(self, a: jax.Array) -> jax.Array:
    """(B, N, ...) -> (B * N, ...)."""
    return a.reshape((self.pool,) + a.shape[2:])

  def per_token(self, fn, membranes: dict[str, jax.Array], *others) -> dict[str, jax.Array]:
    """`fn` applied to the per-token membranes (with the matching entries of `others`); the
    membranes of one neuron per image or per batch (`shared_membranes`) pass unchanged."""
    shared = shared_membranes(self.spec)
    return {k: v if k in shared else fn(v, *(o[k] for o in others))
            for k, v in membranes.items()}


def shared_membranes(spec: ModelSpec) -> tuple[str, ...]:
  """Block membranes that are not one per token, so they stay out of the token buffer: SDT's
  talking-heads LIF (one per image and channel), QKFormer's proj_lif run over the batch."""
  if spec.backbone == 'sdt':
    return sdt.IMAGE_MEMBRANES
  return ('proj_lif',) if spec.proj_lif_over_batch else ()


def _take_rows(buf: _Buffer, idx: jax.Array) -> _Buffer:
  return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), buf)


def _write_home(home_hs: halting.HaltState, buf: _Buffer,
                lay: TokenLayout) -> halting.HaltState:
  """The halting state of the buffer's tokens written into the (B * N,) grid state."""
  return jax.tree.map(lay.put, home_hs, buf.hs)


def _make_plan(model: STAS, variables: dict[str, Any], images: jax.Array,
               fractions: Sequence[float]) -> tuple[_Plan, dict[str, jax.Array]]:
  """The patch embedding (run once, densely), the per-block parameters and the sizes."""
  spec = model.spec
  T, N, D = spec.timesteps, spec.num_tokens, spec.dim
  u, sps_aux = model.apply(variables, images, False, method=STAS.embed)
  gamma, beta = model.apply(variables, method=STAS.halting_params)
  stacked = {k: variables[k]['encoder']['blocks']['block'] for k in ('params', 'batch_stats')}
  block = block_module(spec)(spec, train=False)
  batch = images.shape[0]
  pool = batch * N
  caps = capacities(pool, tuple(fractions))
  u = u.reshape((T, pool, D))
  blocks = tuple(jax.tree.map(lambda a, l=l: a[l], stacked) for l in range(spec.encoder_depth))
  stats_shape = jax.eval_shape(lambda: block.apply(
      blocks[0], u[0].reshape((batch, N, D)), jnp.ones((batch, N)),
      initial_membranes(spec, batch))[2])
  plan = _Plan(spec=spec, block=block, blocks=blocks, u=u,
               halt_params=halting.HaltParams(gamma, beta), batch=batch, caps=caps,
               stats_shape=stats_shape)
  return plan, sps_aux


def _run_block(plan: _Plan, lay: TokenLayout, params, z, hs: halting.HaltState, membranes):
  """One block on the buffer rows: z (C, D), its per-token LIF membranes in grid layout
  (B * N, width)."""
  if lay.rows.shape[0] == plan.pool:  # the full buffer is the grid in order: no gathers
    z, membranes, stats = plan.block.apply(params, plan.grid(z), plan.grid(hs.mask),
                                           plan.per_token(plan.grid, membranes))
    return plan.flat(z), plan.per_token(plan.flat, membranes), stats
  held = plan.per_token(lay.take, membranes)
  z, held, stats = plan.block.apply(params, z, hs.mask, held, lay)
  return z, plan.per_token(lay.put, membranes, held), stats


def _skip_block(plan: _Plan, z, hs: halting.HaltState, membranes):
  """Every token has halted: the block would change nothing, and its stats are zero."""
  del hs
  return z, membranes, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), plan.stats_shape)


def _record(rec: dict[str, Any], cell: dict[str, Any], index) -> dict[str, Any]:
  """`rec` (T * L, ...) with row `index` (raster order of (t, l)) set to `cell`."""
  return jax.tree.map(lambda r, y: jax.lax.dynamic_update_index_in_dim(r, y, index, 0),
                      rec, cell)


def _run_timestep(plan: _Plan, lay: TokenLayout, t, buf: _Buffer, membranes, rec, run):
  """The L blocks at timestep t on the buffer rows; `membranes` holds every token's LIF
  membranes, block by block, in grid layout.

  Returns the next while-loop carry (t + 1, buffer, membranes, records, rows run).
  """
  spec = plan.spec
  full = buf.rows.shape[0] == plan.pool
  hs = halting.reset_for_timestep(buf.hs) if plan.spatial else buf.hs
  z = plan.u[t] if full else lay.take(plan.u[t])
  on_grid = (lambda a: a) if full else lay.spread
  new_membranes = []
  for l, params in enumerate(plan.blocks):
    pending = jnp.any(hs.mask > 0)
    z, block_membranes, stats = jax.lax.cond(
        pending, functools.partial(_run_block, plan, lay, params),
        functools.partial(_skip_block, plan), z, hs, membranes[l])
    run = run + pending * buf.rows.shape[0]
    new_membranes.append(block_membranes)
    active = hs.mask
    position = halting.CellPosition.at(t, l, spec.timesteps, spec.encoder_depth)
    hs, weight = halting.cell_update(spec.halt, hs, z, position, plan.halt_params)
    cell = {'active': on_grid(active), 'weight': on_grid(weight), 'stats': stats}
    if spec.backbone == 'sdt':  # the head LIF's input at this timestep (sdt.step_weight)
      step_w = sdt.step_weight(spec.halt.mode, weight, position.last_block, spec.timesteps)
      cell['readout'] = sdt.step_readout(plan.grid(on_grid(z)), plan.grid(on_grid(step_w)))
    rec = _record(rec, cell, t * spec.encoder_depth + l)
  return t + 1, _Buffer(buf.rows, hs), tuple(new_membranes), rec, run


def _run_phases(plan: _Plan, i: int, t, buf: _Buffer, home_hs: halting.HaltState, membranes,
                rec, run):
  """Runs timesteps t.. in capacity caps[i] while the active tokens need it, then smaller.

  Returns (timesteps run, grid halting state, records, rows run).
  """
  steps = plan.spec.timesteps
  smaller = plan.caps[i + 1] if i + 1 < len(plan.caps) else 0
  lay = TokenLayout.of_rows(buf.rows, plan.batch, plan.spec.num_tokens)

  def more(carry):
    t, buf = carry[:2]
    pending = jnp.sum(buf.hs.mask > 0) > smaller
    # Spatial halting re-activates every token at each timestep: it never shrinks.
    return (t < steps) & (True if plan.spatial else pending)

  t, buf, membranes, rec, run = jax.lax.while_loop(
      more, lambda c: _run_timestep(plan, lay, *c), (t, buf, membranes, rec, run))
  home_hs = _write_home(home_hs, buf, lay)
  if not smaller or plan.spatial:
    return t, home_hs, rec, run

  def compact():
    order = jnp.argsort(buf.hs.mask <= 0, stable=True)[:smaller]
    return _run_phases(plan, i + 1, t, _take_rows(buf, order), home_hs, membranes, rec, run)

  return jax.lax.cond(t < steps, compact, lambda: (t, home_hs, rec, run))


def _initial_state(plan: _Plan):
  """(full buffer, grid halting state, membranes, records) before the first timestep."""
  spec = plan.spec
  cells, pool = spec.timesteps * spec.encoder_depth, plan.pool
  hs0 = jax.tree.map(plan.flat, halting.init_state(plan.batch, spec.num_tokens, spec.dim))
  mem0 = tuple(plan.per_token(plan.flat, initial_membranes(spec, plan.batch))
               for _ in range(spec.encoder_depth))
  start = _Buffer(jnp.arange(pool, dtype=jnp.int32), hs0)
  rec0 = {'active': jnp.zeros((cells, pool), jnp.float32),
          'weight': jnp.zeros((cells, pool), jnp.float32),
          'stats': jax.tree.map(lambda s: jnp.zeros((cells,) + s.shape, s.dtype),
                                plan.stats_shape)}
  if spec.backbone == 'sdt':
    rec0['readout'] = jnp.zeros((cells, plan.batch, spec.dim), jnp.float32)
  return start, hs0, mem0, rec0


def apply(model: STAS, variables: dict[str, Any], images: jax.Array,
          fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[jax.Array, dict[str, Any]]:
  """Eval-mode forward pass that skips halted work; same outputs as `model.apply`.

  Args:
    model: the network (`stas_jax.model.network.create_model`).
    variables: {'params', 'batch_stats'}.
    images: (B, H, W, C) normalised images.
    fractions: buffer capacities as fractions of the batch's token count B * N.

  Returns:
    (logits, aux) with the dense path's `active`, `cell_weight`, `ponder`, `block_stats`,
    `sps_stats` (cells never run are inactive with zero statistics), plus `timesteps_run`, the
    number of timesteps in which any block ran, and `rows_ratio`, the share of the grid's
    B * N * T * L token-cells that went through a block (padding rows of the buffer included):
    the work done, which the token ratio bounds from below.
  """
  plan, sps_aux = _make_plan(model, variables, images, fractions)
  start, hs0, mem0, rec0 = _initial_state(plan)
  timesteps_run, home_hs, rec, rows_run = _run_phases(plan, 0, 0, start, hs0, mem0, rec0,
                                                      jnp.int32(0))
  T, L, N = plan.spec.timesteps, plan.spec.encoder_depth, plan.spec.num_tokens
  cell_grid = (T, L, plan.batch, N)
  step_readouts = None
  if 'readout' in rec:
    step_readouts = jnp.sum(rec['readout'].reshape((T, L) + rec['readout'].shape[1:]), axis=1)
  logits, head_stats = model.apply(variables, plan.grid(home_hs.out), step_readouts,
                                   method=STAS.head_logits)
  extra = {'head_stats': {'head_lif': head_stats['head_lif']}} if head_stats else {}
  return logits, forward_aux(
      rec['active'].reshape(cell_grid), rec['weight'].reshape(cell_grid), plan.grid(home_hs.rho),
      jax.tree.map(lambda a: a.reshape((T, L) + a.shape[1:]), rec['stats']), sps_aux,
      timesteps_run=timesteps_run, rows_ratio=rows_run / (T * L * plan.pool), **extra)
