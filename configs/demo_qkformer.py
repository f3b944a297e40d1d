"""Offline demo with QKFormer as backbone: configs/demo.py (STAS: I-SPS over its three patch
embeddings, spatiotemporal halting over stage 3; 14 epochs of batch 64) with
`model.backbone = 'qkformer'`, depth 3 (one block in each stage) and dim 48: stages of width 12,
24, 48 at 16 x 16, 8 x 8 and 4 x 4 tokens (patch 8 max-pools patch_embed1's spikes once). At dim
96 a step costs 2.3 times the Spikformer demo's (stage 1 runs 256 tokens), past the budget.

Command:
  python train.py --config=configs/demo_qkformer.py --workdir=runs/demo_qkformer
  # QKFormer itself: add --config.model.patch_embed=sps --config.model.halt.mode=none

Expected: see the study, docs/studies/backbones.md (to be run; each arm under 10 minutes on
2 cores).
"""
from configs import demo


def get_config():
  config = demo.get_config()
  config.model.backbone = 'qkformer'
  config.model.depth = 3
  config.model.dim = 48
  return config
