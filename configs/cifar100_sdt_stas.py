"""STAS on SDT-2-512, CIFAR-100: configs/cifar10_sdt_stas.py with 100 classes.

Command:
  python train.py --config=configs/cifar100_sdt_stas.py --workdir=runs/cifar100_sdt_stas

Expected: not yet run here (no CIFAR data on the development machine).
Study: docs/studies/backbones.md.
"""
from configs import cifar10_sdt_stas


def get_config():
  config = cifar10_sdt_stas.get_config()
  config.data.dataset = 'cifar100'
  config.model.num_classes = 100
  return config
