"""The training objective in one place: soft-target cross-entropy plus the halting losses.

loss = CE(logits, soft targets) + alpha_p * ponder + alpha_d * KL(prior || halting distribution)
(spec section 6), plus, when `config.energy_loss_weight` > 0, that weight times the estimated
energy per image in microjoules (`stas_jax.model.energy`, counted on the training batch; a study
option, not part of the paper's objective). Soft targets carry label smoothing and mixup/cutmix
from the input pipeline.
"""


import jax
import jax.numpy as jnp
import optax

from stas_jax.model import energy
from stas_jax.model import halting
from stas_jax.model.spec import ModelSpec


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over the batch of -sum(targets * log_softmax(logits)); targets (B, K) sum to 1."""
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def halt_loss_terms(aux: dict, spec: ModelSpec) -> dict[str, jax.Array]:
  """The two halting losses, unweighted, from what the model returned.

  Args:
    aux: the model's aux dict: `ponder` rho (B, N) and `cell_weight` (T, L, B, N), and with
      `model.halt.prior = 'avit'` (and halting on) `cell_score` (T, L, B, N).
    spec: the model spec (grid size, prior in `spec.halt`).

  Returns:
    {'ponder': mean rho / (T * L), 'distribution': KL(Gaussian prior || halting distribution)}.
  """
  hp = spec.halt
  cells = halting.scoring_cells(hp.mode, spec.timesteps, spec.depth)
  prior = hp.prior if hp.prior_reads_scores else 'act_weight'
  values = aux['cell_score'] if hp.prior_reads_scores else aux['cell_weight']
  return {
      'ponder': halting.ponder_loss(aux['ponder'], spec.timesteps, spec.depth),
      'distribution': halting.distribution_prior_loss(
          values, cells, hp.target_cell, hp.target_sigma, prior),
  }


def energy_term(aux: dict, spec: ModelSpec) -> jax.Array:
  """Batch mean of the estimated energy per image, in microjoules (`energy.estimate`).

  Differentiable: the spike sums it counts carry the surrogate gradients of the neurons that
  made them, so its gradient asks every LIF layer to fire less, each in proportion to the fan-out
  its spikes drive (conv0's and the head's MACs are constants).
  """
  return jnp.mean(energy.estimate(aux, spec)['energy_mj']) * 1e3


def total_loss(logits: jax.Array, targets: jax.Array, aux: dict, spec: ModelSpec,
               energy_weight: float | jax.Array = 0.0
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of the terms, and each term for logging.

  With halting off (mode none) the halting losses do not count.

  Args:
    logits: (B, K).
    targets: soft targets (B, K).
    aux: the model's aux dict (needs `ponder` and `cell_weight`, see `halt_loss_terms`, and
      with `energy_weight` the sums `energy.estimate` reads).
    spec: the model spec (halting loss weights in `spec.halt`).
    energy_weight: weight of `energy_term` (per microjoule): a number (0 leaves the term out of
      the graph) or a traced scalar (the warm-up of `optim.energy_weight_schedule`; the term is
      computed whatever its value).

  Returns:
    (scalar loss, {'loss', 'ce', 'ponder', 'distribution'} and, with energy_weight > 0,
    'energy' in microjoules per image).
  """
  traced = isinstance(energy_weight, jax.Array)
  if not traced and energy_weight < 0:
    raise ValueError(f'energy_loss_weight must be >= 0, got {energy_weight}')
  ce = soft_cross_entropy(logits, targets)
  terms = halt_loss_terms(aux, spec)
  loss = ce
  if spec.halt.mode != 'none':
    loss = loss + spec.halt.alpha_p * terms['ponder'] + spec.halt.alpha_d * terms['distribution']
  out = {'ce': ce, 'ponder': terms['ponder'], 'distribution': terms['distribution']}
  if traced or energy_weight > 0:
    out['energy'] = energy_term(aux, spec)
    loss = loss + energy_weight * out['energy']
  return loss, {'loss': loss, **out}
