"""Smoke test: a tiny STAS (dim 16, depth 1, 2 heads, T = 2) for a few steps on the offline
MNIST demo data; used by the tests, and a quick check that an installation works.

Command:
  python train.py --config=configs/smoke.py --workdir=/tmp/stas_smoke

Runs 6 steps and evaluates on 2 test batches in well under a minute on a laptop CPU; the
accuracy is meaningless (about chance).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'mnist_demo'
  config.data.crop_padding = 2
  config.data.hflip = False
  config.data.mixup_alpha = 0.0
  config.data.label_smoothing = 0.0

  m = config.model
  m.in_channels = 1
  m.num_classes = 10
  m.dim = 16
  m.depth = 1
  m.heads = 2
  m.mlp_ratio = 2
  m.timesteps = 2
  m.patch_embed = 'isps'
  m.halt.mode = 'spatiotemporal'

  config.batch_size = 8
  config.eval_batch_size = 80
  config.steps_per_eval = 2
  config.num_train_steps = 6
  config.optim.learning_rate = 1e-3
  config.optim.warmup_epochs = 0
  config.log_every_steps = 2
  config.checkpoint_every_steps = 3
  return config
