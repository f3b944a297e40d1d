"""Layer-by-layer parity with the PyTorch reference: a tiny QKFormer from zhouchenlin2096/QKFormer
`cifar10/model.py`, its weights converted by `stas_jax.tools.convert` (fixture:
tests/fixtures/README.md). Every token map and firing rate exactly, logits to 1e-5.
"""
import json
import os

import jax
import numpy as np
import pytest

from configs import default
from stas_jax.model import energy
from stas_jax.model import network
from stas_jax.tools import convert
from test_parity import first_difference, load_fixture

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'qkformer_cifar_tiny.npz')
EMBED_MAPS = ('patch_embed1_out', 'stage1_attn_out/0', 'stage1_out/0', 'patch_embed2_out',
              'stage2_attn_out/0', 'stage2_out/0', 'patch_embed3_out')


def qkformer_model_config(constructor_args):
  """Our `config.model` for the reference constructor arguments (QKFormer: sps, no halting).

  `depth` is the official `depths` (stages 1 and 2 have one block each, stage 3 depth - 2);
  the constructor overwrites num_heads with 8, which is what the fixture passes.
  """
  a = constructor_args
  assert a['img_size_h'] == a['img_size_w'] and a['num_heads'] == 8
  cfg = default.get_model_config()
  cfg.backbone = 'qkformer'
  cfg.geometry = 'cifar'
  cfg.image_size = a['img_size_h']
  cfg.patch_size = a['patch_size']
  cfg.in_channels = a['in_channels']
  cfg.num_classes = a['num_classes']
  cfg.dim = a['embed_dims']
  cfg.heads = a['num_heads']
  cfg.mlp_ratio = a['mlp_ratios']
  cfg.depth = a['depths']
  cfg.timesteps = a['T']
  cfg.patch_embed = 'sps'
  cfg.halt.mode = 'none'
  # The reference's stage-3 proj_lif runs over the flattened (T, B) axis (method.md section 3).
  cfg.proj_lif_over_batch = True
  return cfg


def _forward(cfg, variables, images, apply=None):
  """(logits, aux) of the eval forward with captures, by `apply` if given (a jitted one)."""
  if apply is None:
    model = network.create_model(cfg)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False, capture=True))
  logits, aux = apply(variables, images)
  return np.asarray(logits), jax.tree.map(np.asarray, aux)


@pytest.fixture(scope='module')
def reference():
  arrays, state_dict, config = load_fixture(FIXTURE)
  cfg = qkformer_model_config(config['constructor_args'])
  variables = convert.from_pytorch(state_dict, cfg)
  images = np.transpose(arrays['input'], (0, 2, 3, 1))  # NCHW -> NHWC
  return (arrays, cfg, variables, images) + _forward(cfg, variables, images)


def test_stages_before_the_encoder_are_exact(reference):
  arrays, _, _, _, _, aux = reference
  for key in EMBED_MAPS:  # execution order
    got = aux['embed_captures'][key.split('/')[0]]
    msg = first_difference(key, got, arrays[key], ('t', 'b', 'token', 'channel'))
    assert not msg, msg
  np.testing.assert_array_equal(aux['embed'], arrays['patch_embed3_out'])


def test_stage3_outputs_are_exact(reference):
  arrays, cfg, _, _, _, aux = reference
  attn = aux['block_mids'] - aux['block_inputs']  # proj_lif spikes, before the residual add
  for t in range(cfg.timesteps):
    for l in range(cfg.depth - 2):
      for name, got, key in (('attention', attn, 'stage3_attn_out'),
                             ('block', aux['block_outputs'], 'stage3_out')):
        msg = first_difference(f'stage-3 {name} {l} output at timestep {t}', got[t, l],
                               arrays[f'{key}/{l}'][t], ('b', 'token', 'channel'))
        assert not msg, msg


def test_logits_match(reference):
  arrays, _, _, _, logits, _ = reference
  err = np.max(np.abs(logits - arrays['logits']))
  assert err < 1e-5, f'logits differ from the reference by up to {err}'


def test_firing_rates_are_exact(reference):
  arrays, cfg, _, _, _, aux = reference
  want = json.loads(str(arrays['firing_rates_json']))
  got = {k: float(v) for k, v in energy.estimate(aux, cfg)['firing_rates'].items()}
  assert sorted(got) == sorted(want)
  wrong = [f'{k}: {got[k]} (reference {want[k]})' for k in want if got[k] != want[k]]
  assert not wrong, 'firing rates differ:\n' + '\n'.join(wrong)


def test_per_image_proj_lif_keeps_images_independent(reference):
  """Our default runs the stage-3 proj_lif per image: the stages before it still match the
  reference exactly, stage 3 does not (the reference chains the images), and an image's
  logits no longer depend on the others in its batch."""
  arrays, cfg, variables, images, _, _ = reference
  own = cfg.copy_and_resolve_references()
  own.proj_lif_over_batch = False
  model = network.create_model(own)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, capture=True))
  logits, aux = _forward(own, variables, images, apply)
  np.testing.assert_array_equal(aux['embed'], arrays['patch_embed3_out'])
  assert (aux['block_outputs'][:, 0] != arrays['stage3_out/0']).any()
  order = np.array([2, 0, 3, 1])
  shuffled, _ = _forward(own, variables, images[order], apply)
  np.testing.assert_allclose(shuffled, logits[order], atol=1e-6)
