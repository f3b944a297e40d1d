"""Baseline: QKFormer 4-384 on CIFAR-10 with its official recipe, T = 4.

Command:
  python train.py --config=configs/cifar10_qkformer.py --workdir=runs/cifar10_qkformer

Recipe of zhouchenlin2096/QKFormer `cifar10/cifar10.yml` (docs/training.md): 400 epochs, batch
64, AdamW 1e-3 (warm-up 20 epochs from 1e-5, cosine to 1e-5), weight decay 0.06, label smoothing
0.1, mixup 0.5 until epoch 200, flip, RandAugment rand-m9-n1-mstd0.4, random erasing 0.25; no
crop. depth 4 = one block in stages 1 and 2, two in stage 3; 8 heads. STAS twin:
configs/cifar10_qkformer_stas.py.
Expected: not yet run here (no CIFAR data on the development machine); QKFormer's logs reach
96.21 % top-1, STEP's protocol 96.24 %. Study: docs/studies/backbones.md.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'cifar10'
  config.data.crop_padding = 0      # the recipe's RandomResizedCrop has scale and ratio 1
  config.data.randaugment_num_layers = 1
  config.data.random_erasing_prob = 0.25
  m = config.model
  m.backbone = 'qkformer'
  m.num_classes = 10
  m.dim = 384
  m.depth = 4
  m.heads = 8
  m.patch_embed = 'sps'
  m.halt.mode = 'none'
  config.num_epochs = 400
  config.batch_size = 64
  config.optim.learning_rate = 1e-3
  config.optim.warmup_init_learning_rate = 1e-5
  return config
