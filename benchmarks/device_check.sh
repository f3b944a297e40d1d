#!/usr/bin/env bash
# One short check of stas-jax on a GPU machine: the fast tests, the train-step benchmark of
# Spikformer and STAS (batch 32 and 128, float32 and bfloat16), early-exit inference against
# the dense path, and the PyTorch reference on the same GPU. Every JSON goes under --out.
#
#   benchmarks/device_check.sh --out DIR [--wheels DIR] [--jobs N]   # on the GPU machine
#   benchmarks/device_check.sh --out DIR --cpu-dry-run [--wheels DIR]  # anywhere: every step,
#                                                                      # tiny sizes, on the CPU
#
# The GPU machine reaches no network and already has a CUDA build of JAX, flax, optax, orbax,
# chex, einops and CUDA PyTorch. What else stas-jax needs is installed from --wheels, a folder
# prepared beforehand with internet, with the GPU machine's Python version and platform:
#   pip download --dest wheels --only-binary=:all: --python-version 3.11 \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       ml_collections==1.1.0 grain==0.2.18 pytest==9.0.3 absl-py pillow
# (on a machine like the GPU one, the plain `pip download --dest wheels PACKAGES...` will do).
# Packages already installed keep their versions (pip runs with them as constraints).
#
# Budget: under 8 minutes on one GPU. The compiles dominate, so --jobs warm-up processes first
# compile every benchmarked program side by side into a persistent compilation cache (while
# the tests run), then the timed runs go one at a time and load their programs from it.
# Results: DIR/environment.json, tests.json (+ tests.xml), train_<model>_<dtype>_b<batch>.json,
# infer_early_exit.json, torch_vs_jax.json, summary.json (each step's exit code and seconds);
# logs in DIR/logs/.
set -uo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

OUT="" WHEELS="" DRY=0 JOBS=8
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --wheels=*) WHEELS="${1#*=}"; shift ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --jobs=*) JOBS="${1#*=}"; shift ;;
    --cpu-dry-run) DRY=1; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$OUT" ] || { echo 'ERROR: --out DIR is required' >&2; usage; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO"
START=$(date +%s)
PY="${PYTHON:-python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="$OUT/jax_cache"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

SPIKFORMER=configs/cifar100_spikformer.py
STAS=configs/cifar100.py
if [ "$DRY" = 1 ]; then
  # Every step, at sizes a 2-core CPU runs in a few minutes.
  export JAX_PLATFORMS=cpu
  TINY=(--config.model.dim=32 --config.model.heads=2 --config.model.depth=1
        --config.model.timesteps=2)
  BATCHES=(4 8); EE_BATCH=8; EE_BETA=5; TORCH_BATCH=4; REPEATS=2; PEAK_N=256
  TORCH_DEVICE=cpu
  TESTS=(tests/test_matmul.py tests/test_neurons.py)
  [ "$JOBS" -gt 2 ] && JOBS=2
  STEP_TIMEOUT=600
else
  export JAX_PLATFORMS=cuda,cpu  # the CPU devices stand in for a pod in tests/test_lowering.py
  TINY=()
  BATCHES=(32 128); EE_BATCH=128; EE_BETA=-2; TORCH_BATCH=32; REPEATS=5; PEAK_N=8192
  TORCH_DEVICE=cuda
  TESTS=(tests/test_neurons.py tests/test_halting.py tests/test_layers.py tests/test_matmul.py
         tests/test_model.py tests/test_energy.py tests/test_early_exit.py
         tests/test_torch_reference.py tests/test_lowering.py)
  STEP_TIMEOUT=240
fi
DTYPES=(float32 bfloat16)

STEPS_JSON="$OUT/logs/steps.jsonl"
: > "$STEPS_JSON"
# step NAME CMD...: runs CMD (which bounds its own time), logs it, records exit code and time.
step() {
  local name="$1"; shift
  local t0=$(date +%s) rc
  echo "== $name"
  "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >> "$STEPS_JSON"
  if [ $rc -ne 0 ]; then
    echo "   FAILED (exit $rc), last lines of $OUT/logs/$name.log:"
    tail -n 15 "$OUT/logs/$name.log"
  fi
  return $rc
}

# --------------------------------------------------------------------------- 1. dependencies
# import name:pip name
NEEDED="ml_collections:ml_collections==1.1.0 grain:grain==0.2.18 PIL:pillow absl:absl-py
        pytest:pytest==9.0.3"
install_deps() {
  local missing="" all="" pair
  for pair in $NEEDED; do
    all="$all ${pair#*:}"
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing="$missing ${pair#*:}"
  done
  echo "missing:${missing:- none}"
  if [ -z "$WHEELS" ]; then
    [ -z "$missing" ] && return 0
    echo "ERROR: missing$missing and no --wheels DIR to install them from; prepare one with" \
         "'pip download' (see the top of $0)."
    return 1
  fi
  "$PY" -m pip list --format=freeze > "$OUT/logs/constraints.txt"
  if [ -n "$missing" ]; then
    timeout 300 "$PY" -m pip install --no-index --find-links "$WHEELS" \
        -c "$OUT/logs/constraints.txt" $missing
  elif [ "$DRY" = 1 ]; then
    # Nothing to install here: check that the folder, dependencies included, would do on a
    # machine that has none of them.
    timeout 300 "$PY" -m pip install --dry-run --ignore-installed --no-index \
        --find-links "$WHEELS" $all
  fi
}
step dependencies install_deps || { echo 'cannot continue without the dependencies'; exit 1; }

step environment timeout 120 "$PY" - "$OUT/environment.json" <<'EOF'
import json, platform, subprocess, sys
import jax, jaxlib, flax, optax, orbax.checkpoint, torch
info = {'python': platform.python_version(), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
        'flax': flax.__version__, 'optax': optax.__version__,
        'orbax_checkpoint': orbax.checkpoint.__version__, 'torch': torch.__version__,
        'torch_cuda': torch.version.cuda, 'jax_backend': jax.default_backend(),
        'jax_devices': [d.device_kind for d in jax.devices()]}
try:
  info['nvidia_smi'] = subprocess.run(
      ['nvidia-smi', '--query-gpu=name,memory.total,driver_version,clocks.max.sm',
       '--format=csv,noheader'], capture_output=True, text=True, timeout=30).stdout.strip()
except FileNotFoundError:
  info['nvidia_smi'] = None
json.dump(info, open(sys.argv[1], 'w'), indent=2)
print(json.dumps(info, indent=2))
EOF
[ "$DRY" = 1 ] || grep -q '"jax_backend": "gpu"' "$OUT/environment.json" || {
  echo 'ERROR: JAX sees no GPU (environment.json); use --cpu-dry-run on a machine without one.'
  exit 1; }

# --------------------------------------------------------------------------- 2. warm-ups + tests
bench_args() {  # CONFIG DTYPE BATCH
  echo --config="$1" --batch="$3" --config.model.dtype="$2" "${TINY[@]}"
}
# Random weights: EE_BETA makes tokens halt, so that the early-exit path has work to skip
# (4-384: -2 gives a token ratio of 0.56, the default -3 none; the tiny dry-run model: 5, 0.5).
EE_ARGS=(--config="$STAS" --mode=infer_early_exit --batch="$EE_BATCH"
         --config.model.halt.beta="$EE_BETA" "${TINY[@]}")
warmups() {
  local pids=() cfg dt b rc=0
  # Warm-ups share the GPU: no process may take most of its memory up front.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  run_one() {  # NAME ARGS...
    local name="$1"; shift
    timeout --kill-after=10 "$STEP_TIMEOUT" "$PY" benchmarks/bench.py --warmup_only "$@" \
        > "$OUT/logs/warmup_$name.log" 2>&1
  }
  for cfg in "$SPIKFORMER" "$STAS"; do
    for dt in "${DTYPES[@]}"; do
      for b in "${BATCHES[@]}"; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
        run_one "$(basename "$cfg" .py)_${dt}_b$b" $(bench_args "$cfg" "$dt" "$b") &
        pids+=($!)
      done
    done
  done
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  run_one infer_early_exit "${EE_ARGS[@]}" &
  pids+=($!)
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  grep -h 'warm-up done' "$OUT"/logs/warmup_*.log
  return $rc
}
tests() {
  # float32 tests compare with float64 references: no TF32 here.
  XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest \
      timeout --kill-after=10 $(( 2 * STEP_TIMEOUT )) "$PY" -m pytest -q -p no:cacheprovider \
      "${TESTS[@]}" --junitxml="$OUT/tests.xml"
  local rc=$?
  "$PY" - "$OUT/tests.xml" "$OUT/tests.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == 'testsuite' else suite[0]
failed = [c.get('classname') + '::' + c.get('name') for c in suite.iter('testcase')
          if c.find('failure') is not None or c.find('error') is not None]
out = {k: int(suite.get(k, 0)) for k in ('tests', 'failures', 'errors', 'skipped')}
out.update(seconds=float(suite.get('time', 0)), failed=failed)
json.dump(out, open(sys.argv[2], 'w'), indent=2)
print(json.dumps(out))
EOF
  return $rc
}
step warmups warmups &
WARM_PID=$!
step tests tests
wait $WARM_PID

# --------------------------------------------------------------------------- 3. timed runs
for cfg in "$SPIKFORMER" "$STAS"; do
  model=$(basename "$cfg" .py)
  for dt in "${DTYPES[@]}"; do
    for b in "${BATCHES[@]}"; do
      step "train_${model}_${dt}_b$b" timeout "$STEP_TIMEOUT" "$PY" benchmarks/bench.py \
          --mode=train $(bench_args "$cfg" "$dt" "$b") --repeats="$REPEATS" \
          --peak_n="$PEAK_N" --json="$OUT/train_${model}_${dt}_b$b.json"
    done
  done
done
step infer_early_exit timeout "$STEP_TIMEOUT" "$PY" benchmarks/bench.py "${EE_ARGS[@]}" \
    --repeats="$REPEATS" --peak_n="$PEAK_N" --json="$OUT/infer_early_exit.json"
# JAX leaves memory to PyTorch on the shared GPU.
step torch_vs_jax timeout "$STEP_TIMEOUT" env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" \
    benchmarks/torch_reference.py --config="$SPIKFORMER" --batch="$TORCH_BATCH" \
    --repeats="$REPEATS" --torch_device="$TORCH_DEVICE" "${TINY[@]}" \
    --json="$OUT/torch_vs_jax.json"

# --------------------------------------------------------------------------- 4. summary
"$PY" - "$OUT" "$(( $(date +%s) - START ))" "$DRY" <<'EOF'
import glob, json, os, sys
out, seconds, dry = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1'
steps = [json.loads(l) for l in open(os.path.join(out, 'logs', 'steps.jsonl'))]
rows = []
for path in sorted(glob.glob(os.path.join(out, 'train_*.json'))):
  r = json.load(open(path))
  rows.append({'run': os.path.basename(path)[6:-5], 'images_per_s': r['images_per_s'],
               'step_time_median_s': r['step_time_median_s'],
               'fraction_of_matmul_peak': r['fraction_of_matmul_peak'],
               'matmul_peak_gflops': r['matmul_peak_gflops'],
               'device_peak_gib': r.get('device_peak_gib')})
summary = {'cpu_dry_run': dry, 'total_seconds': seconds, 'steps': steps, 'train': rows,
           'note': 'compile_s in the train and inference JSONs is a load from the persistent '
                   'compilation cache; logs/warmup_*.log give the real compile times.'}
for name in ('infer_early_exit', 'torch_vs_jax'):
  path = os.path.join(out, name + '.json')
  if os.path.exists(path):
    r = json.load(open(path))
    keep = ('token_ratio', 'identical_predictions', 'time_ratio_vs_dense',
            'time_fall_over_token_fall', 'jax_time_ratio_vs_torch', 'eval_logits_max_abs_diff')
    summary[name] = {k: r[k] for k in keep if k in r}
json.dump(summary, open(os.path.join(out, 'summary.json'), 'w'), indent=2)
print(f"\n{'run':<42} {'images/s':>10} {'step s':>8} {'of peak':>8}")
for r in rows:
  print(f"{r['run']:<42} {r['images_per_s']:>10.1f} {r['step_time_median_s']:>8.4f} "
        f"{100 * r['fraction_of_matmul_peak']:>7.1f}%")
for name in ('infer_early_exit', 'torch_vs_jax'):
  print(name, summary.get(name))
failed = [s['step'] for s in steps if s['rc'] != 0]
print(f"\n{len(steps) - len(failed)}/{len(steps)} steps passed"
      + (f"; failed: {', '.join(failed)}" if failed else '') + f"; {seconds} s in all")
sys.exit(1 if failed else 0)
EOF
