"""Train-step time of this checkout against another commit of stas-jax, alternating runs.

  python benchmarks/versus_commit.py --base=5096341 --rounds=3 -- \
      --config=configs/demo.py --batch=64 --mode=train

Checks the base commit out into a temporary git worktree, then runs `benchmarks/bench.py`
(each tree its own) with the flags after `--`, in turns base, this checkout, base, ...: two
versions of one package cannot share a process, so the turns are processes, and alternating
them gives both the same drifting machine load. Prints every run's median step time and the
ratio of the medians of medians (this checkout / base); `--json` writes it all.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(tree: str, bench_args, out_json: str) -> dict:
  cmd = [sys.executable, os.path.join(tree, 'benchmarks', 'bench.py'), *bench_args,
         f'--json={out_json}']
  subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.DEVNULL,
                 env=dict(os.environ, PYTHONPATH=tree))
  with open(out_json) as f:
    return json.load(f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--base', required=True, help='commit (or ref) to compare against')
  parser.add_argument('--rounds', type=int, default=3, help='runs of each tree')
  parser.add_argument('--json', default=None, help='write the results here')
  parser.add_argument('bench_args', nargs='*', help='flags for bench.py (after --)')
  args = parser.parse_args()
  tmp = tempfile.mkdtemp(prefix='stas_versus_')
  base_tree = os.path.join(tmp, 'base')
  subprocess.run(['git', '-C', REPO, 'worktree', 'add', '--detach', base_tree, args.base],
                 check=True, capture_output=True)
  times = {'base': [], 'this': []}
  try:
    for i in range(args.rounds):
      for name, tree in (('base', base_tree), ('this', REPO)):
        result = _bench(tree, args.bench_args, os.path.join(tmp, f'{name}{i}.json'))
        times[name].append(result['step_time_median_s'])
        print(f'round {i + 1} {name}: median step {result["step_time_median_s"]:.4f} s',
              flush=True)
  finally:
    subprocess.run(['git', '-C', REPO, 'worktree', 'remove', '--force', base_tree],
                   check=False, capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)
  base, this = statistics.median(times['base']), statistics.median(times['this'])
  summary = {'base': args.base, 'bench_args': args.bench_args, 'step_times_s': times,
             'base_median_s': base, 'this_median_s': this, 'time_ratio_this_vs_base': this / base}
  print(json.dumps(summary, indent=2))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(summary, f, indent=2)


if __name__ == '__main__':
  main()
