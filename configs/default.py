"""Shared defaults for every stas-jax experiment; other configs import and override them.

Not meant to be run on its own: it describes Spikformer-4-384 on CIFAR-10 with the Spikformer
recipe (spec section 8). Run a concrete config instead, e.g.
`python train.py --config=configs/cifar100.py`.
"""
import ml_collections


def get_model_config() -> ml_collections.ConfigDict:
  """The `model` group: backbone sizes, neurons, I-SPS and halting (spec sections 2-5)."""
  m = ml_collections.ConfigDict()
  m.geometry = 'cifar'          # 'cifar' (Linear blocks) | 'imagenet' (1x1 convs, no qkv bias)
  m.image_size = 32
  m.in_channels = 3
  m.num_classes = 10
  m.patch_size = 4              # 2 ** (number of max-pools in the SPS); cifar 4, imagenet 16
  m.dim = 384
  m.depth = 4
  m.heads = 12
  m.mlp_ratio = 4
  m.timesteps = 4
  m.patch_embed = 'sps'         # 'sps' (Spikformer) | 'isps' (integrated, STAS)
  m.attn_scale = 0.125
  m.bn_momentum = 0.9           # flax convention: 1 - PyTorch momentum (0.1)
  m.bn_epsilon = 1e-5
  m.bn_cross_replica = False    # pmean batch statistics over the 'batch' axis (pmap)
  m.dtype = 'float32'           # matmul/conv operands: 'float32' | 'bfloat16' (mixed precision:
                                # float32 accumulation, params, BN and LIF; stas_jax/matmul.py)
  m.remat = True                # jax.checkpoint each encoder cell, keeping what the policy says
  m.remat_policy = 'dots_saveable'  # keep matmul outputs, recompute BatchNorm/LIF/mask work:
                                    # 4-384 train step 0.82x the time without remat and peak
                                    # 6.6 -> 4.9 GiB on CPU; 'nothing_saveable' recomputes all
  m.unroll_time = True          # unroll the T-step time scan, the block scan stays rolled:
                                # 4-384 train step 0.89-0.95x the rolled time on CPU, +2 s compile
  m.unroll_scans = False        # unroll the block scan too (implies unroll_time; longer compile)

  m.neuron = ml_collections.ConfigDict()
  m.neuron.tau = 2.0
  m.neuron.v_threshold = 1.0
  m.neuron.attn_v_threshold = 0.5
  m.neuron.v_reset = 0.0
  m.neuron.surrogate = 'sigmoid'  # 'sigmoid' | 'atan'
  m.neuron.alpha = 4.0
  m.neuron.detach_reset = True

  m.isps = ml_collections.ConfigDict()
  m.isps.reduce = 'mean'            # 'mean' | 'sum' over the T spikes of the first LIF
  m.isps.integrate_at = 'first_lif'  # 'first_lif' | 'sps_output'
  # How the tail's neurons (after conv1-3 and the RPE conv, which run once) fire: 'single_step'
  # (one LIF step) | 'any_spike' (1 if T LIF steps on the constant current fire) | 'multi_step'
  # (the T steps' spikes integrated by `reduce`); see docs/method.md section 4.
  m.isps.tail = 'single_step'

  m.halt = ml_collections.ConfigDict()
  m.halt.mode = 'none'          # 'none' | 'spatial' | 'temporal' | 'spatiotemporal'
  m.halt.eps = 0.01
  m.halt.channel = 0
  m.halt.gamma = 1.0
  m.halt.beta = -3.0
  m.halt.learnable = False
  m.halt.soft_mask = False      # differentiable relaxation of the halting mask (studies)
  m.halt.soft_temperature = 0.05  # soft-mask temperature at step 0 (see halt_anneal_steps)
  m.halt.target_cell = 0.75     # centre of the Gaussian prior, as a fraction of the T*L cells
  m.halt.target_sigma = 1.0
  m.halt.alpha_p = 5e-4         # ponder loss weight
  m.halt.alpha_d = 0.1          # distribution-prior loss weight
  return m


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
