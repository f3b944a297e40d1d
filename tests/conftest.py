"""Test setup: 8 virtual CPU devices for multi-device tests, fast compiles."""
import contextlib
import os

import pytest

# Must happen before jax is imported anywhere. Eight virtual devices share two cores, so one
# device can reach a pmap collective long after the others; XLA:CPU aborts the process when a
# collective waits longer than 40 s by default, which a loaded machine can exceed. 300 s still
# turns a real deadlock into an abort with a message instead of a hang.
COLLECTIVE_TIMEOUT_FLAG = '--xla_cpu_collective_call_terminate_timeout_seconds=300'
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count=8 {COLLECTIVE_TIMEOUT_FLAG}"
                           ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Fewer XLA passes, here and in every train.py / ablate / convert subprocess a test starts:
# compiling is most of the suite's time, and no test is about the optimised program's speed.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)


def tiny_model_config(**overrides):
  """A small CIFAR-geometry model config (dim 32, 2 blocks, T 3) with dotted-key overrides."""
  from configs import default
  cfg = default.get_model_config()
  cfg.dim, cfg.heads, cfg.depth, cfg.timesteps = 32, 2, 2, 3
  for key, value in overrides.items():
    node = cfg
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return cfg


@contextlib.contextmanager
def persistent_compilation_cache(cache: str):
  """Points jax's persistent compilation cache at `cache`, keeping every entry, for the block;
  subprocesses given the same directory reuse what this process compiled."""
  options = {'jax_compilation_cache_dir': cache,
             'jax_persistent_cache_min_compile_time_secs': 0.0,
             'jax_persistent_cache_min_entry_size_bytes': 0}
  previous = {k: getattr(jax.config, k) for k in options}
  for k, v in options.items():
    jax.config.update(k, v)
  try:
    yield cache
  finally:
    for k, v in previous.items():
      jax.config.update(k, v)


@pytest.fixture(scope='session', autouse=True)
def session_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the whole session, also for the subprocesses that
  tests start (JAX_COMPILATION_CACHE_DIR): the smoke model's programs, which most modules and
  the train.py / ablate subprocesses build, compile once. It starts empty in every session."""
  cache = str(tmp_path_factory.getbasetemp() / 'jax_cache_session')
  env = {'JAX_COMPILATION_CACHE_DIR': cache, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
  previous = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    with persistent_compilation_cache(cache):
      yield cache
  finally:
    for k, v in previous.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
