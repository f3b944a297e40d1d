"""Baseline: Spike-driven Transformer v1, SDT-2-512, on CIFAR-10 with its official recipe, T = 4.

Command:
  python train.py --config=configs/cifar10_sdt.py --workdir=runs/cifar10_sdt

Recipe of BICLab/Spike-Driven-Transformer `conf/cifar10/2_512_300E_t4.yml` (docs/training.md):
300 epochs, batch 64, AdamW 3e-4 (warm-up 20 epochs from 1e-6, cosine to 1e-5), weight decay
0.06, label smoothing 0.1, mixup 0.5 until epoch 200, flip and RandAugment rand-m9-n1-mstd0.4;
no crop, no random erasing. STAS twin: configs/cifar10_sdt_stas.py.
Expected: not yet run here (no CIFAR data on the development machine); the SDT paper reports
95.6 % top-1, STEP's protocol 95.79 %. Study: docs/studies/backbones.md.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'cifar10'
  config.data.crop_padding = 0      # the recipe's RandomResizedCrop has scale and ratio 1
  config.data.randaugment_num_layers = 1
  config.data.random_erasing_prob = 0.0
  m = config.model
  m.backbone = 'sdt'
  m.num_classes = 10
  m.dim = 512
  m.depth = 2
  m.heads = 8
  m.patch_embed = 'sps'
  m.halt.mode = 'none'
  config.batch_size = 64
  config.optim.learning_rate = 3e-4
  config.optim.warmup_init_learning_rate = 1e-6
  return config
