#!/bin/bash
# What one device call runs for the scan kernels (issue 3): install the wheel carried in wheels/,
# build mamba_ssm's selective_scan_cuda in the background, the scan's GPU tests, then the
# side-by-side benchmark grid (bench_cuda.py). Logs and tables go to $OUT.
#   bash benchmarks/device_scan.sh [extra pytest files...]
set -o pipefail
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-index --upgrade --target /tmp/site wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/benchmarks
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export ANCHOR_BUILD_DIR=/tmp/anchor_ss; mkdir -p $ANCHOR_BUILD_DIR
(python benchmarks/bench_cuda.py --anchor-src .anchor/src/selective_scan --build-only \
  > "$OUT/anchor_build.log" 2>&1) &
timeout ${TEST_S:-330} python -m pytest -q -rf -x tests/test_cuda.py "$@" 2>&1 \
  | tee "$OUT/pytest_scan.log" | tail -4
wait
tail -2 "$OUT/anchor_build.log"
BENCH_OUT=$OUT timeout ${BENCH_S:-200} python benchmarks/bench_cuda.py \
  --anchor-src .anchor/src/selective_scan ${BENCH_ARGS} 2>&1 | tail -32
(cd "$OUT" && tar cf results.tar *.log *.md *.txt 2>/dev/null && rm -f *.log *.md *.txt)
