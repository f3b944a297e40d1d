"""ACT token halting over the (timestep, block) grid: scores, accumulation, readout, losses.

Pure functions (spec sections 5-6); the model threads `HaltState` through its two scans.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MODES = ('none', 'spatial', 'temporal', 'spatiotemporal')
# The distribution prior's two forms (`model.halt.prior`, spec section 6): 'act_weight' puts a
# Gaussian over the raster order of the scoring cells on the per-cell ACT weight; 'avit' is
# A-ViT's form: the per-cell mean of the raw halting score h, with a Gaussian over the
# timesteps on the last-block cells (zero target elsewhere).
PRIORS = ('act_weight', 'avit')


class HaltState(NamedTuple):
  """Per-token halting carry.

  Attributes:
    c: cumulative halting score (B, N).
    r: remainder R, starts at 1 (B, N).
    rho: ponder cost (B, N).
    out: halting-weighted output accumulator (B, N, D).
    mask: 1 while the token is processed, 0 once halted (B, N).
  """
  c: jax.Array
  r: jax.Array
  rho: jax.Array
  out: jax.Array
  mask: jax.Array


class HaltParams(NamedTuple):
  """What the halting score and mask read besides the state (`cell_update`).

  Attributes:
    gamma, beta: h = sigmoid(gamma * z[channel] + beta); scalars, parameters if learnable.
    temperature: the soft-mask temperature (traced, see `act_step`); None: the hard mask.
  """
  gamma: jax.Array
  beta: jax.Array
  temperature: jax.Array | None = None


class CellPosition(NamedTuple):
  """Where a grid cell (t, l) sits in the (T, L) grid; `at` builds it from t and l.

  Attributes:
    last_block: (traced) bool, l = L - 1.
    last_cell: (traced) bool, (t, l) = (T - 1, L - 1).
    timesteps: T (static).
  """
  last_block: jax.Array
  last_cell: jax.Array
  timesteps: int

  @classmethod
  def at(cls, t, l, timesteps: int, depth: int) -> 'CellPosition':
    last_block = l == depth - 1
    return cls(last_block, last_block & (t == timesteps - 1), timesteps)


def init_state(batch: int, tokens: int, dim: int, dtype=jnp.float32) -> HaltState:
  """Fresh state: nothing accumulated, every token active."""
  zeros = jnp.zeros((batch, tokens), dtype)
  ones = jnp.ones((batch, tokens), dtype)
  return HaltState(c=zeros, r=ones, rho=zeros, out=jnp.zeros((batch, tokens, dim), dtype),
                   mask=ones)


def halting_score(z: jax.Array, gamma, beta, channel: int) -> jax.Array:
  """h = sigmoid(gamma * z[..., channel] + beta); z (B, N, D) -> (B, N)."""
  return jax.nn.sigmoid(gamma * z[..., channel] + beta)


def hard_mask(c: jax.Array, eps: float) -> jax.Array:
  """1 for tokens whose cumulative score is still below 1 - eps."""
  return (c < 1.0 - eps).astype(c.dtype)


def soft_mask(c: jax.Array, eps: float, temperature: float) -> jax.Array:
  """Differentiable relaxation of `hard_mask`; tends to it as temperature -> 0."""
  return jax.nn.sigmoid((1.0 - eps - c) / temperature)


def act_step(state: HaltState, z: jax.Array, h: jax.Array, eps: float, temperature=None,
             final=False) -> tuple[HaltState, jax.Array]:
  """One ACT accumulation at a grid cell (spec section 5, step 3).

  Tokens still active add h to c. Those that reach 1 - eps now contribute their remainder R
  (ACT weight R, ponder += R); the others contribute h (ponder += 1) and R -= h.

  Args:
    state: carry before this cell.
    z: block output at this cell (B, N, D).
    h: halting score at this cell (B, N).
    eps: ACT epsilon.
    temperature: None for the hard mask (no gradient through it); otherwise a (possibly traced)
      scalar: > 0 uses the soft relaxation `soft_mask`, 0 the hard mask.
    final: (traced) bool, the last cell of the ACT: every active token halts here.

  Returns:
    (new state, ACT weight (B, N) given to z at this cell).
  """
  m = state.mask
  c = state.c + m * h
  hard = hard_mask(c, eps)
  if temperature is None:
    still = hard
  else:
    soft = soft_mask(c, eps, jnp.maximum(temperature, 1e-6))
    still = jnp.where(temperature > 0, soft, hard)
  still = jnp.where(final, 0.0, still)
  reached = 1.0 - still
  weight = m * (reached * state.r + still * h)
  out = state.out + z * weight[..., None]
  rho = state.rho + m * (reached * state.r + still)
  r = state.r - m * still * h
  new_mask = m * still
  if temperature is None:
    new_mask = jax.lax.stop_gradient(new_mask)
  else:
    new_mask = jnp.where(temperature > 0, new_mask, jax.lax.stop_gradient(new_mask))
  return HaltState(c=c, r=r, rho=rho, out=out, mask=new_mask), weight


def cell_update(hp, state: HaltState, z: jax.Array, position: CellPosition,
                params: HaltParams) -> tuple[HaltState, jax.Array]:
  """The halting update of grid cell (t, l) for the mode `hp.mode` (spec section 5).

  none: no halting; the readout is the mean over timesteps of the last block's output.
  spatiotemporal: one ACT over the raster order of the whole grid, h = 1 at (T, L).
  spatial: a fresh ACT over the blocks of each timestep (h = 1 at l = L; the caller resets the
    state with `reset_for_timestep`), its outputs averaged over time.
  temporal: scored once per timestep after block L, h = 1 at (T, L).

  Args:
    hp: the halting spec (`ModelSpec.halt`): mode, channel, eps.
    state: carry before the cell.
    z: the block's output (B, N, D).
    position: where the cell sits in the grid (`CellPosition.at`).
    params: gamma, beta and the soft-mask temperature (`HaltParams`).

  Returns:
    (new state, ACT weight (B, N) of this cell's output in the readout).
  """
  last_block, last_cell, timesteps = position
  if hp.mode == 'none':
    weight = jnp.broadcast_to(last_block / timesteps, state.mask.shape).astype(z.dtype)
    return state._replace(out=state.out + z * weight[..., None],
                          rho=state.rho + state.mask), weight
  h = halting_score(z, params.gamma, params.beta, hp.channel)
  temperature = params.temperature
  if hp.mode == 'spatiotemporal':
    return act_step(state, z, jnp.where(last_cell, 1.0, h), hp.eps, temperature, last_cell)
  if hp.mode == 'spatial':
    return act_step(state, z / timesteps, jnp.where(last_block, 1.0, h), hp.eps, temperature,
                    last_block)
  new_state, weight = act_step(state, z, jnp.where(last_cell, 1.0, h), hp.eps, temperature,
                               last_cell)
  new_state = jax.tree.map(lambda a, b: jnp.where(last_block, a, b), new_state, state)
  return new_state, jnp.where(last_block, weight, 0.0)


def reset_for_timestep(state: HaltState) -> HaltState:
  """Spatial mode: each timestep starts a fresh ACT over the blocks; output and ponder persist."""
  fresh = jnp.zeros_like(state.c)
  return state._replace(c=fresh, r=jnp.ones_like(state.r), mask=jnp.ones_like(state.mask))


def readout(out: jax.Array) -> jax.Array:
  """Token mean of the accumulated output: (B, N, D) -> (B, D)."""
  return jnp.mean(out, axis=1)


def scoring_cells(mode: str, timesteps: int, depth: int) -> np.ndarray:
  """(T, L) static bool array: the cells at which a mode computes a halting score."""
  if mode not in MODES:
    raise ValueError(f'unknown halting mode {mode!r}; choose one of {MODES}')
  if mode in ('spatial', 'spatiotemporal'):
    return np.ones((timesteps, depth), bool)
  # temporal scores after the last block; none takes its output there
  cells = np.zeros((timesteps, depth), bool)
  cells[:, -1] = True
  return cells


def ponder_loss(rho: jax.Array, timesteps: int, depth: int) -> jax.Array:
  """mean(rho) / (T * L): the ponder cost normalised to the grid size."""
  return jnp.mean(rho) / (timesteps * depth)


def gaussian_target(num_cells: int, centre: float, sigma: float) -> jax.Array:
  """Normalised Gaussian over the cell index 0..num_cells-1, centred at centre * num_cells."""
  idx = jnp.arange(num_cells, dtype=jnp.float32)
  mu = centre * num_cells
  g = jnp.exp(-0.5 * ((idx - mu) / sigma) ** 2)
  return g / jnp.sum(g)


def halting_distribution(cell_values: jax.Array, cells: jax.Array) -> jax.Array:
  """Batch-and-token mean of a per-cell quantity over the scoring cells, normalised, clipped.

  Args:
    cell_values: (T, L, B, N): the ACT weight per cell (prior 'act_weight') or the raw halting
      score h per cell (prior 'avit').
    cells: (T, L) static bool scoring cells (see `scoring_cells`).

  Returns:
    p over the scoring cells in raster order, shape (num scoring cells,).
  """
  per_cell = jnp.mean(cell_values, axis=(2, 3)).reshape(-1)
  p = per_cell[np.flatnonzero(np.asarray(cells))]
  p = p / jnp.maximum(jnp.sum(p), 1e-12)
  return jnp.clip(p, 0.01, 0.99)


def prior_target(cells: np.ndarray, prior: str, centre: float, sigma: float) -> jax.Array:
  """The prior's target over the scoring cells in raster order (see `PRIORS`).

  'act_weight': `gaussian_target` over the scoring cells, centred at centre * (their number).
  'avit': `gaussian_target` over the T timesteps, centred at centre * T, on the cells of the
  last block; the other scoring cells get target 0.
  """
  cells = np.asarray(cells)
  flat = np.flatnonzero(cells)
  if prior == 'act_weight':
    return gaussian_target(flat.size, centre, sigma)
  if prior != 'avit':
    raise ValueError(f'unknown distribution prior {prior!r}; choose one of {PRIORS}')
  timesteps, depth = cells.shape
  on_grid = jnp.zeros((timesteps, depth)).at[:, depth - 1].set(
      gaussian_target(timesteps, centre, sigma))
  return on_grid.reshape(-1)[flat]


def distribution_prior_loss(cell_values: jax.Array, cells: np.ndarray, centre: float,
                            sigma: float, prior: str = 'act_weight') -> jax.Array:
  """KL(target || p) between the prior's target and the distribution of `cell_values`.

  Args:
    cell_values: (T, L, B, N) ACT weights ('act_weight') or raw halting scores ('avit').
    cells: (T, L) static bool scoring cells.
    centre, sigma: the Gaussian's centre (a fraction, see `prior_target`) and width.
    prior: one of `PRIORS`.
  """
  p = halting_distribution(cell_values, cells)
  target = prior_target(cells, prior, centre, sigma)
  return jnp.sum(target * (jnp.log(jnp.maximum(target, 1e-12)) - jnp.log(p)))


def temporal_similarity(block_inputs: jax.Array, active: jax.Array = None) -> jax.Array:
  """Per block, mean cosine similarity of block inputs between consecutive timesteps.

  The paper's Fig. 2(e) quantity: I-SPS makes the encoder input identical across time.

  Args:
    block_inputs: (T, L, B, N, D) inputs of each block at each timestep.
    active: optional (T, L, B, N) mask; only tokens active at both steps count.

  Returns:
    (L, T - 1) mean cosine similarity between step t and t + 1, per block.
  """
  a, b = block_inputs[:-1], block_inputs[1:]
  dot = jnp.sum(a * b, axis=-1)
  na = jnp.linalg.norm(a, axis=-1)
  nb = jnp.linalg.norm(b, axis=-1)
  both_zero = (na == 0) & (nb == 0)
  cos = jnp.where(both_zero, 1.0, dot / jnp.maximum(na * nb, 1e-12))
  if active is None:
    w = jnp.ones(cos.shape, cos.dtype)
  else:
    w = active[:-1] * active[1:]
  sim = jnp.sum(cos * w, axis=(2, 3)) / jnp.maximum(jnp.sum(w, axis=(2, 3)), 1.0)
  return sim.T
