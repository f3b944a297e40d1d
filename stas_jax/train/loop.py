"""The training loop: train, log, evaluate and checkpoint, resuming where a run stopped.

One `for`-style loop over steps with one block per periodic action (log, eval, checkpoint, stop
on a signal), in the manner of big_vision's train.py. What the loop needs lives in two small
objects: `_Run` (fixed for the run) and `_Progress` (what changes from step to step). The
pieces are in their own modules: `optim` (optimiser, schedules), `steps` (train state, train
step), `evaluation` (eval step and metrics), `parallel` (pmap / jit layouts), `checkpoint`,
`run_files` (config.json, metrics.jsonl, TensorBoard, the summary) and `preemption` (signals).
"""
import dataclasses
import math
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from stas_jax.train import checkpoint
from stas_jax.train import evaluation
from stas_jax.data import pipeline
from stas_jax.model import network
from stas_jax.train import optim
from stas_jax.train import parallel
from stas_jax.train import preemption
from stas_jax.train import run_files
from stas_jax.train import steps


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; the message names the first such step."""


@dataclasses.dataclass(frozen=True)
class _Run:
  """What stays fixed while a run trains."""
  config: ml_collections.ConfigDict
  workdir: str
  data: pipeline.DataBundle
  strategy: Any  # parallel.PmapStrategy | parallel.JitStrategy
  ckpt: checkpoint.Checkpointer
  log: run_files.MetricsLog
  aug_key: jax.Array
  total_steps: int

  @property
  def steps_per_epoch(self) -> int:
    return self.data.steps_per_epoch


@dataclasses.dataclass
class _Progress:
  """What the loop changes: the step, metrics not yet logged, the latest summaries."""
  step: int
  start_step: int
  pending: list[dict[str, float]]   # host train metrics since the last log line
  queued: list[tuple[int, Any]] = dataclasses.field(default_factory=list)  # (step, on device)
  train_summary: dict[str, float] = dataclasses.field(default_factory=dict)
  eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  last_saved: int | None = None
  window_start: float = dataclasses.field(default_factory=time.monotonic)
  window_steps: int = 0


def _check_data(config: ml_collections.ConfigDict, data: pipeline.DataBundle):
  m = config.model
  if data.num_classes != m.num_classes:
    raise ValueError(f'{config.data.dataset} has {data.num_classes} classes but '
                     f'config.model.num_classes={m.num_classes}.')
  want = (m.image_size, m.image_size, m.in_channels)
  if tuple(data.image_shape) != want:
    raise ValueError(f'{config.data.dataset} gives images of shape {tuple(data.image_shape)} '
                     f'but the model expects {want} (config.model.image_size / in_channels).')
  if data.steps_per_epoch < 1:
    raise ValueError(f'config.batch_size={config.batch_size} exceeds the '
                     f'{data.num_train_examples} training examples.')


def _fetch_metrics(run: _Run, p: _Progress) -> None:
  """Moves the queued step metrics to the host; stops at the first non-finite one."""
  for step, metrics in p.queued:
    host = run.strategy.host_metrics(metrics)
    if not all(math.isfinite(v) for v in host.values()):
      bad = sorted(k for k, v in host.items() if not math.isfinite(v))
      raise NonFiniteLossError(
          f'Non-finite training metrics {bad} (loss={host["loss"]}) at step {step} '
          f'(epoch {step / run.steps_per_epoch:.2f}); stopping. Checkpoints after the last good '
          f'one were not written (latest: {run.ckpt.latest_step()}); lower '
          'optim.learning_rate or set optim.grad_clip_norm, then rerun to resume from it.')
    p.pending.append(host)
  p.queued.clear()


def _log_train(run: _Run, p: _Progress) -> None:
  """Averages the train metrics since the last log line, writes and prints them."""
  _fetch_metrics(run, p)
  means = {k: float(np.mean([r[k] for r in p.pending])) for k in p.pending[0]}
  p.train_summary = {f'train/{k}': v for k, v in means.items()}
  p.pending.clear()
  epoch = p.step / run.steps_per_epoch
  run.log.write({'step': p.step, 'epoch': epoch, 'kind': 'train', **p.train_summary})
  step_time = (time.monotonic() - p.window_start) / max(p.window_steps, 1)
  t = p.train_summary
  energy = f' energy {t["train/energy"]:.2f} uJ' if 'train/energy' in t else ''
  logging.info(
      'step %d/%d (epoch %.2f): loss %.4f (ce %.4f ponder %.3f dist %.3f%s) acc %.3f '
      'tokens %.3f lr %.2e | %.1f img/s, ETA %s', p.step, run.total_steps, epoch,
      t['train/loss'], t['train/ce'], t['train/ponder'], t['train/distribution'], energy,
      t['train/accuracy'], t['train/token_ratio'], t['train/learning_rate'],
      run.config.batch_size / max(step_time, 1e-9),
      run_files.format_duration(step_time * (run.total_steps - p.step)))
  p.window_start, p.window_steps = time.monotonic(), 0


def _evaluate(run: _Run, p: _Progress, state: steps.TrainState,
              record: bool = True) -> steps.TrainState:
  """Evaluates on the test split (`evaluation.run`); writes and prints the metrics if `record`
  (not when a finished run is only evaluated again)."""
  _fetch_metrics(run, p)
  state = run.strategy.sync_batch_stats(state)
  start = time.monotonic()
  metrics = evaluation.run(lambda batch: run.strategy.eval_sums(state, batch),
                           run.data.make_eval_iter(), run.config.steps_per_eval)
  p.eval_metrics = {f'eval/{k}': v for k, v in metrics.items()}
  if not record:
    return state
  epoch = p.step / run.steps_per_epoch
  run.log.write({'step': p.step, 'epoch': epoch, 'kind': 'eval', **p.eval_metrics})
  logging.info('eval at step %d (epoch %.2f): top-1 %.4f top-5 %.4f loss %.4f tokens %.3f '
               'energy %.5f mJ timesteps %.2f (%d images, %.1fs)', p.step, epoch,
               metrics['top1'], metrics['top5'], metrics['loss'], metrics['token_ratio'],
               metrics['energy_mj'], metrics['timesteps'], metrics['count'],
               time.monotonic() - start)
  p.window_start = time.monotonic()  # keep eval time out of the throughput
  return state


def _save(run: _Run, p: _Progress, state: steps.TrainState) -> steps.TrainState:
  """Checkpoints the state, the data iterator and the metrics not yet logged."""
  _fetch_metrics(run, p)
  state = run.strategy.sync_batch_stats(state)
  meta = {'config': run_files.config_json(run.config), 'step': p.step,
          'epoch': p.step / run.steps_per_epoch, 'pending_train_metrics': p.pending,
          'metrics_lines': run.log.lines}
  run.ckpt.save(p.step, run.strategy.get_state(state), meta, data_iterator=run.data.train_iter,
                force=True)
  p.last_saved = p.step
  return state


def _itstime(step: int, every: int, last: int) -> bool:
  """Whether a periodic action runs after `step`: every `every` steps and after the last."""
  return step % every == 0 or step == last


def _train_loop(run: _Run, p: _Progress, state: steps.TrainState,
                stop: preemption.StopFlag) -> steps.TrainState:
  """Trains from step p.step to run.total_steps; see train_and_evaluate."""
  config, spe = run.config, run.steps_per_epoch
  if p.step >= run.total_steps:
    logging.info('Step %d >= %d: training is complete; evaluating only.', p.step,
                 run.total_steps)
  while p.step < run.total_steps:
    batch = next(run.data.train_iter)
    epoch = np.float32(p.step // spe)
    state, metrics = run.strategy.train_step(state, batch, run.aug_key, epoch)
    p.step += 1
    p.window_steps += 1
    p.queued.append((p.step, metrics))

    if _itstime(p.step, config.log_every_steps, run.total_steps):
      _log_train(run, p)
    if _itstime(p.step, spe * config.eval_every_epochs, run.total_steps):
      state = _evaluate(run, p, state)
    if _itstime(p.step, config.checkpoint_every_steps, run.total_steps):
      state = _save(run, p, state)
    if stop.stop_after(p.step):
      if p.last_saved != p.step:
        state = _save(run, p, state)
      run.ckpt.wait_until_finished()
      raise preemption.TrainingInterrupted(stop.signum, p.step, run.workdir)
  if not p.eval_metrics:  # nothing trained in this session
    state = _evaluate(run, p, state, record=False)
  return state


def _restore(config: ml_collections.ConfigDict, ckpt: checkpoint.Checkpointer, strategy,
             data: pipeline.DataBundle, state: steps.TrainState
             ) -> tuple[steps.TrainState, _Progress, int | None]:
  """The newest readable checkpoint, if any (it also moves the data iterator there):
  (state, progress, lines of metrics.jsonl to keep; None for a fresh run)."""
  restored = ckpt.restore_latest(strategy.get_state(state), data_iterator=data.train_iter)
  if restored is None:
    return state, _Progress(step=0, start_step=0, pending=[]), None
  host_state, meta, step = restored
  if meta['config'] != run_files.config_json(config):
    logging.warning('Resuming with a config that differs from the checkpoint\'s.')
  logging.info('Resumed from step %d (epoch %.2f).', step, step / data.steps_per_epoch)
  progress = _Progress(step=step, start_step=step, pending=meta['pending_train_metrics'],
                       last_saved=step)
  return strategy.put_state(host_state), progress, meta['metrics_lines']


def _warm_start(config: ml_collections.ConfigDict, workdir: str, strategy,
                state: steps.TrainState) -> steps.TrainState:
  """`state` with the parameters and BatchNorm statistics of the latest checkpoint in
  `config.init_from` (two-stage training); its step and optimiser state stay fresh."""
  source = os.path.abspath(config.init_from)
  ckpt_dir = os.path.join(source, 'checkpoints')
  if source == os.path.abspath(workdir):
    raise ValueError(f'config.init_from={config.init_from!r} is this run\'s own --workdir; '
                     'point it at the run of the first stage.')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(
        f'config.init_from={config.init_from!r}: no checkpoints/ there; train the first stage '
        'into that directory first (python train.py --workdir=DIR ...).')
  fresh = strategy.get_state(state)
  with checkpoint.Checkpointer(ckpt_dir, async_save=False) as source_ckpt:
    try:
      restored = source_ckpt.restore_latest(fresh)
    except checkpoint.CheckpointError as e:
      raise checkpoint.CheckpointError(
          f'config.init_from={config.init_from!r}: {e}\nBoth stages need the same model '
          'parameters and optimiser (model.dim, depth, heads, patch_embed, halt.learnable; '
          'optim.*); halting without learnable parameters adds none.') from e
  if restored is None:
    raise FileNotFoundError(f'config.init_from={config.init_from!r}: {ckpt_dir} holds no '
                            'checkpoint; train the first stage there first.')
  trained, _, step = restored
  logging.info('Initialised from step %d of %s (parameters and BatchNorm statistics).', step,
               source)
  return strategy.put_state(fresh.replace(params=trained.params,
                                          batch_stats=trained.batch_stats))


def _setup(config: ml_collections.ConfigDict, workdir: str):
  """Data, strategy, model, fresh state and the augmentation key of a run."""
  data = pipeline.create_datasets(config, process_index=jax.process_index(),
                                        process_count=jax.process_count())
  _check_data(config, data)
  total_steps = optim.total_train_steps(config, data.steps_per_epoch)
  schedule = optim.learning_rate_schedule(config, data.steps_per_epoch, total_steps)
  ctx = steps.StepContext(config=config, mean=data.mean, std=data.std,
                          num_classes=data.num_classes, schedule=schedule,
                          halt_temperature=optim.halt_temperature_schedule(config, total_steps),
                          energy_weight=optim.energy_weight_schedule(config, total_steps))
  strategy = parallel.create_strategy(ctx)
  model = network.create_model(config.model, bn_axis_name=parallel.bn_axis_name(config))
  init_key, aug_key = jax.random.split(jax.random.key(config.seed))
  state = strategy.put_state(steps.create_train_state(
      model, init_key, optim.create_optimizer(config, schedule)))
  if jax.process_index() == 0:
    run_files.write_config(workdir, config)
  logging.info('%d parameters; %d steps (%d per epoch), global batch %d on %d devices (%s).',
               sum(x.size for x in jax.tree.leaves(strategy.get_state(state).params)),
               total_steps, data.steps_per_epoch, config.batch_size, jax.device_count(),
               config.parallel)
  return data, strategy, state, aug_key, total_steps


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir/checkpoints` if present), evaluates, and summarises.

  Args:
    config: experiment config (see configs/default.py).
    workdir: where checkpoints, metrics.jsonl, tb/ and config.json go.

  Returns:
    The final metrics: 'eval/...' of the last evaluation, 'train/...' of the last logged
    window, 'step', 'epoch', 'start_step' (the restored step, 0 for a fresh run), 'wall_time_s'.

  Raises:
    pipeline.DatasetUnavailableError: the dataset is missing and cannot be prepared.
    NonFiniteLossError: the loss became NaN / inf (no checkpoint is written after that).
    preemption.TrainingInterrupted: SIGTERM / SIGINT; a checkpoint was saved first.
  """
  wall_start = time.monotonic()
  os.makedirs(workdir, exist_ok=True)
  data, strategy, state, aug_key, total_steps = _setup(config, workdir)
  # On CPU, saves gain little from running in the background, and there the background copies
  # can starve XLA's in-process collectives of threads (a rendezvous abort with virtual devices).
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                               max_to_keep=config.keep_checkpoints,
                               async_save=jax.default_backend() != 'cpu') as ckpt:
    state, progress, resume_lines = _restore(config, ckpt, strategy, data, state)
    if resume_lines is None and config.init_from:  # a resumed run keeps its own checkpoint
      state = _warm_start(config, workdir, strategy, state)
    log = run_files.MetricsLog(workdir, jax.process_index() == 0, resume_lines, progress.step)
    run = _Run(config=config, workdir=workdir, data=data, strategy=strategy, ckpt=ckpt, log=log,
               aug_key=aug_key, total_steps=total_steps)
    try:
      with preemption.StopFlag(ckpt.reached_preemption) as stop:
        _train_loop(run, progress, state, stop)
    finally:
      log.close()
  final = {**progress.train_summary, **progress.eval_metrics, 'step': progress.step,
           'epoch': progress.step / data.steps_per_epoch, 'start_step': progress.start_step,
           'wall_time_s': time.monotonic() - wall_start}
  logging.info('\n%s', run_files.format_summary(final, config.model.timesteps))
  return final
