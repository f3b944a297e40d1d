"""Layer-by-layer parity with the PyTorch reference: a tiny Spikformer from ZK-Zhou/spikformer
`cifar10/model.py`, its weights converted by `stas_jax.tools.convert` (fixture:
tests/fixtures/README.md).
"""
import json
import os

import jax
import numpy as np
import pytest

from configs import default
from stas_jax.tools import convert
from stas_jax.model import network
from stas_jax.model.spec import BLOCK_LIFS, SPS_LIFS, spec_from_config

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'spikformer_cifar_tiny.npz')


def fixture_model_config(constructor_args):
  """Our `config.model` for the reference constructor arguments (Spikformer: sps, no halting)."""
  a = constructor_args
  assert a['img_size_h'] == a['img_size_w'] and a['sr_ratios'] == 1 and not a['qkv_bias']
  cfg = default.get_model_config()
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
  return cfg


def load_fixture(path=FIXTURE):
  """Returns (arrays by key, state_dict, reference config dict) of the reference fixture."""
  z = np.load(path)
  arrays = {k: z[k] for k in z.files}
  state_dict = {k[len('sd/'):]: v for k, v in arrays.items() if k.startswith('sd/')}
  return arrays, state_dict, json.loads(str(arrays['config_json']))


@pytest.fixture(scope='module')
def reference():
  arrays, state_dict, config = load_fixture()
  cfg = fixture_model_config(config['constructor_args'])
  variables = convert.from_pytorch(state_dict, cfg)
  model = network.create_model(cfg)
  images = np.transpose(arrays['input'], (0, 2, 3, 1))  # NCHW -> NHWC
  logits, aux = jax.jit(lambda v, x: model.apply(v, x, train=False, capture=True))(
      variables, images)
  return arrays, cfg, np.asarray(logits), jax.tree.map(np.asarray, aux)


def first_difference(name, got, want, axes):
  """'' if equal, else a message naming the first differing index (time-major order)."""
  assert got.shape == want.shape, f'{name}: shape {got.shape} != reference {want.shape}'
  diff = got != want
  if not diff.any():
    return ''
  where = dict(zip(axes, np.argwhere(diff)[0]))
  index = ', '.join(f'{k}={v}' for k, v in where.items())
  at = tuple(where.values())
  per_first_axis = [int(d.sum()) for d in diff]
  return (f'{name}: {int(diff.sum())} of {diff.size} entries differ '
          f'(per {axes[0]}: {per_first_axis}); '
          f'first at {index}: got {got[at]}, reference {want[at]}')


def test_patch_embedding_is_exact(reference):
  arrays, _, _, aux = reference
  msg = first_difference('patch embedding (sps_out)', aux['embed'], arrays['sps_out'],
                         ('t', 'b', 'token', 'channel'))
  assert not msg, msg


def test_block_outputs_are_exact(reference):
  arrays, cfg, _, aux = reference
  got = aux['block_outputs']  # (T, L, B, N, D)
  # Report the earliest cell in execution order (timestep-major, then block).
  for t in range(cfg.timesteps):
    for l in range(cfg.depth):
      msg = first_difference(f'block {l} output at timestep {t}', got[t, l],
                             arrays[f'block_out/{l}'][t], ('b', 'token', 'channel'))
      assert not msg, msg


def test_logits_match(reference):
  arrays, _, logits, _ = reference
  err = np.max(np.abs(logits - arrays['logits']))
  assert err < 1e-4, f'logits differ from the reference by up to {err}'


def firing_rates(cfg, aux, batch):
  """Mean spike rate of every LIF layer, keyed like the PyTorch modules, from aux spike sums."""
  s = spec_from_config(cfg)
  c = s.sps_channels
  neurons, side = {}, s.image_size
  for stage, name in enumerate(('proj_lif', 'proj_lif1', 'proj_lif2', 'proj_lif3')):
    neurons[name] = side * side * c[stage]
    if stage >= 4 - s.num_pools:  # a max-pool follows this stage
      side //= 2
  neurons['rpe_lif'] = side * side * c[3]
  rates = {}
  for name in SPS_LIFS:
    spikes = float(np.sum(aux['sps_stats'][name], dtype=np.float64))
    rates[f'patch_embed.{name}'] = spikes / (neurons[name] * s.timesteps * batch)
  for name in BLOCK_LIFS:
    group = 'mlp' if name.startswith('fc') else 'attn'
    width = s.hidden_dim if name == 'fc1_lif' else s.dim
    per_layer = np.sum(aux['block_stats'][name], axis=(0, 2), dtype=np.float64)  # (L,)
    for l in range(s.depth):
      rates[f'block.{l}.{group}.{name}'] = float(per_layer[l]) / (
          s.num_tokens * width * s.timesteps * batch)
  return rates


def test_firing_rates_match(reference):
  arrays, cfg, _, aux = reference
  want = json.loads(str(arrays['firing_rates_json']))
  got = firing_rates(cfg, aux, arrays['input'].shape[0])
  assert sorted(got) == sorted(want)
  # Spike counts over power-of-two neuron counts: the rates are exact in float32 and float64.
  wrong = [f'{k}: {got[k]} (reference {want[k]})' for k in want if got[k] != want[k]]
  assert not wrong, 'firing rates differ (first in execution order first):\n' + '\n'.join(wrong)
