"""Shared defaults for every stas-jax experiment; other configs import and override them.

Not meant to be run on its own: it describes Spikformer-4-384 on CIFAR-10 with the Spikformer
recipe (spec section 8). Run a concrete config instead, e.g.
`python train.py --config=configs/cifar100.py`.
"""
import dataclasses

import ml_collections

from stas_jax.model import spec as model_spec


def get_model_config() -> ml_collections.ConfigDict:
  """The `model` group: backbone sizes, neurons, I-SPS and halting (spec sections 2-5).

  Its keys and defaults are the fields of `stas_jax.model.spec.ModelSpec` (documented there),
  with the `neuron`, `isps` and `halt` sub-specs as nested groups. Among them the token-ratio
  controller: `halt.target_token_ratio` (0 = off; in (0, 1]: the training token ratio it holds
  by moving an offset on the halting score's beta, docs/method.md section 6.1) and
  `halt.ratio_gain` (the offset's step per unit of ratio error), reading the batch's eval-mode
  ratio (`halt.ratio_source='eval'`) or the training forward's ('train').
  """
  return ml_collections.ConfigDict(dataclasses.asdict(model_spec.ModelSpec()))


def get_config() -> ml_collections.ConfigDict:
  """Spikformer-4-384, CIFAR-10, T=4, Spikformer's CIFAR recipe."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = get_model_config()

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'cifar10'   # 'cifar10' | 'cifar100' | 'imagenet2012' | 'mnist_demo' | 'npz'
  config.data.data_dir = ''         # tfds data dir; '' = tfds default (~/tensorflow_datasets)
  config.data.npz_path = ''         # dataset 'npz': file with x_train, y_train, x_test, y_test
  config.data.download = True       # let tfds download and prepare when missing
  config.data.num_workers = 0       # grain worker processes (0 = in-process)
  config.data.crop_padding = 4
  config.data.hflip = True
  config.data.random_resized_crop = False  # ImageNet-style augmentation
  # RandAugment (timm's rand-m9-n1-mstd0.4-inc1 when on) and random erasing, on the device
  # (stas_jax/data/randaugment.py); 0 = off.
  config.data.randaugment_num_layers = 0
  config.data.randaugment_magnitude = 9.0
  config.data.randaugment_magnitude_std = 0.4
  config.data.randaugment_prob = 0.5
  config.data.random_erasing_prob = 0.0
  config.data.mixup_alpha = 0.5
  config.data.cutmix_alpha = 0.0
  config.data.mixup_off_epoch = 200
  config.data.label_smoothing = 0.1

  config.batch_size = 128           # global
  config.eval_batch_size = 256
  config.num_epochs = 300
  config.num_train_steps = -1       # > 0 overrides num_epochs
  config.steps_per_eval = -1        # -1: the whole test split
  # With model.halt.soft_mask: the temperature decays linearly to 0 (hard mask) over this many
  # steps; -1 = the whole run, 0 = constant. Evaluation always uses the hard mask.
  config.halt_anneal_steps = 0
  # Weight (per microjoule) of the estimated energy per image (stas_jax.model.energy) in the
  # training loss: a spike-count penalty that asks every LIF layer to fire less (a study option, not the
  # paper's objective; 0 = off).
  config.energy_loss_weight = 0.0
  # The energy weight ramps linearly from 0 to energy_loss_weight over this many steps, so the
  # network learns its features before it is asked to fire less; -1 = the whole run, 0 = the
  # full weight from step 0.
  config.energy_loss_warmup_steps = 0
  # Two-stage training: a run directory whose latest checkpoint gives this run's starting
  # parameters and BatchNorm statistics (e.g. an I-SPS run without halting, then STAS on top);
  # the optimiser state and the step start afresh. '' = a fresh initialisation.
  config.init_from = ''
  # Exponential moving average of the parameters and BatchNorm statistics, updated after every
  # optimiser step with the decay min(ema_decay, (1 + t) / (10 + t)) at step t; evaluation
  # during training then reports both weights (eval/ and eval_ema/), and the tools take
  # --weights=ema. 0 = off (e.g. 0.999 to turn it on).
  config.ema_decay = 0.0

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 5e-4
  config.optim.warmup_init_learning_rate = 1e-5  # lr at step 0 (Spikformer's warmup_lr)
  config.optim.min_learning_rate = 1e-5
  config.optim.warmup_epochs = 20
  config.optim.weight_decay = 0.06
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.grad_clip_norm = 0.0  # 0 = off

  config.parallel = 'pmap'          # 'pmap' | 'jit'
  config.distributed = False        # jax.distributed.initialize() (also if JAX_COORDINATOR_ADDRESS)
  config.log_every_steps = 50
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  return config
