"""STAS on CIFAR-100: Spikformer-4-384 with I-SPS and spatiotemporal token halting, T = 4.

Command:
  python train.py --config=configs/cifar100.py --workdir=runs/cifar100

Needs tfds 'cifar100' prepared as ArrayRecord under ~/tensorflow_datasets (or
--config.data.data_dir=...); without it train.py stops at once and prints how to build it.
Recipe: Spikformer's CIFAR recipe (spec section 8): 300 epochs, global batch 128, AdamW 5e-4,
weight decay 0.06, cosine to 1e-5 after 20 warm-up epochs, label smoothing 0.1, mixup 0.5 until
epoch 200, random crop (pad 4) + flip. Spikformer's RandAugment and random erasing are not
implemented. Expected: about the Spikformer-4-384 baseline's 77.86% top-1
(configs/cifar100_spikformer.py) with fewer active tokens and less energy per image (the STAS
paper reports 43.8% less energy on CIFAR-100). On the offline demo data STAS with this
config's single-step I-SPS tail trails its Spikformer by 2.4 points for 55% less energy, with
--config.model.isps.tail=multi_step,single_step,single_step,single_step by 1.2 points for 45%
less, with LIF1 and LIF2 counting over 4 steps
(--config.model.isps.tail=multi_step,multi_step,single_step,single_step) by 0.3 points for 24%
less, and with the demo's tail (the same, counting over 2 steps: add
--config.model.isps.tail_steps=2) by 0.26-0.36 points for 47-48% less over 5 and 8 seeds (README "Studies"),
so try that tail and expect a gap. Not yet run: no CIFAR data on the development machine.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'cifar100'
  config.model.num_classes = 100
  config.model.patch_embed = 'isps'
  config.model.halt.mode = 'spatiotemporal'
  return config
