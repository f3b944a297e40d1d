"""STAS on CIFAR-100: the model and recipe of configs/cifar10.py with 100 classes.

Command:
  python train.py --config=configs/cifar100.py --workdir=runs/cifar100

Needs tfds 'cifar100' as ArrayRecord (train.py says how to build it when it is missing).
Expected: not yet run (no CIFAR data on the development machine); Spikformer-4-384 reports
77.86 % top-1 and the STAS paper 43.8 % less energy than its baseline.
"""
from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.data.dataset = 'cifar100'
  config.model.num_classes = 100
  return config
