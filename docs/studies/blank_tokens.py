"""Halting of blank and digit tokens in a trained run: cells processed, halting score, spikes.

A token is blank when every pixel of its patch holds the minimum value of the model's input
(the background). Prints, for blank and for digit tokens of the first test batch: the (t, l)
cells processed per token, the mean halting score h over all T x L cells, and the
encoder-input spikes per token per timestep.

  PYTHONPATH=. python docs/studies/blank_tokens.py runs/study_ts2/isps-spatiotemporal/seed0
"""
import sys


import einops
import numpy as np


def blank_tokens(images: np.ndarray, patch_size: int) -> np.ndarray:
  """(B, H, W) model inputs -> (B, N) bool: the patch holds only the batch's minimum value.

  Tokens are numbered in raster order of the (H / p) x (W / p) patch grid.
  """
  peak = einops.reduce(images, 'b (gh p) (gw q) -> b (gh gw)', 'max', p=patch_size, q=patch_size)
  return peak <= images.min() + 1e-6


def group_stats(active: np.ndarray, h: np.ndarray, spikes: np.ndarray,
                group: np.ndarray) -> dict[str, float]:
  """Means over the tokens of `group` (B, N): cells processed (active (T, L, B, N) summed over
  the cells), halting score h (T, L, B, N) over all cells, encoder-input spikes (B, N)."""
  return {'cells': float(active[:, :, group].sum((0, 1)).mean()),
          'h': float(h[:, :, group].mean()),
          'spikes': float(spikes[group].mean())}


def main(workdir: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from stas_jax.train import evaluation  # pylint: disable=g-import-not-at-top
  from stas_jax.model import halting  # pylint: disable=g-import-not-at-top
  from stas_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from stas_jax.train import run_files  # pylint: disable=g-import-not-at-top
  from stas_jax.train import steps  # pylint: disable=g-import-not-at-top
  config = run_files.load_config(workdir)
  data = pipeline.create_datasets(config, process_index=0, process_count=1)
  model, variables, _ = evaluation.restore(config, workdir)
  ctx = steps.StepContext(config=config, mean=data.mean, std=data.std,
                          num_classes=data.num_classes)
  batch = next(iter(evaluation.eval_batches(data.make_eval_iter(), 1)))
  images, _ = evaluation.model_inputs(batch, ctx)
  forward = jax.jit(lambda v, x: evaluation.forward(model.apply, v, x, config, capture=True))
  _, aux = forward(variables, images)
  keep = np.asarray(batch['mask']) > 0
  blank = blank_tokens(np.asarray(images)[keep, ..., 0], config.model.patch_size)
  hp = config.model.halt
  gamma, beta = model.apply(variables, method=model.halting_params)
  z = np.asarray(aux['block_outputs'])[:, :, keep]                  # (T, L, B, N, D)
  h = np.asarray(halting.halting_score(z, gamma, beta, hp.channel))
  active = np.asarray(aux['active'])[:, :, keep]                    # (T, L, B, N)
  spikes = np.asarray(aux['block_inputs'])[0, 0][keep].sum(-1)      # (B, N)
  print(f'{len(blank)} images, {blank.shape[1]} tokens each, blank share {blank.mean():.3f}')
  for name, group in (('blank', blank), ('digit', ~blank)):
    s = group_stats(active, h, spikes, group)
    print(f"{name}: cells processed per token {s['cells']:.2f} of "
          f"{active.shape[0] * active.shape[1]}, mean h per cell {s['h']:.3f}, "
          f"encoder-input spikes per token per timestep {s['spikes']:.1f}")


if __name__ == '__main__':
  main(sys.argv[1])
