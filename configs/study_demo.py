"""Study config for `stas_jax.ablate` on the offline demo (base config: configs/demo.py): the
{SPS, I-SPS} x {none, spatial, temporal, spatiotemporal} grid, every row with seeds 0, 1, 2 at
the demo's own budget (14 epochs of batch 64), mean +- std in the table.

Commands (README "Studies"):
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --out=runs/study --rows=sps-none,isps-none,isps-spatial,isps-temporal,isps-spatiotemporal
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --out=runs/study                                       # the whole grid, 24 runs

Rerunning reuses the finished runs, so the second command adds the 9 runs the first lacks.
Measured (2-core CPU, 2026-12-02, the first command, 15 runs): Spikformer (sps-none) 98.37 +-
0.12 % at 7.04 +- 0.31 uJ per image; STAS (isps-spatiotemporal) 95.97 +- 0.45 % at 3.16 +- 0.14
uJ (55 % less energy, 2.4 points less accurate); isps-temporal 96.63 +- 0.40 % at 3.22 +- 0.10
uJ, the best I-SPS row; the rest in the README table. An I-SPS run takes about 5 minutes alone
on the machine, an SPS run about twice that (its patch-embedding tail runs T times).
"""
from stas_jax import ablate


def get_config():
  study = ablate.default_study()
  study.seeds = (0, 1, 2)
  study.t_sweep = ()
  return study
