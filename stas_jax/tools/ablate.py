"""Ablation study: {sps, isps} x {none, spatial, temporal, spatiotemporal} and a timestep sweep
of the full model, every row trained and evaluated with the same seeds and budget.

  python -m stas_jax.tools.ablate --config=configs/demo.py --out=runs/study --seeds=0,1,2 \
      [--study_config=FILE] [--rows=sps-none,isps-spatiotemporal] [--t_sweep=1,2] \
      [--weights=raw|ema]

Each row is a few config overrides of the one base config, trained with
`loop.train_and_evaluate` and evaluated with `stas_jax.tools.evaluate`: in OUT/<row> for the
base config's seed alone, in OUT/<row>/seed<k> for each of --seeds. Rerunning reuses the runs
that finished (their eval.json matches the run's config at the last step) and resumes a
half-trained one from its checkpoint. Writes OUT/ablation.csv (a line per row: the mean and
the sample std over seeds), OUT/ablation_runs.csv (a line per run), OUT/ablation.md,
OUT/accuracy_energy.png and OUT/temporal_similarity.png. --weights=ema evaluates the weight
EMA of each run (a base config with config.ema_decay > 0; reports in eval_ema.json).
"""
import dataclasses
import json
import os
import sys
import time
from typing import Any
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from stas_jax.tools import evaluate
from stas_jax.data import pipeline
from stas_jax.train import evaluation
from stas_jax.train import optim
from stas_jax.train import preemption
from stas_jax.train import run_files
from stas_jax.tools import study_report
from stas_jax.tools import workers as train_workers
from stas_jax.train import loop

ROW_INFO = 'ablation_row.json'


def default_study() -> ml_collections.ConfigDict:
  """The study a --study_config file may change (its get_config() returns one like this)."""
  s = ml_collections.ConfigDict()
  s.patch_embeds = ('sps', 'isps')
  s.halt_modes = ('none', 'spatial', 'temporal', 'spatiotemporal')
  s.rows = ()                      # subset of the grid rows to run ('sps-none', ...); () = all
  s.full_model = ('isps', 'spatiotemporal')  # the row the timestep sweep varies
  s.t_sweep = (1, 2, 4, 6)
  s.baseline = 'sps-none'          # energy saving and accuracy change are relative to this row
  s.similarity_rows = ('sps-none', 'isps-none')  # the SPS vs I-SPS temporal-similarity plot
  s.run_plots = True               # each row's own figures in OUT/<row>/plots
  s.seeds = ()                     # seeds of every row; () = the base config's seed alone
  return s


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the study table.

  Attributes:
    name: table name, e.g. 'isps-temporal' or 'isps-spatiotemporal-T2'.
    kind: 'grid' or 't_sweep'.
    patch_embed, halt_mode, timesteps: the overrides of the base config.
    run_dir: sub-directory of the run; rows with identical overrides share one.
  """
  name: str
  kind: str
  patch_embed: str
  halt_mode: str
  timesteps: int
  run_dir: str


def study_rows(base: ml_collections.ConfigDict, study: ml_collections.ConfigDict) -> list[Row]:
  """The grid rows (optionally a subset) followed by the timestep sweep of the full model."""
  base_t = base.model.timesteps
  grid = [Row(f'{pe}-{mode}', 'grid', pe, mode, base_t, f'{pe}-{mode}')
          for pe in study.patch_embeds for mode in study.halt_modes]
  if study.rows:
    known = {r.name for r in grid}
    unknown = sorted(set(study.rows) - known)
    if unknown:
      raise ValueError(f'unknown study rows {unknown}; the grid has {sorted(known)}')
    grid = [r for r in grid if r.name in set(study.rows)]
  pe, mode = study.full_model
  sweep = [Row(f'{pe}-{mode}-T{t}', 't_sweep', pe, mode, int(t),
               f'{pe}-{mode}' if int(t) == base_t else f'{pe}-{mode}-T{t}')
           for t in study.t_sweep]
  return grid + sweep


def row_config(base: ml_collections.ConfigDict, row: Row,
               seed: int | None = None) -> ml_collections.ConfigDict:
  """The base config with the row's patch embedding, halting mode and timesteps (and seed)."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.model.patch_embed = row.patch_embed
  config.model.halt.mode = row.halt_mode
  config.model.timesteps = row.timesteps
  if seed is not None:
    config.seed = seed
  return config


def run_dirs(row: Row, seeds: Sequence[int]) -> list[tuple[int | None, str]]:
  """(seed, run directory relative to OUT) of each run of a row: OUT/<row> without seeds."""
  if not seeds:
    return [(None, row.run_dir)]
  return [(int(k), os.path.join(row.run_dir, f'seed{int(k)}')) for k in seeds]


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


class StaleRunError(RuntimeError):
  """A row's directory holds a run of a different config."""


def config_differences(recorded: Any, current: Any, name: str = '') -> list[str]:
  """The keys whose value a run recorded (JSON data) differs from the current config's.

  Only keys in both are compared: keys added to or removed from the configs since the run are
  taken to keep the behaviour it had (a new option's default is the old behaviour).
  """
  if isinstance(recorded, dict) and isinstance(current, dict):
    out = []
    for key in recorded.keys() & current.keys():
      out.extend(config_differences(recorded[key], current[key],
                                    f'{name}.{key}' if name else key))
    return sorted(out)
  return [] if recorded == current else [f'{name or "config"}: {recorded!r} -> {current!r}']


# Halting settings that a run with halting mode none reads (the score parameters exist if
# learnable); its other halting constants only shape losses it does not compute.
_HALT_KEYS_WITHOUT_HALTING = ('mode', 'learnable')


def used_settings(config: Any) -> Any:
  """A config's JSON data without the groups its model does not use: `model.isps` for the SPS
  patch embedding, and the halting constants for halting mode none."""
  if not isinstance(config, dict) or not isinstance(config.get('model'), dict):
    return config
  model = dict(config['model'])
  if model.get('patch_embed') == 'sps':
    model.pop('isps', None)
  halt = model.get('halt')
  if isinstance(halt, dict) and halt.get('mode') == 'none':
    model['halt'] = {k: v for k, v in halt.items() if k in _HALT_KEYS_WITHOUT_HALTING}
  return dict(config, model=model)


def run_differences(recorded: Any, current: Any) -> list[str]:
  """`config_differences` of the settings the run's model uses (`used_settings`), so that a
  Spikformer row is reused when a study changes only I-SPS or halting settings."""
  return config_differences(used_settings(recorded), used_settings(current))


def same_config(recorded: Any, current: Any) -> bool:
  """Whether a run recorded with config `recorded` is one of `current` (`run_differences`)."""
  return not run_differences(recorded, current)


def finished_report(run_dir: str, config: ml_collections.ConfigDict,
                    weights: str = 'raw') -> dict[str, Any] | None:
  """The run's eval.json (eval_ema.json for the EMA `weights`) if this code
  (`run_files.code_version`) evaluated this config (`same_config`) at its last step; else the
  run is evaluated again (never retrained)."""
  report = _read_json(os.path.join(run_dir, evaluate.REPORT_FILES[weights][0]))
  if (report is not None and same_config(report.get('config'), run_files.config_json(config))
      and report.get('code_version') == run_files.code_version()
      and report['step'] >= report['total_steps']):
    return report
  return None


def training_finished(run_dir: str, total_steps: int) -> bool:
  """A checkpoint of the last step exists and metrics.jsonl holds the final evaluation."""
  if not os.path.isdir(os.path.join(run_dir, 'checkpoints', str(total_steps))):
    return False  # orbax renames a step's directory to its number only once it is complete
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return any(r.get('kind') == 'eval' and r.get('step') == total_steps for r in records)


def _row_info(run_dir: str) -> dict[str, Any]:
  return _read_json(os.path.join(run_dir, ROW_INFO)) or {}


def _write_row_info(run_dir: str, final: dict[str, Any], joint_runs: int) -> None:
  with open(os.path.join(run_dir, ROW_INFO), 'w') as f:
    json.dump({'train_wall_time_s': final['wall_time_s'], 'start_step': final['start_step'],
               'step': final['step'], 'joint_runs': joint_runs,
               'failure': final.get('failure')}, f)


def _check_not_stale(run_dir: str, config: ml_collections.ConfigDict) -> None:
  recorded = _read_json(os.path.join(run_dir, 'config.json'))
  if recorded is not None:
    diff = run_differences(recorded, run_files.config_json(config))
    if diff:
      raise StaleRunError(
          f'{run_dir} holds a run of another config ({"; ".join(diff[:4])}'
          f'{"; ..." if len(diff) > 4 else ""}); delete it or choose another --out.')


def train_runs(runs: list[tuple[ml_collections.ConfigDict, str]], joint: bool,
               workers: int = 1) -> None:
  """Trains (or resumes) runs: with `workers` > 1 each run in a worker process pinned to its
  share of the cores (`workers.train_in_workers`, the faster way on a CPU); else with `joint`
  the runs of one config side by side in one program (`loop.train_and_evaluate_replicas`, which
  resumes them from a step all of them saved; the way on GPU/TPU); else one by one. Each run's
  ROW_INFO records its training wall time (that of the program it was part of), how many runs
  that program trained, and a failure (non-finite loss) if it stopped alone."""
  if workers > 1:
    start = time.monotonic()
    results = train_workers.train_in_workers(runs, workers)
    for (_, run_dir), result in zip(runs, results):
      result.setdefault('wall_time_s', time.monotonic() - start)
      result.setdefault('start_step', None)
      result.setdefault('step', None)
      _write_row_info(run_dir, result, 1)
    return
  groups: dict[str, list[tuple[ml_collections.ConfigDict, str]]] = {}
  for config, run_dir in runs:
    key = json.dumps(_program_key(config), sort_keys=True) if joint else run_dir
    groups.setdefault(key, []).append((config, run_dir))
  for group in groups.values():
    logging.info('training %s%s', ', '.join(d for _, d in group),
                 ' side by side in one program' if len(group) > 1 else '')
    finals = loop.train_and_evaluate_replicas([c for c, _ in group], [d for _, d in group])
    for (_, run_dir), final in zip(group, finals):
      _write_row_info(run_dir, final, len(group))


def _program_key(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What must be equal for runs to train side by side (all but `loop.REPLICA_KEYS`)."""
  return {k: v for k, v in run_files.config_json(config).items() if k not in loop.REPLICA_KEYS}


def evaluate_run(row: Row, config: ml_collections.ConfigDict, run_dir: str,
                 data: pipeline.DataBundle, run_plots: bool,
                 trained_now: bool, weights: str = 'raw') -> dict[str, Any] | None:
  """A trained run's eval report (reused if this code made it for this config), plus
  'train_wall_time_s', 'joint_runs' and 'reused' ('evaluation', 'training' or None); None for
  a run that stopped in training (ROW_INFO's 'failure')."""
  info = _row_info(run_dir)
  if info.get('failure'):
    logging.error('%s: %s stopped in training: %s', row.name, run_dir, info['failure'])
    return None
  report = finished_report(run_dir, config, weights)
  reused = 'evaluation'
  if report is None:
    reused = None if trained_now else 'training'
    logging.info('%s: evaluating %s', row.name, run_dir)
    report = evaluate.evaluate_run(run_dir, config, max_batches=-1, with_plots=run_plots,
                                   data=data, weights=weights)
  else:
    logging.info('%s: reusing the finished run in %s', row.name, run_dir)
  return dict(report, train_wall_time_s=info.get('train_wall_time_s'),
              joint_runs=info.get('joint_runs', 1), reused=reused)


def runs_to_train(runs: list[tuple[ml_collections.ConfigDict, str]], total_steps: int,
                  weights: str = 'raw') -> list[tuple[ml_collections.ConfigDict, str]]:
  """The runs whose training is not finished (checking that none holds another config)."""
  out = []
  for config, run_dir in runs:
    if finished_report(run_dir, config, weights) is not None:
      continue
    _check_not_stale(run_dir, config)
    if not training_finished(run_dir, total_steps):
      out.append((config, run_dir))
  return out


def run_study(base: ml_collections.ConfigDict, out: str,
              study: ml_collections.ConfigDict | None = None, joint: bool = True,
              workers: int = 1, weights: str = 'raw') -> list[dict[str, Any]]:
  """Runs (or reuses) every row of the study, then writes the table and figures.

  Args:
    base: the base experiment config; rows override model.patch_embed / halt.mode / timesteps.
    out: the study directory.
    study: see `default_study`.
    joint, workers: how the runs train (`train_runs`): all runs of the study are planned first,
      trained, then evaluated row by row.
    weights: evaluate the 'raw' weights or their 'ema' (needs base.ema_decay > 0).

  Returns:
    The table lines (as in ablation.csv).

  Raises:
    evaluation.NoEMAWeightsError: weights='ema' with a base config that keeps no EMA (checked
      before anything trains).
  """
  evaluation.check_weights(base, weights, 'this study (its base config)')
  study = default_study() if study is None else study
  start = time.monotonic()
  os.makedirs(out, exist_ok=True)
  rows = study_rows(base, study)
  data = pipeline.create_datasets(base, process_index=0, process_count=1)
  steps = optim.total_train_steps(base, data.steps_per_epoch)
  row_runs: dict[str, list[tuple[ml_collections.ConfigDict, str]]] = {}
  unique: dict[str, ml_collections.ConfigDict] = {}
  for row in rows:
    row_runs[row.name] = [(row_config(base, row, seed), os.path.join(out, run_dir))
                          for seed, run_dir in run_dirs(row, study.seeds)]
    for config, run_dir in row_runs[row.name]:
      unique.setdefault(run_dir, config)
  to_train = runs_to_train([(c, d) for d, c in unique.items()], steps, weights)
  logging.info('Study of %d rows, %d runs: %d to train', len(rows), len(unique), len(to_train))
  if to_train:
    train_runs(to_train, joint, workers)
  trained = {d for _, d in to_train}
  reports: dict[str, list[dict[str, Any]]] = {}
  failed: list[str] = []
  by_dir: dict[str, dict[str, Any] | None] = {}
  for i, row in enumerate(rows):
    logging.info('[%d/%d] %s', i + 1, len(rows), row.name)
    for config, run_dir in row_runs[row.name]:
      if run_dir not in by_dir:
        by_dir[run_dir] = evaluate_run(row, config, run_dir, data, study.run_plots,
                                       run_dir in trained, weights)
    runs = row_runs[row.name]
    reports[row.name] = [by_dir[d] for _, d in runs if by_dir[d] is not None]
    failed += [f'{row.name} seed {c.seed}' for c, d in runs if by_dir[d] is None]
    if not reports[row.name]:
      raise loop.NonFiniteLossError(f'every run of row {row.name} stopped in training: '
                                    f'{", ".join(d for _, d in runs)} (see their logs)')
  lines = study_report.write_outputs(out, rows, reports, base, study, steps, failed=failed)
  logging.info('Study of %d rows (%d runs) done in %.1f min; see %s', len(rows), len(by_dir),
               (time.monotonic() - start) / 60, os.path.join(out, study_report.MD))
  return lines


def define_flags():
  """Command-line flags, defined only when run as a program (importing has no side effects)."""
  config_flags.DEFINE_config_file('config', default=None, help_string=(
      'Base experiment config (e.g. configs/ablation_demo.py).'), lock_config=True)
  config_flags.DEFINE_config_file('study_config', default=None, help_string=(
      'Optional study config file whose get_config() returns a ConfigDict like '
      'stas_jax.tools.ablate.default_study().'), lock_config=False)
  flags.DEFINE_string('out', None, 'Study directory (one sub-directory per run).')
  flags.DEFINE_list('rows', None, 'Grid rows to run, e.g. sps-none,isps-spatiotemporal '
                    "(default: the study config's, i.e. all).")
  flags.DEFINE_list('t_sweep', None, 'Timesteps of the sweep, e.g. 1,2,4,6; empty: no sweep '
                    "(default: the study config's).")
  flags.DEFINE_integer('workers', 1, 'Train in this many worker processes, each pinned to its '
                       'share of the CPU cores (the faster way on a CPU; docs/performance.md); '
                       '1: in this process.')
  flags.DEFINE_bool('joint', True, 'Train the seeds of a row side by side in one compiled '
                    'program (the train state stacked on a replica axis); --nojoint trains '
                    'them one after the other.')
  flags.DEFINE_enum('weights', 'raw', ['raw', 'ema'], 'Evaluate the trained weights (raw) or '
                    'their moving average (ema; needs config.ema_decay > 0).')
  flags.DEFINE_list('seeds', None, 'Seeds of every row, e.g. 0,1,2: runs in OUT/<row>/seed<k> '
                    "and mean +- std in the table (default: the study config's; none: the base "
                    "config's seed, in OUT/<row>).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.config is None or f.out is None:
    raise app.UsageError('--config and --out are required')
  study = f.study_config if f.study_config is not None else default_study()
  if f.rows is not None:
    study.rows = tuple(f.rows)
  if f.t_sweep is not None:
    study.t_sweep = tuple(int(t) for t in f.t_sweep)
  if f.seeds is not None:
    study.seeds = tuple(int(k) for k in f.seeds)
  try:
    run_study(f.config, f.out, study, joint=f.joint, workers=f.workers, weights=f.weights)
  except KeyboardInterrupt as e:  # the workers saved a checkpoint each (workers.py)
    sys.exit(f'\nInterrupted ({e}): rerun the same ablate command to resume the runs.')
  except preemption.TrainingInterrupted as e:
    logging.warning('%s (rerun the same ablate command: finished rows are reused)', e)
    sys.exit(128 + e.signum)
  except (loop.NonFiniteLossError, pipeline.DatasetUnavailableError,
          StaleRunError, train_workers.WorkerError, evaluation.NoEMAWeightsError) as e:
    sys.exit(f'\nERROR: {e}')
  with open(os.path.join(f.out, study_report.MD)) as fh:
    print(fh.read())


if __name__ == '__main__':
  define_flags()
  flags.FLAGS.set_default('logtostderr', True)
  logging.get_absl_handler().addFilter(evaluate.quiet_orbax)
  app.run(main)
