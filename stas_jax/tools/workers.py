"""Training runs in worker processes, each pinned to its own share of the CPU cores.

On a CPU the small ops of a demo-sized step leave cores idle, and the step is bound by memory
traffic, so N processes with 1/N of the cores each train N runs faster than one program that
trains them side by side (docs/performance.md). On GPU/TPU, train them side by side in one
program instead (`loop.train_and_evaluate_replicas`, ablate's default).

  python -m stas_jax.tools.workers JOB.json   # what each worker runs

A job file holds {'config': the run's config as JSON data, 'workdir': its directory}; the worker
trains it with `loop.train_and_evaluate` and writes the outcome to WORKDIR/worker_result.json.
"""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from absl import logging
import ml_collections

JOB_FILE, RESULT_FILE, LOG_FILE = 'worker_job.json', 'worker_result.json', 'worker.log'


class WorkerError(RuntimeError):
  """A worker process failed for another reason than a non-finite loss."""


def core_groups(workers: int, cores: set[int] | None = None) -> list[list[int]]:
  """The cores this process may use, split into `workers` groups of nearly equal size."""
  cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
  workers = max(1, min(workers, len(cores)))
  size, extra = divmod(len(cores), workers)
  groups, start = [], 0
  for i in range(workers):
    stop = start + size + (1 if i < extra else 0)
    groups.append(cores[start:stop])
    start = stop
  return groups


def _write_job(config: ml_collections.ConfigDict, workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, JOB_FILE)
  with open(path, 'w') as f:
    json.dump({'config': json.loads(config.to_json_best_effort()), 'workdir': workdir}, f)
  return path


def _run_one(job: str, cores: list[int], procs: dict[int, subprocess.Popen]) -> dict[str, Any]:
  """Runs one job in a worker pinned to `cores`; its result (or an error) as a dict."""
  workdir = os.path.dirname(job)
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  with open(os.path.join(workdir, LOG_FILE), 'w') as log:
    proc = subprocess.Popen([sys.executable, '-m', 'stas_jax.tools.workers', job], env=env,
                            stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))
    procs[proc.pid] = proc
    returncode = proc.wait()
    procs.pop(proc.pid, None)
  path = os.path.join(workdir, RESULT_FILE)
  if returncode == 0 and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  with open(os.path.join(workdir, LOG_FILE)) as f:
    tail = f.read()[-2000:]
  return {'error': f'worker for {workdir} exited with {returncode}:\n{tail}',
          'returncode': returncode}


def train_in_workers(runs: list[tuple[ml_collections.ConfigDict, str]],
                     workers: int) -> list[dict[str, Any]]:
  """Trains `runs` (config, workdir) in `workers` processes at a time, each pinned to its share
  of the cores (`core_groups`), taking the next run as one finishes.

  Returns:
    One result per run, in order: the run's final metrics (`loop.train_and_evaluate`, with
    'failure' None), or {'failure': message} for a run whose loss turned non-finite.

  Raises:
    WorkerError: a worker failed otherwise (its log's tail in the message).
    KeyboardInterrupt: on SIGINT / SIGTERM the workers get SIGTERM first, so that each saves a
      checkpoint; rerunning resumes them.
  """
  groups = core_groups(workers)
  jobs: queue.Queue = queue.Queue()
  for i, (config, workdir) in enumerate(runs):
    jobs.put((i, _write_job(config, workdir)))
  results: list[dict[str, Any] | None] = [None] * len(runs)
  procs: dict[int, subprocess.Popen] = {}

  def serve(cores):
    while True:
      try:
        i, job = jobs.get_nowait()
      except queue.Empty:
        return
      logging.info('worker on cores %s: %s', cores, os.path.dirname(job))
      results[i] = _run_one(job, cores, procs)

  def interrupt(signum, frame):
    del frame
    raise KeyboardInterrupt(signal.Signals(signum).name)

  threads = [threading.Thread(target=serve, args=(g,), daemon=True) for g in groups]
  previous = {}
  if threading.current_thread() is threading.main_thread():
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
  for t in threads:
    t.start()
  try:
    while any(t.is_alive() for t in threads):
      time.sleep(0.2)
  except BaseException:
    while not jobs.empty():   # start nothing more
      jobs.get_nowait()
    for proc in list(procs.values()):
      proc.send_signal(signal.SIGTERM)
    for t in threads:
      t.join(timeout=120)
    raise
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  errors = [r['error'] for r in results if r and 'error' in r]
  if errors:
    raise WorkerError('\n\n'.join(errors))
  return results


def _main(job_path: str) -> int:
  # Imported here: the parent imports this module to start workers and needs no JAX for it.
  from stas_jax.train import loop  # pylint: disable=g-import-not-at-top
  from stas_jax.train import preemption  # pylint: disable=g-import-not-at-top
  with open(job_path) as f:
    job = json.load(f)
  config, workdir = ml_collections.ConfigDict(job['config']), job['workdir']
  try:
    final = dict(loop.train_and_evaluate(config, workdir), failure=None)
  except loop.NonFiniteLossError as e:
    final = {'failure': str(e)}
  except preemption.TrainingInterrupted as e:
    logging.warning('%s', e)
    return 128 + e.signum
  with open(os.path.join(workdir, RESULT_FILE), 'w') as f:
    json.dump(final, f)
  return 0


if __name__ == '__main__':
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  sys.exit(_main(sys.argv[1]))
