"""stas_jax.tools.convert: name and layout mapping both ways, error reports, safe loading of
.pth files, and the command line writing an orbax checkpoint that restore_converted reads.
"""
import argparse
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from stas_jax.tools import convert
from stas_jax.model import network
from stas_jax.model.spec import spec_from_config
from test_parity import fixture_model_config, load_fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(geometry, **overrides):
  cfg = default.get_model_config()
  cfg.geometry = geometry
  cfg.dim, cfg.heads, cfg.depth, cfg.num_classes = 32, 2, 1, 5
  cfg.image_size, cfg.patch_size = 32, 4 if geometry == 'cifar' else 16
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


TINY_CIFAR = tiny_config('cifar', depth=2)
TINY_IMAGENET = tiny_config('imagenet')


def reference_shapes(geometry, dim, depth, mlp_ratio, in_channels, num_classes):
  """Every state_dict entry of the reference model.py for these sizes, written out by hand."""
  hid = dim * mlp_ratio
  shapes = {}

  def bn(prefix, n):
    shapes.update({f'{prefix}.weight': (n,), f'{prefix}.bias': (n,),
                   f'{prefix}.running_mean': (n,), f'{prefix}.running_var': (n,),
                   f'{prefix}.num_batches_tracked': ()})

  widths = [in_channels, dim // 8, dim // 4, dim // 2, dim]
  for i, suffix in enumerate(['', '1', '2', '3']):
    shapes[f'patch_embed.proj_conv{suffix}.weight'] = (widths[i + 1], widths[i], 3, 3)
    bn(f'patch_embed.proj_bn{suffix}', widths[i + 1])
  shapes['patch_embed.rpe_conv.weight'] = (dim, dim, 3, 3)
  bn('patch_embed.rpe_bn', dim)
  for l in range(depth):
    b = f'block.{l}'
    for norm in ('norm1', 'norm2'):
      shapes.update({f'{b}.{norm}.weight': (dim,), f'{b}.{norm}.bias': (dim,)})
    for p in ('q', 'k', 'v', 'proj'):
      if geometry == 'cifar':  # nn.Linear, all with bias
        shapes[f'{b}.attn.{p}_linear.weight'] = (dim, dim)
        shapes[f'{b}.attn.{p}_linear.bias'] = (dim,)
      else:  # nn.Conv1d(kernel_size=1); only proj has a bias
        shapes[f'{b}.attn.{p}_conv.weight'] = (dim, dim, 1)
        if p == 'proj':
          shapes[f'{b}.attn.{p}_conv.bias'] = (dim,)
      bn(f'{b}.attn.{p}_bn', dim)
    for p, (n_out, n_in) in (('fc1', (hid, dim)), ('fc2', (dim, hid))):
      if geometry == 'cifar':
        shapes[f'{b}.mlp.{p}_linear.weight'] = (n_out, n_in)
        shapes[f'{b}.mlp.{p}_linear.bias'] = (n_out,)
      else:  # nn.Conv2d(kernel_size=1) with bias
        shapes[f'{b}.mlp.{p}_conv.weight'] = (n_out, n_in, 1, 1)
        shapes[f'{b}.mlp.{p}_conv.bias'] = (n_out,)
      bn(f'{b}.mlp.{p}_bn', n_out)
  shapes.update({'head.weight': (num_classes, dim), 'head.bias': (num_classes,)})
  return shapes


def random_variables(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                      convert.abstract_variables(cfg))


def assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def fixture():
  """The parity fixture: arrays, state_dict, model config, converted variables."""
  arrays, state_dict, config = load_fixture()
  cfg = fixture_model_config(config['constructor_args'])
  return arrays, state_dict, cfg, convert.from_pytorch(state_dict, cfg)


@pytest.fixture(scope='module')
def forward(fixture):
  """Compiled eval forward of the fixture model: variables -> logits of the fixture input."""
  arrays, _, cfg, _ = fixture
  model = network.create_model(cfg)
  images = np.transpose(arrays['input'], (0, 2, 3, 1))
  apply = jax.jit(lambda v: model.apply(v, images, train=False)[0])
  return lambda variables: np.asarray(apply(variables))


# (a) mapping: names, shapes and layouts


@pytest.mark.parametrize('cfg', [TINY_CIFAR, TINY_IMAGENET], ids=['cifar', 'imagenet'])
def test_round_trip_through_pytorch_names(cfg):
  variables = random_variables(cfg)
  sd = convert.to_pytorch(variables, cfg)
  s = spec_from_config(cfg)
  want = reference_shapes(s.geometry, s.dim, s.depth, s.mlp_ratio, s.in_channels, s.num_classes)
  assert {k: v.shape for k, v in sd.items()} == want
  assert_trees_equal(convert.from_pytorch(sd, cfg), variables)
  # DataParallel checkpoints prefix every key with `module.`.
  prefixed = {'module.' + k: v for k, v in sd.items()}
  assert_trees_equal(convert.from_pytorch(prefixed, cfg), variables)


def test_fixture_state_dict_survives_the_round_trip(fixture):
  _, state_dict, cfg, variables = fixture
  back = convert.to_pytorch(variables, cfg)
  assert sorted(back) == sorted(state_dict)
  for key, value in state_dict.items():
    assert back[key].shape == value.shape, key
    if not any(p.search(key) for p in convert.IGNORED_KEYS):
      np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_stas_only_parameters_come_from_the_config():
  cfg = tiny_config('cifar', patch_embed='isps', **{'halt.mode': 'spatiotemporal',
                                                      'halt.learnable': True, 'halt.beta': -2.5})
  variables = random_variables(cfg)
  sd = convert.to_pytorch(variables, cfg)
  assert not [k for k in sd if 'halt' in k]
  converted = convert.from_pytorch(sd, cfg)
  assert converted['params']['halt_beta'] == np.float32(-2.5)
  assert converted['params']['halt_gamma'] == np.float32(1.0)
  for name in ('halt_beta', 'halt_gamma'):
    del converted['params'][name], variables['params'][name]
  assert_trees_equal(converted, variables)


def test_layouts_match_torch_modules():
  """Each weight layout, checked against the PyTorch module that owns it."""
  torch = pytest.importorskip('torch')
  import flax.linen as nn
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  layouts = convert._LAYOUTS

  def check(module, x_torch, ours):
    with torch.no_grad():
      want = module(torch.from_numpy(x_torch)).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)

  def dense(x, w, b):
    return x @ w + b.numpy()

  lin = torch.nn.Linear(5, 7)
  x = rng.standard_normal((2, 5)).astype(np.float32)
  check(lin, x, dense(x, layouts['linear'].to_flax(lin.weight.detach().numpy()), lin.bias.detach()))

  conv1d = torch.nn.Conv1d(5, 7, kernel_size=1)  # (B, C, N)
  x = rng.standard_normal((2, 5, 9)).astype(np.float32)
  w = layouts['conv1d_1'].to_flax(conv1d.weight.detach().numpy())
  check(conv1d, x, dense(x.transpose(0, 2, 1), w, conv1d.bias.detach()).transpose(0, 2, 1))

  conv1x1 = torch.nn.Conv2d(5, 7, kernel_size=1)  # (B, C, H, W)
  x = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
  w = layouts['conv2d_1x1'].to_flax(conv1x1.weight.detach().numpy())
  check(conv1x1, x, dense(x.transpose(0, 2, 3, 1), w, conv1x1.bias.detach()).transpose(0, 3, 1, 2))

  conv = torch.nn.Conv2d(3, 4, kernel_size=3, padding=1, bias=False)
  x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
  kernel = layouts['conv2d'].to_flax(conv.weight.detach().numpy())
  y = nn.Conv(4, (3, 3), padding=1, use_bias=False).apply(
      {'params': {'kernel': kernel}}, x.transpose(0, 2, 3, 1))
  check(conv, x, np.asarray(y).transpose(0, 3, 1, 2))


# (b) errors


def test_missing_unknown_and_misshaped_keys_are_all_listed(fixture):
  _, state_dict, cfg, _ = fixture
  sd = dict(state_dict)
  del sd['head.bias'], sd['block.1.mlp.fc2_bn.running_var']
  sd['block.0.attn.extra.weight'] = np.zeros(3, np.float32)
  sd['block.0.norm3.weight'] = np.zeros(64, np.float32)  # only norm1 / norm2 are ignored
  sd['block.1.mlp.fc1_linear.weight'] = sd['block.1.mlp.fc1_linear.weight'].T
  with pytest.raises(ValueError) as e:
    convert.from_pytorch(sd, cfg)
  msg = str(e.value)
  for name in ('2 missing', 'head.bias', 'block.1.mlp.fc2_bn.running_var',
               '2 unknown', 'block.0.attn.extra.weight', 'block.0.norm3.weight',
               '1 mis-shaped', 'block.1.mlp.fc1_linear.weight: checkpoint (64, 256), model '
               'expects (256, 64)'):
    assert name in msg


@pytest.mark.parametrize('case', ['missing', 'unknown', 'misshaped'])
def test_each_kind_of_bad_key_alone(fixture, case):
  _, state_dict, cfg, _ = fixture
  sd = dict(state_dict)
  key = 'block.0.attn.q_bn.running_mean'
  if case == 'missing':
    del sd[key]
  elif case == 'unknown':
    key = 'patch_embed.proj_conv4.weight'
    sd[key] = np.zeros((1,), np.float32)
  else:
    sd[key] = np.zeros((65,), np.float32)
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    convert.from_pytorch(sd, cfg)


def test_size_mismatch_names_the_config_keys(fixture):
  _, state_dict, cfg, _ = fixture
  cfg = cfg.copy_and_resolve_references()
  cfg.dim, cfg.num_classes = 128, 100
  with pytest.raises(ValueError) as e:
    convert.from_pytorch(state_dict, cfg)
  msg = str(e.value)
  assert 'model.dim=64 (config has 128)' in msg
  assert 'model.num_classes=10 (config has 100)' in msg
  assert 'heads' in msg


def test_geometry_mismatch_is_explained():
  sd = convert.to_pytorch(random_variables(TINY_IMAGENET), TINY_IMAGENET)
  cfg = tiny_config('cifar', patch_size=16)
  with pytest.raises(ValueError, match=r"model.geometry='imagenet' \(config has 'cifar'\)"):
    convert.from_pytorch(sd, cfg)


def test_missing_torch_is_explained(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ImportError, match='requirements-convert.txt'):
    convert.load_pytorch_checkpoint(str(tmp_path / 'x.pth'))


# (c) real .pth files (needs torch)


def torch_state_dict(state_dict):
  torch = pytest.importorskip('torch')
  return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}


@pytest.mark.parametrize('layout', ['timm.pth.tar', 'plain.pth', 'model.pth', 'ddp.pth'])
def test_pth_files_reproduce_the_reference_logits(fixture, forward, tmp_path, layout):
  torch = pytest.importorskip('torch')
  arrays, state_dict, cfg, variables = fixture
  sd = torch_state_dict(state_dict)
  content = {
      # What timm's CheckpointSaver writes (Spikformer's train.py uses it).
      'timm.pth.tar': {'epoch': 3, 'arch': 'spikformer', 'state_dict': sd, 'version': 2,
                       'args': argparse.Namespace(model='spikformer', lr=5e-4, T=4),
                       'optimizer': {'state': {}, 'param_groups': [{'lr': 5e-4}]},
                       'metric': 91.5},
      'plain.pth': sd,
      'model.pth': {'model': sd},
      'ddp.pth': {'state_dict': {'module.' + k: v for k, v in sd.items()}},
  }[layout]
  path = str(tmp_path / layout)
  torch.save(content, path)
  loaded = convert.load_pytorch_checkpoint(path)
  assert all(isinstance(v, np.ndarray) for v in loaded.values())
  converted = convert.from_pytorch(loaded, cfg)
  assert_trees_equal(converted, variables)
  if layout == 'timm.pth.tar':
    err = np.max(np.abs(forward(converted) - arrays['logits']))
    assert err < 1e-4, err


class _Payload:
  """Unpickling this runs a shell command."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'echo pwned > {self.marker}',)


@pytest.mark.parametrize('writer', ['torch.save', 'pickle.dump'])
def test_pickle_with_code_is_refused(fixture, tmp_path, writer):
  torch = pytest.importorskip('torch')
  marker = tmp_path / 'marker'
  path = tmp_path / 'evil.pth'
  if writer == 'torch.save':
    torch.save({'state_dict': torch_state_dict(fixture[1]), 'extra': _Payload(str(marker))},
               str(path))
  else:  # torch.load's legacy (non-zip) format is a plain pickle
    with open(path, 'wb') as f:
      pickle.dump({'epoch': 1, 'extra': _Payload(str(marker))}, f, protocol=2)
  with pytest.raises(ValueError, match=r'Refused to load .*GLOBAL \w+\.system'):
    convert.load_pytorch_checkpoint(str(path))
  assert not marker.exists()


def test_file_without_a_state_dict_is_explained(tmp_path):
  torch = pytest.importorskip('torch')
  path = str(tmp_path / 'odd.pth')
  torch.save({'epoch': 1, 'weights': [torch.zeros(2)]}, path)
  with pytest.raises(ValueError, match=r"top-level keys: \['epoch', 'weights'\]"):
    convert.load_pytorch_checkpoint(path)


# (d) command line


@pytest.mark.slow
def test_command_line_writes_a_restorable_checkpoint(fixture, forward, tmp_path):
  torch = pytest.importorskip('torch')
  arrays, state_dict, cfg, variables = fixture
  in_path = str(tmp_path / 'tiny.pth.tar')
  torch.save({'state_dict': torch_state_dict(state_dict), 'epoch': 0}, in_path)
  out_dir = str(tmp_path / 'converted')
  cmd = [sys.executable, '-m', 'stas_jax.tools.convert', in_path, out_dir,
         '--config=configs/default.py', '--config.model.dim=64', '--config.model.heads=4',
         '--config.model.depth=2']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]

  restored = convert.restore_converted(out_dir, cfg)
  assert_trees_equal(restored, variables)
  np.testing.assert_array_equal(forward(restored), forward(variables))

  other = cfg.copy_and_resolve_references()
  other.heads = 8  # same parameter shapes, different network
  with pytest.raises(ValueError, match='heads: saved 4, given 8'):
    convert.restore_converted(out_dir, other)
  with pytest.raises(ValueError, match='already holds checkpoint steps'):
    convert.save_converted(out_dir, variables, {})
