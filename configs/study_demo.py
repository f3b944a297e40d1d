"""Study config for `python -m stas_jax.tools.ablate` on the offline demo (base config:
configs/demo.py): the {SPS, I-SPS} x {none, spatial, temporal, spatiotemporal} grid, every row
with seeds 0, 1, 2 at the demo's budget (14 epochs of batch 64), no timestep sweep.

Commands:
  python -m stas_jax.tools.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --out=runs/study                                       # the whole grid, 24 runs
  python -m stas_jax.tools.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --study_config.run_plots=False --out=runs/study_ts2 --rows=sps-none,isps-spatiotemporal \
      --seeds=0,1,2,3,4,5,6,7                                # the README's headline table

Expected: the tables of docs/studies/ablation_grid.md and docs/studies/stas_vs_spikformer.md,
each with its commit, machine and seeds. On 2 cores an I-SPS run trains in 4-5 minutes, an SPS
run in 10-13 (`--study_config.run_plots=False` skips each run's figures).
"""
from stas_jax.tools import ablate


def get_config():
  study = ablate.default_study()
  study.seeds = (0, 1, 2)
  study.t_sweep = ()
  return study
