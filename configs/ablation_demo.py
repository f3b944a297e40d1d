"""Ablation study on the offline demo data: configs/demo.py with a shorter per-run budget, so
that the 8 grid rows and the timestep sweep (11 runs for 12 rows) finish on a 2-core CPU.

Command:
  python -m stas_jax.ablate --config=configs/ablation_demo.py --out=runs/ablation

Every row trains the demo model (measured with dim 96, depth 2, 4 heads, patch 8, 16 tokens)
for 2 epochs of batch 32 (250 steps; the demo's 1-epoch warm-up, then cosine decay) with the
same seed and augmentation, then evaluates on the 1,000 test digits; only model.patch_embed,
model.halt.mode and model.timesteps differ.

Expected: the ordering of the demo seed study in README "Studies" (configs/study_demo.py,
14 epochs) at a seventh of its budget, with lower accuracies: I-SPS rows well below SPS, and
halting rows below their halting-free ones in energy. Its figures of 2026-11-28 were made before
energy.py counted integrated inputs as spikes and are withdrawn; it has not been rerun since.
"""
from configs import demo


def get_config():
  config = demo.get_config()
  config.batch_size = 32
  # Unrolled scans step ~15% faster but compile ~2 minutes longer: a loss for 250-step runs.
  config.model.unroll_scans = False
  config.num_epochs = 2
  config.eval_every_epochs = 1000   # evaluate once, at the end (stas_jax.evaluate reports)
  config.checkpoint_every_steps = 50
  config.log_every_steps = 25
  return config
