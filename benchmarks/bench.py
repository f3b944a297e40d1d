"""Speed and memory of a train step or an inference pass, against an analytic FLOP count.

  python benchmarks/bench.py --config=configs/cifar100_spikformer.py --batch=32 --mode=train \
      --json=OUT.json [--devices=N] [--repeats=5] [--config.model.remat=True]
  python benchmarks/bench.py --config=configs/demo.py --mode=infer_early_exit --restore=runs/demo
  python benchmarks/bench.py --config=configs/cifar100.py --versus=configs/cifar100_spikformer.py

Times the jitted step after a warm-up; reports median / min / max over repeats, images/s,
compile time, the model's analytic GFLOP per step (by part: SPS, attention, MLP, head),
achieved GFLOP/s, the machine's matmul peak in the model's compute dtype (model.dtype) measured
in the same run, and peak RSS.
infer_early_exit also times the dense path, alternating with it in the same run, checks that
the predictions are identical and reports time_fall_over_token_fall = (1 - time ratio) /
(1 - token ratio) (1.0: time falls as fast as the token ratio), beside encoder_flop_share,
the bound that the patch embedding (never skipped) puts on it if time follows FLOPs.
Numbers are noisy on shared machines: compare ratios measured in one run.
"""
import json
import os
import resource
import statistics
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_DEVICES = flags.DEFINE_integer('devices', 1, 'Data-parallel devices (pmap); CPU devices are '
                                'simulated with --xla_force_host_platform_device_count.')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_VERSUS = config_flags.DEFINE_config_file(
    'versus', None, 'Train mode: also time this config\'s step, alternating with --config\'s '
    'in the same process, and report the time ratio (robust to a drifting machine load; '
    'peak_rss_gib then covers both).', lock_config=True)
_BATCH = flags.DEFINE_integer('batch', 32, 'Global batch size.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'infer', 'infer_early_exit'], 'What to time.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repetitions after the warm-up.')
_JSON = flags.DEFINE_string('json', None, 'Write the results here as JSON.')
_RESTORE = flags.DEFINE_string('restore', None, 'Inference: a training workdir whose latest '
                               'checkpoint and test split are used (else random weights and '
                               'random images).')
_FRACTIONS = flags.DEFINE_list('fractions', None, 'infer_early_exit: buffer capacities as '
                                'fractions of the batch\'s tokens (default: '
                                'early_exit.DEFAULT_FRACTIONS).')
_MAX_BATCHES = flags.DEFINE_integer('max_batches', 4, 'With --restore: test batches checked.')
_PEAK_N = flags.DEFINE_integer('peak_n', 2048, 'Side of the square matmul that measures the '
                               'peak (a GPU needs about 8192 to approach its own).')
_WARMUP_ONLY = flags.DEFINE_bool(
    'warmup_only', False, 'Compile and run the step once, then exit: with JAX\'s persistent '
    'compilation cache (JAX_COMPILATION_CACHE_DIR), later timed runs skip compiling, and several '
    'warm-ups can compile side by side (benchmarks/device_check.sh).')


def conv_flops(h, w, c_in, c_out, k=3):
  return 2 * h * w * c_in * c_out * k * k


def model_flops(spec) -> dict:
  """Dense forward FLOPs per image of the layers as this implementation runs them.

  conv0 runs once (static image); under I-SPS (first_lif) the later patch-embedding convs run
  once, under SPS T times. Encoder blocks run at every (t, l) cell on all N tokens (the dense
  path), with Spikformer's attention in the cheaper of (Q K^T) V and Q (K^T V) and SDT's as
  three elementwise passes (k * v, its column sum, q * kv). QKFormer: `_qkformer_flops`.
  Multiply by 3 for a train step.
  """
  if spec.backbone == 'qkformer':
    return _qkformer_flops(spec)
  t, n, d, hid = spec.timesteps, spec.num_tokens, spec.dim, spec.hidden_dim
  c = spec.sps_channels
  runs = 1 if spec.isps_once else t
  size, c_in, sps = spec.image_size, spec.in_channels, 0
  for stage, c_out in enumerate(c):
    sps += (1 if stage == 0 else runs) * conv_flops(size, size, c_in, c_out)
    c_in = c_out
    if stage >= 4 - spec.num_pools:  # max-pool after this stage
      size = (size + 1) // 2
  sps += runs * conv_flops(size, size, d, d)  # RPE conv
  h, dh = spec.heads, spec.head_dim
  attn_core = 2 * 2 * h * n * dh * min(n, dh)
  if spec.backbone == 'sdt':
    attn_core = 3 * n * d
  attention = t * spec.encoder_depth * (4 * 2 * n * d * d + attn_core)
  mlp = t * spec.encoder_depth * 2 * 2 * n * d * hid
  head = 2 * d * spec.num_classes
  return {'sps': sps, 'attention': attention, 'mlp': mlp, 'head': head,
          'total': sps + attention + mlp + head}


def _qkformer_flops(spec) -> dict:
  """`model_flops` for QKFormer: 'sps' is its three patch embeddings, 'attention' and 'mlp' hold
  the dense stages 1 and 2 (T steps each) beside the stage-3 encoder."""
  from stas_jax.model import qkformer
  t, runs = spec.timesteps, 1 if spec.isps_once else spec.timesteps
  w, sides = qkformer.stage_widths(spec), qkformer.stage_sides(spec)
  c0, size = spec.sps_channels[0], spec.image_size
  sps = conv_flops(size, size, spec.in_channels, c0)            # conv0, once
  sps += runs * (conv_flops(sides[0], sides[0], c0, w[0]) + conv_flops(sides[0], sides[0], c0,
                                                                       w[0], k=1))
  attention = mlp = 0
  for i in (1, 2):
    n, c, side = sides[i - 1] ** 2, w[i - 1], sides[i - 1]
    attention += t * (3 * 2 * n * c * c + 2 * n * c)          # q, k, proj; head sums, mask
    mlp += t * 2 * 2 * n * c * int(c * spec.mlp_ratio)
    sps += runs * (conv_flops(side, side, c, w[i]) + conv_flops(side, side, w[i], w[i])
                   + conv_flops(sides[i], sides[i], c, w[i], k=1))
  n, d, dh = spec.num_tokens, spec.dim, spec.head_dim
  cells = t * spec.encoder_depth
  attention += cells * (4 * 2 * n * d * d + 2 * 2 * spec.heads * n * dh * min(n, dh))
  mlp += cells * 2 * 2 * n * d * spec.hidden_dim
  head = 2 * d * spec.num_classes
  return {'sps': sps, 'attention': attention, 'mlp': mlp, 'head': head,
          'total': sps + attention + mlp + head}


def matmul_peak_gflops(dtype_name='float32', n=2048, repeats=5):
  """n x n matmul GFLOP/s, operands in the model's compute dtype, float32 accumulation."""
  import jax
  import jax.numpy as jnp
  from stas_jax.model import matmul
  a = jnp.ones((n, n), matmul.compute_dtype(dtype_name))
  f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  best = min(_time(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * n ** 3 / best / 1e9


def _time(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def peak_rss_gib():
  """This process's peak resident memory so far, GiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def device_memory():
  """{'device_peak_gib': peak memory in use on the first device}, where the backend reports it
  (GPU, TPU); {} on CPU."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' not in stats:
    return {}
  return {'device_peak_gib': stats['peak_bytes_in_use'] / 2 ** 30}


def _summary(times):
  return {'step_time_median_s': statistics.median(times), 'step_time_min_s': min(times),
          'step_time_max_s': max(times), 'step_times_s': times}


def _timings(fn, repeats):
  return _summary([_time(fn) for _ in range(repeats)])


def _alternating_timings(fn, other, repeats):
  """Times two steps in turn, so that both see the same machine load."""
  from stas_jax.tools import timing
  times, _ = timing.alternating((fn, other), repeats)
  return _summary(times[0]), _summary(times[1])


def bench_train(config, batch, devices):
  import jax
  import numpy as np
  from stas_jax.model import network
  from stas_jax.train import optim
  from stas_jax.train import parallel
  from stas_jax.train import steps
  s = network.spec_from_config(config.model)
  config.batch_size = config.eval_batch_size = batch
  ctx = steps.StepContext(config=config, mean=np.zeros(s.in_channels, np.float32),
                          std=np.full(s.in_channels, 255.0, np.float32),
                          num_classes=s.num_classes,
                          schedule=optim.learning_rate_schedule(config, 100, 10_000))
  strategy = parallel.create_strategy(ctx, jax.local_devices()[:devices])
  model = network.create_model(config.model, bn_axis_name=parallel.bn_axis_name(config))
  state = strategy.put_state(steps.create_train_state(
      model, jax.random.key(0), optim.create_optimizer(config, ctx.schedule)))
  rng = np.random.default_rng(0)
  data = {'image': rng.integers(0, 256, (batch, s.image_size, s.image_size, s.in_channels),
                                dtype=np.uint8),
          'label': rng.integers(0, s.num_classes, (batch,)).astype(np.int32)}
  key, epoch = jax.random.key(1), np.float32(0)
  holder = {'state': state}

  def step():
    holder['state'], metrics = strategy.train_step(holder['state'], data, key, epoch)
    jax.block_until_ready(metrics)

  compile_s = _time(step)  # first call: trace + compile + one step
  step()
  return compile_s, step


def _inference_inputs(config, batch):
  """(model, variables, list of normalised image batches): a trained run's weights and test
  images (--restore, through `stas_jax.train.evaluation`, as the evaluate command reads them) or
  random ones."""
  import jax
  import numpy as np
  from stas_jax.train import evaluation
  from stas_jax.data import pipeline
  from stas_jax.model import network
  from stas_jax.train import steps
  if not _RESTORE.value:
    model = network.create_model(config.model)
    variables = network.init_variables(model, jax.random.PRNGKey(0))
    s = model.spec
    images = np.random.default_rng(0).normal(
        size=(batch, s.image_size, s.image_size, s.in_channels)).astype(np.float32)
    return model, variables, [images]
  config.eval_batch_size = batch
  data = pipeline.create_datasets(config)
  try:
    model, variables, _ = evaluation.restore(config, _RESTORE.value)
  except FileNotFoundError as e:
    raise SystemExit(str(e)) from e
  ctx = steps.StepContext(config=config, mean=data.mean, std=data.std,
                          num_classes=data.num_classes)
  batches = [np.asarray(evaluation.model_inputs(b, ctx)[0])
             for b in evaluation.eval_batches(data.make_eval_iter(), _MAX_BATCHES.value)]
  return model, variables, batches


def bench_infer(config, batch, early):
  import functools as ft
  import jax
  import numpy as np
  from stas_jax.model import early_exit
  model, variables, batches = _inference_inputs(config, batch)
  dense = jax.jit(lambda v, x: model.apply(v, x))
  fractions = early_exit.DEFAULT_FRACTIONS
  if _FRACTIONS.value is not None:
    fractions = tuple(float(f) for f in _FRACTIONS.value)
  fast = jax.jit(ft.partial(early_exit.apply, model, fractions=fractions))
  fn = fast if early else dense
  extra = {}
  compile_s = _time(lambda: jax.block_until_ready(fn(variables, batches[0])))
  outs = [jax.device_get(fn(variables, b)) for b in batches]
  extra['token_ratio'] = float(np.mean([o[1]['active'].mean() for o in outs]))
  dense_step = None
  if early:
    extra['rows_ratio'] = float(np.mean([o[1]['rows_ratio'] for o in outs]))
    jax.block_until_ready(dense(variables, batches[0]))
    dense_outs = [jax.device_get(dense(variables, b)) for b in batches]
    same = all(np.array_equal(o[0].argmax(-1), d[0].argmax(-1))
               for o, d in zip(outs, dense_outs))
    extra['identical_predictions'] = bool(same)
    extra['images_checked'] = int(sum(b.shape[0] for b in batches))
    extra['timesteps_run'] = [int(o[1]['timesteps_run']) for o in outs]

    def dense_step():
      for b in batches:
        jax.block_until_ready(dense(variables, b))

  def step():
    for b in batches:
      jax.block_until_ready(fn(variables, b))

  return compile_s, step, extra, len(batches), dense_step


def main(argv):
  del argv
  import jax
  from stas_jax.model import network
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required')
  spec = network.spec_from_config(config.model)
  flops = model_flops(spec)
  batch = _BATCH.value
  extra, n_batches, dense_step = {}, 1, None
  if _VERSUS.value is not None and _MODE.value != 'train':
    raise app.UsageError('--versus works with --mode=train')
  if _MODE.value == 'train':
    compile_s, step = bench_train(config, batch, _DEVICES.value)
    per_image = 3 * flops['total']
  else:
    compile_s, step, extra, n_batches, dense_step = bench_infer(
        config, batch, _MODE.value == 'infer_early_exit')
    per_image = flops['total']
  if _WARMUP_ONLY.value:
    if _VERSUS.value is not None:
      bench_train(_VERSUS.value, batch, _DEVICES.value)
    print(f'warm-up done: compiled and ran one step ({compile_s:.1f} s)')
    return
  peak = matmul_peak_gflops(spec.dtype, n=_PEAK_N.value)
  if _VERSUS.value is not None:
    other = _VERSUS.value
    other_compile_s, other_step = bench_train(other, batch, _DEVICES.value)
    t, other_t = _alternating_timings(step, other_step, _REPEATS.value)
    other_flops = model_flops(network.spec_from_config(other.model))
    extra['versus'] = {
        'config': config_flags.get_config_filename(flags.FLAGS['versus']),
        **other_t, 'compile_s': other_compile_s,
        'model_gflop_per_step': 3 * other_flops['total'] * batch / 1e9}
    extra['time_ratio_vs_versus'] = t['step_time_median_s'] / other_t['step_time_median_s']
    extra['time_ratio_vs_versus_min'] = t['step_time_min_s'] / other_t['step_time_min_s']
    extra['flop_ratio_vs_versus'] = flops['total'] / other_flops['total']
  elif dense_step is not None:
    t, dense_t = _alternating_timings(step, dense_step, _REPEATS.value)
    extra['dense_time_median_s'] = dense_t['step_time_median_s']
    extra['dense_time_min_s'] = dense_t['step_time_min_s']
    extra['dense_times_s'] = dense_t['step_times_s']
  else:
    t = _timings(step, _REPEATS.value)
  images = batch * n_batches
  gflop = per_image * images / 1e9
  result = {
      'config': config_flags.get_config_filename(flags.FLAGS['config']),
      'mode': _MODE.value, 'batch': batch, 'devices': _DEVICES.value,
      'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
      **{**t},
      'images_per_s': images / t['step_time_median_s'],
      'compile_s': compile_s,
      'model_gflop_per_step': gflop,
      'model_gflop_per_image_by_part': {k: v / 1e9 * (3 if _MODE.value == 'train' else 1)
                                        for k, v in flops.items()},
      'achieved_gflops': gflop / t['step_time_median_s'],
      'matmul_peak_gflops': peak,
      'matmul_peak_dtype': spec.dtype,  # operands; the model's compute dtype
      'fraction_of_matmul_peak': gflop / t['step_time_median_s'] / peak,
      'peak_rss_gib': peak_rss_gib(),
      **device_memory(),
      **extra,
  }
  if 'dense_time_median_s' in result:
    ratio = result['step_time_median_s'] / result['dense_time_median_s']
    result['time_ratio_vs_dense'] = ratio
    result['time_ratio_vs_dense_min'] = result['step_time_min_s'] / result['dense_time_min_s']
    # How much of the fall in token ratio shows up as a fall in wall-clock time.
    token_fall = 1.0 - result['token_ratio']
    result['time_fall_over_token_fall'] = (1.0 - ratio) / token_fall if token_fall > 0 else None
    # Halting skips block work only: the patch embedding runs for every image. If time followed
    # FLOPs, the fall could reach at most the blocks' share of the dense FLOPs.
    result['encoder_flop_share'] = (flops['attention'] + flops['mlp']) / flops['total']
  print(json.dumps(result, indent=2))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(result, f, indent=2)


def _set_device_count():
  """Simulated CPU devices must be requested before jax is imported."""
  for arg in sys.argv:
    if arg.startswith('--devices='):
      n = int(arg.split('=', 1)[1])
      if n > 1 and 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                                   f' --xla_force_host_platform_device_count={n}'
                                   # simulated devices share the cores; XLA aborts a collective
                                   # that waits over 40 s by default
                                   ' --xla_cpu_collective_call_terminate_timeout_seconds=300')


if __name__ == '__main__':
  _set_device_count()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
