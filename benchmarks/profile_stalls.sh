#!/bin/bash
# Nsight Compute detail for the scan kernels at grid shapes (indices into bench_cuda.GRID):
# warp-stall reasons per issued instruction, pipe utilisation, shared-memory wavefronts and bank
# conflicts, instruction mix. Needs mamba_scan importable (installed, or on PYTHONPATH).
#   KREGEX='^ssm_bwd' TAG=x bash benchmarks/profile_stalls.sh 0 7
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for s in "$@"; do
  f="$OUT/ncu_stalls_${TAG:-}$s.txt"
  timeout ${NCU_S:-150} ncu -k regex:${KREGEX:-^ssm_bwd} --launch-skip ${SKIP:-2} --launch-count ${COUNT:-2} \
    --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section InstructionStats --section SpeedOfLight --print-details all \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__inst_executed.sum,sm__cycles_elapsed.avg" \
    python benchmarks/profile_scan.py $s > "$f" 2>&1
  echo "== $f"
  grep -E "^  ssm_|Duration|stalled_.*ratio +[0-9.]+|wavefronts_mem_shared|bank_conflicts|inst_executed.sum|Issue Slots Busy|Pipe|ALU|FMA|XU|LSU|Shared" "$f" \
    | awk '!/stalled/ || $NF+0 >= 0.05' | head -${LINES_MAX:-60}
done
