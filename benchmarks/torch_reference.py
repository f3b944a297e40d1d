"""The PyTorch Spikformer train step, timed in one process with ours.

  python benchmarks/torch_reference.py --config=configs/cifar100_spikformer.py [--batch=32] \
      [--repeats=5] [--json=OUT.json] [--torch_device=cuda]

`TorchSpikformer` is a plain-PyTorch (eager, float32) port of the official Spikformer's CIFAR
model (ZK-Zhou/spikformer `cifar10/model.py`): the same layers in the same order, the same
state_dict names (less the LayerNorms it builds and never calls), and SpikingJelly's
MultiStepLIFNode as it uses it (tau 2, decay_input, hard reset to 0, detached reset, sigmoid
surrogate with alpha 4), written out in torch because SpikingJelly's default CUDA backend does
not run on a CPU. Like the original, it runs the first conv T times on the repeated image.

Before timing, the script sets the BatchNorm statistics from a probe batch (so that spikes reach
every layer), converts the port's weights with `stas_jax.tools.convert` and checks that both
frameworks give the same eval-mode logits, so the two steps compute the same network. It
then times the PyTorch train step (forward, cross-entropy, backward, AdamW) alternately with
stas_jax's (`bench.bench_train`) and reports both, their ratio, and PyTorch's peak RSS, read
before JAX compiles anything (on a GPU: both frameworks' peak device memory instead). With
--torch_device=cuda both steps run on the GPU: set XLA_PYTHON_CLIENT_PREALLOCATE=false so that
JAX leaves PyTorch room. Numbers are noisy on shared machines: compare the ratio.
"""
import contextlib
import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402  pylint: disable=g-import-not-at-top  (its flags: --config, --batch, ...)

_TORCH_DEVICE = flags.DEFINE_string('torch_device', 'cpu', 'Where the PyTorch step runs: cpu | '
                                    'cuda (JAX uses its default backend).')


class _Spike(torch.autograd.Function):
  """Heaviside step whose gradient is SpikingJelly's sigmoid surrogate."""

  @staticmethod
  def forward(ctx, x, alpha):
    ctx.save_for_backward(x)
    ctx.alpha = alpha
    return (x >= 0).to(x.dtype)

  @staticmethod
  def backward(ctx, grad):
    (x,) = ctx.saved_tensors
    sg = torch.sigmoid(ctx.alpha * x)
    return grad * ctx.alpha * sg * (1.0 - sg), None


def multistep_lif(x_seq, v_threshold=1.0, tau=2.0, alpha=4.0):
  """LIF over the leading time axis from rest: (T, ...) currents -> (T, ...) spikes."""
  v = torch.zeros_like(x_seq[0])
  spikes = []
  for x in x_seq:
    h = v + (x - v) / tau
    s = _Spike.apply(h - v_threshold, alpha)
    v = h * (1.0 - s.detach())
    spikes.append(s)
  return torch.stack(spikes)


def _seq(fn, x):
  """Applies fn to x (T, B, ...) with time folded into the batch."""
  y = fn(x.flatten(0, 1))
  return y.reshape(x.shape[:2] + y.shape[1:])


class SPS(nn.Module):
  """Spiking patch splitting, CIFAR form: pools after stages 2 and 3."""

  def __init__(self, in_channels, dim):
    super().__init__()
    c = (dim // 8, dim // 4, dim // 2, dim)
    conv = lambda i, o: nn.Conv2d(i, o, 3, 1, 1, bias=False)
    self.proj_conv, self.proj_bn = conv(in_channels, c[0]), nn.BatchNorm2d(c[0])
    self.proj_conv1, self.proj_bn1 = conv(c[0], c[1]), nn.BatchNorm2d(c[1])
    self.proj_conv2, self.proj_bn2 = conv(c[1], c[2]), nn.BatchNorm2d(c[2])
    self.proj_conv3, self.proj_bn3 = conv(c[2], c[3]), nn.BatchNorm2d(c[3])
    self.rpe_conv, self.rpe_bn = conv(c[3], c[3]), nn.BatchNorm2d(c[3])
    self.pool = nn.MaxPool2d(3, 2, 1)

  def forward(self, x):  # (T, B, C, H, W) -> (T, B, N, D)
    stage = lambda x, conv, bn: multistep_lif(_seq(lambda a: bn(conv(a)), x))
    x = stage(x, self.proj_conv, self.proj_bn)
    x = stage(x, self.proj_conv1, self.proj_bn1)
    x = _seq(self.pool, stage(x, self.proj_conv2, self.proj_bn2))
    x = _seq(self.pool, stage(x, self.proj_conv3, self.proj_bn3))
    x = x + stage(x, self.rpe_conv, self.rpe_bn)
    return x.flatten(-2).transpose(-1, -2)


def _linear_bn_lif(x, linear, bn, v_threshold=1.0):
  """(T, B, N, C) -> LIF(BN1d over channels(Linear(x)))."""
  y = _seq(lambda a: bn(linear(a).transpose(-1, -2)).transpose(-1, -2), x)
  return multistep_lif(y, v_threshold)


class SSA(nn.Module):
  """Spiking self-attention: Q, K, V spikes, (Q K^T) V * 0.125 without softmax."""

  def __init__(self, dim, heads, qkv_bias, scale):
    super().__init__()
    self.heads, self.scale = heads, scale
    for name in ('q', 'k', 'v'):
      setattr(self, f'{name}_linear', nn.Linear(dim, dim, bias=qkv_bias))
      setattr(self, f'{name}_bn', nn.BatchNorm1d(dim))
    self.proj_linear, self.proj_bn = nn.Linear(dim, dim), nn.BatchNorm1d(dim)

  def forward(self, x):
    t, b, n, d = x.shape
    split = lambda a: a.reshape(t, b, n, self.heads, d // self.heads).transpose(2, 3)
    q = split(_linear_bn_lif(x, self.q_linear, self.q_bn))
    k = split(_linear_bn_lif(x, self.k_linear, self.k_bn))
    v = split(_linear_bn_lif(x, self.v_linear, self.v_bn))
    y = ((q @ k.transpose(-2, -1)) * self.scale) @ v
    y = multistep_lif(y.transpose(2, 3).reshape(t, b, n, d), v_threshold=0.5)
    return _linear_bn_lif(y, self.proj_linear, self.proj_bn)


class MLP(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1_linear, self.fc1_bn = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden)
    self.fc2_linear, self.fc2_bn = nn.Linear(hidden, dim), nn.BatchNorm1d(dim)

  def forward(self, x):
    return _linear_bn_lif(_linear_bn_lif(x, self.fc1_linear, self.fc1_bn),
                          self.fc2_linear, self.fc2_bn)


class Block(nn.Module):

  def __init__(self, dim, heads, hidden, qkv_bias, scale):
    super().__init__()
    self.attn = SSA(dim, heads, qkv_bias, scale)
    self.mlp = MLP(dim, hidden)

  def forward(self, x):
    x = x + self.attn(x)
    return x + self.mlp(x)


class TorchSpikformer(nn.Module):
  """The reference CIFAR Spikformer for a stas_jax ModelSpec (sps, halting off)."""

  def __init__(self, spec):
    super().__init__()
    if spec.geometry != 'cifar' or spec.num_pools != 2 or spec.patch_embed != 'sps':
      raise ValueError('the PyTorch port covers the CIFAR Spikformer (geometry cifar, '
                       'patch_size 4, patch_embed sps)')
    self.timesteps = spec.timesteps
    self.patch_embed = SPS(spec.in_channels, spec.dim)
    self.block = nn.ModuleList(
        Block(spec.dim, spec.heads, spec.hidden_dim, spec.qkv_bias, spec.attn_scale)
        for _ in range(spec.depth))
    self.head = nn.Linear(spec.dim, spec.num_classes)

  def forward(self, images):  # (B, C, H, W)
    x = self.patch_embed(images.unsqueeze(0).repeat(self.timesteps, 1, 1, 1, 1))
    for blk in self.block:
      x = blk(x)
    return self.head(x.mean(2).mean(0))


def jax_variables(torch_model, model_config):
  """The torch model's weights as stas_jax variables (via `stas_jax.tools.convert`)."""
  from stas_jax.tools import convert
  sd = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
  return convert.from_pytorch(sd, model_config)


def _device_of(torch_model):
  return next(torch_model.parameters()).device


@contextlib.contextmanager
def _full_precision():
  """float32 products without TF32 in both frameworks (GPUs use TF32 by default), so that the
  logit check compares the networks, not the rounding."""
  import jax  # pylint: disable=g-import-not-at-top
  saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  try:
    with jax.default_matmul_precision('highest'):
      yield
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def calibrate_batch_stats(torch_model, images):
  """Sets every BatchNorm's running statistics to those of `images` (NCHW numpy).

  With the initial mean 0 / variance 1, a fresh network fires nothing after its first LIF in
  eval mode, and any two ports would agree; calibrated statistics make spikes reach every layer.
  """
  bns = [m for m in torch_model.modules()
         if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
  momenta = [m.momentum for m in bns]
  for m in bns:
    m.momentum = 1.0
  torch_model.train()
  with torch.no_grad():
    torch_model(torch.from_numpy(images).to(_device_of(torch_model)))
  for m, momentum in zip(bns, momenta):
    m.momentum = momentum


def check_same_logits(torch_model, model_config, images):
  """Max |logit difference| between the port and stas_jax in eval mode on NCHW images."""
  import jax
  from stas_jax.model import network
  torch_model.eval()
  with torch.no_grad():
    want = torch_model(torch.from_numpy(images).to(_device_of(torch_model))).cpu().numpy()
  model = network.create_model(model_config)
  got, _ = jax.jit(model.apply)(jax_variables(torch_model, model_config),
                                np.transpose(images, (0, 2, 3, 1)))
  torch_model.train()
  return float(np.max(np.abs(np.asarray(got) - want)))


def main(argv):
  del argv
  from stas_jax.model.spec import spec_from_config
  config = bench._CONFIG.value
  if config is None:
    raise app.UsageError('--config is required')
  spec = spec_from_config(config.model)
  if spec.halt.mode != 'none':
    raise app.UsageError('--config must be a Spikformer config (model.halt.mode=none)')
  device = torch.device(_TORCH_DEVICE.value)
  cuda = device.type == 'cuda'
  torch.manual_seed(0)
  net = TorchSpikformer(spec).to(device)
  rng = np.random.default_rng(0)
  probe = rng.normal(size=(4, spec.in_channels, spec.image_size, spec.image_size)) * 2
  probe = probe.astype(np.float32)
  with _full_precision():
    calibrate_batch_stats(net, probe)
    max_diff = check_same_logits(net, config.model, probe)
  if max_diff > 1e-3:
    raise SystemExit(f'the PyTorch port and stas_jax disagree (max |logit diff| {max_diff})')

  batch = bench._BATCH.value
  images = torch.from_numpy(rng.normal(
      size=(batch, spec.in_channels, spec.image_size, spec.image_size)).astype(np.float32))
  labels = torch.from_numpy(rng.integers(0, spec.num_classes, batch))
  images, labels = images.to(device), labels.to(device)
  opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)

  def torch_step():
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    opt.step()
    if cuda:  # kernels run asynchronously: time them, not their launch
      torch.cuda.synchronize(device)

  torch_first_s = bench._time(torch_step)
  torch_step()
  torch_rss = bench.peak_rss_gib()
  jax_compile_s, jax_step = bench.bench_train(config, batch, 1)
  torch_t, jax_t = bench._alternating_timings(torch_step, jax_step, bench._REPEATS.value)
  import jax  # pylint: disable=g-import-not-at-top
  torch_extra = {}
  if cuda:
    torch_extra = {'device_name': torch.cuda.get_device_name(device),
                   'device_peak_gib': torch.cuda.max_memory_allocated(device) / 2 ** 30,
                   'matmul_allow_tf32': torch.backends.cuda.matmul.allow_tf32,
                   'cudnn_allow_tf32': torch.backends.cudnn.allow_tf32}
  result = {
      'config': config_flags.get_config_filename(flags.FLAGS['config']), 'batch': batch,
      'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads(),
      'torch_device': str(device), 'jax_backend': jax.default_backend(),
      'jax_device_kind': jax.devices()[0].device_kind,
      'eval_logits_max_abs_diff': max_diff,
      'torch': {**torch_t, 'first_step_s': torch_first_s, 'peak_rss_gib': torch_rss,
                **torch_extra},
      'jax': {**jax_t, 'compile_s': jax_compile_s, **bench.device_memory()},
      'jax_time_ratio_vs_torch': jax_t['step_time_median_s'] / torch_t['step_time_median_s'],
      'jax_time_ratio_vs_torch_min': jax_t['step_time_min_s'] / torch_t['step_time_min_s'],
      'peak_rss_gib_both': bench.peak_rss_gib(),
  }
  print(json.dumps(result, indent=2))
  if bench._JSON.value:
    with open(bench._JSON.value, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  app.run(main)
