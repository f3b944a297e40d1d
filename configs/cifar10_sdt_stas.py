"""STAS on SDT-2-512, CIFAR-10: configs/cifar10_sdt.py with I-SPS over MS_SPS and
spatiotemporal halting over its blocks (docs/method.md sections 3-5), T = 4.

Command:
  python train.py --config=configs/cifar10_sdt_stas.py --workdir=runs/cifar10_sdt_stas

The halting constants are the ModelSpec defaults, tuned on Spikformer, whose residual stream
holds spike counts; SDT's holds real-valued membranes.
Expected: not yet run here (no CIFAR data on the development machine).
Study: docs/studies/backbones.md.
"""
from configs import cifar10_sdt


def get_config():
  config = cifar10_sdt.get_config()
  config.model.patch_embed = 'isps'
  config.model.halt.mode = 'spatiotemporal'
  return config
