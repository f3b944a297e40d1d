"""Run directories written by older stas-jax still restore and resume exactly.

tests/fixtures/old_run is a 4-step smoke run from commit 5096341 (README.md there), whose
checkpoints keep the data-iterator positions in meta['data_iterator_states'] rather than in a
grain `data` item.
"""
import json
import os
import re
import shutil


import jax
import numpy as np
import optax
import pytest

from configs import smoke
from conftest import persistent_compilation_cache
from stas_jax.train import checkpoint
from stas_jax.data import pipeline
from stas_jax.model import network
from stas_jax.train import optim
from stas_jax.train import steps
from stas_jax.train import loop

# Every test here trains, spawns processes or exports programs.
pytestmark = pytest.mark.slow

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'old_run')
OLD_STEPS, MORE_STEPS = 4, 8
# What the fixture was run with (README.md there), but for the number of steps. So that
# training on past the old run's end can equal one uninterrupted run: the learning rate is
# constant (min = peak), independent of num_train_steps; and parallel is 'jit', whose batch
# statistics are global. pmap averages per-device statistics (pmean) before every eval and
# save, and the mean of 8 equal float32 numbers is not always that number: the old run, which
# evaluated and saved at its last step, averaged once more there than an uninterrupted run.
OVERRIDES = {'checkpoint_every_steps': 2, 'optim.min_learning_rate': 1e-3, 'parallel': 'jit'}


def _config(num_train_steps):
  config = smoke.get_config()
  config.update_from_flattened_dict({**OVERRIDES, 'num_train_steps': num_train_steps})
  return config


def _fresh_state(config):
  """A newly initialised train state (concrete arrays), as a run builds before restoring."""
  model = network.create_model(config.model)
  tx = optim.create_optimizer(config, optax.constant_schedule(config.optim.learning_rate))
  return steps.create_train_state(model, jax.random.key(config.seed + 1), tx)


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _saved_state(workdir, step, config):
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    state, _ = ckpt.restore(step, _fresh_state(config))
  return state


def _assert_same_state(got, want, message=''):
  """Equal leaves, bit for bit."""
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  want_leaves = jax.tree_util.tree_leaves_with_path(want)
  assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
  for (path, a), (_, b) in zip(got_leaves, want_leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=f'{jax.tree_util.keystr(path)} {message}')


def _assert_same_end(got_dir, want_dir):
  """The two runs' states at MORE_STEPS are equal, bit for bit."""
  config = _config(MORE_STEPS)
  _assert_same_state(_saved_state(got_dir, MORE_STEPS, config),
                     _saved_state(want_dir, MORE_STEPS, config))


def _cpu() -> dict | None:
  """What decides XLA:CPU's float32 results here: the CPU's identity and vector extensions
  (XLA compiles for the host CPU). None where /proc/cpuinfo cannot be read."""
  try:
    with open('/proc/cpuinfo') as f:
      text = f.read().split('\n\n')[0]
  except OSError:
    return None
  fields = dict(line.split(':', 1) for line in text.splitlines() if ':' in line)
  fields = {k.strip(): v.strip() for k, v in fields.items()}
  simd = sorted(f for f in fields.get('flags', '').split()
                if re.match(r'(sse|avx|fma|f16c|amx)', f))
  return {'vendor_id': fields.get('vendor_id'), 'cpu family': fields.get('cpu family'),
          'model': fields.get('model'), 'simd': simd}


def _reproduces_fixture() -> bool:
  """Whether this CPU is one on which the fixture's steps were seen to be today's, bit for bit
  (reproduced_on.json). Elsewhere XLA:CPU may sum in another order, and a spike that flips
  amplifies a last-bit difference far past float32 noise (seen on an AMD EPYC, 2026-12-03):
  there the fixture cannot tell a code change from the CPU, and the two tests that compare
  with its numbers skip. The format tests and the resume test below run everywhere."""
  with open(os.path.join(FIXTURE, 'reproduced_on.json')) as f:
    return _cpu() in json.load(f)['cpus']


_OTHER_CPU = ('this CPU is not in tests/fixtures/old_run/reproduced_on.json, so the fixture '
              "cannot tell a code change from XLA:CPU's numerics here (see its README.md to "
              'add a CPU).')


def test_fixture_is_what_it_claims():
  with open(os.path.join(FIXTURE, 'config.json')) as f:
    saved = json.load(f)
  assert saved['num_train_steps'] == OLD_STEPS
  assert saved['checkpoint_every_steps'] == OVERRIDES['checkpoint_every_steps']
  assert saved['optim']['min_learning_rate'] == OVERRIDES['optim.min_learning_rate']
  assert saved['parallel'] == OVERRIDES['parallel']
  assert sorted(os.listdir(os.path.join(FIXTURE, 'checkpoints'))) == ['2', '4']
  assert not os.path.exists(os.path.join(FIXTURE, 'checkpoints', '4', 'data'))


def test_restore_latest_restores_state_and_iterator_position(tmp_path):
  config = _config(OLD_STEPS)
  workdir = str(tmp_path / 'run')
  shutil.copytree(FIXTURE, workdir)
  target = _fresh_state(config)
  resumed = pipeline.create_datasets(config, process_index=0, process_count=1).train_iter
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    state, meta, step = ckpt.restore_latest(target, data_iterator=resumed)
  assert step == OLD_STEPS and int(state.step) == OLD_STEPS and meta['step'] == OLD_STEPS
  assert jax.tree.structure(state) == jax.tree.structure(target)
  abstract = checkpoint.abstract_target(target)
  for got, fresh in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert got.shape == fresh.shape and got.dtype == fresh.dtype
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(state.params), jax.tree.leaves(target.params))]
  assert any(changed)  # trained weights, not the fresh ones
  # The old run consumed OLD_STEPS batches; the restored iterator goes on from there.
  reference = pipeline.create_datasets(config, process_index=0, process_count=1).train_iter
  for _ in range(OLD_STEPS):
    next(reference)
  for _ in range(2):
    want, got = next(reference), next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def _today_format_copy(old_dir, new_dir, config):
  """`old_dir` with its last step rewritten by today's Checkpointer: the same state and meta,
  and the position after that many batches (found by taking them, not by reading
  meta['data_iterator_states']) in a grain `data` item."""
  shutil.copytree(old_dir, new_dir, ignore=shutil.ignore_patterns('checkpoints'))
  with checkpoint.Checkpointer(os.path.join(old_dir, 'checkpoints')) as old:
    state, meta, step = old.restore_latest(_fresh_state(config))
  iterator = pipeline.create_datasets(config, process_index=0, process_count=1).train_iter
  for _ in range(step):
    next(iterator)
  meta = {k: v for k, v in meta.items() if k != checkpoint._LEGACY_DATA_KEY}
  with checkpoint.Checkpointer(os.path.join(new_dir, 'checkpoints')) as new:
    new.save(step, state, meta, data_iterator=iterator, force=True)
  assert os.path.isdir(os.path.join(new_dir, 'checkpoints', str(step), 'data'))


@pytest.fixture(scope='module')
def resumed_runs(tmp_path_factory):
  """Trained on to MORE_STEPS by today's code: the fixture, the fixture in today's checkpoint
  format, and (on a CPU that reproduces the fixture) a fresh run."""
  root = tmp_path_factory.mktemp('old_run')
  runs = {name: str(root / name) for name in ('resumed', 'today_format', 'uninterrupted')}
  shutil.copytree(FIXTURE, runs['resumed'])
  config = _config(MORE_STEPS)
  _today_format_copy(FIXTURE, runs['today_format'], config)
  summaries = {}
  with persistent_compilation_cache(str(root / 'jax_cache')):  # later runs compile nothing
    for name in ('resumed', 'today_format'):
      summaries[name] = loop.train_and_evaluate(config, runs[name])
    if _reproduces_fixture():
      loop.train_and_evaluate(config, runs['uninterrupted'])
  return runs, summaries


def test_old_format_resumes_as_todays_format(resumed_runs):
  """On any CPU: from the same state and iterator position, a step saved before checkpoints
  had a `data` item trains on exactly as one saved today (and test_train checks that today's
  format resumes as an uninterrupted run)."""
  runs, summaries = resumed_runs
  for summary in summaries.values():
    assert summary['start_step'] == OLD_STEPS and summary['step'] == MORE_STEPS
  got, want = _records(runs['resumed']), _records(runs['today_format'])
  assert got[:len(_records(FIXTURE))] == _records(FIXTURE)
  assert [r['step'] for r in got if r['kind'] == 'train'] == [2, 4, 6, 8]
  assert got == want
  _assert_same_end(runs['resumed'], runs['today_format'])


def test_resumed_old_run_equals_uninterrupted_run(resumed_runs):
  runs, _ = resumed_runs
  if not _reproduces_fixture():
    pytest.skip(_OTHER_CPU)
  got, want = _records(runs['resumed']), _records(runs['uninterrupted'])
  # The old run ended at OLD_STEPS and evaluated there; the uninterrupted one did not.
  old_end = {'step': OLD_STEPS, 'kind': 'eval'}
  assert [r for r in got if {k: r[k] for k in old_end} == old_end] == _records(FIXTURE)[-1:]
  assert [r for r in got if {k: r[k] for k in old_end} != old_end] == want
  _assert_same_end(runs['resumed'], runs['uninterrupted'])


def test_old_steps_are_the_steps_todays_code_takes(resumed_runs):
  """Tells a changed model, optimiser or data pipeline from a broken resume."""
  runs, _ = resumed_runs
  if not _reproduces_fixture():
    pytest.skip(_OTHER_CPU)
  config = _config(MORE_STEPS)
  _assert_same_state(
      _saved_state(runs['uninterrupted'], OLD_STEPS, config),
      _saved_state(FIXTURE, OLD_STEPS, config), message=(
          "differs between the fixture and an uninterrupted run of today's code at the same "
          'step, on a CPU that reproduced the fixture: the model, the optimiser or the data '
          'changed; regenerate the fixture (README.md there) if that was intended.'))
