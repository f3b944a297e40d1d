"""Baseline: Spikformer-4-384 on CIFAR-100 (per-timestep SPS, no halting), T = 4.

Command:
  python train.py --config=configs/cifar100_spikformer.py --workdir=runs/cifar100_spikformer

Needs tfds 'cifar100' prepared as ArrayRecord (train.py explains how when it is missing).
Same recipe as configs/cifar100.py. Expected: the Spikformer paper's 77.86% top-1 (its recipe
also uses RandAugment and random erasing, which we do not, so expect slightly less). Not yet run
here.
"""
from configs import cifar100


def get_config():
  config = cifar100.get_config()
  config.model.patch_embed = 'sps'
  config.model.halt.mode = 'none'
  return config
