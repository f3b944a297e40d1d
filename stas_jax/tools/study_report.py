"""The outputs of a study (`stas_jax.tools.ablate`): the per-row and per-run tables (CSV and
markdown, mean ± sample std over seeds) and the accuracy-energy and temporal-similarity
figures. `rows` are `ablate.Row`s; `reports` map a row name to its runs' eval.json reports.
"""
import csv
import os
import statistics
from typing import Any, Sequence

from absl import logging
import ml_collections

from stas_jax.model import energy
from stas_jax.tools import plots

CSV, RUNS_CSV, MD = 'ablation.csv', 'ablation_runs.csv', 'ablation.md'
ACCURACY_ENERGY_PNG, SIMILARITY_PNG = 'accuracy_energy.png', 'temporal_similarity.png'
EMBED_NAMES = {'sps': 'SPS', 'isps': 'I-SPS'}

_MEASURES = (('top1', 'top1', 100.0), ('top5', 'top5', 100.0), ('energy_mj', 'energy_mj', 1.0),
             ('token_ratio', 'token_ratio', 1.0), ('timesteps_per_token', 'timesteps', 1.0))


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and sample standard deviation (None for a single value)."""
  values = [float(v) for v in values]
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _run_lines(rows: Sequence[Any], reports: dict[str, list[dict[str, Any]]]
               ) -> list[dict[str, Any]]:
  """One line per run (row and seed) with its own figures, as in ablation_runs.csv."""
  out = []
  for row in rows:
    for r in reports[row.name]:
      line = {'row': row.name, 'seed': r['config']['seed']}
      line.update({col: scale * r[key] for col, key, scale in _MEASURES})
      line.update({f'energy_{k}_mj': r['energy_split_mj'][k] for k in energy.SPLIT})
      line['train_wall_time_s'] = r.get('train_wall_time_s')
      line['joint_runs'] = r.get('joint_runs', 1)
      line['run_dir'] = r['workdir']
      out.append(line)
  return out


def _table_rows(rows: Sequence[Any], reports: dict[str, list[dict[str, Any]]],
                baseline: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
  """One line per row: each measure's mean and sample std over the row's seeds; the accuracy
  change and energy saving are relative to the baseline row's means."""
  base_top1 = base_energy = None
  if baseline is not None:
    base_top1 = statistics.fmean(100 * r['top1'] for r in baseline)
    base_energy = statistics.fmean(r['energy_mj'] for r in baseline)
  out = []
  for row in rows:
    runs = reports[row.name]
    line = {'row': row.name, 'kind': row.kind, 'patch_embed': row.patch_embed,
            'halt_mode': row.halt_mode, 'timesteps': row.timesteps, 'seeds': len(runs)}
    for col, key, scale in _MEASURES:
      line[col], line[f'{col}_std'] = _mean_std([scale * r[key] for r in runs])
    line['delta_top1_pp'] = None if base_top1 is None else line['top1'] - base_top1
    line['energy_saving_pct'] = (None if base_energy is None
                                 else 100 * (1 - line['energy_mj'] / base_energy))
    line.update({f'energy_{k}_mj': statistics.fmean(r['energy_split_mj'][k] for r in runs)
                 for k in energy.SPLIT})
    line['run_dir'] = row.run_dir
    out.append(line)
  return out


def _round(value):
  return float(f'{value:.6g}') if isinstance(value, float) else value


def _fmt(value, spec: str, suffix: str = '') -> str:
  return '-' if value is None else f'{value:{spec}}{suffix}'


def _pm(line: dict[str, Any], col: str, spec: str) -> str:
  """'mean +- std' of a column ('mean' alone for one seed)."""
  std = line[f'{col}_std']
  return f'{line[col]:{spec}}' + ('' if std is None else f' ± {std:{spec}}')


def format_markdown(lines: list[dict[str, Any]], base: ml_collections.ConfigDict,
                    study: ml_collections.ConfigDict, steps: int) -> str:
  """ablation.md: the grid table (as in the paper) and the timestep-sweep table."""
  m = base.model
  seeds = ', '.join(str(k) for k in (study.seeds or (base.seed,)))
  md = ['# Ablation: patch embedding x halting mode, and timesteps\n\n',
        f'Every row: {base.data.dataset}, dim {m.dim}, depth {m.depth}, {m.heads} heads, '
        f'{steps} training steps of batch {base.batch_size}, seeds {seeds}; mean ± sample std '
        f'over the seeds; energy per test image (45 nm: 0.9 pJ / AC, 4.6 pJ / MAC); saving '
        f'and accuracy change of the means vs `{study.baseline}`.\n\n']
  header = ('row', 'patch embed', 'halting', 'T', 'top-1 (%)', 'change (pp)', 'energy (uJ)',
            'saving (%)', 'token ratio', 'timesteps')
  for kind, title in (('grid', 'Grid'), ('t_sweep', 'Timestep sweep of ' +
                                          '-'.join(study.full_model))):
    sel = [l for l in lines if l['kind'] == kind]
    if not sel:
      continue
    md.append(f'## {title}\n\n| ' + ' | '.join(header) + ' |\n|' + ' --- |' * len(header) + '\n')
    for l in sel:
      micro = dict(l, energy_uj=1e3 * l['energy_mj'],
                   energy_uj_std=None if l['energy_mj_std'] is None else 1e3 * l['energy_mj_std'])
      cells = (f"`{l['row']}`", EMBED_NAMES.get(l['patch_embed'], l['patch_embed']),
               l['halt_mode'], l['timesteps'], _pm(l, 'top1', '.2f'),
               _fmt(l['delta_top1_pp'], '+.2f'), _pm(micro, 'energy_uj', '.2f'),
               _fmt(l['energy_saving_pct'], '.1f'), _pm(l, 'token_ratio', '.3f'),
               _pm(l, 'timesteps_per_token', '.2f'))
      md.append('| ' + ' | '.join(str(c) for c in cells) + ' |\n')
    md.append('\n')
  md.append('## Energy by part (uJ / image)\n\n| row | ' + ' | '.join(energy.SPLIT) + ' |\n|'
            + ' --- |' * (len(energy.SPLIT) + 1) + '\n')
  seen = set()
  for l in lines:
    if l['run_dir'] not in seen:
      seen.add(l['run_dir'])
      md.append(f"| `{l['row']}` | " + ' | '.join(f"{1e3 * l[f'energy_{k}_mj']:.3f}"
                                                  for k in energy.SPLIT) + ' |\n')
  md.append(f'\n![accuracy vs energy]({ACCURACY_ENERGY_PNG})\n')
  return ''.join(md)


def _write_csv(path: str, lines: list[dict[str, Any]]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(lines[0]))
    writer.writeheader()
    writer.writerows([{k: _round(v) for k, v in l.items()} for l in lines])


def write_outputs(out: str, rows: Sequence[Any], reports: dict[str, list[dict[str, Any]]],
                  base: ml_collections.ConfigDict, study: ml_collections.ConfigDict,
                  steps: int, failed: Sequence[str] = ()) -> list[dict[str, Any]]:
  """ablation.csv, ablation_runs.csv, ablation.md and the two study figures; returns the table
  lines (one per row, means and stds over its seeds). `failed` names runs that stopped in
  training (a non-finite loss); the tables leave them out and ablation.md lists them."""
  baseline = reports.get(study.baseline)
  if baseline is None:
    logging.warning('baseline row %s not in this study: no saving / change columns',
                    study.baseline)
  lines = _table_rows(rows, reports, baseline)
  _write_csv(os.path.join(out, CSV), lines)
  _write_csv(os.path.join(out, RUNS_CSV), _run_lines(rows, reports))
  with open(os.path.join(out, MD), 'w') as f:
    f.write(format_markdown(lines, base, study, steps))
    if failed:
      f.write('\n**Runs that stopped in training** (non-finite loss; left out of the tables): '
              + ', '.join(failed) + '.\n')
  # One point per run directory: a sweep row that is a grid row's run only adds 'T=..'.
  points, errors = {}, {}
  for l in lines:
    if l['run_dir'] in points:
      points[l['run_dir']][0] += f" (T={l['timesteps']})"
      continue
    sweep = l['kind'] == 't_sweep'
    points[l['run_dir']] = [
        f"T={l['timesteps']}" if sweep else l['halt_mode'], l['energy_mj'], l['top1'],
        f"T sweep ({'+'.join(study.full_model)})" if sweep
        else EMBED_NAMES.get(l['patch_embed'], l['patch_embed'])]
    errors[l['run_dir']] = (l['energy_mj_std'] or 0.0, l['top1_std'] or 0.0)
  plots.accuracy_energy(os.path.join(out, ACCURACY_ENERGY_PNG),
                        [tuple(p) for p in points.values()],
                        title=f'{base.data.dataset}: accuracy vs energy per image'
                              + (f' (mean ± std, {len(study.seeds)} seeds)'
                                 if len(study.seeds) > 1 else ''),
                        errors=list(errors.values()) if len(study.seeds) > 1 else None)
  curves = {}
  by_run = {row.run_dir: reports[row.name] for row in rows}
  for name in study.similarity_rows:  # a grid row's name is its run directory
    r = reports.get(name, by_run.get(name))
    if r is not None:
      r = r[0]  # the first seed's run
      pe = EMBED_NAMES.get(r['config']['model']['patch_embed'], name)
      curves[f"{pe} ({r['config']['model']['halt']['mode']})"] = (
          r['temporal_similarity_all_tokens'])
  if len(curves) >= 2:
    plots.temporal_similarity(os.path.join(out, SIMILARITY_PNG), curves,
                              title='Encoder-block inputs: cosine similarity, t vs t+1 '
                                    '(trained runs, test set)')
  else:
    logging.warning('similarity rows %s not all in this study: no %s',
                    list(study.similarity_rows), SIMILARITY_PNG)
  return lines
