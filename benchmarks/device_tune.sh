#!/bin/bash
# What one device call runs for the scan kernels (issue 3), each step optional and under its own
# time limit, logs to $OUT as it goes: install the wheel carried in wheels/; build mamba_ssm's
# selective_scan_cuda in the background; test_cuda.py (one -k selection, or groups side by side);
# A/B timings of variants (environment per run, e.g. kernel constants through
# MAMBA_SCAN_CUDA_DEFINES, each in its own process); compute-sanitizer; Nsight Compute; then the
# side-by-side grid against mamba_ssm (bench_cuda.py).
#   VARIANTS="tag1:MAMBA_SCAN_CUDA_TILE=32 tag2:MAMBA_SCAN_CUDA_DEFINES=-DkB=2" SHAPES=0,7 \
#     bash benchmarks/device_tune.sh
set -o pipefail
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-index --upgrade --target /tmp/site wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/benchmarks
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export ANCHOR_BUILD_DIR=/tmp/anchor_ss; mkdir -p $ANCHOR_BUILD_DIR
# NO_ANCHOR=1: no grid this call, so no anchor build either (it takes the CPU cores).
[ -z "$NO_ANCHOR" ] && (python benchmarks/bench_cuda.py --anchor-src .anchor/src/selective_scan --build-only \
  > "$OUT/anchor_build.log" 2>&1; cp -f $ANCHOR_BUILD_DIR/selective_scan_cuda.so "$OUT/" 2>/dev/null) &
if [ -n "$TEST_K" ]; then
  timeout ${TEST_S:-150} python -m pytest -q -rf -x tests/test_cuda.py -k "$TEST_K" 2>&1 \
    | tee "$OUT/pytest_tune.log" | tail -3
fi
# PAR_TESTS="tag|defines|-k expression;tag2|...": test groups run side by side (NVRTC compiles
# dominate their time and use the CPU cores), each with its own log.
if [ -n "$PAR_TESTS" ]; then
  IFS=';' read -ra groups <<< "$PAR_TESTS"
  for grp in "${groups[@]}"; do
    IFS='|' read -r tag defs kexpr <<< "$grp"
    (MAMBA_SCAN_CUDA_DEFINES="$defs" timeout ${TEST_S:-240} python -m pytest -q -rf \
      -p no:cacheprovider tests/test_cuda.py -k "$kexpr" > "$OUT/pytest_$tag.log" 2>&1) &
  done
  wait
  for grp in "${groups[@]}"; do
    IFS='|' read -r tag defs kexpr <<< "$grp"
    echo "$tag: $(tail -1 "$OUT/pytest_$tag.log")"
  done
fi
# VARIANTS="tag:VAR=value,VAR2=value2 ...": environment for each run ('+' stands for a space
# inside a value, e.g. MAMBA_SCAN_CUDA_DEFINES=-DkA=1+-DkB=2).
for v in $VARIANTS; do
  tag=${v%%:*}; assigns=${v#*:}; assigns=${assigns//,/ }
  IFS=' ' read -ra kv <<< "$assigns"
  for i in "${!kv[@]}"; do kv[$i]=${kv[$i]//+/ }; done
  env "${kv[@]}" BENCH_OUT=/tmp/scratch timeout ${VAR_S:-60} \
    python benchmarks/bench_cuda.py --shapes ${SHAPES:-0} --no-overhead --tag "$tag " $VAR_ARGS 2>&1 \
    | grep "^| $tag" | tee -a "$OUT/variants.md"
done
if [ -n "$SANITIZE" ]; then
  for tool in memcheck racecheck; do
    timeout ${SAN_S:-150} compute-sanitizer --tool $tool python benchmarks/cuda_scan_run.py \
      > "$OUT/sanitizer_scan_$tool.log" 2>&1
    echo "$tool: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|cuda_scan_run" "$OUT/sanitizer_scan_$tool.log" | tr '\n' ' ')"
  done
fi
if [ -n "$PROFILE" ]; then
  for s in $PROFILE; do
    timeout 120 ncu --section WarpStateStats --section SchedulerStats --section Occupancy \
      --section SpeedOfLight --section LaunchStats -k regex:^ssm_ --launch-skip 3 --launch-count 3 \
      python benchmarks/profile_scan.py $s > "$OUT/ncu_scan_$s.txt" 2>&1
    grep -E "ssm_|Duration|Registers Per|Achieved Occupancy|Issued Warp|No Eligible|Stall|Warp Cycles Per Issued" \
      "$OUT/ncu_scan_$s.txt" | head -40
  done
fi
wait
[ -z "$NO_ANCHOR" ] && tail -2 "$OUT/anchor_build.log"
if [ -z "$NO_GRID$NO_ANCHOR" ]; then
  BENCH_OUT=$OUT timeout ${BENCH_S:-150} python benchmarks/bench_cuda.py \
    --anchor-src .anchor/src/selective_scan ${BENCH_ARGS} 2>&1 | tail -16
fi
