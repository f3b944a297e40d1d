"""Layer-by-layer parity with the PyTorch reference: a tiny Spike-driven Transformer (v1) from
BICLab/Spike-Driven-Transformer, its weights converted by `stas_jax.tools.convert` (fixture:
tests/fixtures/README.md). Real-valued maps and logits to 1e-5, spikes and firing rates exactly.
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

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'sdt_cifar_tiny.npz')
ATOL = 1e-5


def sdt_model_config(constructor_args):
  """Our `config.model` for the reference constructor arguments (SDT: sps, no halting)."""
  a = constructor_args
  assert a['img_size_h'] == a['img_size_w'] and a['spike_mode'] == 'lif'
  assert not (a['dvs_mode'] or a['TET'] or a['qkv_bias'])
  cfg = default.get_model_config()
  cfg.backbone = 'sdt'
  cfg.geometry = 'cifar'
  cfg.image_size = a['img_size_h']
  # MS_SPS pools after the stages its pooling_stat marks; ours pools after the last
  # log2(patch_size) stages, so patch 4 is "0011".
  assert a['pooling_stat'] == '0011'
  cfg.patch_size = 4
  cfg.in_channels = a['in_channels']
  cfg.num_classes = a['num_classes']
  cfg.dim = a['embed_dims']
  cfg.heads = a['num_heads']
  cfg.mlp_ratio = a['mlp_ratios']
  cfg.depth = a['depths']
  cfg.timesteps = a['T']
  cfg.patch_embed = 'sps'
  cfg.halt.mode = 'none'
  return cfg


@pytest.fixture(scope='module')
def reference():
  arrays, state_dict, config = load_fixture(FIXTURE)
  cfg = sdt_model_config(config['constructor_args'])
  variables = convert.from_pytorch(state_dict, cfg)
  model = network.create_model(cfg)
  images = np.transpose(arrays['input'], (0, 2, 3, 1))  # NCHW -> NHWC
  logits, aux = jax.jit(lambda v, x: model.apply(v, x, train=False, capture=True))(
      variables, images)
  return arrays, cfg, np.asarray(logits), jax.tree.map(np.asarray, aux)


def close_to(name, got, want, axes, atol=ATOL):
  """'' if |got - want| <= atol everywhere, else where the first larger difference is."""
  assert got.shape == want.shape, f'{name}: shape {got.shape} != reference {want.shape}'
  far = np.abs(got - want) > atol
  if not far.any():
    return ''
  at = tuple(np.argwhere(far)[0])
  where = ', '.join(f'{k}={v}' for k, v in zip(axes, at))
  return (f'{name}: {int(far.sum())} of {far.size} entries differ by more than {atol}; '
          f'first at {where}: got {got[at]}, reference {want[at]}')


def test_patch_embedding_matches(reference):
  arrays, _, _, aux = reference
  msg = close_to('patch embedding (sps_out)', aux['embed'], arrays['sps_out'],
               ('t', 'b', 'token', 'channel'))
  assert not msg, msg


def test_attention_and_block_outputs_match(reference):
  arrays, cfg, _, aux = reference
  for t in range(cfg.timesteps):  # the earliest cell in execution order first
    for l in range(cfg.depth):
      for name, got, key in (('attention', aux['block_mids'], 'attn_out'),
                             ('block', aux['block_outputs'], 'block_out')):
        msg = close_to(f'{name} {l} output at timestep {t}', got[t, l], arrays[f'{key}/{l}'][t],
                     ('b', 'token', 'channel'))
        assert not msg, msg


def test_head_spikes_are_exact(reference):
  arrays, _, _, aux = reference
  msg = first_difference('head_lif spikes', aux['head_spikes'], arrays['head_lif_out'],
                         ('t', 'b', 'channel'))
  assert not msg, msg


def test_logits_match(reference):
  arrays, _, logits, _ = reference
  err = np.max(np.abs(logits - arrays['logits']))
  assert err < ATOL, f'logits differ from the reference by up to {err}'


def test_firing_rates_are_exact(reference):
  """energy.estimate's rates, keyed like the reference's LIF modules, equal the fixture's: spike
  counts over power-of-two neuron counts, exact in float32."""
  arrays, cfg, _, aux = reference
  want = json.loads(str(arrays['firing_rates_json']))
  got = {k: float(v) for k, v in energy.estimate(aux, cfg)['firing_rates'].items()}
  assert sorted(got) == sorted(want)
  wrong = [f'{k}: {got[k]} (reference {want[k]})' for k in want if got[k] != want[k]]
  assert not wrong, 'firing rates differ:\n' + '\n'.join(wrong)


def test_heads_change_nothing(reference):
  """SDT's attention acts on each channel alone, so the head count is only a divisor of dim."""
  arrays, cfg, logits, aux = reference
  one_head = cfg.copy_and_resolve_references()
  one_head.heads = 1
  variables = convert.from_pytorch(load_fixture(FIXTURE)[1], one_head)
  images = np.transpose(arrays['input'], (0, 2, 3, 1))
  got = network.create_model(one_head).apply(variables, images)[0]
  np.testing.assert_array_equal(np.asarray(got), logits)
