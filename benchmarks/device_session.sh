#!/bin/bash
# What one device call runs for the small kernels (issue 4): install the wheel carried in
# wheels/, build the anchors in the background, GPU tests, compute-sanitizer, benchmarks.
# Logs and tables go to $OUT (then into benchmarks/results/).
#   bash benchmarks/device_session.sh [tests|bench|all]
set -o pipefail
export PYTHONUNBUFFERED=1
what=${1:-all}
python -m pip install -q --no-deps --no-index --upgrade --target /tmp/site wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/benchmarks
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ "$what" != tests ]; then
  (python -c "import anchors; anchors.build_all()" > "$OUT/anchor_build.log" 2>&1
   for f in /tmp/anchor_build/ss/selective_scan_cuda.so /tmp/anchor_build/cc/causal_conv1d_cuda.so; do
     [ -f "$f" ] && [ $(stat -c %s "$f") -lt 16000000 ] && cp "$f" "$OUT/"; done; ls -la "$OUT"/*.so) &
fi
if [ "$what" != bench ]; then
  TESTS="tests/test_cuda_small.py tests/test_conv1d.py tests/test_state_update.py tests/test_mamba_module.py"
  TESTS="$TESTS tests/test_patch.py tests/test_main.py tests/test_errors.py"
  [ "$QUICK" = 1 ] || TESTS="$TESTS tests/test_ddp.py"
  timeout 300 python -m pytest -q -rf $TESTS \
    2>&1 | tee "$OUT/pytest_small_cuda.log" | tail -4
  [ "$QUICK" = 1 ] || timeout 200 python -m pytest -q tests/test_cuda.py \
    -k "graph or stream or determin or agree or other_device" 2>&1 | tee "$OUT/pytest_scan_subset.log" | tail -2
  TOOLS="memcheck racecheck"; [ "$QUICK" = 1 ] && TOOLS=memcheck
  for tool in $TOOLS; do
    timeout 150 compute-sanitizer --tool $tool python benchmarks/cuda_small_run.py \
      > "$OUT/sanitizer_small_$tool.log" 2>&1
    tail -2 "$OUT/sanitizer_small_$tool.log"
  done
fi
wait
tail -3 "$OUT/anchor_build.log" 2>/dev/null
if [ "$what" != tests ]; then
  BENCH_OUT=$OUT timeout 150 python benchmarks/bench_train.py --anchors 2>&1 | tail -7
  BENCH_OUT=$OUT timeout 150 python benchmarks/bench_decode.py --anchors 2>&1 | tail -16
  [ "$QUICK" = 1 ] && [ "$PROFILE" != 1 ] || timeout 100 python benchmarks/profile_block.py --anchors > "$OUT/profile_block.txt" 2>&1
  if [ "$SLOW" = 1 ]; then
    BENCH_OUT=$OUT timeout 100 python benchmarks/bench_train.py --slow-path --reps 3 --d-models 768 \
      --out train_block_slow.md 2>&1 | tail -5
  fi
fi
# The device returns at most 8 files: the text results travel as one tar.
(cd "$OUT" && tar cf results.tar *.log *.md *.txt 2>/dev/null && rm -f *.log *.md *.txt)
