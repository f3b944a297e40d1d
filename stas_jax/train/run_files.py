"""What a run directory holds besides checkpoints: config.json, metrics.jsonl and TensorBoard
events (`MetricsLog`), and the closing summary printed at the end of a run.

clu's metric writers were considered for the logs: they bring no JSONL writer, and their
TensorBoard writers need TensorFlow or PyTorch, so the few lines here stay.
"""
import functools
import hashlib
import json
import os
from typing import Any

import ml_collections

CONFIG_JSON, METRICS_JSONL, TB_DIR = 'config.json', 'metrics.jsonl', 'tb'


@functools.lru_cache(maxsize=1)
def code_version() -> str:
  """A digest of the stas_jax sources: figures computed by other code (an evaluation made
  before a change of the energy rule, say) are recognised as stale by `stas_jax.tools.ablate`."""
  return source_digest(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def source_digest(package: str) -> str:
  """sha256 (16 hex digits) of every `*.py` file under `package`, sub-folders included, each
  keyed by its path relative to `package` (so a move counts as a change)."""
  digest = hashlib.sha256()
  paths = []
  for root, dirs, files in os.walk(package):
    dirs[:] = sorted(d for d in dirs if d != '__pycache__')
    paths += [os.path.join(root, n) for n in files if n.endswith('.py')]
  for path in sorted(paths, key=lambda p: os.path.relpath(p, package).split(os.sep)):
    rel = '/'.join(os.path.relpath(path, package).split(os.sep))
    with open(path, 'rb') as f:
      digest.update(rel.encode() + b'\0' + f.read())
  return digest.hexdigest()[:16]


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data, as written to RUN/config.json."""
  return json.loads(config.to_json_best_effort())


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(workdir, CONFIG_JSON), 'w') as f:
    json.dump(config_json(config), f, indent=2)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (RUN/config.json)."""
  path = os.path.join(workdir, CONFIG_JSON)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: is {workdir} a training work directory? '
                            'Pass --config to evaluate with an explicit config.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


class MetricsLog:
  """metrics.jsonl (one JSON object per logged step and per evaluation) and TensorBoard.

  Args:
    workdir: the run directory.
    enabled: False on every process but the first (which alone writes).
    resume_lines: lines of metrics.jsonl that the checkpoint being resumed had seen (the rest,
      logged after it by an interrupted run, is dropped); None for a fresh run.
    start_step: the resumed step (TensorBoard purges later events).
  """

  def __init__(self, workdir: str, enabled: bool, resume_lines: int | None, start_step: int):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_JSONL)
    self.lines = 0
    self.writer = None
    if not enabled:
      return
    existing = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        existing = f.read().splitlines()
    keep = existing[:resume_lines] if resume_lines is not None else []
    with open(self.path, 'w') as f:
      f.writelines(line + '\n' for line in keep)
    self.lines = len(keep)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.writer = SummaryWriter(os.path.join(workdir, TB_DIR),
                                purge_step=start_step + 1 if start_step else None)

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    self.lines += 1
    step = record['step']
    for key, value in record.items():
      if key not in ('step', 'kind') and isinstance(value, (int, float)):
        self.writer.add_scalar(key, value, step)
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def format_summary(metrics: dict[str, Any], timesteps: int) -> str:
  """The end-of-run table: accuracy, token ratio, energy per image, timesteps per token (and
  the EMA weights' accuracy and token ratio, the controller's last offset, where kept)."""
  rows = [('top-1 accuracy', f"{100 * metrics['eval/top1']:.2f} %"),
          ('top-5 accuracy', f"{100 * metrics['eval/top5']:.2f} %"),
          ('token ratio', f"{metrics['eval/token_ratio']:.4f}"),
          ('energy', f"{metrics['eval/energy_mj']:.5f} mJ / image"),
          ('timesteps per token', f"{metrics['eval/timesteps']:.3f} of {timesteps}"),
          ('test images', f"{int(metrics['eval/count'])}"),
          ('steps', f"{metrics['step']} ({metrics['epoch']:.2f} epochs)"),
          ('wall time', format_duration(metrics['wall_time_s']))]
  if 'eval_ema/top1' in metrics:
    rows[2:2] = [('EMA top-1 accuracy', f"{100 * metrics['eval_ema/top1']:.2f} %"),
                 ('EMA token ratio', f"{metrics['eval_ema/token_ratio']:.4f}")]
  if 'train/halt_offset' in metrics:
    rows.insert(-2, ('halt offset (train)', f"{metrics['train/halt_offset']:+.4f}"))
  width = max(len(name) for name, _ in rows)
  lines = ['=' * 44, 'STAS run summary', '-' * 44]
  lines += [f'{name:<{width}}  {value}' for name, value in rows]
  lines.append('=' * 44)
  return '\n'.join(lines)
