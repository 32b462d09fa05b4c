#!/usr/bin/env bash
# The GPU suite: on any machine with a CUDA GPU, torch and mamba_scan importable, runs the GPU
# tests, compute-sanitizer over every kernel family and the benchmarks, and writes the result
# files named by what they hold and where they ran (scan_<gpu>.md, pytest_cuda_<gpu>.log, ...).
#
#   bash benchmarks/gpu_suite.sh [--out DIR] [--steps warmup,tests,sanitizer,parity,compile,bench]
#                                [--anchors] [--wheel FILE]
#
# --out      where the result files go (default benchmarks/results)
# --steps    a subset of the steps, comma-separated (default: all of them, in that order)
# --anchors  build mamba_ssm's selective_scan_cuda and causal-conv1d's kernels from .anchor/
#            (benchmarks/anchor_sources.sh lays the sdists out there) and time them side by side;
#            without it the anchor columns stay empty
# --wheel    install this mamba_scan wheel into a private folder first (pip --target)
# Each step runs under its own time limit (STEP_TIMEOUT, seconds, default 900) and writes its
# files as it goes, so a step cut short still leaves what it finished. warmup compiles every
# kernel into the cache on all cores first (the tests would otherwise compile them one by one);
# SANITIZER_TOOLS (default: memcheck racecheck initcheck synccheck), COMPILE_ARCHS (sm_80 sm_90)
# and COMPILE_REPEAT (2) narrow the sanitizer and compile steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
STEPS=warmup,tests,sanitizer,parity,compile,bench
ANCHORS=0
WHEEL=
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --anchors) ANCHORS=1; shift ;;
    --wheel) WHEEL=$2; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 BENCH_OUT=$OUT
if [ -n "$WHEEL" ]; then
  python -m pip install -q --no-deps --no-index --upgrade --target /tmp/mamba_scan_site "$WHEEL" || exit 1
  export PYTHONPATH=/tmp/mamba_scan_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
T=${STEP_TIMEOUT:-900}
export ANCHOR_BUILD_DIR=${ANCHOR_BUILD_DIR:-/tmp/anchor_build/ss}  # where anchors.build_all puts it
GPU=$(python -c "import naming; print(naming.machine_tag())") || exit 1
ARCH=$(python -c "import torch; print('sm_%d%d' % torch.cuda.get_device_capability())")
python -c "import naming; print(naming.header())"
has() { [[ ",$STEPS," == *",$1,"* ]]; }

if [ "$ANCHORS" = 1 ]; then
  # Built in the background while the tests run (NVRTC and nvcc share the CPU cores).
  (python -c "import anchors; anchors.build_all()" > "$OUT/anchor_build_$GPU.log" 2>&1) &
  ANCHOR_PID=$!
fi

if has warmup; then
  timeout "$T" python -m mamba_scan warmup 2>&1 | tail -2
fi

if has tests; then
  timeout "$T" python -m pytest -q -rfE -p no:cacheprovider tests 2>&1 \
    | tee "$OUT/pytest_cuda_$GPU.log" | tail -3
fi

if has sanitizer; then
  f="$OUT/sanitizer_$GPU.md"
  { python -c "import naming; print(naming.header())"; echo
    echo "compute-sanitizer over benchmarks/cuda_scan_run.py (scan forward and backward: both layout"
    echo "families, both tile lengths, 3 dtypes, fixed / grouped B and C, initial state, last-state"
    echo "gradient, lengths ending mid-tile, dstate 16 / 32 / 64 / 128, full and partial blocks) and"
    echo "benchmarks/cuda_small_run.py (causal conv1d forward / backward / update, state update,"
    echo "mamba_inner_fn)."; echo
    echo "| driver | tool | summary |"; echo "| --- | --- | --- |"; } > "$f"
  for drv in cuda_scan_run cuda_small_run; do
    for tool in ${SANITIZER_TOOLS:-memcheck racecheck initcheck synccheck}; do
      log=/tmp/sanitizer_${drv}_$tool.log
      timeout "$T" compute-sanitizer --tool $tool --error-exitcode 9 python "benchmarks/$drv.py" > "$log" 2>&1
      rc=$?
      sum=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
      echo "| $drv | $tool | ${sum:-no summary} (exit $rc) |" | tee -a "$f"
    done
  done
fi

if has parity; then
  { python -c "import naming; print(naming.header())"; echo
    echo "Worst kernel error / same-precision PyTorch reference error / tolerance over the parity"
    echo "grid (benchmarks/parity_table.py cuda); the ratio in brackets must be <= 1."; echo
    timeout "$T" python benchmarks/parity_table.py cuda; } > "$OUT/parity_cuda_$GPU.md" 2>&1
  tail -3 "$OUT/parity_cuda_$GPU.md"
fi

if has compile; then
  for arch in ${COMPILE_ARCHS:-sm_80 sm_90}; do
    timeout "$T" python benchmarks/compile_check.py --arch $arch --repeat "${COMPILE_REPEAT:-2}" \
      --out "$OUT/compile_$arch.md" 2>&1 | grep -E "programs|core-s"
  done
fi

if has bench; then
  [ "$ANCHORS" = 1 ] && { wait "$ANCHOR_PID"; tail -2 "$OUT/anchor_build_$GPU.log"; }
  ANC=(); [ "$ANCHORS" = 1 ] && ANC=(--anchors)
  SRC=(); [ "$ANCHORS" = 1 ] && SRC=(--anchor-src .anchor/src/selective_scan)
  timeout "$T" python benchmarks/bench_cuda.py "${SRC[@]}" 2>&1 | tail -14
  timeout "$T" python benchmarks/bench_train.py "${ANC[@]}" 2>&1 | tail -6
  timeout "$T" python benchmarks/bench_decode.py "${ANC[@]}" 2>&1 | tail -10
  timeout "$T" python benchmarks/bench_varlen.py 2>&1 | tail -8
fi
echo "results in $OUT"
