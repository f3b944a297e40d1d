"""A trained run as a Python function: `load_run(run_dir)` reads its config.json and latest
checkpoint and returns a `Classifier` that maps a batch of uint8 images to logits, halting masks
and the estimated energy, as the run's evaluation computes them.

  import stas_jax
  clf = stas_jax.load_run('runs/demo')
  out = clf(images)              # (B, H, W, C) or (B, H, W) uint8 pixels
  out.predictions, out.logits, out.active, out.energy_mj, out.token_ratio
"""
import dataclasses
import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from stas_jax.data import augment
from stas_jax.data import npz
from stas_jax.data import pipeline
from stas_jax.model import energy
from stas_jax.model import network
from stas_jax.train import evaluation
from stas_jax.train import run_files


@dataclasses.dataclass(frozen=True)
class Prediction:
  """What the network computed for a batch of B images (numpy arrays).

  Attributes:
    logits: (B, K) class scores.
    predictions: (B,) the argmax class.
    active: (T, L, B, N) the halting mask in effect when block l ran at timestep t (1 = the
      token was processed).
    token_ratio: (B,) active token-cells / (T * L * N).
    timesteps: (B,) mean number of timesteps a token was processed.
    energy_mj: (B,) estimated energy per image, millijoules (docs/method.md section 7).
    energy_split_mj: {'patch_embed', 'attention', 'mlp', 'head'} -> (B,).
  """
  logits: np.ndarray
  predictions: np.ndarray
  active: np.ndarray
  token_ratio: np.ndarray
  timesteps: np.ndarray
  energy_mj: np.ndarray
  energy_split_mj: dict[str, np.ndarray]


class Classifier:
  """A trained network with its run's normalisation; call it on uint8 images.

  Attributes:
    config: the run's config.
    model: the Flax module (`stas_jax.model.network.STAS`).
    variables: {'params', 'batch_stats'} of the restored step.
    step: the restored training step.
    mean, std: (C,) the normalisation of the run's training data, in pixel units.
  """

  def __init__(self, config: ml_collections.ConfigDict, model: network.STAS,
               variables: dict[str, Any], step: int, mean: np.ndarray, std: np.ndarray):
    self.config, self.model, self.variables, self.step = config, model, variables, step
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    self._forward = jax.jit(functools.partial(_forward, model=model, config=config))

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) the network takes; smaller images are padded to it as in training."""
    m = self.config.model
    return (m.image_size, m.image_size, m.in_channels)

  def _check(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(f'images must be uint8 pixels 0..255, got dtype {images.dtype} (floats in '
                       '[0, 1]: np.round(x * 255).astype(np.uint8))')
    if images.ndim == 3:
      images = images[..., None]
    size, _, channels = self.image_shape
    if images.ndim != 4 or images.shape[-1] != channels or max(images.shape[1:3]) > size:
      raise ValueError(f'images must be (B, H, W, {channels}) or, with one channel, (B, H, W), '
                       f'with H, W <= {size} (smaller ones are padded), got shape '
                       f'{images.shape}')
    if images.shape[1:3] != (size, size):
      images = npz.pad_to_size(images, size)
    return images

  def __call__(self, images: np.ndarray) -> Prediction:
    """Classifies a batch of uint8 images: (B, H, W, C), or (B, H, W) for one channel."""
    images = self._check(images)
    logits, active, est = jax.device_get(
        self._forward(self.variables, images, self.mean, self.std))
    return Prediction(logits=logits, predictions=np.argmax(logits, -1), active=active,
                      token_ratio=est['token_ratio'], timesteps=est['timesteps'],
                      energy_mj=est['energy_mj'], energy_split_mj=est['energy_split_mj'])


def _forward(variables, images, mean, std, *, model, config):
  """Normalise, eval-mode forward pass, energy: what `evaluation.eval_step` computes."""
  x = augment.normalize(images, mean, std)
  logits, aux = evaluation.forward(model.apply, variables, x, config)
  return logits, aux['active'], energy.estimate(aux, model.spec)


def load_run(run_dir: str, *, config: ml_collections.ConfigDict | None = None,
             mean: Any = None, std: Any = None) -> Classifier:
  """The newest readable checkpoint of a training run as a `Classifier`.

  Args:
    run_dir: a `python train.py --workdir` directory (config.json and checkpoints/).
    config: the run's config; default: `run_dir/config.json`.
    mean, std: (C,) normalisation in pixel units; default: the run's training data's
      (`pipeline.normalization`; for an .npz run this reads the file at its recorded path).

  Raises:
    FileNotFoundError: no config.json or no checkpoint in `run_dir`.
    stas_jax.train.checkpoint.CheckpointError: no checkpoint could be restored.
  """
  config = run_files.load_config(run_dir) if config is None else config
  model, variables, step = evaluation.restore(config, run_dir)
  if mean is None or std is None:
    mean, std = pipeline.normalization(config)
  return Classifier(config, model, variables, step, mean, std)
