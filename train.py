"""Trains and evaluates STAS: `python train.py [--config=configs/<name>.py] [--workdir=DIR]`.

Without --config it runs the offline MNIST demo (configs/demo.py). Override any config key on
the command line, e.g. `--config.batch_size=64`; the work directory defaults to
runs/<config file stem>, and rerunning with the same one resumes from its latest checkpoint.

Several processes (hosts) train one model when each is started with the same flags plus
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (docs/training.md, "Multi-process
training"); on SLURM, Open MPI or Cloud TPU `--config.distributed=True` lets JAX find these.
"""
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'demo.py')

_CONFIG = config_flags.DEFINE_config_file(
    'config', default=None,
    help_string='Experiment config file (default: the offline demo, configs/demo.py).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Checkpoints and logs go here (default: runs/<config file stem>).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process runs: HOST:PORT of process 0, the same for '
    'every process (default: $JAX_COORDINATOR_ADDRESS, or what JAX detects on a cluster).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Multi-process runs: the number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'Multi-process runs: this process\'s index, 0 .. N-1.')
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout_s', 100, 'Multi-process runs: a process silent for this long counts as '
    'dead, and the others exit with an error instead of waiting for it.')
_SHUTDOWN = flags.DEFINE_integer('shutdown_timeout_s', 300, 'Multi-process runs: how long a '
                                 'finished process waits for the others at exit.')
_INIT_TIMEOUT = flags.DEFINE_integer('initialization_timeout_s', 300, 'Multi-process runs: '
                                     'how long to wait for every process to connect.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  # Imported here so that flag errors come out before the slow JAX / TF imports.
  from stas_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  from stas_jax.train import distributed  # pylint: disable=g-import-not-at-top
  from stas_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from stas_jax.train import preemption  # pylint: disable=g-import-not-at-top
  from stas_jax.train import loop  # pylint: disable=g-import-not-at-top

  workdir = _WORKDIR.value
  if workdir is None:
    stem = os.path.splitext(os.path.basename(config_flags.get_config_filename(
        flags.FLAGS['config'])))[0]
    workdir = os.path.join('runs', stem)
  distributed.maybe_initialize_distributed(config, distributed.DistributedOptions(
      coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value, heartbeat_timeout_s=_HEARTBEAT.value,
      shutdown_timeout_s=_SHUTDOWN.value, initialization_timeout_s=_INIT_TIMEOUT.value))
  logging.info('Config:\n%s', config)
  logging.info('Work directory: %s', os.path.abspath(workdir))
  try:
    loop.train_and_evaluate(config, workdir)
  except pipeline.DatasetUnavailableError as e:
    sys.exit(f'\nERROR: {e}')
  except loop.NonFiniteLossError as e:
    sys.exit(f'\nERROR: {e}')
  except checkpoint.CheckpointError as e:
    sys.exit(f'\nERROR: {e}')
  except preemption.TrainingInterrupted as e:
    logging.warning('%s', e)
    sys.exit(128 + e.signum)


def _parse_flags(argv):
  """absl's flag parser, with configs/demo.py as the default --config, and with a misspelled
  --config.<key> override reported in one line (ml_collections' "Did you mean" hint included)
  instead of a traceback."""
  if not any(a == '--config' or a.startswith('--config=') for a in argv[1:]):
    argv = argv[:1] + [f'--config={_DEMO_CONFIG}'] + argv[1:]  # so --config.<key> still works
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as e:
    overrides = ' '.join(a for a in argv[1:] if a.startswith('--config.'))
    hint = e
    while isinstance(hint, BaseException) and hint.args:  # AttributeError(KeyError(text))
      hint = hint.args[0]
    hint = ' '.join(str(hint).split())
    sys.stderr.write(f'FATAL Flags parsing error: unknown config key in {overrides}: {hint}\n')
    sys.exit(1)


def _quiet_libraries(record) -> bool:
  """Keeps orbax's per-save INFO chatter out of the progress log (warnings still show)."""
  return (record.levelno >= std_logging.WARNING
          or f'{os.sep}orbax{os.sep}' not in record.pathname)


if __name__ == '__main__':
  flags.FLAGS.set_default('logtostderr', True)  # progress lines on the terminal
  logging.get_absl_logger().addFilter(_quiet_libraries)
  app.run(main, flags_parser=_parse_flags)
