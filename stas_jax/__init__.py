"""stas-jax: STAS (spatio-temporal adaptive computation time) for spiking transformers in JAX.

Sub-packages: `model` (the network), `data` (input pipelines), `train` (the training loop and
what it needs), `tools` (evaluation reports, studies, conversion, inference).
"""


def load_run(run_dir: str, **kwargs):
  """A trained run as a classifier of uint8 images (`stas_jax.tools.classifier.load_run`)."""
  from stas_jax.tools import classifier  # pylint: disable=g-import-not-at-top
  return classifier.load_run(run_dir, **kwargs)
