"""Study config for `stas_jax.ablate` on the offline demo (base config: configs/demo.py): the
{SPS, I-SPS} x {none, spatial, temporal, spatiotemporal} grid, every row with seeds 0, 1, 2 at
the demo's own budget (14 epochs of batch 64), mean +- std in the table.

Commands (README "Studies"):
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --out=runs/study --rows=sps-none,isps-none,isps-spatial,isps-temporal,isps-spatiotemporal
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --out=runs/study                                       # the whole grid, 24 runs

Rerunning reuses the finished runs, so the second command adds the 9 runs the first lacks.
Measured (2-core CPU, 2026-12-03, the first command, 15 runs): Spikformer (sps-none) 98.37 +-
0.12 % at 7.04 +- 0.31 uJ per image; STAS (isps-spatiotemporal, the demo's tail) 97.13 +- 0.68 %
at 3.90 +- 0.19 uJ (44.5 % less energy, 1.2 points less accurate); isps-none 97.77 +- 0.38 % at
5.17 uJ; the rest in the README table. An I-SPS run takes about 6 minutes with its evaluation
alone on the machine, an SPS run about 20 (its patch-embedding tail runs T times).
"""
from stas_jax import ablate


def get_config():
  study = ablate.default_study()
  study.seeds = (0, 1, 2)
  study.t_sweep = ()
  return study
