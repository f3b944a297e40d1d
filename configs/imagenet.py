"""STAS on ImageNet-1k: Spikformer-8-512 (ImageNet geometry) with I-SPS and spatiotemporal
token halting, T = 4, 224 x 224 images, 16 x 16 patches (196 tokens).

Command:
  python train.py --config=configs/imagenet.py --workdir=runs/imagenet

Needs tfds 'imagenet2012' prepared as ArrayRecord; ImageNet cannot be downloaded by tfds, so
train.py says where to put the two ILSVRC2012 tar files when it is missing.
Recipe (Spikformer's imagenet.yml): 300 epochs, AdamW 5e-4, weight decay 0.05, cosine to 1e-5
after 20 warm-up epochs from 1e-6, label smoothing 0.1, random-resized crop + flip, mixup 0.8 /
cutmix 1.0 (one per batch) for the whole run. Spikformer used 24 images per GPU; the global batch
here is 256 (scale the learning rate if you change it). RandAugment and random erasing are not
implemented. Expected: about Spikformer-8-512's 73.38% top-1 at less energy (the STAS paper
reports 30.1% less). Not yet run: needs accelerators and the dataset.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'imagenet2012'
  config.data.random_resized_crop = True
  config.data.crop_padding = 0
  config.data.hflip = True
  config.data.mixup_alpha = 0.8
  config.data.cutmix_alpha = 1.0
  config.data.mixup_off_epoch = 10_000  # never: Spikformer's mixup_off_epoch 0 means "off never"
  config.data.num_workers = 8

  m = config.model
  m.geometry = 'imagenet'
  m.image_size = 224
  m.patch_size = 16
  m.num_classes = 1000
  m.dim = 512
  m.depth = 8
  m.heads = 8
  m.timesteps = 4
  m.patch_embed = 'isps'
  m.halt.mode = 'spatiotemporal'

  config.batch_size = 256
  config.eval_batch_size = 256
  config.optim.weight_decay = 0.05
  config.optim.warmup_init_learning_rate = 1e-6
  config.checkpoint_every_steps = 2000
  config.log_every_steps = 100
  return config
