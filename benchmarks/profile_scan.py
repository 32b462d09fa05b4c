"""One forward and one backward of the scan at a grid shape, twice, for Nsight Compute:

    ncu --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section SpeedOfLight -k regex:^ssm_ --launch-skip 3 --launch-count 3 \
        python benchmarks/profile_scan.py 0

The first round compiles and loads the kernels; profile the second (its ssm_fwd, ssm_bwd and
ssm_bwd_reduce launches). The argument is an index into bench_cuda.GRID.
"""

from __future__ import annotations

import sys

import torch
from bench_cuda import GRID, inputs


def main():
    from mamba_scan import selective_scan_fn

    dname, (b, d, n, L) = GRID[int(sys.argv[1]) if len(sys.argv) > 1 else 0]
    dtype = torch.bfloat16 if dname == "bf16" else torch.float32
    leaves = [t.requires_grad_() for t in inputs(b, d, n, L, dtype)]
    for _ in range(2):
        out = selective_scan_fn(*leaves, True)
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    torch.cuda.synchronize()
    print(f"profiled {dname} {(b, d, n, L)}")


if __name__ == "__main__":
    main()
