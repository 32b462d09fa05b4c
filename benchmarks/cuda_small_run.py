"""Forward + backward on small and uneven shapes: the driver for compute-sanitizer
(memcheck, racecheck) and, with --profile, one steady-state call at a benchmark shape for ncu."""

import sys

import torch

from mamba_scan import selective_scan_fn


def run(b, d, n, L, dtype, b_groups, c_fixed):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    u, delta, z = (r(b, d, L).to(dtype) for _ in range(3))
    A = -(0.5 + torch.rand(d, n, device="cuda", generator=g))
    B = r(b, b_groups, n, L).to(dtype)
    C = r(d, n) if c_fixed else r(b, n, L).to(dtype)
    D, bias, h0 = r(d), r(d), r(b, d, n)
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias, h0)]
    out, last = selective_scan_fn(*leaves[:8], True, True, initial_state=leaves[8])
    (out.float().sum() + last.sum()).backward()
    torch.cuda.synchronize()


if __name__ == "__main__":
    if "--profile" in sys.argv:
        for _ in range(3):
            run(8, 1536, 16, 2048, torch.bfloat16, 1, False)
    else:
        run(2, 8, 16, 37, torch.bfloat16, 2, False)
        run(1, 24, 64, 300, torch.float32, 1, True)
        run(2, 6, 16, 129, torch.float16, 2, False)
    print("done")
