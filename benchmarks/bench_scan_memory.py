"""Time and peak memory of the selective scan through the public function (what users call):
``mamba_scan.selective_scan_fn`` forward, backward, and the extra memory one forward+backward
allocates beyond its inputs, on the shapes of the speed/memory goals (variable B / C, z, D,
delta_bias, softplus). Medians of CUDA-event timings after warm-up.

    python benchmarks/bench_scan_memory.py [--label TEXT] [--reps 20] [--shapes 0,6]

Prints markdown rows; run it under two builds (PYTHONPATH) for a before / after table. Peak
memory: ``torch.cuda.max_memory_allocated`` during one forward+backward (grads returned by
``torch.autograd.grad``, the output gradient allocated before) minus what was allocated before.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_cuda import GRID

# bench_cuda's grid, and dstate 256 and fp16.
SHAPES = GRID + [("bf16", (2, 1024, 256, 1024)), ("fp16", (8, 1536, 16, 2048))]
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def inputs(dtype, b, d, n, L):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    dt = DT[dtype]
    u, z = r(b, d, L).to(dt), r(b, d, L).to(dt)
    delta = (r(b, d, L) * 0.5 - 4).to(dt)
    A = -torch.rand(d, n, device="cuda", generator=g) - 0.5
    B, C = r(b, 1, n, L).to(dt), r(b, 1, n, L).to(dt)
    D, bias = r(d), r(d) * 0.1
    leaves = [x.requires_grad_() for x in (u, delta, A, B, C, D, z, bias)]
    return leaves, torch.randn_like(u)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", default="", help="comma-separated indices into SHAPES")
    a = ap.parse_args()
    shapes = [SHAPES[int(i)] for i in a.shapes.split(",")] if a.shapes else SHAPES
    from mamba_scan import selective_scan_fn

    def fwd(x):
        return selective_scan_fn(*x, delta_softplus=True)

    head = f"{a.label} " if a.label else ""
    print(f"| {head}dtype (b, d, N, L) | fwd ms | bwd ms | peak MB one fwd+bwd |")
    print("| --- | --- | --- | --- |")
    for dtype, shape in shapes:
        x, gout = inputs(dtype, *shape)
        for _ in range(3):
            torch.autograd.grad(fwd(x), x, gout)
        torch.cuda.synchronize()
        tf, tb = [], []
        for _ in range(a.reps):
            e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            e[0].record()
            out = fwd(x)
            e[1].record()
            grads = torch.autograd.grad(out, x, gout)
            e[2].record()
            torch.cuda.synchronize()
            tf.append(e[0].elapsed_time(e[1]))
            tb.append(e[1].elapsed_time(e[2]))
            del out, grads
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = torch.autograd.grad(fwd(x), x, gout)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        del grads, x, gout
        print(f"| {dtype} {shape} | {statistics.median(tf):.3f} | {statistics.median(tb):.3f} "
              f"| {peak:.0f} |", flush=True)  # fmt: skip
    import mamba_scan

    print(f"\ntorch {torch.__version__}, {torch.cuda.get_device_name()}, mamba_scan from "
          f"{mamba_scan.__file__}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
