"""Baseline: Spikformer-4-384 on CIFAR-10 (per-timestep SPS, no halting), T = 4.

Command:
  python train.py --config=configs/cifar10_spikformer.py --workdir=runs/cifar10_spikformer

Needs tfds 'cifar10' prepared as ArrayRecord (train.py explains how when it is missing).
Same recipe as configs/cifar10.py. Expected: the Spikformer paper's 95.19% top-1 (its recipe
also uses RandAugment and random erasing, which we do not, so expect slightly less). Not yet run
here.
"""
from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.patch_embed = 'sps'
  config.model.halt.mode = 'none'
  return config
