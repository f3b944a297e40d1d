"""Evaluation report of a trained run: accuracy, token usage, energy and its split, firing rates,
token ratio per (t, l) cell and temporal similarity, written to RUN/eval.json and RUN/eval.md.

  python -m stas_jax.tools.evaluate --workdir=runs/demo [--config=configs/demo.py] [--early_exit]
      [--plots] [--max_batches=N] [--weights=raw|ema]

The config comes from RUN/config.json unless --config is given. --weights=ema evaluates the
moving average of the weights (runs trained with config.ema_decay > 0) and writes
RUN/eval_ema.json and RUN/eval_ema.md instead, beside the raw weights' report. --early_exit also runs
`stas_jax.model.early_exit.apply` (same predictions) and times it against the dense forward pass;
--plots writes RUN/plots/*.png.
"""
import functools
import json
import logging as std_logging
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from stas_jax.model import early_exit
from stas_jax.model import energy
from stas_jax.train import evaluation
from stas_jax.model import halting
from stas_jax.data import pipeline
from stas_jax.train import optim
from stas_jax.tools import plots
from stas_jax.train import run_files
from stas_jax.train import steps
from stas_jax.tools import timing

EVAL_JSON, EVAL_MD, PLOTS_DIR = 'eval.json', 'eval.md', 'plots'
# The report files of each choice of weights (`evaluation.WEIGHTS`).
REPORT_FILES = {'raw': (EVAL_JSON, EVAL_MD), 'ema': ('eval_ema.json', 'eval_ema.md')}
NUM_PLOT_IMAGES = 4


def _batch_sums(variables, batch, *, model, ctx):
  """`evaluation.masked_sums` of one eval batch plus what only the report needs: the active
  tokens per (t, l) cell and the temporal-similarity sums; also the batch's active mask and
  predictions (for the halting heat map)."""
  images, targets = evaluation.model_inputs(batch, ctx)
  logits, aux = evaluation.forward(model.apply, variables, images, ctx.config, capture=True)
  sums = evaluation.masked_sums(logits, targets, batch, aux, model.spec)
  mask = batch['mask'].astype(jnp.float32)
  active = aux['active'] * mask[None, None, :, None]                  # (T, L, B, N)
  sums['cell_active'] = jnp.sum(active, axis=(2, 3))                   # (T, L)
  # Similarity sums: the mean times its weight, so that batches combine exactly.
  every = jnp.broadcast_to(mask[None, None, :, None], active.shape)
  for name, weights in (('similarity_active', active), ('similarity_all', every)):
    sim = halting.temporal_similarity(aux['block_inputs'], weights)    # (L, T - 1)
    w = jnp.sum(weights[:-1] * weights[1:], axis=(2, 3)).T
    sums[name] = sim * w
    sums[name + '_weight'] = w
  return sums, aux['active'], jnp.argmax(logits, -1)


# Jitted `_batch_sums` per model and input normalisation: the runs of a study that differ only in
# their seed share one compiled program.
_BATCH_SUMS: dict[Any, Any] = {}


def _batch_sums_fn(model, ctx: steps.StepContext):
  config = run_files.config_json(ctx.config)
  del config['seed']
  key = (model.spec, json.dumps(config, sort_keys=True), np.asarray(ctx.mean).tobytes(),
         np.asarray(ctx.std).tobytes(), ctx.num_classes)
  if key not in _BATCH_SUMS:
    _BATCH_SUMS[key] = jax.jit(functools.partial(_batch_sums, model=model, ctx=ctx))
  return _BATCH_SUMS[key]


REPORT_ONLY = ('cell_active', 'similarity_active', 'similarity_active_weight',
               'similarity_all', 'similarity_all_weight')


def _time_forward(fns, variables, batches, repeats: int = 3) -> tuple[list, list]:
  """Median wall time of each fn over the batches (after a warm-up call), and its outputs."""
  for fn in fns:
    jax.block_until_ready(fn(variables, batches[0]))
  passes = [lambda fn=fn: [fn(variables, b) for b in batches] for fn in fns]
  times, outs = timing.alternating(passes, repeats)
  return [float(np.median(t)) for t in times], outs


def _early_exit_report(model, variables, ctx, batches) -> dict[str, Any]:
  """Early-exit vs dense forward: agreement of predictions and wall time (compile excluded)."""

  @jax.jit
  def dense(v, batch):
    images = evaluation.model_inputs(batch, ctx)[0]
    return evaluation.forward(model.apply, v, images, ctx.config)[0]

  @jax.jit
  def fast(v, batch):
    logits, aux = early_exit.apply(model, v, evaluation.model_inputs(batch, ctx)[0])
    return logits, aux['timesteps_run']

  (dense_s, fast_s), (dense_out, fast_out) = _time_forward((dense, fast), variables, batches)
  agree, count, max_diff, steps_run = 0.0, 0.0, 0.0, []
  for batch, d, (f, t_run) in zip(batches, dense_out, fast_out):
    m = np.asarray(batch['mask']) > 0
    d, f = np.asarray(d)[m], np.asarray(f)[m]
    agree += float(np.sum(d.argmax(-1) == f.argmax(-1)))
    count += float(m.sum())
    if m.any():
      max_diff = max(max_diff, float(np.max(np.abs(d - f))))
    steps_run.append(int(t_run))
  return {'dense_wall_time_s': dense_s, 'early_exit_wall_time_s': fast_s,
          'speedup': dense_s / max(fast_s, 1e-12),
          'prediction_agreement': agree / max(count, 1.0), 'max_abs_logit_diff': max_diff,
          'mean_timesteps_run': float(np.mean(steps_run)), 'batches': len(batches),
          'device': jax.devices()[0].platform}


def evaluate_run(workdir: str, config: ml_collections.ConfigDict | None = None, *,
                 max_batches: int | None = None, with_early_exit: bool = False,
                 with_plots: bool = False, num_plot_images: int = NUM_PLOT_IMAGES,
                 data: pipeline.DataBundle | None = None,
                 weights: str = 'raw') -> dict[str, Any]:
  """Evaluates the latest checkpoint of `workdir` on the test split; writes eval.json / eval.md
  (`REPORT_FILES[weights]`).

  Args:
    workdir: a training work directory (checkpoints/, config.json).
    config: the run's config; default RUN/config.json.
    max_batches: evaluate at most this many batches (< 0: all); default config.steps_per_eval.
    with_early_exit: also time `early_exit.apply` against the dense forward pass.
    with_plots: write RUN/plots/{halting_heatmap,temporal_similarity,token_ratio_cells}.png.
    num_plot_images: test images in the halting heat map.
    data: an input pipeline for this config (built if None).
    weights: 'raw' or 'ema' (the weight EMA of a run trained with config.ema_decay > 0;
      `evaluation.NoEMAWeightsError` for a run without one).

  Returns:
    The report written to RUN/eval.json: 'step', 'total_steps', 'count', 'top1', 'top5',
    'loss', 'token_ratio', 'timesteps', 'energy_mj', 'energy_split_mj' {patch_embed,
    attention, mlp, head}, 'sops' {group/layer}, 'firing_rates' {layer}, 'token_ratio_per_cell'
    (T x L), 'temporal_similarity' (L x T-1, tokens active at both steps),
    'temporal_similarity_all_tokens' (L x T-1), 'weights', 'config', 'code_version',
    'eval_wall_time_s', and 'early_exit' / 'plots' when asked for.
  """
  start = time.monotonic()
  config = run_files.load_config(workdir) if config is None else config
  if data is None:
    data = pipeline.create_datasets(config, process_index=0, process_count=1)
  if max_batches is None:
    max_batches = config.get('steps_per_eval', -1)
  model, variables, step = evaluation.restore(config, workdir, weights)
  ctx = steps.StepContext(config=config, mean=data.mean, std=data.std,
                          num_classes=data.num_classes)
  run_batch = _batch_sums_fn(model, ctx)
  totals, batches, first = None, [], None
  for batch in evaluation.eval_batches(data.make_eval_iter(), max_batches):
    sums, active, preds = run_batch(variables, batch)
    if first is None:
      first = (batch, active, preds)
    totals = evaluation.add(totals, sums)
    if with_early_exit:
      batches.append(batch)
  if totals is None:
    raise ValueError('no evaluation batch (max_batches=0?)')
  detail = {k: np.asarray(totals.pop(k)) for k in REPORT_ONLY}
  report: dict[str, Any] = {'workdir': os.path.abspath(workdir), 'step': int(step),
                            'total_steps': optim.total_train_steps(config, data.steps_per_epoch)}
  report.update(evaluation.grouped(evaluation.means(totals)))
  count = report['count']
  report['token_ratio_per_cell'] = (detail['cell_active'] / (count * model.spec.num_tokens)
                                    ).tolist()
  for name, key in (('similarity_active', 'temporal_similarity'),
                    ('similarity_all', 'temporal_similarity_all_tokens')):
    w = detail[name + '_weight']
    report[key] = np.where(w > 0, detail[name] / np.maximum(w, 1e-12), np.nan).tolist()
  if with_early_exit:
    report['early_exit'] = _early_exit_report(model, variables, ctx, batches)
  if with_plots:
    report['plots'] = write_plots(workdir, report, model.spec.halt.mode, first, num_plot_images)
  report['weights'] = weights
  report['config'] = run_files.config_json(config)
  report['code_version'] = run_files.code_version()
  report['eval_wall_time_s'] = time.monotonic() - start
  json_name, md_name = REPORT_FILES[weights]
  with open(os.path.join(workdir, json_name), 'w') as f:
    json.dump(report, f, indent=1, allow_nan=True)
  with open(os.path.join(workdir, md_name), 'w') as f:
    f.write(format_markdown(report))
  return report


def write_plots(workdir: str, report: dict[str, Any], mode: str, first, num_images: int):
  """The run's three figures under RUN/plots/; returns their paths relative to RUN."""
  batch, active, preds = first
  k = int(min(num_images, np.sum(np.asarray(batch['mask']) > 0)))
  out = {
      'halting_heatmap': plots.halting_heatmap(
          os.path.join(workdir, PLOTS_DIR, 'halting_heatmap.png'), batch['image'][:k],
          np.asarray(active)[:, :, :k], mode, labels=batch['label'][:k],
          predictions=np.asarray(preds)[:k]),
      'token_ratio_cells': plots.token_ratio_cells(
          os.path.join(workdir, PLOTS_DIR, 'token_ratio_cells.png'),
          np.asarray(report['token_ratio_per_cell'])),
  }
  if np.size(report['temporal_similarity']):  # T > 1
    out['temporal_similarity'] = plots.temporal_similarity(
        os.path.join(workdir, PLOTS_DIR, 'temporal_similarity.png'),
        {'all tokens': np.asarray(report['temporal_similarity_all_tokens']),
         'tokens active at t and t+1': np.asarray(report['temporal_similarity'])})
  return {name: os.path.relpath(path, workdir) for name, path in out.items()}


def _table(header, rows) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def format_markdown(report: dict[str, Any]) -> str:
  """eval.md: the headline numbers, the energy split, per-cell token ratios, similarity and
  firing rates."""
  m = report['config']['model']
  steps, depth = m['timesteps'], m['depth']
  which = ' (EMA weights)' if report.get('weights') == 'ema' else ''
  md = [f"# Evaluation of {report['workdir']}{which}\n",
        f"Step {report['step']} of {report['total_steps']}; {int(report['count'])} test images; "
        f"patch embedding `{m['patch_embed']}`, halting `{m['halt']['mode']}`, T = {steps}, "
        f"L = {depth}, dim {m['dim']}.\n"]
  md.append(_table(('metric', 'value'), [
      ('top-1 accuracy', f"{100 * report['top1']:.2f} %"),
      ('top-5 accuracy', f"{100 * report['top5']:.2f} %"),
      ('loss', f"{report['loss']:.4f}"),
      ('token ratio', f"{report['token_ratio']:.4f}"),
      ('timesteps per token', f"{report['timesteps']:.3f} of {steps}"),
      ('energy', f"{report['energy_mj']:.5g} mJ / image")]))
  total = max(report['energy_mj'], 1e-30)
  md.append('\n## Energy split (mJ / image)\n')
  split = report['energy_split_mj']
  md.append(_table(('part', 'mJ', 'share'), [
      (k, f'{split[k]:.5g}', f'{100 * split[k] / total:.1f} %') for k in energy.SPLIT]))
  md.append('\n## Token ratio per (timestep, block) cell\n')
  md.append(_table(['t \\ block'] + [f'l{l + 1}' for l in range(depth)], [
      [f't{t + 1}'] + [f'{v:.3f}' for v in row]
      for t, row in enumerate(report['token_ratio_per_cell'])]))
  md.append('\n## Temporal similarity of block inputs (cosine, t vs t+1)\n')
  if steps > 1:
    header = ['block'] + [f'{t + 1}-{t + 2}' for t in range(steps - 1)]
    for key, what in (('temporal_similarity_all_tokens', 'all tokens'),
                      ('temporal_similarity', 'tokens active at both steps')):
      md.append(f'\n{what}:\n\n')
      md.append(_table(header, [[f'l{l + 1}'] + [f'{v:.4f}' for v in row]
                                for l, row in enumerate(report[key])]))
  else:
    md.append('T = 1: no consecutive timesteps.\n')
  md.append('\n## Firing rates\n')
  md.append(_table(('layer', 'rate'), [(k, f'{v:.4f}')
                                       for k, v in report['firing_rates'].items()]))
  if 'early_exit' in report:
    e = report['early_exit']
    md.append('\n## Early-exit inference\n')
    md.append(_table(('', 'value'), [
        ('dense forward', f"{e['dense_wall_time_s']:.3f} s"),
        ('early-exit forward', f"{e['early_exit_wall_time_s']:.3f} s"),
        ('speed-up', f"{e['speedup']:.2f}x ({e['device']}, {e['batches']} batches, median of "
                     '3 alternating passes, compile excluded)'),
        ('same predictions', f"{100 * e['prediction_agreement']:.2f} %"),
        ('max abs logit difference', f"{e['max_abs_logit_diff']:.2e}"),
        ('timesteps run per batch', f"{e['mean_timesteps_run']:.2f} of {steps}")]))
  if 'plots' in report:
    md.append('\n## Plots\n\n')
    md.extend(f'![{name}]({path})\n\n' for name, path in report['plots'].items())
  return ''.join(md)


def quiet_orbax(record) -> bool:
  """absl handler filter: keeps orbax's per-save INFO lines out of the progress log."""
  return (record.levelno >= std_logging.WARNING
          or f'{os.sep}orbax{os.sep}' not in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    report = evaluate_run(f.workdir, f.config, max_batches=f.max_batches,
                          with_early_exit=f.early_exit, with_plots=f.plots, weights=f.weights)
  except evaluation.NoEMAWeightsError as e:
    sys.exit(f'ERROR: {e}')
  print(format_markdown(report))
  logging.info('Wrote %s and %s', *(os.path.join(f.workdir, name)
                                    for name in REPORT_FILES[f.weights]))


def define_flags():
  """The command-line flags (defined only when run as a program: ablate imports this module)."""
  config_flags.DEFINE_config_file('config', default=None, help_string=(
      "Config file; default: the run's own RUN/config.json."), lock_config=True)
  flags.DEFINE_string('workdir', None, 'The run to evaluate (its checkpoints/).', required=True)
  flags.DEFINE_bool('early_exit', False,
                    'Also time stas_jax.model.early_exit against the dense path.')
  flags.DEFINE_bool('plots', False, 'Write RUN/plots/*.png.')
  flags.DEFINE_integer('max_batches', None, 'Evaluate at most N test batches (-1: all); '
                       'default: config.steps_per_eval.')
  flags.DEFINE_enum('weights', 'raw', list(evaluation.WEIGHTS), 'raw: the trained weights; '
                    'ema: their moving average (runs trained with config.ema_decay > 0), '
                    'reported in RUN/eval_ema.json and RUN/eval_ema.md.')


if __name__ == '__main__':
  define_flags()
  flags.FLAGS.set_default('logtostderr', True)
  logging.get_absl_handler().addFilter(quiet_orbax)
  app.run(main)
