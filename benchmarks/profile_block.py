"""Where a Mamba block's training step spends its GPU time: torch.profiler over forward +
backward (bf16 autocast) of mamba_scan.Mamba, and of mamba_ssm's Mamba when --anchors builds
it; prints the kernels by total CUDA time.

    python benchmarks/profile_block.py [--anchors] [--d-model 768] [--batch 8] [--seqlen 2048]
"""

from __future__ import annotations

import argparse

import torch
from bench_cuda import cuda_profile

import mamba_scan


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchors", action="store_true")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    args = ap.parse_args()
    d = args.d_model
    torch.manual_seed(0)
    models = [("mamba_scan", mamba_scan.Mamba(d_model=d, d_state=16).cuda())]
    if args.anchors:
        import anchors

        anchors.build_all()
        ms = anchors.import_mamba_ssm()
        m = ms.Mamba(d_model=d, d_state=16).cuda()
        m.load_state_dict(models[0][1].state_dict())
        models.append(("mamba_ssm", m))
    h = torch.randn(args.batch, args.seqlen, d, device="cuda")
    g = torch.randn(args.batch, args.seqlen, d, device="cuda", dtype=torch.bfloat16)
    for name, m in models:

        def step(m=m):
            x = h.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = m(x)
            y.backward(g)

        print(f"== {name}: d_model {d}, batch {args.batch}, seqlen {args.seqlen}, 5 steps")
        print(cuda_profile(step, warmup=3, reps=5, rows=22))


if __name__ == "__main__":
    main()
