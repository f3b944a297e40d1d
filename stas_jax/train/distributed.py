"""Joining a multi-process run: `jax.distributed.initialize` from train.py's flags or the
cluster's environment (docs/training.md, "Multi-process training")."""
import dataclasses
import os


from absl import logging
import jax
import ml_collections


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
  """How this process joins a multi-process run (train.py's flags); None: JAX finds out.

  Attributes:
    coordinator_address: host:port of process 0, which runs JAX's coordination service
      (also read from $JAX_COORDINATOR_ADDRESS).
    num_processes: how many processes take part.
    process_id: this process's index, 0 .. num_processes - 1.
    heartbeat_timeout_s: a process silent for this long counts as dead; the others then exit
      with an error instead of waiting for it.
    shutdown_timeout_s: how long a finishing process waits for the others at exit.
    initialization_timeout_s: how long to wait for every process to connect.
  """
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  heartbeat_timeout_s: int = 100
  shutdown_timeout_s: int = 300
  initialization_timeout_s: int = 300

  @property
  def requested(self) -> bool:
    return (any(v is not None for v in (self.coordinator_address, self.num_processes,
                                        self.process_id))
            or bool(os.environ.get('JAX_COORDINATOR_ADDRESS')))


def maybe_initialize_distributed(config: ml_collections.ConfigDict,
                                 options: DistributedOptions = DistributedOptions()) -> bool:
  """jax.distributed.initialize() for multi-process runs; call before any other JAX use.

  Runs when `options` name any part of the run (or $JAX_COORDINATOR_ADDRESS is set), or with
  config.distributed, where JAX detects the rest on the clusters it knows (SLURM, Open MPI,
  Cloud TPU, ...). Collectives go over NCCL on GPUs, ICI on TPUs and gloo on CPUs.

  Returns:
    Whether it initialised the distributed runtime.
  """
  if not (config.get('distributed', False) or options.requested):
    return False
  try:
    jax.distributed.initialize(
        coordinator_address=options.coordinator_address, num_processes=options.num_processes,
        process_id=options.process_id, initialization_timeout=options.initialization_timeout_s,
        heartbeat_timeout_seconds=options.heartbeat_timeout_s,
        shutdown_timeout_seconds=options.shutdown_timeout_s)
  except ValueError as e:  # some of the three missing, and no cluster to detect them from
    raise ValueError(
        f'{e} Start every process with --coordinator_address=HOST:PORT (of process 0), '
        '--num_processes=N and its own --process_id=I, or, under SLURM, Open MPI or on a '
        'Cloud TPU pod, with --config.distributed=True (docs/training.md, "Multi-process '
        'training").'
    ) from e
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices. If a process '
               'dies, the others stop within %d s (JAX: "Terminating process because the JAX '
               'distributed service detected fatal errors"); then rerun every process to '
               'resume from the last checkpoint.', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), options.heartbeat_timeout_s)
  return True
