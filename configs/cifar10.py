"""STAS on CIFAR-10: Spikformer-4-384 with I-SPS and spatiotemporal token halting, T = 4, and
the ModelSpec defaults otherwise: every I-SPS tail LIF fires once (`model.isps.tail=single_step`),
halting gamma 1, beta -3, ponder weight 5e-4, distribution prior 0.1.

Command:
  python train.py --config=configs/cifar10.py --workdir=runs/cifar10

Needs tfds 'cifar10' as ArrayRecord under ~/tensorflow_datasets (or --config.data.data_dir);
train.py says how to build it when it is missing. Recipe: Spikformer's (docs/method.md section 8):
300 epochs, global batch 128, AdamW 5e-4, weight decay 0.06, cosine to 1e-5 after 20 warm-up
epochs, label smoothing 0.1, mixup 0.5 until epoch 200, random crop (pad 4) + flip; no
RandAugment or random erasing. Expected: not yet run (no CIFAR data on the development machine);
Spikformer-4-384 reports 95.19 % top-1 and the STAS paper 45.9 % less energy. On the demo data
the single-step tail was the least accurate of those tried (docs/studies/isps_tail.md).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'cifar10'
  config.model.num_classes = 10
  config.model.patch_embed = 'isps'
  config.model.halt.mode = 'spatiotemporal'
  return config
