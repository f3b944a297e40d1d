"""stas_jax.tools.convert for SDT and QKFormer: every state_dict entry of the references (written
out by hand), round trips, the size hint, and the command line converting an official-format
.pth that then evaluates to the fixture's logits."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_model_config
from stas_jax.model import network
from stas_jax.tools import convert
from test_convert import assert_trees_equal, random_variables, torch_state_dict
from test_parity import load_fixture
from test_parity_qkformer import FIXTURE as QK_FIXTURE
from test_parity_qkformer import qkformer_model_config
from test_parity_sdt import FIXTURE as SDT_FIXTURE
from test_parity_sdt import sdt_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bn(shapes, prefix, n):
  shapes.update({f'{prefix}.weight': (n,), f'{prefix}.bias': (n,),
                 f'{prefix}.running_mean': (n,), f'{prefix}.running_var': (n,),
                 f'{prefix}.num_batches_tracked': ()})


def sdt_reference_shapes(dim, depth, heads, mlp_ratio, in_channels, num_classes):
  """Every state_dict entry of SpikeDrivenTransformer (model/spikeformer.py, module/*.py)."""
  shapes, hid = {}, dim * mlp_ratio
  widths = [in_channels, dim // 8, dim // 4, dim // 2, dim]
  for i, suffix in enumerate(['', '1', '2', '3']):
    shapes[f'patch_embed.proj_conv{suffix}.weight'] = (widths[i + 1], widths[i], 3, 3)
    _bn(shapes, f'patch_embed.proj_bn{suffix}', widths[i + 1])
  shapes['patch_embed.rpe_conv.weight'] = (dim, dim, 3, 3)
  _bn(shapes, 'patch_embed.rpe_bn', dim)
  for l in range(depth):
    b = f'block.{l}'
    for p in ('q', 'k', 'v'):  # Conv2d(1x1), no bias
      shapes[f'{b}.attn.{p}_conv.weight'] = (dim, dim, 1, 1)
      _bn(shapes, f'{b}.attn.{p}_bn', dim)
    shapes[f'{b}.attn.talking_heads.weight'] = (heads, heads, 1)  # built, never called
    shapes[f'{b}.attn.proj_conv.weight'] = (dim, dim, 1, 1)
    shapes[f'{b}.attn.proj_conv.bias'] = (dim,)
    _bn(shapes, f'{b}.attn.proj_bn', dim)
    for p, (n_out, n_in) in (('fc1', (hid, dim)), ('fc2', (dim, hid))):
      shapes[f'{b}.mlp.{p}_conv.weight'] = (n_out, n_in, 1, 1)
      shapes[f'{b}.mlp.{p}_conv.bias'] = (n_out,)
      _bn(shapes, f'{b}.mlp.{p}_bn', n_out)
  shapes.update({'head.weight': (num_classes, dim), 'head.bias': (num_classes,)})
  return shapes


def qkformer_reference_shapes(dim, depth, mlp_ratio, in_channels, num_classes):
  """Every state_dict entry of QKFormer's spiking_transformer (cifar10/model.py)."""
  shapes = {}
  w = (dim // 4, dim // 2, dim)
  shapes['patch_embed1.proj_conv.weight'] = (w[0] // 2, in_channels, 3, 3)
  _bn(shapes, 'patch_embed1.proj_bn', w[0] // 2)
  shapes['patch_embed1.proj1_conv.weight'] = (w[0], w[0] // 2, 3, 3)
  _bn(shapes, 'patch_embed1.proj1_bn', w[0])
  shapes['patch_embed1.proj_res_conv.weight'] = (w[0], w[0] // 2, 1, 1)
  _bn(shapes, 'patch_embed1.proj_res_bn', w[0])
  for i in (2, 3):
    c, pe = w[i - 1], f'patch_embed{i}'
    shapes[f'{pe}.proj3_conv.weight'] = (c, c // 2, 3, 3)
    _bn(shapes, f'{pe}.proj3_bn', c)
    shapes[f'{pe}.proj4_conv.weight'] = (c, c, 3, 3)
    _bn(shapes, f'{pe}.proj4_bn', c)
    shapes[f'{pe}.proj_res_conv.weight'] = (c, c // 2, 1, 1)
    _bn(shapes, f'{pe}.proj_res_bn', c)

  def block(prefix, attn, names, c):
    for p in names:  # Conv1d(k=1); only proj has a bias
      shapes[f'{prefix}.{attn}.{p}_conv.weight'] = (c, c, 1)
      _bn(shapes, f'{prefix}.{attn}.{p}_bn', c)
    shapes[f'{prefix}.{attn}.proj_conv.bias'] = (c,)
    hid = c * mlp_ratio
    for p, (n_out, n_in) in (('mlp1', (hid, c)), ('mlp2', (c, hid))):  # Conv2d(1x1), bias
      shapes[f'{prefix}.mlp.{p}_conv.weight'] = (n_out, n_in, 1, 1)
      shapes[f'{prefix}.mlp.{p}_conv.bias'] = (n_out,)
      _bn(shapes, f'{prefix}.mlp.{p}_bn', n_out)

  block('stage1.0', 'tssa', ('q', 'k', 'proj'), w[0])
  block('stage2.0', 'tssa', ('q', 'k', 'proj'), w[1])
  for l in range(depth - 2):
    block(f'stage3.{l}', 'ssa', ('q', 'k', 'v', 'proj'), w[2])
  shapes.update({'head.weight': (num_classes, dim), 'head.bias': (num_classes,)})
  return shapes


SDT_TINY = tiny_model_config(backbone='sdt', dim=48, heads=3, depth=3, mlp_ratio=2,
                             num_classes=7, in_channels=2)
QK_TINY = tiny_model_config(backbone='qkformer', dim=64, heads=4, depth=4, mlp_ratio=3,
                            num_classes=7, in_channels=2, image_size=16)


@pytest.mark.parametrize('cfg,want', [
    (SDT_TINY, sdt_reference_shapes(48, 3, 3, 2, 2, 7)),
    (QK_TINY, qkformer_reference_shapes(64, 4, 3, 2, 7)),
], ids=['sdt', 'qkformer'])
def test_every_reference_entry_and_back(cfg, want):
  variables = random_variables(cfg)
  sd = convert.to_pytorch(variables, cfg)
  assert {k: tuple(np.shape(v)) for k, v in sd.items()} == want
  assert_trees_equal(convert.from_pytorch(sd, cfg), variables)


def _fixture(path, make_config):
  arrays, state_dict, config = load_fixture(path)
  return arrays, state_dict, make_config(config['constructor_args'])


@pytest.mark.parametrize('path,make_config', [(SDT_FIXTURE, sdt_model_config),
                                              (QK_FIXTURE, qkformer_model_config)],
                         ids=['sdt', 'qkformer'])
def test_fixture_state_dict_round_trip_and_sizes(path, make_config):
  _, state_dict, cfg = _fixture(path, make_config)
  back = convert.to_pytorch(convert.from_pytorch(state_dict, cfg), cfg)
  assert sorted(back) == sorted(state_dict)
  for key, value in state_dict.items():
    assert back[key].shape == value.shape, key
    if not convert.is_ignored_key(key, cfg.backbone):
      np.testing.assert_array_equal(back[key], value, err_msg=key)
  sizes = convert.infer_sizes(state_dict)
  assert sizes == {'backbone': cfg.backbone, 'geometry': 'cifar', 'depth': cfg.depth,
                   'dim': cfg.dim, 'mlp_ratio': cfg.mlp_ratio, 'in_channels': 3,
                   'num_classes': 10}


def test_a_backbone_mismatch_is_explained():
  _, state_dict, cfg = _fixture(SDT_FIXTURE, sdt_model_config)
  spikformer = cfg.copy_and_resolve_references()
  spikformer.backbone = 'spikformer'
  with pytest.raises(ValueError, match=r"model.backbone='sdt' \(config has 'spikformer'\)"):
    convert.from_pytorch(state_dict, spikformer)
  assert convert.is_ignored_key('block.0.attn.talking_heads.weight', 'sdt')
  assert not convert.is_ignored_key('block.0.attn.talking_heads.weight', 'spikformer')


@pytest.mark.slow
@pytest.mark.parametrize('path,make_config,flags', [
    (SDT_FIXTURE, sdt_model_config,
     ['--config=configs/cifar10_sdt.py', '--config.model.dim=64', '--config.model.heads=4']),
    (QK_FIXTURE, qkformer_model_config,
     ['--config=configs/cifar10_qkformer.py', '--config.model.dim=64', '--config.model.depth=3',
      '--config.model.proj_lif_over_batch=True']),
], ids=['sdt', 'qkformer'])
def test_command_line_converts_an_official_checkpoint(path, make_config, flags, tmp_path):
  """The fixture's state_dict saved as timm's trainers save it, converted by the command line;
  the restored variables evaluate to the reference logits."""
  torch = pytest.importorskip('torch')
  arrays, state_dict, cfg = _fixture(path, make_config)
  in_path = str(tmp_path / 'official.pth.tar')
  torch.save({'state_dict': torch_state_dict(state_dict), 'epoch': 299}, in_path)
  out_dir = str(tmp_path / 'converted')
  cmd = [sys.executable, '-m', 'stas_jax.tools.convert', in_path, out_dir] + flags
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  restored = convert.restore_converted(out_dir, cfg)
  assert_trees_equal(restored, convert.from_pytorch(state_dict, cfg))
  images = np.transpose(arrays['input'], (0, 2, 3, 1))
  logits = network.create_model(cfg).apply(jax.device_get(restored), images)[0]
  np.testing.assert_allclose(np.asarray(logits), arrays['logits'], atol=1e-5)
