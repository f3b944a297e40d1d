"""Baseline: SDT-2-512 on CIFAR-100, the recipe of configs/cifar10_sdt.py (the official
`conf/cifar100/2_512_300E_t4.yml` differs only in the data), T = 4.

Command:
  python train.py --config=configs/cifar100_sdt.py --workdir=runs/cifar100_sdt

STAS twin: configs/cifar100_sdt_stas.py.
Expected: not yet run here; the SDT paper reports 78.4 % top-1, STEP's protocol 78.29 %.
Study: docs/studies/backbones.md.
"""
from configs import cifar10_sdt


def get_config():
  config = cifar10_sdt.get_config()
  config.data.dataset = 'cifar100'
  config.model.num_classes = 100
  return config
