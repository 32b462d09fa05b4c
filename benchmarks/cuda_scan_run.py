"""Forward and backward of the CUDA scan on a few small and uneven shapes, for compute-sanitizer:

    compute-sanitizer --tool memcheck python benchmarks/cuda_scan_run.py
    compute-sanitizer --tool racecheck python benchmarks/cuda_scan_run.py

Covers both layout families, both tile lengths, fixed and variable (grouped) B / C, z, an
initial state and the gradient of the last state, lengths that end mid-tile.
"""

from __future__ import annotations

import os

import torch


def run(dtype, b, d, n, L, var_bc=True, groups=1, h0=False):
    from mamba_scan import selective_scan_fn

    dev = os.environ.get("SCAN_RUN_DEVICE", "cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    u = r(b, d, L).to(dtype).requires_grad_()
    delta = (r(b, d, L) * 0.5).to(dtype).requires_grad_()
    A = (-(0.5 + torch.rand(d, n, device=dev, generator=g))).requires_grad_()
    if var_bc:
        B = r(b, groups, n, L).to(dtype).requires_grad_()
        C = r(b, groups, n, L).to(dtype).requires_grad_()
    else:
        B = r(d, n).requires_grad_()
        C = r(d, n).requires_grad_()
    D = r(d).requires_grad_()
    z = r(b, d, L).to(dtype).requires_grad_()
    bias = (r(d) * 0.5).requires_grad_()
    kw = {}
    if h0:
        kw["initial_state"] = r(b, d, n).requires_grad_()
    out, last = selective_scan_fn(u, delta, A, B, C, D, z, bias, True, return_last_state=True, **kw)
    (out.float().sum() + last.sum()).backward()
    if dev == "cuda":
        torch.cuda.synchronize()


def main():
    for layout in ("deep", "wide"):
        for tile in ("32", "64"):
            os.environ["MAMBA_SCAN_CUDA_LAYOUT"] = layout
            os.environ["MAMBA_SCAN_CUDA_TILE"] = tile
            run(torch.bfloat16, 2, 64, 16, 1029)
            run(torch.float16, 1, 48, 16, 77, groups=2, h0=True)
            run(torch.float32, 2, 40, 16, 200, var_bc=False, h0=True)
            run(torch.bfloat16, 1, 32, 64, 333)
            run(torch.bfloat16, 1, 16, 128, 129)
            run(torch.bfloat16, 1, 64, 32, 100)
    print("cuda_scan_run: done")


if __name__ == "__main__":
    main()
