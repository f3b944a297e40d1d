"""Study config for `stas_jax.ablate` on the offline demo (base config: configs/demo.py): the
{SPS, I-SPS} x {none, spatial, temporal, spatiotemporal} grid, every row with seeds 0, 1, 2 at
the demo's own budget (14 epochs of batch 64), mean +- std in the table.

STAS as the demo trains it (LIF1 and LIF2 counting over 2 steps) against Spikformer, 5 seeds
(2026-12-07, AMD EPYC; an SPS run trained in about 11 minutes, an I-SPS run in about 5):
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --study_config.run_plots=False --out=runs/study_ts2 --rows=sps-none,isps-spatiotemporal \
      --seeds=0,1,2,3,4
gave Spikformer 98.26 +- 0.18 % at 7.03 +- 0.22 uJ and STAS 98.00 +- 0.31 % at 3.75 +- 0.16 uJ
(0.26 points down for 46.6 % less energy; seeds 0-2 alone 98.03 +- 0.25 % at 3.66 uJ against
98.37 +- 0.12 % at 7.04, 0.33 points down for 47.9 % less); with --seeds=0,1,2,3,4,5,6,7
(Spikformer runs of about 13 minutes), Spikformer 98.15 +- 0.27 % at 6.96 +- 0.20 uJ and STAS
97.79 +- 0.48 % at 3.65 +- 0.19 uJ (0.36 points down for 47.6 % less).

The grid with the demo default's I-SPS rows, seeds 0-2 (2026-12-07, AMD EPYC; sps-none and
isps-spatiotemporal are the runs above, copied into the --out; the other I-SPS runs trained in
about 5 minutes each):
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --study_config.run_plots=False --out=runs/study_grid_ts2 \
      --rows=sps-none,isps-none,isps-spatial,isps-temporal,isps-spatiotemporal
gave isps-none 97.90 +- 0.50 % at 5.09 uJ (27.7 % less than Spikformer), isps-spatial
97.97 +- 0.21 % at 5.23 uJ (halts nothing), isps-temporal 97.43 +- 0.21 % at 3.82 uJ and
isps-spatiotemporal (STAS) 98.03 +- 0.25 % at 3.66 uJ (47.9 % less, 0.33 points down); the SPS
rows with halting are the 2026-12-03 runs below. Half the ponder weight
(--config.model.halt.alpha_p=0.0025 --out=runs/study_ts2_p0025 --rows=isps-spatiotemporal
--seeds=0,1,2,3,4,5,6,7) gave 97.74 +- 0.23 % at 3.80 +- 0.17 uJ.

The halting options of ours, STAS row only, seeds 0-2 (2026-12-07, an Intel Xeon; an I-SPS run
trained in about 5 minutes):
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --study_config.run_plots=False --rows=isps-spatiotemporal \
      --config.model.halt.score=linear --out=runs/study_ts2_linear
gave (the learned linear score) 97.43 +- 0.15 % at 3.71 +- 1.10 uJ, token ratio 0.55 +- 0.37
(seeds 0 and 1 halt far more than the default, seed 2 hardly at all); with
--config.model.halt.alpha_p=0.0025 added (--out=runs/study_ts2_linear_p0025) 97.43 +- 0.21 %
at 4.32 +- 0.84 uJ, token ratio 0.80; with --config.model.halt.readout=rate in place of the
score (--out=runs/study_ts2_rate) 97.97 +- 0.21 % at 4.32 +- 0.37 uJ, token ratio 0.80 (as
accurate as the default, 38.6 % less energy than Spikformer instead of 47.9); and with
--config.model.halt.alpha_p=0.01 added to that (--out=runs/study_ts2_rate_p01) 97.83 +- 0.42 %
at 4.33 +- 0.22 uJ, token ratio 0.79.
The paper's score with a negative gamma, so that a silent token halts first
(--config.model.halt.gamma=-3.0 --config.model.halt.beta=0.0 --out=runs/study_ts2_neg), gave
97.77 +- 0.23 % at 3.93 +- 0.04 uJ, token ratio 0.49.
Twice the epochs for both arms (--config.num_epochs=28 --rows=sps-none,isps-spatiotemporal
--seeds=0,1,2 --out=runs/study_ts2_e28): STAS 98.23 +- 0.12 % at 3.14 uJ against Spikformer's
98.17 +- 0.12 % at 6.44 uJ (a STAS run about 11 minutes, a Spikformer run about 28).

Commands of the runs made before the 2-step tail (README "Studies"; they count over T = 4
steps, hence --config.model.isps.tail_steps=0; the 2026-12-03 grid's I-SPS rows count spikes
in LIF1 only, the demo default until 2026-12-04; TAIL stands for
--config.model.isps.tail=multi_step,single_step,single_step,single_step
--config.model.isps.tail_steps=0):
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py TAIL \
      --out=runs/study --rows=sps-none,isps-none,isps-spatial,isps-temporal,isps-spatiotemporal
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py TAIL \
      --out=runs/study                                       # the whole grid, 24 runs
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --config.model.isps.tail_steps=0 --out=runs/study_ms2 --rows=isps-spatiotemporal

Rerunning reuses the finished runs, so the second command adds the 9 runs the first lacks
(`--study_config.run_plots=False` skips each run's own figures, minutes per SPS run).
Measured (2-core CPUs, 2026-12-03, all 24 runs; the first command on an AMD EPYC, the 9 SPS
runs with halting on an Intel Xeon, in another --out with --rows=sps-spatial,sps-temporal,
sps-spatiotemporal --study_config.run_plots=False): Spikformer (sps-none) 98.37 +- 0.12 % at
7.04 +- 0.31 uJ per image; STAS with the LIF1-counting tail (isps-spatiotemporal) 97.13 +- 0.68 %
at 3.90 +- 0.19 uJ (44.5 % less energy, 1.2 points less accurate); sps-spatiotemporal
97.53 +- 0.74 % at 5.18 uJ (26.4 % less, 0.8 points down); the rest in the README table. The
third command (LIF1 and LIF2 counting over 4 steps, 2026-12-04, AMD EPYC, with
--study_config.run_plots=False): 98.03 +- 0.70 % at
5.38 +- 0.31 uJ (23.6 % less, 0.33 points down). On the Xeon an SPS run trains in about 9.5
minutes and an I-SPS run in about 4, alone on the machine; on the EPYC an SPS run took about
20 minutes with its figures, an I-SPS run of the demo default 4.5 minutes without.

The energy loss on both arms, with LIF1 and LIF2 counting over 4 steps (every I-SPS command
below also takes --config.model.isps.tail_steps=0; 2026-12-06, AMD EPYC; an SPS run trained in
10-12 minutes, an I-SPS run in 4.1-4.6, without figures):
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --study_config.run_plots=False --config.energy_loss_weight=0.005 \
      --out=runs/study_e005 --rows=sps-none,isps-spatiotemporal --seeds=0,1,2,3,4
gave Spikformer 97.88 +- 0.36 % at 5.17 +- 0.16 uJ and STAS 98.14 +- 0.38 % at 4.41 +- 0.31 uJ
(14.6 % less than that Spikformer, 37.3 % less than the plain one); weights 0.006 and 0.007
(STAS row only, seeds 0-2) gave 97.63 +- 0.46 % at 4.06 uJ and 97.47 +- 0.32 % at 3.83 uJ.
Five seeds of the plain Spikformer and of STAS with twice the ponder weight (same day and
machine; an SPS run trained in 10.7-11.6 minutes, an I-SPS run in 4.2-4.8):
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --study_config.run_plots=False --out=runs/study_sps5 --rows=sps-none --seeds=0,1,2,3,4
  python -m stas_jax.ablate --config=configs/demo.py --study_config=configs/study_demo.py \
      --study_config.run_plots=False --config.energy_loss_weight=0.005 \
      --config.model.halt.alpha_p=0.01 --out=runs/study_e005_p01 --rows=isps-spatiotemporal \
      --seeds=0,1,2,3,4
gave 98.26 +- 0.18 % at 7.03 +- 0.22 uJ (seeds 0-2 repeat the grid's runs exactly) and
97.84 +- 0.18 % at 4.31 +- 0.39 uJ; with --config.energy_loss_weight=0.0055 (no alpha_p
override) --out=runs/study_e0055 --rows=isps-spatiotemporal --seeds=0,1,2,3,4, STAS gave
97.98 +- 0.24 % at 4.20 +- 0.18 uJ (I-SPS runs of 4.5-5.1 minutes on a busier host); with
the loss at 0.0055 warmed up from 0 over the first 434 steps
(--config.energy_loss_warmup_steps=434, --out=runs/study_e0055_w434, seeds 0-2,
2026-12-07), 98.20 +- 0.36 % at 4.62 +- 0.44 uJ.
"""
from stas_jax import ablate


def get_config():
  study = ablate.default_study()
  study.seeds = (0, 1, 2)
  study.t_sweep = ()
  return study
