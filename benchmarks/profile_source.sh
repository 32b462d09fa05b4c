#!/bin/bash
# Per-instruction (SASS) warp-stall samples and executed instructions of the scan kernels at a
# grid shape, as CSV from Nsight Compute's source page (aggregate with
# benchmarks/stall_regions.py). Needs mamba_scan importable (installed, or on PYTHONPATH).
#   bash benchmarks/profile_source.sh 0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for s in "$@"; do
  timeout ${NCU_S:-150} ncu -k regex:'^ssm_(fwd|bwd)$' --launch-skip 2 --launch-count 2 \
    --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
    python benchmarks/profile_scan.py $s > "$OUT/ncu_source_$s.csv" 2> "$OUT/ncu_source_$s.err"
  echo "source $s: rc $? $(wc -c < "$OUT/ncu_source_$s.csv") bytes"; tail -3 "$OUT/ncu_source_$s.err"
done
