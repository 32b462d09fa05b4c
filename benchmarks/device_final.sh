#!/bin/bash
# One device call (kind nvidia-h200-x2) that re-checks a final wheel within a few minutes: the
# small-kernel, module, transformers and 2-GPU DDP tests; the scan tests of the tile / layout
# choices; then the scan benchmark grid vs mamba_ssm. Each step has its own time limit and writes
# its log to $OUT as it goes, so a cut-off call still returns what ran.
set -o pipefail
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-index --upgrade --target /tmp/site wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/benchmarks
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | head -2
export ANCHOR_BUILD_DIR=/tmp/anchor_ss; mkdir -p $ANCHOR_BUILD_DIR
(python benchmarks/bench_cuda.py --anchor-src .anchor/src/selective_scan --build-only \
  > "$OUT/anchor_build.log" 2>&1) &
timeout 160 python -m pytest -q -rf tests/test_cuda_small.py tests/test_conv1d.py \
  tests/test_state_update.py tests/test_mamba_module.py tests/test_patch.py tests/test_main.py \
  tests/test_errors.py tests/test_ddp.py 2>&1 | tee "$OUT/pytest_small_final.log" | tail -3
timeout 130 python -m pytest -q -rf tests/test_cuda.py \
  -k "tile or every_layout or graph or determin or stream or other_device or chunk" 2>&1 \
  | tee "$OUT/pytest_scan_final.log" | tail -3
wait
BENCH_OUT=$OUT timeout 110 python benchmarks/bench_cuda.py \
  --anchor-src .anchor/src/selective_scan 2>&1 | tail -16
