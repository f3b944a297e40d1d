"""Offline demo with the Spike-driven Transformer v1 as backbone: configs/demo.py (STAS: I-SPS
over MS_SPS, spatiotemporal halting; dim 96, depth 2, 8 x 8 patches, 14 epochs of batch 64) with
`model.backbone = 'sdt'`, for the study across backbones.

Command:
  python train.py --config=configs/demo_sdt.py --workdir=runs/demo_sdt
  # SDT itself: add --config.model.patch_embed=sps --config.model.halt.mode=none

Expected: see the study, docs/studies/backbones.md (to be run; a step costs what the
Spikformer demo's does, so about 5 minutes on 2 cores).
"""
from configs import demo


def get_config():
  config = demo.get_config()
  config.model.backbone = 'sdt'
  return config
