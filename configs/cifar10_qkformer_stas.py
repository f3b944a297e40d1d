"""STAS on QKFormer 4-384, CIFAR-10: configs/cifar10_qkformer.py with I-SPS over its three patch
embeddings and spatiotemporal halting over its stage-3 blocks (docs/method.md sections 3-5).

Command:
  python train.py --config=configs/cifar10_qkformer_stas.py --workdir=runs/cifar10_qkformer_stas

Halting covers the 64 tokens of stage 3 (two blocks here); stages 1 and 2 run densely.
Expected: not yet run here (no CIFAR data on the development machine).
Study: docs/studies/backbones.md.
"""
from configs import cifar10_qkformer


def get_config():
  config = cifar10_qkformer.get_config()
  config.model.patch_embed = 'isps'
  config.model.halt.mode = 'spatiotemporal'
  return config
