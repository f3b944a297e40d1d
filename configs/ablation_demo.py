"""Ablation study on the offline demo data: configs/demo.py with a shorter per-run budget (2
epochs of batch 32, 250 steps), so that the 8 grid rows and the timestep sweep (11 runs for 12
rows) finish on a 2-core CPU. Only model.patch_embed, model.halt.mode and model.timesteps differ
between rows; each run is evaluated on the 1,000 test digits.

Command:
  python -m stas_jax.tools.ablate --config=configs/ablation_demo.py --out=runs/ablation

Expected: not measured with the current energy rule (earlier figures withdrawn, CHANGELOG.md): a
quick preview of docs/studies/ablation_grid.md at a seventh of its budget, with lower accuracies.
"""
from configs import demo


def get_config():
  config = demo.get_config()
  config.batch_size = 32
  # Unrolled scans step ~15% faster but compile ~2 minutes longer: a loss for 250-step runs.
  config.model.unroll_scans = False
  config.num_epochs = 2
  config.eval_every_epochs = 1000   # evaluate once, at the end (stas_jax.tools.evaluate reports)
  config.checkpoint_every_steps = 50
  config.log_every_steps = 25
  return config
