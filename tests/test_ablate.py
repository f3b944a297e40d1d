"""stas_jax.tools.ablate: row construction, a tiny study end to end, and a restart that retrains
nothing."""
import csv
import json
import os
import re
import shutil

import pytest

from configs import ablation_demo
from configs import smoke
from stas_jax.tools import ablate
from stas_jax.tools import evaluate
from stas_jax.train import run_files
from stas_jax.tools import study_report
from stas_jax.train import loop

# Every test here trains, spawns processes or exports programs.
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def compilation_cache(session_compilation_cache):
  """The session's persistent compilation cache (tests/conftest.py), also for subprocesses."""
  return session_compilation_cache


def _base():
  config = smoke.get_config()
  config.update_from_flattened_dict({'num_train_steps': 2, 'steps_per_eval': 1,
                                     'checkpoint_every_steps': 2})
  return config


def _tiny_study():
  study = ablate.default_study()
  study.rows = ('sps-none',)
  study.t_sweep = (smoke.get_config().model.timesteps,)  # the grid's full model: no new run
  study.similarity_rows = ('sps-none', 'isps-spatiotemporal')
  return study


def test_default_rows_are_the_grid_and_the_t_sweep():
  base = ablation_demo.get_config()
  rows = ablate.study_rows(base, ablate.default_study())
  names = [r.name for r in rows]
  assert names[:8] == [f'{pe}-{m}' for pe in ('sps', 'isps')
                       for m in ('none', 'spatial', 'temporal', 'spatiotemporal')]
  assert names[8:] == [f'isps-spatiotemporal-T{t}' for t in (1, 2, 4, 6)]
  assert base.model.timesteps == 4
  # T = 4 is the grid's full-model run itself: 11 runs for 12 rows.
  assert len({r.run_dir for r in rows}) == 11
  config = ablate.row_config(base, rows[1])
  assert (config.model.patch_embed, config.model.halt.mode) == ('sps', 'spatial')
  # Rows differ from the base config only in the three study keys.
  flat = lambda c: {k: v for k, v in run_files.config_json(c).items() if k != 'model'}
  assert flat(config) == flat(base)
  with pytest.raises(ValueError, match='unknown study rows'):
    study = ablate.default_study()
    study.rows = ('sps-nothing',)
    ablate.study_rows(base, study)


def test_config_differences_compare_the_keys_both_configs_have():
  recorded = {'seed': 0, 'old_key': 1, 'model': {'dim': 16, 'halt': {'mode': 'none'}}}
  assert ablate.same_config(recorded, {'seed': 0, 'new_key': 1,
                                       'model': {'dim': 16, 'halt': {'mode': 'none', 'x': 2}}})
  assert ablate.config_differences(recorded, {'seed': 1, 'model': {'dim': 16, 'halt': {
      'mode': 'temporal'}}}) == ["model.halt.mode: 'none' -> 'temporal'", 'seed: 0 -> 1']


@pytest.fixture(scope='module')
def first_study(tmp_path_factory, compilation_cache):
  del compilation_cache
  out = str(tmp_path_factory.mktemp('study'))
  lines = ablate.run_study(_base(), out, _tiny_study())
  return out, lines


def test_tiny_study_writes_table_and_figures(first_study):
  out, lines = first_study
  assert [l['row'] for l in lines] == ['sps-none', 'isps-spatiotemporal-T2']
  assert sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))) == [
      'isps-spatiotemporal', 'sps-none']
  with open(os.path.join(out, study_report.CSV)) as f:
    rows = list(csv.DictReader(f))
  assert [r['row'] for r in rows] == [l['row'] for l in lines]
  assert float(rows[0]['energy_saving_pct']) == 0.0
  for name in (study_report.MD, study_report.ACCURACY_ENERGY_PNG, study_report.SIMILARITY_PNG):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, study_report.MD)) as f:
    md = f.read()
  assert '`sps-none`' in md and 'saving (%)' in md and 'Timestep sweep' in md
  assert all(line['timesteps'] == 2 for line in lines)


def test_restart_retrains_nothing(first_study, monkeypatch):
  out, lines = first_study

  def forbidden(*args, **kwargs):
    raise AssertionError('a finished row was trained or evaluated again')

  monkeypatch.setattr(loop, 'train_and_evaluate', forbidden)
  monkeypatch.setattr(evaluate, 'evaluate_run', forbidden)
  again = ablate.run_study(_base(), out, _tiny_study())
  assert again == lines


def _evaluations_only(monkeypatch):
  """Fails on any training; returns the list that records which runs get evaluated."""
  calls = []
  real = evaluate.evaluate_run

  def counting(workdir, *args, **kwargs):
    calls.append(os.path.basename(workdir))
    return real(workdir, *args, **kwargs)

  monkeypatch.setattr(loop, 'train_and_evaluate',
                      lambda *a, **k: pytest.fail('retrained a finished run'))
  monkeypatch.setattr(evaluate, 'evaluate_run', counting)
  return calls


def test_trained_but_unevaluated_row_is_only_evaluated(first_study, monkeypatch, tmp_path):
  out, _ = first_study
  copy = str(tmp_path / 'study')
  shutil.copytree(out, copy)
  os.remove(os.path.join(copy, 'sps-none', evaluate.EVAL_JSON))
  calls = _evaluations_only(monkeypatch)
  ablate.run_study(_base(), copy, _tiny_study())
  assert calls == ['sps-none']
  with open(os.path.join(copy, 'sps-none', evaluate.EVAL_JSON)) as f:
    assert json.load(f)['step'] == 2


def test_row_evaluated_by_other_code_is_evaluated_again(first_study, monkeypatch, tmp_path):
  """An eval.json written by other stas_jax sources (say, before a change of the energy rule)
  is stale: the run is evaluated again with today's code, not retrained."""
  out, _ = first_study
  copy = str(tmp_path / 'study')
  shutil.copytree(out, copy)
  path = os.path.join(copy, 'sps-none', evaluate.EVAL_JSON)
  with open(path) as f:
    stale = json.load(f)
  stale['code_version'], stale['energy_mj'] = 'older-code', -1.0
  with open(path, 'w') as f:
    json.dump(stale, f)
  calls = _evaluations_only(monkeypatch)
  lines = ablate.run_study(_base(), copy, _tiny_study())
  assert calls == ['sps-none']
  with open(path) as f:
    fresh = json.load(f)
  assert fresh['code_version'] == run_files.code_version() and fresh['energy_mj'] > 0
  assert all(line['energy_mj'] > 0 for line in lines)


def test_run_of_another_config_is_refused_not_reused(first_study, monkeypatch, tmp_path):
  out, _ = first_study
  copy = str(tmp_path / 'study')
  shutil.copytree(out, copy)
  monkeypatch.setattr(loop, 'train_and_evaluate',
                      lambda *a, **k: pytest.fail('trained over a run of another config'))
  base = _base()
  base.optim.learning_rate = 5e-4
  with pytest.raises(ablate.StaleRunError,
                     match=re.escape('optim.learning_rate: 0.001 -> 0.0005')):
    ablate.run_study(base, copy, _tiny_study())


def test_seeds_run_every_row_per_seed_and_report_mean_and_std(tmp_path, compilation_cache):
  del compilation_cache
  study = _tiny_study()
  study.t_sweep = ()
  study.seeds = (0, 1)
  out = str(tmp_path / 'seeds')
  lines = ablate.run_study(_base(), out, study)
  assert sorted(os.listdir(os.path.join(out, 'sps-none'))) == ['seed0', 'seed1']
  with open(os.path.join(out, study_report.RUNS_CSV)) as f:
    runs = list(csv.DictReader(f))
  assert [(r['row'], int(r['seed'])) for r in runs] == [('sps-none', 0), ('sps-none', 1)]
  reports = []
  for seed in (0, 1):
    with open(os.path.join(out, 'sps-none', f'seed{seed}', evaluate.EVAL_JSON)) as f:
      reports.append(json.load(f))
  assert [r['config']['seed'] for r in reports] == [0, 1]
  (line,) = lines
  top1 = [100 * r['top1'] for r in reports]
  energy_mj = [r['energy_mj'] for r in reports]
  assert line['seeds'] == 2
  assert line['top1'] == pytest.approx(sum(top1) / 2)
  assert line['top1_std'] == pytest.approx(abs(top1[0] - top1[1]) / 2 ** 0.5)
  assert line['energy_mj'] == pytest.approx(sum(energy_mj) / 2)
  assert line['energy_mj_std'] == pytest.approx(abs(energy_mj[0] - energy_mj[1]) / 2 ** 0.5)
  assert energy_mj[0] != energy_mj[1]  # two seeds really are two different runs
  with open(os.path.join(out, study_report.MD)) as f:
    md = f.read()
  assert 'seeds 0, 1' in md and '±' in md


def test_runs_are_compared_on_the_settings_their_model_uses():
  base = run_files.config_json(ablation_demo.get_config())
  changed = run_files.config_json(ablation_demo.get_config())
  changed['model']['isps']['tail'] = 'any_spike'
  changed['model']['halt']['alpha_d'] = 0.5
  for pe, mode, same in (('sps', 'none', True), ('isps', 'none', False),
                         ('sps', 'temporal', False)):
    for c in (base, changed):
      c['model']['patch_embed'], c['model']['halt']['mode'] = pe, mode
    assert ablate.same_config(base, changed) == same, (pe, mode)
  changed['model']['halt']['learnable'] = True   # makes parameters even without halting
  base['model']['patch_embed'] = changed['model']['patch_embed'] = 'sps'
  base['model']['halt']['mode'] = changed['model']['halt']['mode'] = 'none'
  assert ablate.run_differences(base, changed) == ['model.halt.learnable: False -> True']
  rows = {r.name: r for r in ablate.study_rows(ablation_demo.get_config(),
                                               ablate.default_study())}
  assert ablate.row_config(ablation_demo.get_config(), rows['sps-none'], seed=7).seed == 7
