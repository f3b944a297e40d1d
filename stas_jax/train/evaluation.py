"""The one evaluation path: eval inputs, the masked per-batch sums and their means, and the
restore of a trained run. The training loop (through `parallel`), `stas_jax.tools.evaluate` and
`benchmarks/bench.py` all use it, so every figure of a run has one name and one definition.

Metric names (means over the real examples of the split): 'top1', 'top5', 'loss',
'energy_mj', 'token_ratio', 'timesteps', 'energy_split_mj/<part>', 'sops/<group/layer>',
'firing_rates/<layer>' and 'count' (the number of examples).
"""
import os
from typing import Any, Iterable, Iterator

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from stas_jax.data import augment
from stas_jax.train import checkpoint
from stas_jax.model import energy
from stas_jax.model import network
from stas_jax.train import optim
from stas_jax.train import steps

GROUPS = ('energy_split_mj', 'sops', 'firing_rates')  # metric families '<group>/<name>'


def model_inputs(batch: dict[str, Any], ctx: steps.StepContext) -> tuple[jax.Array, jax.Array]:
  """Normalised images and one-hot targets of an eval batch (no augmentation)."""
  return augment.augment_batch(None, batch, ctx.config, epoch=0, mean=ctx.mean, std=ctx.std,
                               num_classes=ctx.num_classes, train=False)


def forward(apply_fn, variables: dict[str, Any], images: jax.Array,
            config: ml_collections.ConfigDict, capture: bool = False):
  """Eval-mode forward pass, (logits, aux); always the hard halting mask (temperature 0), also
  for a model trained with a soft one."""
  hard = {'halt_temperature': 0.0} if config.model.halt.soft_mask else {}
  return apply_fn(variables, images, train=False, capture=capture, **hard)


def masked_sums(logits: jax.Array, targets: jax.Array, batch: dict[str, jax.Array],
                aux: dict[str, Any], spec) -> dict[str, jax.Array]:
  """Sums over the real (mask 1) examples of a batch, so that batches and devices add up.

  Returns:
    Every metric of the module docstring as a sum over real examples ('firing_rates/<layer>':
    the batch's pooled rate, padding excluded, times its count), and 'count'.
  """
  labels = batch['label']
  mask = batch['mask'].astype(jnp.float32)
  _, top = lax.top_k(logits, min(5, logits.shape[-1]))
  e = energy.estimate(aux, spec, weights=mask)
  per_image = {
      'top1': (top[:, 0] == labels).astype(jnp.float32),
      'top5': jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32),
      'loss': optax.softmax_cross_entropy(logits, targets),
      'energy_mj': e['energy_mj'],
      'token_ratio': e['token_ratio'],
      'timesteps': e['timesteps'],
  }
  per_image.update({f'energy_split_mj/{k}': v for k, v in e['energy_split_mj'].items()})
  per_image.update({f'sops/{k}': v for k, v in e['sops'].items()})
  count = jnp.sum(mask)
  sums = {k: jnp.sum(v * mask) for k, v in per_image.items()}
  sums.update({f'firing_rates/{k}': v * count for k, v in e['firing_rates'].items()})
  sums['count'] = count
  return sums


def eval_step(state: steps.TrainState, batch: dict[str, jax.Array], *,
              ctx: steps.StepContext) -> dict[str, jax.Array]:
  """`masked_sums` of one eval batch; no collectives: the caller adds devices and batches."""
  images, targets = model_inputs(batch, ctx)
  logits, aux = forward(state.apply_fn, state.variables, images, ctx.config)
  return masked_sums(logits, targets, batch, aux, ctx.spec)


def eval_batches(batches: Iterable[dict[str, np.ndarray]],
                 max_batches: int = -1) -> Iterator[dict[str, np.ndarray]]:
  """The first `max_batches` batches (all if < 0)."""
  for i, batch in enumerate(batches):
    if 0 <= max_batches <= i:
      return
    yield batch


def add(totals: dict[str, Any] | None, sums: dict[str, Any]) -> dict[str, Any]:
  """Running sums over batches (on device: one transfer at the end)."""
  return sums if totals is None else jax.tree.map(jnp.add, totals, sums)


def means(totals: dict[str, Any] | None) -> dict[str, float]:
  """The metrics of the module docstring from summed batches."""
  if totals is None:
    raise ValueError('no evaluation batch (max_batches=0?)')
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = max(totals.pop('count'), 1.0)
  out = {k: v / count for k, v in totals.items()}
  out['count'] = count
  return out


def totals(sums_fn, batches: Iterable[dict[str, np.ndarray]], max_batches: int = -1) -> Any:
  """`sums_fn(batch)` added over the first `max_batches` batches (all if < 0), on device."""
  total = None
  for batch in eval_batches(batches, max_batches):
    total = add(total, sums_fn(batch))
  if total is None:
    raise ValueError('no evaluation batch (max_batches=0?)')
  return total


def run(sums_fn, batches: Iterable[dict[str, np.ndarray]], max_batches: int = -1
        ) -> dict[str, float]:
  """Means over the eval split of `sums_fn(batch)` (each example counted once via the mask)."""
  return means(totals(sums_fn, batches, max_batches))


def grouped(metrics: dict[str, float]) -> dict[str, Any]:
  """`means` with the metric families nested: {'energy_split_mj': {part: mJ}, ...}."""
  out = {k: v for k, v in metrics.items() if k.split('/')[0] not in GROUPS}
  for group in GROUPS:
    prefix = group + '/'
    out[group] = {k[len(prefix):]: metrics[k] for k in sorted(metrics) if k.startswith(prefix)}
  return out


WEIGHTS = ('raw', 'ema')  # which weights of a run to evaluate (`restore`)


class NoEMAWeightsError(ValueError):
  """The EMA weights of a run that keeps none (config.ema_decay = 0) were asked for."""


def check_weights(config: ml_collections.ConfigDict, weights: str, what: str) -> None:
  """Raises unless `weights` is one of `WEIGHTS` that runs of `config` keep.

  Raises:
    ValueError: an unknown `weights`.
    NoEMAWeightsError: 'ema' for a config without EMA; the message names `what` (the run).
  """
  if weights not in WEIGHTS:
    raise ValueError(f'weights={weights!r}; choose one of {WEIGHTS}')
  if weights == 'ema' and steps.ema_decay(config) == 0:
    raise NoEMAWeightsError(f'{what} has no EMA weights (config.ema_decay is 0): use '
                            '--weights=raw, or train with --config.ema_decay (e.g. 0.999)')


def restore(config: ml_collections.ConfigDict, workdir: str, weights: str = 'raw'
            ) -> tuple[network.STAS, dict[str, Any], int]:
  """The newest readable checkpoint of a run, for inference.

  Args:
    config: the run's config.
    workdir: the run directory.
    weights: 'raw' (the trained parameters and statistics) or 'ema' (their moving average,
      kept with `config.ema_decay` > 0).

  Returns:
    (model, {'params', 'batch_stats'} (and the token-ratio controller's state if any), step).

  Raises:
    FileNotFoundError: `workdir/checkpoints` holds no checkpoint.
    NoEMAWeightsError: weights='ema' for a run that keeps no EMA (`check_weights`).
    checkpoint.CheckpointError: checkpoints exist but none can be restored.
  """
  check_weights(config, weights, f'the run in {workdir}')
  ema = steps.ema_decay(config) > 0
  model = network.create_model(config.model)
  # The optimiser state only has to match in structure, so any schedule will do.
  tx = optim.create_optimizer(config, optax.constant_schedule(0.0))
  target = jax.eval_shape(lambda: steps.create_train_state(model, jax.random.key(0), tx,
                                                           ema=ema))
  directory = os.path.join(workdir, 'checkpoints')
  with checkpoint.Checkpointer(directory, async_save=False) as ckpt:
    restored = ckpt.restore_latest(target)
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {directory}')
  state, meta, step = restored
  state = steps.complete_restored(state, meta.get(checkpoint.MISSING_FIELDS_KEY, []))
  if weights == 'ema':
    state = state.ema_view()
  return model, state.variables, step
