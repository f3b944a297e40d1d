"""The GPU and TPU programs, lowered here without those devices (jax.export): the 4-384 CIFAR
train steps of STAS and Spikformer in float32 and bfloat16 under pmap and jit, those of STAS on
SDT and QKFormer (at width 64), and the inference steps, checked for what they run on an
accelerator.
"""
import collections
import functools
import re

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10
from configs import cifar10_qkformer_stas
from configs import cifar10_sdt_stas
from configs import cifar10_spikformer
from stas_jax.model import early_exit
from stas_jax.model import network
from stas_jax.train import optim
from stas_jax.train import parallel
from stas_jax.train import steps

# Every test here trains, spawns processes or exports programs.
pytestmark = pytest.mark.slow



def _small(get_config):
  """A backbone config at width 64: the programs' structure does not depend on the width."""
  def small():
    config = get_config()
    config.model.dim = 64
    return config
  return small


MODELS = {'stas': cifar10.get_config, 'spikformer': cifar10_spikformer.get_config,
          'sdt': _small(cifar10_sdt_stas.get_config),
          'qkformer': _small(cifar10_qkformer_stas.get_config)}
DTYPES = ('float32', 'bfloat16')
# 3x3 convolutions, each one convolution op whatever the number of timesteps (time folds into
# the batch): the SPS's and MS_SPS's four stages and RPE; QKFormer's conv0 and two in each patch
# embedding (its 1x1 convolutions are matmuls).
CONVS = {'stas': 5, 'spikformer': 5, 'sdt': 5, 'qkformer': 6}
# Every case of Spikformer and STAS on it; the other backbones in each dtype and layout once.
TRAIN_CASES = ([(m, d, l) for m in ('stas', 'spikformer') for d in DTYPES
                for l in parallel.PARALLEL_MODES]
               + [(m, d, l) for m in ('sdt', 'qkformer')
                  for d, l in (('float32', 'pmap'), ('bfloat16', 'jit'))])
ACCELERATORS = ('cuda', 'tpu')
# conftest's 8 CPU devices stand in for the accelerators' (also on a GPU machine).
DEVICES = jax.devices('cpu')
PER_DEVICE = 2
# matmul.kernel_grad_conv: the images' axis contracted like a feature axis, dy as the window.
KERNEL_GRAD_DIMS = '[f, 0, 1, b]x[i, 0, 1, o]->[0, 1, b, f]'
COLLECTIVES = ('all_reduce', 'all_gather', 'all_to_all', 'reduce_scatter',
               'collective_permute', 'collective_broadcast')


def _config(model, dtype, layout, cross_replica=False):
  config = MODELS[model]()
  config.model.dtype = dtype
  config.model.bn_cross_replica = cross_replica
  config.parallel = layout
  config.batch_size = config.eval_batch_size = PER_DEVICE * len(DEVICES)
  return config


@functools.cache
def _setup(model, dtype, layout, cross_replica=False):
  """(strategy over DEVICES, abstract unreplicated train state)."""
  config = _config(model, dtype, layout, cross_replica)
  schedule = optim.learning_rate_schedule(config, 100, 1000)
  ctx = steps.StepContext(config=config, mean=np.zeros(3, np.float32),
                          std=np.full(3, 64.0, np.float32), num_classes=10,
                          schedule=schedule)
  strategy = parallel.create_strategy(ctx, DEVICES)
  net = network.create_model(config.model, bn_axis_name=parallel.bn_axis_name(config))
  tx = optim.create_optimizer(config, schedule)
  state = jax.eval_shape(lambda: steps.create_train_state(net, jax.random.key(0), tx))
  return strategy, state


def _abstract(strategy, state, layout, train=True):
  """ShapeDtypeStructs of the step's arguments, laid out as the strategy lays them out."""
  n = len(DEVICES)
  batch = {'image': ((n * PER_DEVICE, 32, 32, 3), jnp.uint8),
           'label': ((n * PER_DEVICE,), jnp.int32)}
  if not train:
    batch['mask'] = ((n * PER_DEVICE,), jnp.float32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  if layout == 'pmap':  # (devices, per device, ...) host arrays, as put_batch makes them
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    state = jax.tree.map(lambda x: sds((n,) + x.shape, x.dtype), state)
    batch = {k: sds((n, PER_DEVICE) + shape[1:], dtype) for k, (shape, dtype) in batch.items()}
  else:
    sds = lambda shape, dtype, sharding=strategy.replicated: jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding)
    state = jax.tree.map(lambda x: sds(x.shape, x.dtype), state)
    batch = {k: sds(shape, dtype, strategy.sharded) for k, (shape, dtype) in batch.items()}
  if not train:
    return state, batch
  return state, batch, sds(key.shape, key.dtype), sds((), jnp.float32)


@functools.cache
def _export(model, dtype, layout, platform, step='train', cross_replica=False):
  """The strategy's own jitted or pmapped step, exported for `platform`."""
  strategy, state = _setup(model, dtype, layout, cross_replica)
  # pylint: disable-next=protected-access
  step_fn = strategy._train if step == 'train' else strategy._eval
  # export takes a jit; under one, the pmap lowers to the shard_map program that it runs.
  fn = jax.jit(lambda *args: step_fn(*args)) if layout == 'pmap' else step_fn
  return export.export(fn, platforms=[platform])(*_abstract(strategy, state, layout,
                                                           step == 'train'))


def _ops(text):
  return collections.Counter(re.findall(r'\b(?:stablehlo|sdy)\.([a-z_]+)', text))


def _operand_types(text, op):
  """(lhs, rhs, result) element types of every `op` in the module."""
  t = r'tensor<(?:\d+x)*(\w+)>'
  sigs = re.findall(rf'stablehlo\.{op}\b.*?: \({t}, {t}\) -> {t}', text)
  return collections.Counter(sigs)


def _assert_runs_on_the_accelerator_alone(exported, text):
  """No host callbacks (they would be effects, or custom calls into Python) and no other custom
  calls, such as CPU-only kernels."""
  assert not exported.ordered_effects and not exported.unordered_effects
  targets = re.findall(r'custom_call @([\w.]+)', text)
  targets += re.findall(r'call_target_name = "([\w.]+)"', text)
  assert not targets, f'custom calls in the program: {sorted(set(targets))}'
  assert 'callback' not in text


def _assert_precision(text, dtype):
  if dtype == 'float32':
    assert 'bf16' not in text
    return
  convs = _operand_types(text, 'convolution')
  assert set(convs) == {('bf16', 'bf16', 'f32')}, convs  # bfloat16 operands, float32 sums
  dots = _operand_types(text, 'dot_general')
  assert dots[('bf16', 'bf16', 'f32')] > 0, dots
  assert not any(result == 'bf16' for _, _, result in dots), dots


def _main_signature(text):
  """[(argument sharding, argument name)], [result sharding] of the exported main function."""
  m = re.search(r'func\.func public @main\((.*?)\) -> \((.*?)\) \{', text, re.S)
  args = re.findall(r'sdy\.sharding = #sdy\.sharding<@mesh, (\[.*?\])>.*?loc\("([^"]*)"\)',
                    m.group(1))
  results = re.findall(r'sdy\.sharding = #sdy\.sharding<@mesh, (\[.*?\])>', m.group(2))
  return args, results


def _replicated(spec):
  return '"' not in spec  # no mesh axis named in any dimension


@pytest.mark.parametrize('model,dtype,layout', TRAIN_CASES)
def test_train_step_lowers_for_gpu_and_tpu(model, dtype, layout):
  _, state = _setup(model, dtype, layout)
  n = len(DEVICES)
  cpu = _export(model, dtype, layout, 'cpu').mlir_module()
  cpu_ops = _ops(cpu)
  assert cpu.count(KERNEL_GRAD_DIMS) == 0  # nine per-tap GEMMs per kernel gradient instead
  for platform in ACCELERATORS:
    exported = _export(model, dtype, layout, platform)
    text = exported.mlir_module()
    ops = _ops(text)
    assert exported.platforms == (platform,) and exported.nr_devices == n
    _assert_runs_on_the_accelerator_alone(exported, text)
    # One native convolution per conv kernel gradient, where the CPU program has nine GEMMs.
    assert text.count(KERNEL_GRAD_DIMS) == CONVS[model]
    assert ops['convolution'] == cpu_ops['convolution'] + CONVS[model]
    assert ops['dot_general'] == cpu_ops['dot_general'] - 9 * CONVS[model]
    _assert_precision(text, dtype)
    if layout == 'pmap':
      # One all-reduce per gradient leaf and per metric (the pmeans), each over every device.
      num_metrics = len(exported.out_avals) - len(jax.tree.leaves(state))
      assert ops['all_reduce'] == len(jax.tree.leaves(state.params)) + num_metrics
      groups = re.findall(r'stablehlo\.all_reduce.*?replica_groups = dense<(\[\[.*?\]\])>', text)
      assert set(groups) == {f'[[{", ".join(map(str, range(n)))}]]'}, set(groups)
    else:
      # The batch is split over the mesh and the state replicated; XLA's partitioner adds the
      # collectives when it compiles, so the exported program holds none yet.
      assert f'sdy.mesh @mesh = <["batch"={n}]>' in text
      args, results = _main_signature(text)
      assert len(args) == len(jax.tree.leaves(state)) + 4
      for spec, name in args:
        expected = '[{"batch"}' if name.startswith('batch') else None
        assert (spec.startswith(expected) if expected else _replicated(spec)), (name, spec)
      assert all(_replicated(spec) for spec in results)
      # The state's buffers are donated: updated in place on the device.
      assert text.count('tf.aliasing_output') == len(jax.tree.leaves(state))
    for op in COLLECTIVES:
      if op != 'all_reduce' or layout == 'jit':
        assert ops[op] == 0, op


def _all_reduce_types(text):
  """The operand types of every all-reduce, e.g. 'tensor<384xf32>'."""
  return collections.Counter(re.findall(r'stablehlo\.all_reduce".*?\}\) : \(([^)]*)\)', text,
                                        re.S))


def test_cross_replica_batchnorm_averages_statistics_over_every_device():
  """model.bn_cross_replica under pmap: BatchNorm statistics of every width (the SPS stages
  48..384, the MLP's 1536) become all-reduces over all devices, on top of the gradients'."""
  n = len(DEVICES)
  base = _export('stas', 'float32', 'pmap', 'cuda').mlir_module()
  cross = _export('stas', 'float32', 'pmap', 'cuda', cross_replica=True).mlir_module()
  added = _all_reduce_types(cross) - _all_reduce_types(base)
  for width in (48, 96, 192, 384, 1536):
    assert added[f'tensor<{width}xf32>'] >= 2, (width, added)  # mean and variance, forward
  assert not _all_reduce_types(base) - _all_reduce_types(cross)
  groups = set(re.findall(r'stablehlo\.all_reduce.*?replica_groups = dense<(\[\[.*?\]\])>', cross))
  assert groups == {f'[[{", ".join(map(str, range(n)))}]]'}


@pytest.mark.parametrize('model,dtype,layout',
                         [('stas', d, l) for d in DTYPES for l in parallel.PARALLEL_MODES]
                         + [('sdt', 'bfloat16', 'jit'), ('qkformer', 'bfloat16', 'jit')])
def test_eval_step_lowers_for_gpu_and_tpu(model, dtype, layout):
  """The training loop's inference step: forward only, the sums added over devices (pmap)."""
  for platform in ACCELERATORS:
    exported = _export(model, dtype, layout, platform, step='eval')
    text = exported.mlir_module()
    ops = _ops(text)
    _assert_runs_on_the_accelerator_alone(exported, text)
    assert ops['convolution'] == CONVS[model] and text.count(KERNEL_GRAD_DIMS) == 0
    _assert_precision(text, dtype)
    # pmap: one psum per returned sum; jit: the partitioner adds them at compile time.
    want = len(exported.out_avals) if layout == 'pmap' else 0
    assert ops['all_reduce'] == want
    assert all(ops[op] == 0 for op in COLLECTIVES if op != 'all_reduce')


@pytest.mark.parametrize('model,dtype', [('stas', 'float32'), ('stas', 'bfloat16'),
                                         ('sdt', 'float32'), ('qkformer', 'float32')])
def test_early_exit_inference_lowers_for_gpu_and_tpu(model, dtype):
  """early_exit.apply: its time loop and block skips stay device-side control flow."""
  config = _config(model, dtype, 'jit')
  net = network.create_model(config.model)
  variables = jax.eval_shape(lambda: network.init_variables(net, jax.random.key(0)))
  images = jax.ShapeDtypeStruct((64, 32, 32, 3), jnp.float32)
  fn = jax.jit(functools.partial(early_exit.apply, net))
  for platform in ACCELERATORS:
    exported = export.export(fn, platforms=[platform])(variables, images)
    text = exported.mlir_module()
    ops = _ops(text)
    _assert_runs_on_the_accelerator_alone(exported, text)
    assert ops['while'] >= 1 and ops['case'] >= 1
    assert ops['convolution'] == CONVS[model]
    _assert_precision(text, dtype)
    assert all(ops[op] == 0 for op in COLLECTIVES)
