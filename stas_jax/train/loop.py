"""The training loop: train, log, evaluate and checkpoint, resuming where a run stopped.

One `for`-style loop over steps with one block per periodic action (log, eval, checkpoint, stop
on a signal), in the manner of big_vision's train.py. The loop trains one run, or several runs
of one config that differ only in their seed side by side in one compiled program
(`train_and_evaluate_replicas`: the train state stacked on a leading replica axis, the step
`jax.vmap`-ped over it); each run keeps its own directory, data order, augmentation keys,
checkpoints and logs, as if it had trained alone. What the loop needs lives in small objects:
`_Replica` (one run's files and what it has logged), `_Run` (fixed for the program) and
`_Progress` (what changes from step to step). The pieces are in their own modules: `optim`
(optimiser, schedules), `steps` (train state, train step), `evaluation` (eval step and
metrics), `parallel` (pmap / jit layouts), `checkpoint`, `run_files` (config.json,
metrics.jsonl, TensorBoard, the summary) and `preemption` (signals).
"""
import dataclasses
import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stas_jax.data import pipeline
from stas_jax.model import network
from stas_jax.train import checkpoint
from stas_jax.train import evaluation
from stas_jax.train import optim
from stas_jax.train import parallel
from stas_jax.train import preemption
from stas_jax.train import run_files
from stas_jax.train import steps

# Config keys in which the runs of one joint program may differ: they act outside the step.
REPLICA_KEYS = ('seed', 'init_from')


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; the message names the first such step."""


@dataclasses.dataclass
class _Replica:
  """One run: its config, directory, data, checkpoints and log, and what it has logged."""
  config: ml_collections.ConfigDict
  workdir: str
  data: pipeline.DataBundle
  ckpt: Any = None                  # checkpoint.Checkpointer, opened by the loop
  log: Any = None                   # run_files.MetricsLog
  pending: list[dict[str, float]] = dataclasses.field(default_factory=list)
  train_summary: dict[str, float] = dataclasses.field(default_factory=dict)
  eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  start_step: int = 0
  failure: str | None = None        # why it stopped early (non-finite loss)

  @property
  def label(self) -> str:
    return f'seed {self.config.seed}'


@dataclasses.dataclass(frozen=True)
class _Run:
  """What stays fixed while the program trains."""
  config: ml_collections.ConfigDict   # the first replica's; the others differ in REPLICA_KEYS
  replicas: tuple[_Replica, ...]
  stacked: bool                       # state on a leading replica axis (several runs)
  strategy: Any                       # parallel.PmapStrategy | parallel.JitStrategy
  aug_key: jax.Array                  # (R,) with `stacked`
  total_steps: int

  @property
  def steps_per_epoch(self) -> int:
    return self.replicas[0].data.steps_per_epoch

  def alive(self) -> list[tuple[int, _Replica]]:
    return [(r, rep) for r, rep in enumerate(self.replicas) if rep.failure is None]

  def take(self, tree: Any, r: int) -> Any:
    """Replica r's part of a (possibly stacked) pytree."""
    return jax.tree.map(lambda x: x[r], tree) if self.stacked else tree

  def prefix(self, rep: _Replica) -> str:
    return f'[{rep.label}] ' if self.stacked else ''


@dataclasses.dataclass
class _Progress:
  """What the loop changes: the step, metrics still on the device, throughput window."""
  step: int
  queued: list[tuple[int, Any]] = dataclasses.field(default_factory=list)  # (step, on device)
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


def _non_finite(rep: _Replica, step: int, values: dict[str, float], spe: int) -> str:
  bad = sorted(k for k, v in values.items() if not math.isfinite(v))
  return (f'Non-finite training metrics {bad} (loss={values["loss"]}) at step {step} '
          f'(epoch {step / spe:.2f}); stopping. Checkpoints after the last good one were not '
          f'written (latest: {rep.ckpt.latest_step()}); lower optim.learning_rate or set '
          'optim.grad_clip_norm, then rerun to resume from it.')


def _fetch_metrics(run: _Run, p: _Progress) -> None:
  """Moves the queued step metrics to the host. A replica whose metrics turn non-finite stops
  alone (no more logs or checkpoints); a single run, or the last replica, raises."""
  for step, metrics in p.queued:
    host = run.strategy.host_metrics(metrics)
    for r, rep in run.alive():
      values = {k: float(v[r] if run.stacked else v) for k, v in host.items()}
      if all(math.isfinite(v) for v in values.values()):
        rep.pending.append(values)
        continue
      rep.failure = _non_finite(rep, step, values, run.steps_per_epoch)
      if not run.stacked:
        raise NonFiniteLossError(rep.failure)
      logging.error('%s%s', run.prefix(rep), rep.failure)
  p.queued.clear()
  if not run.alive():
    raise NonFiniteLossError('Every run of the joint program stopped: ' +
                             ' | '.join(f'{rep.label}: {rep.failure}' for rep in run.replicas))


def _log_train(run: _Run, p: _Progress) -> None:
  """Averages each run's train metrics since the last log line, writes and prints them."""
  _fetch_metrics(run, p)
  step_time = (time.monotonic() - p.window_start) / max(p.window_steps, 1)
  epoch = p.step / run.steps_per_epoch
  for _, rep in run.alive():
    means = {k: float(np.mean([r[k] for r in rep.pending])) for k in rep.pending[0]}
    rep.train_summary = {f'train/{k}': v for k, v in means.items()}
    rep.pending.clear()
    rep.log.write({'step': p.step, 'epoch': epoch, 'kind': 'train', **rep.train_summary})
    t = rep.train_summary
    energy = f' energy {t["train/energy"]:.2f} uJ' if 'train/energy' in t else ''
    if 'train/halt_offset' in t:
      energy += f' halt offset {t["train/halt_offset"]:+.3f}'
    if 'train/token_ratio_eval' in t:
      energy += f' tokens in eval mode {t["train/token_ratio_eval"]:.3f}'
    logging.info(
        '%sstep %d/%d (epoch %.2f): loss %.4f (ce %.4f ponder %.3f dist %.3f%s) acc %.3f '
        'tokens %.3f lr %.2e | %.1f img/s, ETA %s', run.prefix(rep), p.step, run.total_steps,
        epoch, t['train/loss'], t['train/ce'], t['train/ponder'], t['train/distribution'],
        energy, t['train/accuracy'], t['train/token_ratio'], t['train/learning_rate'],
        run.config.batch_size * len(run.replicas) / max(step_time, 1e-9),
        run_files.format_duration(step_time * (run.total_steps - p.step)))
  p.window_start, p.window_steps = time.monotonic(), 0


def _evaluate(run: _Run, p: _Progress, state: steps.TrainState,
              record: bool = True) -> steps.TrainState:
  """Evaluates every run on the test split (`evaluation.run`); writes and prints the metrics
  if `record` (not when a finished run is only evaluated again)."""
  _fetch_metrics(run, p)
  state = run.strategy.sync_batch_stats(state)
  start = time.monotonic()
  # The EMA weights go through the same compiled eval step (same tree structure).
  views = {'eval': state}
  if state.ema:
    views['eval_ema'] = state.ema_view()
  totals = {}
  for prefix, view in views.items():
    totals[prefix] = jax.device_get(evaluation.totals(
        lambda batch, view=view: run.strategy.eval_sums(view, batch),
        run.replicas[0].data.make_eval_iter(), run.config.steps_per_eval))
  seconds = time.monotonic() - start
  epoch = p.step / run.steps_per_epoch
  for r, rep in run.alive():
    rep.eval_metrics = {}
    for prefix, total in totals.items():
      rep.eval_metrics.update({f'{prefix}/{k}': v
                               for k, v in evaluation.means(run.take(total, r)).items()})
    metrics = {k[len('eval/'):]: v for k, v in rep.eval_metrics.items() if k.startswith('eval/')}
    if not record:
      continue
    rep.log.write({'step': p.step, 'epoch': epoch, 'kind': 'eval', **rep.eval_metrics})
    logging.info('%seval at step %d (epoch %.2f): top-1 %.4f top-5 %.4f loss %.4f tokens %.3f '
                 'energy %.5f mJ timesteps %.2f (%d images, %.1fs)', run.prefix(rep), p.step,
                 epoch, metrics['top1'], metrics['top5'], metrics['loss'],
                 metrics['token_ratio'], metrics['energy_mj'], metrics['timesteps'],
                 metrics['count'], seconds)
    if 'eval_ema/top1' in rep.eval_metrics:
      logging.info('%seval of the EMA weights: top-1 %.4f top-5 %.4f loss %.4f tokens %.3f',
                   run.prefix(rep), rep.eval_metrics['eval_ema/top1'],
                   rep.eval_metrics['eval_ema/top5'], rep.eval_metrics['eval_ema/loss'],
                   rep.eval_metrics['eval_ema/token_ratio'])
  # Keep eval time out of the throughput.
  p.window_start, p.window_steps = time.monotonic(), 0
  return state


def _save(run: _Run, p: _Progress, state: steps.TrainState) -> steps.TrainState:
  """Checkpoints each run's state, data iterator and the metrics it has not yet logged."""
  _fetch_metrics(run, p)
  state = run.strategy.sync_batch_stats(state)
  host_state = run.strategy.get_state(state)
  for r, rep in run.alive():
    meta = {'config': run_files.config_json(rep.config), 'step': p.step,
            'epoch': p.step / run.steps_per_epoch, 'pending_train_metrics': rep.pending,
            'metrics_lines': rep.log.lines}
    rep.ckpt.save(p.step, run.take(host_state, r), meta, data_iterator=rep.data.train_iter,
                  force=True)
  p.last_saved = p.step
  return state


def _itstime(step: int, every: int, last: int) -> bool:
  """Whether a periodic action runs after `step`: every `every` steps and after the last."""
  return step % every == 0 or step == last


def _next_batch(run: _Run) -> dict[str, np.ndarray]:
  """The next training batch of every run, stacked on a leading replica axis if stacked."""
  if not run.stacked:
    return next(run.replicas[0].data.train_iter)
  batches = [next(rep.data.train_iter) for rep in run.replicas]
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _train_loop(run: _Run, p: _Progress, state: steps.TrainState,
                stop: preemption.StopFlag) -> steps.TrainState:
  """Trains from step p.step to run.total_steps; see train_and_evaluate."""
  config, spe = run.config, run.steps_per_epoch
  if p.step >= run.total_steps:
    logging.info('Step %d >= %d: training is complete; evaluating only.', p.step,
                 run.total_steps)
  while p.step < run.total_steps:
    batch = _next_batch(run)
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
      for rep in run.replicas:
        rep.ckpt.wait_until_finished()
      raise preemption.TrainingInterrupted(
          stop.signum, p.step, ', '.join(rep.workdir for rep in run.replicas))
  if not any(rep.eval_metrics for rep in run.replicas):  # nothing trained in this session
    state = _evaluate(run, p, state, record=False)
  return state


def _restore(rep: _Replica, fresh: steps.TrainState, stacked: bool,
             max_step: int | None = None) -> tuple[steps.TrainState, int | None]:
  """The run's newest readable checkpoint (at most `max_step`), if any (it also moves its
  data iterator there): (unreplicated state, lines of metrics.jsonl to keep; None for a fresh
  run). Sets the replica's start step and pending metrics."""
  restored = rep.ckpt.restore_latest(fresh, data_iterator=rep.data.train_iter,
                                     max_step=max_step)
  if restored is None:
    rep.start_step, rep.pending = 0, []
    return fresh, None
  host_state, meta, step = restored
  host_state = steps.complete_restored(host_state, meta.get(checkpoint.MISSING_FIELDS_KEY, []))
  if meta['config'] != run_files.config_json(rep.config):
    logging.warning('Resuming %s with a config that differs from the checkpoint\'s.',
                    rep.workdir)
  logging.info('Resumed %sfrom step %d (epoch %.2f).', f'{rep.workdir} ' if stacked else '',
               step, step / rep.data.steps_per_epoch)
  rep.start_step, rep.pending = step, meta['pending_train_metrics']
  return host_state, meta['metrics_lines']


def _restore_together(replicas: list[_Replica], fresh: list[steps.TrainState]
                      ) -> list[tuple[steps.TrainState, int | None]]:
  """Restores runs that train together at one step: the newest that every run saved (and
  could read). A run that had saved later steps sets them aside (`restore_latest`); with no
  step in common every run starts afresh."""
  saved = [set(rep.ckpt.all_steps()) for rep in replicas]
  common = set.intersection(*saved)
  limit = max(common) if common else (0 if any(saved) else None)
  while True:
    out = [_restore(rep, f, True, limit) for rep, f in zip(replicas, fresh)]
    starts = {rep.start_step for rep in replicas}
    if len(starts) == 1:
      return out
    limit = min(starts)  # one run could not read the common step: go back further


def _warm_start(config: ml_collections.ConfigDict, workdir: str,
                fresh: steps.TrainState) -> steps.TrainState:
  """`fresh` (unreplicated) with the parameters and BatchNorm statistics of the latest
  checkpoint in `config.init_from` (two-stage training); its step and optimiser state stay
  fresh."""
  source = os.path.abspath(config.init_from)
  ckpt_dir = os.path.join(source, 'checkpoints')
  if source == os.path.abspath(workdir):
    raise ValueError(f'config.init_from={config.init_from!r} is this run\'s own --workdir; '
                     'point it at the run of the first stage.')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(
        f'config.init_from={config.init_from!r}: no checkpoints/ there; train the first stage '
        'into that directory first (python train.py --workdir=DIR ...).')
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
  state = fresh.replace(params=trained.params, batch_stats=trained.batch_stats)
  if state.ema:  # averaging starts at the weights this stage starts from
    state = state.replace(ema={'params': trained.params, 'batch_stats': trained.batch_stats})
  return state


def _flat(data: Any, prefix: str = '') -> dict[str, Any]:
  """Nested JSON data as {'a.b.c': value}."""
  if not isinstance(data, dict):
    return {prefix: data}
  out = {}
  for key, value in data.items():
    out.update(_flat(value, f'{prefix}.{key}' if prefix else key))
  return out


def check_joint(configs: list[ml_collections.ConfigDict]) -> None:
  """Raises ValueError unless the configs differ only in `REPLICA_KEYS` (one program)."""
  def core(config):
    return {k: v for k, v in _flat(run_files.config_json(config)).items()
            if k not in REPLICA_KEYS}
  first = core(configs[0])
  for config in configs[1:]:
    other = core(config)
    differ = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
    if differ:
      raise ValueError(f'runs trained together may differ only in {", ".join(REPLICA_KEYS)}; '
                       f'these differ: {", ".join(differ)}')


def _stack(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _setup(configs: list[ml_collections.ConfigDict], workdirs: list[str]):
  """Replicas (data of each run), strategy, model, tx and the keys of a program."""
  config = configs[0]
  replicas = []
  for cfg, workdir in zip(configs, workdirs):
    data = pipeline.create_datasets(cfg, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    _check_data(cfg, data)
    replicas.append(_Replica(config=cfg, workdir=workdir, data=data))
  data = replicas[0].data
  total_steps = optim.total_train_steps(config, data.steps_per_epoch)
  schedule = optim.learning_rate_schedule(config, data.steps_per_epoch, total_steps)
  ctx = steps.StepContext(config=config, mean=data.mean, std=data.std,
                          num_classes=data.num_classes, schedule=schedule,
                          halt_temperature=optim.halt_temperature_schedule(config, total_steps),
                          energy_weight=optim.energy_weight_schedule(config, total_steps))
  stacked = len(configs) > 1
  strategy = parallel.create_strategy(ctx, replicas=len(configs) if stacked else None)
  model = network.create_model(config.model, bn_axis_name=parallel.bn_axis_name(config))
  keys = [jax.random.split(jax.random.key(cfg.seed)) for cfg in configs]
  return replicas, strategy, model, optim.create_optimizer(config, schedule), keys, total_steps


def train_and_evaluate_replicas(configs: list[ml_collections.ConfigDict],
                                workdirs: list[str]) -> list[dict[str, Any]]:
  """Trains several runs of one config (they may differ in `REPLICA_KEYS`) in one program.

  Each run is what `train_and_evaluate(configs[i], workdirs[i])` would give: its own
  initialisation, data order, augmentation keys and BatchNorm statistics, its own
  config.json, metrics.jsonl, TensorBoard files and checkpoints in its directory, so that it
  resumes, evaluates and plots as a run trained alone. With one config it is that run. The
  runs must resume from the same step (a directory's latest checkpoint; fresh runs at 0).

  Returns:
    One dict per run, as `train_and_evaluate` returns, plus 'failure' (the message of the
    error that stopped it, or None) with several runs: a run whose loss turns non-finite
    stops alone, with the checkpoints it had.

  Raises:
    ValueError: the configs differ in more than `REPLICA_KEYS`.
    pipeline.DatasetUnavailableError, NonFiniteLossError (of a single run, or of every run),
    preemption.TrainingInterrupted: as `train_and_evaluate`.
  """
  if len(configs) != len(workdirs) or not configs:
    raise ValueError('give one work directory per config')
  check_joint(configs)
  if len(configs) > 1 and jax.process_count() > 1:
    raise ValueError('runs trained together (several seeds) need a single process')
  wall_start = time.monotonic()
  for workdir in workdirs:
    os.makedirs(workdir, exist_ok=True)
  replicas, strategy, model, tx, keys, total_steps = _setup(configs, workdirs)
  config = configs[0]
  # On CPU, saves gain little from running in the background, and there the background copies
  # can starve XLA's in-process collectives of threads (a rendezvous abort with virtual devices).
  async_save = jax.default_backend() != 'cpu'
  try:
    stacked = len(replicas) > 1
    fresh = []
    for rep, (init_key, _) in zip(replicas, keys):
      rep.ckpt = checkpoint.Checkpointer(os.path.join(rep.workdir, 'checkpoints'),
                                         max_to_keep=config.keep_checkpoints,
                                         async_save=async_save)
      state = steps.create_train_state(model, init_key, tx, ema=steps.ema_decay(config) > 0)
      if not stacked:  # restore into the strategy's layout (global arrays across processes)
        state = strategy.get_state(strategy.put_state(state))
      fresh.append(state)
    restored = (_restore_together(replicas, fresh) if stacked
                else [_restore(replicas[0], fresh[0], False)])
    states, resume_lines = [], []
    for rep, (state, lines) in zip(replicas, restored):
      if lines is None and rep.config.init_from:  # a resumed run keeps its own checkpoint
        state = _warm_start(rep.config, rep.workdir, state)
      states.append(state)
      resume_lines.append(lines)
      if jax.process_index() == 0:
        run_files.write_config(rep.workdir, rep.config)
    step = replicas[0].start_step
    state = strategy.put_state(_stack(states) if stacked else states[0])
    aug_key = jnp.stack([k for _, k in keys]) if stacked else keys[0][1]
    logging.info('%d parameters; %d steps (%d per epoch), global batch %d on %d devices (%s)%s.',
                 sum(x.size for x in jax.tree.leaves(states[0].params)), total_steps,
                 replicas[0].data.steps_per_epoch, config.batch_size, jax.device_count(),
                 config.parallel,
                 f'; {len(replicas)} runs side by side (seeds '
                 f'{", ".join(str(c.seed) for c in configs)})' if stacked else '')
    for rep, lines in zip(replicas, resume_lines):
      rep.log = run_files.MetricsLog(rep.workdir, jax.process_index() == 0, lines, step)
    run = _Run(config=config, replicas=tuple(replicas), stacked=stacked, strategy=strategy,
               aug_key=aug_key, total_steps=total_steps)
    progress = _Progress(step=step, last_saved=step if step else None)
    with preemption.StopFlag(replicas[0].ckpt.reached_preemption) as stop:
      _train_loop(run, progress, state, stop)
  finally:
    for rep in replicas:
      if rep.log is not None:
        rep.log.close()
      if rep.ckpt is not None:
        rep.ckpt.close()
  finals = []
  for rep in replicas:
    final = {**rep.train_summary, **rep.eval_metrics, 'step': progress.step,
             'epoch': progress.step / rep.data.steps_per_epoch, 'start_step': rep.start_step,
             'wall_time_s': time.monotonic() - wall_start}
    if stacked:
      final['failure'] = rep.failure
    if rep.failure is None:
      logging.info('\n%s%s', run.prefix(rep),
                   run_files.format_summary(final, config.model.timesteps))
    finals.append(final)
  return finals


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
  return train_and_evaluate_replicas([config], [workdir])[0]
