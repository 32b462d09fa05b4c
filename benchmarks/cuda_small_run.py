"""Forward + backward on small and uneven shapes: the driver for compute-sanitizer
(memcheck, racecheck) and, with --profile, one steady-state call at a benchmark shape for ncu.
Covers the scan, the causal conv1d (forward, backward, update), selective_state_update and
the fused mamba_inner_fn."""

import sys

import torch

import mamba_scan
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


def run_small():
    g = torch.Generator(device="cuda").manual_seed(1)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    for dtype, last, L in ((torch.bfloat16, False, 131), (torch.float32, True, 37)):
        x = r(3, 40, L).to(dtype)
        if last:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        w, b = r(40, 4).requires_grad_(), r(40).requires_grad_()
        h0 = r(3, 40, 3).requires_grad_()
        xl = x.requires_grad_()
        out, fin = mamba_scan.causal_conv1d_fn(xl, w, b, initial_states=h0,
                                               return_final_states=True, activation="silu")  # fmt: skip
        (out.float().sum() + fin.float().sum()).backward()
        seq = (torch.arange(L, device="cuda") >= L // 2).int().expand(3, L).contiguous()
        mamba_scan.causal_conv1d_fn(x.detach(), w, b, seq_idx=seq).float().sum().backward()
    state = r(4, 40, 5).to(torch.bfloat16)
    xs = r(3, 40, 2).to(torch.bfloat16)
    cs = torch.tensor([1, 6, 3], device="cuda", dtype=torch.int32)
    mamba_scan.causal_conv1d_update(xs, state, r(40, 4), None, "silu", cs,
                                    torch.tensor([3, -1, 0], device="cuda"))  # fmt: skip
    st = r(5, 2, 24, 33)
    mamba_scan.selective_state_update(
        st, r(3, 2, 24), r(3, 2, 24), -torch.rand(2, 24, 33, device="cuda"), r(3, 1, 33),
        r(3, 1, 33), D=r(2, 24), z=r(3, 2, 24), dt_bias=r(2, 24), dt_softplus=True,
        state_batch_indices=torch.tensor([4, -1, 9], device="cuda"),
    )  # fmt: skip
    m = mamba_scan.Mamba(d_model=32, d_state=16).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        m(r(2, 45, 32).requires_grad_()).float().sum().backward()
    torch.cuda.synchronize()


if __name__ == "__main__":
    if "--profile" in sys.argv:
        for _ in range(3):
            run(8, 1536, 16, 2048, torch.bfloat16, 1, False)
    else:
        run(2, 8, 16, 37, torch.bfloat16, 2, False)
        run(1, 24, 64, 300, torch.float32, 1, True)
        run(2, 6, 16, 129, torch.float16, 2, False)
        run_small()
    print("done")
