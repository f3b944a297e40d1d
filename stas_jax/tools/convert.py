"""Imports PyTorch checkpoints of the three backbones (Spikformer: ZK-Zhou/spikformer
`cifar10/model.py` or `imagenet/model.py`; SDT v1: BICLab/Spike-Driven-Transformer; QKFormer:
zhouchenlin2096/QKFormer `cifar10/model.py`) into stas-jax variables, exports them back, and saves
them with orbax. `config.model.backbone` names the checkpoint's backbone.

Usage (the config must describe the checkpoint's model; heads, patch size and image size are
not stored in the weights):

  pip install -r requirements-convert.txt
  python -m stas_jax.tools.convert spikformer-4-384.pth.tar /tmp/converted \
      --config=configs/default.py
  python -m stas_jax.tools.convert svit-8-512.pth.tar /tmp/in8x512 --config=configs/default.py \
      --config.model.geometry=imagenet --config.model.image_size=224 \
      --config.model.patch_size=16 --config.model.dim=512 --config.model.depth=8 \
      --config.model.heads=8 --config.model.num_classes=1000
  python -m stas_jax.tools.convert sdt-2-512.pth.tar /tmp/sdt --config=configs/cifar10_sdt.py
  python -m stas_jax.tools.convert qkformer.pth.tar /tmp/qk --config=configs/cifar10_qkformer.py

`restore_converted(out_dir, config.model)` then returns {'params', 'batch_stats'}. Only
`torch.load(..., weights_only=True)` is used, so a checkpoint whose pickle carries code is refused.
"""
import argparse
import dataclasses
import functools
import os
import pickle
import re
from typing import Any
from collections.abc import Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from stas_jax.model import network
from stas_jax.model.spec import ModelSpec, spec_from_config

# State-dict entries the JAX model has no use for: the blocks' LayerNorms, which the reference
# constructs but never calls, and BatchNorm's update counter (PyTorch momentum is a constant).
IGNORED_KEYS = (
    re.compile(r'^block\.\d+\.norm[12]\.(weight|bias)$'),
    re.compile(r'(^|\.)num_batches_tracked$'),
)
# Further unused entries by backbone: SDT builds a talking-heads Conv1d that its forward never
# calls (its talking_heads_lif takes the column sums directly).
BACKBONE_IGNORED_KEYS = {
    'sdt': (re.compile(r'^block\.\d+\.attn\.talking_heads\.weight$'),),
}
# Wrappers that training scripts put around the state_dict, in the order they are tried.
WRAPPER_KEYS = ('state_dict', 'model', 'state_dict_ema')
_DDP_PREFIX = 'module.'
# Parameters that exist only in STAS (halting), filled from the config: no backbone has them.
_STAS_ONLY = {'halt_gamma': lambda s: s.halt.gamma, 'halt_beta': lambda s: s.halt.beta}
# ModelSpec fields that change the parameters or the meaning of the weights.
_BACKBONE_KEYS = ('backbone', 'geometry', 'in_channels', 'num_classes', 'patch_size', 'dim', 'depth', 'heads',
                  'mlp_ratio')
_ATTN_LAYERS = ('q', 'k', 'v', 'proj')
_MLP_LAYERS = ('fc1', 'fc2')
_BN_PARAM = {'scale': 'weight', 'bias': 'bias'}
_BN_STAT = {'mean': 'running_mean', 'var': 'running_var'}

Array = np.ndarray
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How a PyTorch tensor maps onto a Flax leaf (`to_flax`) and back (`to_torch`)."""
  to_flax: Callable[[Array], Array]
  to_torch: Callable[[Array], Array]


_LAYOUTS = {
    'same': _Layout(lambda w: w, lambda w: w),
    # nn.Linear weight (out, in) -> Dense kernel (in, out).
    'linear': _Layout(lambda w: w.T, lambda k: k.T),
    # nn.Conv1d(kernel_size=1) weight (out, in, 1) -> Dense kernel (in, out).
    'conv1d_1': _Layout(lambda w: w[:, :, 0].T, lambda k: k.T[:, :, None]),
    # nn.Conv2d(kernel_size=1) weight (out, in, 1, 1) -> Dense kernel (in, out).
    'conv2d_1x1': _Layout(lambda w: w[:, :, 0, 0].T, lambda k: k.T[:, :, None, None]),
    # nn.Conv2d weight (out, in, kh, kw) -> Conv kernel (kh, kw, in, out).
    'conv2d': _Layout(lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
}


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One PyTorch tensor and the Flax leaf (or one depth slice of a stacked leaf) it fills."""
  torch_key: str
  path: Path                 # (collection, module, ..., leaf name)
  layer: int | None       # depth index into a stacked block leaf; None if not stacked
  layout: str
  torch_shape: tuple[int, ...]


def abstract_variables(model_config) -> dict[str, Any]:
  """Shapes and dtypes of the model's {'params', 'batch_stats'} (nothing is computed)."""
  return _abstract_variables(spec_from_config(model_config))


@functools.lru_cache(maxsize=8)
def _abstract_variables(spec: ModelSpec) -> dict[str, Any]:
  # Tracing the model takes seconds; callers only read the cached tree.
  model = network.create_model(spec)
  images = jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, spec.in_channels),
                                jnp.float32)
  return dict(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images))


def _torch_shape(layout: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(_LAYOUTS[layout].to_torch(np.empty(flax_shape, np.float32)).shape)


def _block_torch_name(spec: ModelSpec, module: str) -> tuple[str, str]:
  """Flax encoder-block module -> (PyTorch name under the block's prefix, layout of its weight)."""
  prefix, kind = module.rsplit('_', 1)
  if prefix not in _ATTN_LAYERS + _MLP_LAYERS:
    raise ValueError(f'block module {module!r} has no PyTorch counterpart')
  group = 'attn' if prefix in _ATTN_LAYERS else 'mlp'
  if spec.backbone == 'qkformer':  # stage 3: `ssa` with Conv1d q, k, v, proj; mlp1 / mlp2
    group, prefix = ('ssa', prefix) if group == 'attn' else ('mlp', {'fc1': 'mlp1',
                                                                     'fc2': 'mlp2'}[prefix])
    if kind == 'bn':
      return f'{group}.{prefix}_bn', 'same'
    return f'{group}.{prefix}_conv', 'conv1d_1' if group == 'ssa' else 'conv2d_1x1'
  if kind == 'bn':
    return f'{group}.{prefix}_bn', 'same'
  if spec.backbone == 'sdt':  # every block layer a Conv2d(1x1)
    return f'{group}.{prefix}_conv', 'conv2d_1x1'
  if spec.geometry == 'cifar':
    return f'{group}.{prefix}_linear', 'linear'
  # ImageNet: attention uses Conv1d(k=1) on (B, C, N), the MLP Conv2d(1x1) on (B, C, H, W).
  return f'{group}.{prefix}_conv', 'conv1d_1' if group == 'attn' else 'conv2d_1x1'


def _block_prefix(spec: ModelSpec, layer: int) -> str:
  """The PyTorch prefix of encoder block `layer`: `block.<l>`, QKFormer's `stage3.<l>`."""
  return f'stage3.{layer}' if spec.backbone == 'qkformer' else f'block.{layer}'


def _leaf_suffix(collection: str, module: str, leaf: str) -> str:
  if collection == 'batch_stats':
    return _BN_STAT[leaf]
  if re.search(r'_bn\d*$', module):
    return _BN_PARAM[leaf]
  return {'kernel': 'weight', 'bias': 'bias'}[leaf]


def _qkformer_embed_name(path: Path, collection: str, ndim: int) -> tuple[str, str]:
  """QKFormer's modules before stage 3 (`qkformer.Tokenizer`): path below `patch_embed` ->
  (PyTorch key, layout). Stages 1 and 2 have one block each (index 0)."""
  if path[0].startswith('stage'):
    stage, sub, module, leaf = path
    key = f'{stage}.0.{sub}.{module}.{_leaf_suffix(collection, module, leaf)}'
    conv = 'conv1d_1' if sub == 'tssa' else 'conv2d_1x1'  # Token_QK_Attention uses Conv1d
  else:
    stage, module, leaf = path
    key = f'{stage}.{module}.{_leaf_suffix(collection, module, leaf)}'
    conv = 'conv2d' if ndim == 4 else 'conv2d_1x1'
  layout = conv if leaf == 'kernel' else 'same'
  return key, layout


def _entries(spec: ModelSpec, target: Mapping[str, Any]) -> list[_Entry]:
  """Every PyTorch tensor the model needs, derived from the model's own variable tree."""
  entries = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    path = tuple(k.key for k in key_path)
    collection, top = path[0], path[1]
    if collection == 'params' and top in _STAS_ONLY:
      continue
    if top == 'patch_embed' and spec.backbone == 'qkformer':
      key, layout = _qkformer_embed_name(path[2:], collection, len(leaf.shape))
      entries.append(_Entry(key, path, None, layout, _torch_shape(layout, leaf.shape)))
    elif top == 'patch_embed':
      module, name = path[2], path[3]
      layout = 'conv2d' if re.search(r'_conv\d*$', module) else 'same'
      key = f'patch_embed.{module}.{_leaf_suffix(collection, module, name)}'
      entries.append(_Entry(key, path, None, layout, _torch_shape(layout, leaf.shape)))
    elif top == 'head':
      layout = 'linear' if path[2] == 'kernel' else 'same'
      key = f'head.{_leaf_suffix(collection, "head", path[2])}'
      entries.append(_Entry(key, path, None, layout, _torch_shape(layout, leaf.shape)))
    elif path[1:4] == ('encoder', 'blocks', 'block'):
      module, name = path[4], path[5]
      torch_name, layout = _block_torch_name(spec, module)
      if name == 'bias' and collection == 'params':
        layout = 'same'
      suffix = _leaf_suffix(collection, module, name)
      shape = _torch_shape(layout, leaf.shape[1:])
      entries.extend(_Entry(f'{_block_prefix(spec, l)}.{torch_name}.{suffix}', path, l, layout,
                            shape) for l in range(leaf.shape[0]))
    else:
      raise ValueError(f'variable {"/".join(path)} has no PyTorch counterpart')
  return entries


def strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops DataParallel's `module.` prefix from every key that has it."""
  return {k[len(_DDP_PREFIX):] if k.startswith(_DDP_PREFIX) else k: v
          for k, v in state_dict.items()}


def infer_sizes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Model sizes that a state_dict reveals (heads, patch and image size it does not).

  Returns:
    A dict with whichever of backbone, geometry, depth, dim, mlp_ratio, in_channels,
    num_classes could be read off the key names and shapes.
  """
  sd = strip_prefix(state_dict)
  sizes = {}
  shape = lambda k: tuple(np.shape(sd[k]))
  if any(k.startswith(('patch_embed1.', 'stage3.')) for k in sd):
    return _infer_qkformer_sizes(sd)
  if any(re.match(r'^block\.\d+\.attn\.talking_heads\.', k) for k in sd):
    sizes['backbone'], sizes['geometry'] = 'sdt', 'cifar'
  elif any(re.match(r'^block\.\d+\.attn\.q_conv\.', k) for k in sd):
    sizes['backbone'], sizes['geometry'] = 'spikformer', 'imagenet'
  elif any(re.match(r'^block\.\d+\.attn\.q_linear\.', k) for k in sd):
    sizes['backbone'], sizes['geometry'] = 'spikformer', 'cifar'
  blocks = {int(m.group(1)) for m in (re.match(r'^block\.(\d+)\.', k) for k in sd) if m}
  if blocks:
    sizes['depth'] = max(blocks) + 1
  if 'patch_embed.rpe_conv.weight' in sd:
    sizes['dim'] = shape('patch_embed.rpe_conv.weight')[0]
  fc1 = [k for k in ('block.0.mlp.fc1_linear.weight', 'block.0.mlp.fc1_conv.weight') if k in sd]
  if fc1 and 'dim' in sizes and sizes['dim']:
    sizes['mlp_ratio'] = _ratio(shape(fc1[0])[0], sizes['dim'])
  if 'patch_embed.proj_conv.weight' in sd:
    sizes['in_channels'] = shape('patch_embed.proj_conv.weight')[1]
  if 'head.weight' in sd:
    sizes['num_classes'] = shape('head.weight')[0]
  return sizes


def _ratio(hidden: int, dim: int):
  ratio = hidden / dim
  return int(ratio) if ratio == int(ratio) else ratio


def _infer_qkformer_sizes(sd: Mapping[str, Any]) -> dict[str, Any]:
  """`infer_sizes` for a QKFormer state_dict: depth counts stages 1 and 2 (the official depths)."""
  shape = lambda k: tuple(np.shape(sd[k]))
  sizes = {'backbone': 'qkformer', 'geometry': 'cifar'}
  blocks = {int(m.group(1)) for m in (re.match(r'^stage3\.(\d+)\.', k) for k in sd) if m}
  sizes['depth'] = (max(blocks) + 1 if blocks else 0) + 2
  if 'patch_embed3.proj4_conv.weight' in sd:
    sizes['dim'] = shape('patch_embed3.proj4_conv.weight')[0]
    if 'stage3.0.mlp.mlp1_conv.weight' in sd:
      sizes['mlp_ratio'] = _ratio(shape('stage3.0.mlp.mlp1_conv.weight')[0], sizes['dim'])
  if 'patch_embed1.proj_conv.weight' in sd:
    sizes['in_channels'] = shape('patch_embed1.proj_conv.weight')[1]
  if 'head.weight' in sd:
    sizes['num_classes'] = shape('head.weight')[0]
  return sizes


def _size_hint(spec: ModelSpec, state_dict: Mapping[str, Any]) -> str:
  sizes = infer_sizes(state_dict)
  differ = [f'model.{k}={v!r} (config has {getattr(spec, k)!r})'
            for k, v in sizes.items() if getattr(spec, k) != v]
  read = ', '.join(f'{k}={v!r}' for k, v in sizes.items()) or 'nothing'
  text = f'The checkpoint looks like: {read}.'
  if differ:
    text += ' Set ' + '; '.join(differ) + '.'
  return (text + ' Check model.backbone, geometry, dim, depth, mlp_ratio, in_channels and '
          'num_classes; heads, patch_size and image_size are not stored in the weights, take '
          "them from the checkpoint's training config.")


def is_ignored_key(key: str, backbone: str = 'spikformer') -> bool:
  """Whether a PyTorch state_dict key of `backbone` is one the JAX model has no use for
  (`IGNORED_KEYS`, `BACKBONE_IGNORED_KEYS`)."""
  patterns = IGNORED_KEYS + BACKBONE_IGNORED_KEYS.get(backbone, ())
  return any(p.search(key) for p in patterns)


def _set(tree: dict[str, Any], path: Path, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def from_pytorch(state_dict: Mapping[str, Any], model_config) -> dict[str, Any]:
  """Converts a state_dict of the backbone `model_config.backbone` into this model's variables.

  Args:
    state_dict: PyTorch parameter name -> array (numpy, or anything `np.asarray` takes), as
      from `load_pytorch_checkpoint`; a DataParallel `module.` prefix is accepted.
    model_config: `config.model` (ConfigDict, dict or ModelSpec) describing the same network.
      halt_gamma / halt_beta (STAS only, when `halt.learnable`) take the config's values.

  Returns:
    {'params': ..., 'batch_stats': ...}: nested dicts of numpy arrays in the model's dtypes,
    with the encoder blocks stacked on a leading depth axis.

  Raises:
    ValueError: listing every missing, unknown and mis-shaped key, with the sizes the
      checkpoint implies.
  """
  spec = spec_from_config(model_config)
  target = abstract_variables(spec)
  sd = strip_prefix(state_dict)
  entries = _entries(spec, target)
  expected = {e.torch_key: e for e in entries}
  missing = sorted(k for k in expected if k not in sd)
  ignore = lambda k: is_ignored_key(k, spec.backbone)
  unknown = sorted(k for k in sd if k not in expected and not ignore(k))
  misshaped = sorted(f'{k}: checkpoint {np.shape(sd[k])}, model expects {e.torch_shape}'
                     for k, e in expected.items()
                     if k in sd and tuple(np.shape(sd[k])) != e.torch_shape)
  if missing or unknown or misshaped:
    parts = [f'{len(v)} {name} key(s):\n  ' + '\n  '.join(v)
             for name, v in (('missing', missing), ('unknown', unknown),
                             ('mis-shaped', misshaped)) if v]
    raise ValueError('The PyTorch state_dict does not fit the model config: '
                     + '; '.join(parts) + '\n' + _size_hint(spec, sd))

  ignored = sorted(k for k in sd if ignore(k))
  logging.info('Converting %d PyTorch tensors; ignoring %d unused ones (%s)', len(expected),
               len(ignored), ', '.join(ignored[:3] + ['...'] * (len(ignored) > 3)))
  out: dict[str, Any] = {}
  by_path = {tuple(k.key for k in kp): leaf
             for kp, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
  stacked: dict[Path, list[Array | None]] = {}
  for e in entries:
    value = _LAYOUTS[e.layout].to_flax(np.asarray(sd[e.torch_key]))
    if e.layer is None:
      _set(out, e.path, value)
    else:
      stacked.setdefault(e.path, [None] * by_path[e.path].shape[0])[e.layer] = value
  for path, layers in stacked.items():
    _set(out, path, np.stack(layers))
  for name, value in _STAS_ONLY.items():
    if ('params', name) in by_path:
      _set(out, ('params', name), np.asarray(value(spec)))
  out = {c: out.get(c, {}) for c in target}
  # tree.map also checks that the structure is the model's own.
  return jax.tree.map(lambda a, t: np.ascontiguousarray(a, dtype=t.dtype), out, target)


def to_pytorch(variables: Mapping[str, Any], model_config) -> dict[str, Array]:
  """Exports variables to a state_dict that the reference backbone loads with strict=True.

  Entries the reference builds but never reads get fixed values: Spikformer's LayerNorms their
  initial ones (weight 1, bias 0), SDT's talking-heads Conv1d zeros; `num_batches_tracked` is 0;
  halting parameters (STAS only) are dropped.

  Args:
    variables: {'params', 'batch_stats'} of a model built from `model_config`.
    model_config: `config.model` (ConfigDict, dict or ModelSpec).

  Returns:
    PyTorch parameter name -> numpy array in PyTorch layout (float32; counters int64).
  """
  spec = spec_from_config(model_config)
  target = abstract_variables(spec)
  by_path = {tuple(k.key for k in kp): np.asarray(leaf)
             for kp, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]}
  sd = {}
  for e in _entries(spec, target):
    value = by_path[e.path] if e.layer is None else by_path[e.path][e.layer]
    sd[e.torch_key] = np.ascontiguousarray(_LAYOUTS[e.layout].to_torch(value))
  for key in list(sd):
    if key.endswith('.running_var'):
      sd[key[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  for l in range(spec.encoder_depth):
    if spec.backbone == 'spikformer':
      for norm in ('norm1', 'norm2'):
        sd[f'block.{l}.{norm}.weight'] = np.ones((spec.dim,), np.float32)
        sd[f'block.{l}.{norm}.bias'] = np.zeros((spec.dim,), np.float32)
    elif spec.backbone == 'sdt':
      sd[f'block.{l}.attn.talking_heads.weight'] = np.zeros((spec.heads, spec.heads, 1),
                                                            np.float32)
  return sd


def _unwrap(obj: Any, key: str | None, path: str) -> Mapping[str, Any]:
  import torch  # Only called from load_pytorch_checkpoint, after torch imported.
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state_dict or a dict around one')
  if key is not None:
    if not isinstance(obj.get(key), Mapping):
      raise ValueError(f'{path} has no dict entry {key!r}; top-level keys: '
                       f'{sorted(map(str, obj))}')
    return obj[key]
  if obj and all(torch.is_tensor(v) for v in obj.values()):
    return obj
  for wrapper in WRAPPER_KEYS:
    if isinstance(obj.get(wrapper), Mapping):
      return obj[wrapper]
  raise ValueError(f'{path} is neither a state_dict nor a dict holding one under '
                   f'{WRAPPER_KEYS}; top-level keys: {sorted(map(str, obj))}')


def _unpickling_reason(error: Exception) -> str:
  """The sentence of torch's weights-only error that names what was blocked."""
  text = str(error)
  reasons = [' '.join(line.split(' Please use')[0].split())
             for line in text.splitlines() if 'GLOBAL' in line]
  return '; '.join(reasons) if reasons else ' '.join(text.split())[:600]


def load_pytorch_checkpoint(path: str, key: str | None = None) -> dict[str, Array]:
  """Reads a `.pth` / `.pth.tar` checkpoint into numpy arrays, without running code.

  `torch.load(weights_only=True)` only rebuilds tensors and plain containers (plus
  argparse.Namespace, which timm's checkpoint saver stores as `args`); a pickle that would
  import or call anything else is refused.

  Args:
    path: checkpoint file.
    key: entry of a wrapper dict that holds the state_dict; by default the file itself if it
      is a state_dict, else the first of `WRAPPER_KEYS` present.

  Returns:
    PyTorch parameter name -> numpy array (bfloat16 tensors become float32).

  Raises:
    ImportError: torch is not installed.
    ValueError: the file is refused by the safe unpickler or holds no state_dict.
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError('Reading PyTorch checkpoints needs torch: '
                      'pip install -r requirements-convert.txt') from e
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(
        f'Refused to load {path}: its pickle needs more than tensors and plain containers '
        f'({_unpickling_reason(e)}). If you trust the file, re-save only its state_dict with '
        'torch and convert that.') from e
  state_dict = _unwrap(obj, key, path)
  bad = sorted(str(k) for k, v in state_dict.items() if not torch.is_tensor(v))
  if bad:
    raise ValueError(f'{path}: state_dict entries that are not tensors: {bad}')
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
          for k, v in state_dict.items()}


def save_converted(out_dir: str, variables: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
  """Writes variables as step 0 of an orbax checkpoint in `out_dir` (which must hold none)."""
  from stas_jax.train import checkpoint  # Deferred: orbax is slow to import.
  with checkpoint.Checkpointer(out_dir, async_save=False) as ckpt:
    if ckpt.all_steps():
      raise ValueError(f'{out_dir} already holds checkpoint steps {ckpt.all_steps()}; '
                       'choose an empty directory')
    ckpt.save(0, dict(variables), dict(meta), force=True)
    return ckpt.step_dir(0)


def restore_converted(out_dir: str, model_config) -> dict[str, Any]:
  """Loads the variables that `python -m stas_jax.tools.convert` wrote to `out_dir`.

  Args:
    out_dir: the converter's output directory.
    model_config: `config.model` of the network to load into; its backbone sizes must equal
      those recorded at conversion (image size, timesteps, halting and I-SPS may differ).

  Returns:
    {'params': ..., 'batch_stats': ...} as jax arrays.

  Raises:
    ValueError: the backbone sizes differ from the converted checkpoint's.
  """
  from stas_jax.train import checkpoint
  spec = spec_from_config(model_config)
  target = abstract_variables(spec)
  with checkpoint.Checkpointer(out_dir, async_save=False) as ckpt:
    variables, meta = ckpt.restore(0, target)
  saved = meta.get('model_config', {})
  differ = [f'{k}: saved {saved[k]!r}, given {getattr(spec, k)!r}'
            for k in _BACKBONE_KEYS if k in saved and saved[k] != getattr(spec, k)]
  if differ:
    raise ValueError(f'{out_dir} was converted for another backbone: ' + '; '.join(differ))
  return dict(variables)


def convert_file(in_path: str, out_dir: str, model_config, key: str | None = None) -> str:
  """Converts a PyTorch checkpoint file into an orbax checkpoint; returns the step directory."""
  variables = from_pytorch(load_pytorch_checkpoint(in_path, key), model_config)
  meta = {'source': os.path.abspath(in_path),
          'model_config': dataclasses.asdict(spec_from_config(model_config))}
  return save_converted(out_dir, variables, meta)


def _main():
  from absl import app
  from absl import flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file(
      'config', None, "Config file whose `model` group describes the checkpoint's network.",
      lock_config=True)
  key_flag = flags.DEFINE_string(
      'checkpoint_key', '', 'Entry of the checkpoint dict that holds the state_dict; default: '
      f'the file itself if it is one, else the first of {WRAPPER_KEYS} present.')
  flags.mark_flags_as_required(['config'])

  def main(argv):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every stage of a save at INFO.
    if len(argv) != 3:
      raise app.UsageError(
          'usage: python -m stas_jax.tools.convert IN.pth OUT_DIR --config=CONFIG.py')
    step_dir = convert_file(argv[1], argv[2], config_flag.value.model, key_flag.value or None)
    print(f'Converted {argv[1]} into {step_dir}; load it with '
          'stas_jax.tools.convert.restore_converted(OUT_DIR, config.model)')

  app.run(main)


if __name__ == '__main__':
  _main()
