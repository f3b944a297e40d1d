"""Halting of blank and digit tokens in a trained run: cells processed, halting score, spikes.

A token is blank when every pixel of its patch holds the background value of the model's
input. Prints, for blank and for digit tokens of the first test batch: the (t, l) cells
processed per token, the mean halting score h over all T x L cells, and the encoder-input
spikes per token per timestep.

  PYTHONPATH=. python docs/studies/blank_tokens.py runs/study_ts2/isps-spatiotemporal/seed0
"""
import sys

import jax
import numpy as np

from stas_jax import evaluation, halting, input_pipeline, run_files, steps


def main(workdir: str) -> None:
  config = run_files.load_config(workdir)
  data = input_pipeline.create_datasets(config, process_index=0, process_count=1)
  model, variables, _ = evaluation.restore(config, workdir)
  ctx = steps.StepContext(config=config, mean=data.mean, std=data.std,
                          num_classes=data.num_classes)
  batch = next(iter(evaluation.eval_batches(data.make_eval_iter(), 1)))
  images, _ = evaluation.model_inputs(batch, ctx)
  forward = jax.jit(lambda v, x: evaluation.forward(model.apply, v, x, config, capture=True))
  _, aux = forward(variables, images)
  keep = np.asarray(batch['mask']) > 0
  x = np.asarray(images)[keep, ..., 0]                               # (B, H, W)
  p, g = config.model.patch_size, x.shape[1] // config.model.patch_size
  patches = x.reshape(len(x), g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(len(x), g * g, -1)
  blank = patches.max(-1) <= x.min() + 1e-6                         # (B, N)
  hp = config.model.halt
  z = np.asarray(aux['block_outputs'])[:, :, keep]                  # (T, L, B, N, D)
  gamma, beta = ((variables['params']['halt_gamma'], variables['params']['halt_beta'])
                 if hp.learnable else (hp.gamma, hp.beta))
  h = np.asarray(halting.halting_score(z, gamma, beta, hp.channel))
  active = np.asarray(aux['active'])[:, :, keep]                    # (T, L, B, N)
  spikes = np.asarray(aux['block_inputs'])[0, 0][keep].sum(-1)      # (B, N)
  print(f'{len(x)} images, {g * g} tokens each, blank share {blank.mean():.3f}')
  for name, m in (('blank', blank), ('digit', ~blank)):
    print(f'{name}: cells processed per token {active[:, :, m].sum((0, 1)).mean():.2f} of '
          f'{active.shape[0] * active.shape[1]}, mean h per cell {h[:, :, m].mean():.3f}, '
          f'encoder-input spikes per token per timestep {spikes[m].mean():.1f}')


if __name__ == '__main__':
  main(sys.argv[1])
