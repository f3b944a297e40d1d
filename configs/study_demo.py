"""Study config for `stas_jax.ablate` on the offline demo (base config: configs/demo.py): the
{SPS, I-SPS} x {none, spatial, temporal, spatiotemporal} grid, every row with seeds 0, 1, 2 at
the demo's own budget (14 epochs of batch 64), mean +- std in the table.

Commands (README "Studies"):
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --out=runs/study --rows=sps-none,isps-spatiotemporal   # STAS vs Spikformer, 6 runs
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --out=runs/study                                       # the whole grid, 24 runs

Rerunning reuses the finished runs, so the second command adds the 18 runs the first lacks.
Measured (2-core CPU): see the README's "Studies" table; an SPS run takes about twice as long
as an I-SPS one.
"""
from stas_jax import ablate


def get_config():
  study = ablate.default_study()
  study.seeds = (0, 1, 2)
  study.t_sweep = ()
  # SPS vs I-SPS block-input similarity from the two rows the first command trains.
  study.similarity_rows = ('sps-none', 'isps-spatiotemporal')
  return study
