"""Baseline: QKFormer 4-384 on CIFAR-100, the recipe of configs/cifar10_qkformer.py (the
official `cifar100/cifar100.yml` differs only in the data), T = 4.

Command:
  python train.py --config=configs/cifar100_qkformer.py --workdir=runs/cifar100_qkformer

STAS twin: configs/cifar100_qkformer_stas.py.
Expected: not yet run here; QKFormer's logs reach 81.22 % top-1, STEP's protocol 79.72 %.
Study: docs/studies/backbones.md.
"""
from configs import cifar10_qkformer


def get_config():
  config = cifar10_qkformer.get_config()
  config.data.dataset = 'cifar100'
  config.model.num_classes = 100
  return config
