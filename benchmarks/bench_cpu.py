"""CPU benchmark: mamba-scan vs the transformers-style slow path and our selective_scan_ref.

Prints a markdown table (median wall-clock ms, ratios measured in the same run) and the
exp-throughput floor measured on this machine; writes benchmarks/results/cpu_<n>core.md (and .png
when matplotlib is installed). A report, not a test: nothing is asserted.

    python benchmarks/bench_cpu.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import naming
import torch

from mamba_scan import _native, selective_scan_fn, selective_scan_ref
from mamba_scan.reference import selective_scan_slow_path

HERE = os.path.dirname(os.path.abspath(__file__))


def inputs(b, d, L, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g).to(dtype)
    delta = (torch.rand(b, d, L, generator=g) * 2 - 1.5).to(dtype)
    A = -(0.5 + torch.rand(d, n, generator=g) * 3)
    B = torch.randn(b, n, L, generator=g).to(dtype)
    C = torch.randn(b, n, L, generator=g).to(dtype)
    D = torch.randn(d, generator=g)
    z = torch.randn(b, d, L, generator=g).to(dtype)
    bias = torch.randn(d, generator=g) * 0.5
    return [u, delta, A, B, C, D, z, bias]


def median_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def exp_floor_rate():
    """exp/s of torch's vectorised float32 exp over a 50M-element array, all threads."""
    x = torch.rand(50_300_000) * -3
    out = torch.empty_like(x)
    ms = median_ms(lambda: torch.exp(x, out=out), reps=5)
    return x.numel() / (ms * 1e-3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="first shape only, fewer repeats")
    args = ap.parse_args()
    shapes = [
        ((2, 1536, 1024, 16), torch.float32),
        ((2, 1536, 1024, 16), torch.bfloat16),
        ((1, 2048, 2048, 16), torch.float32),
        ((8, 768, 512, 16), torch.float32),
    ]
    if args.quick:
        shapes = shapes[:1]
    rate = exp_floor_rate()
    threads = torch.get_num_threads()
    lines = [
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"mamba-scan {_native.cpu_isa()} kernels on {_native.cpu_threads()} threads, "
        f"torch {torch.__version__} ({threads} threads)",
        f"exp floor: torch float32 exp ran {rate / 1e9:.2f} G exp/s on this machine "
        "(50.3M elements, all threads)",
        "",
        "| shape (b, d, L, N) | dtype | ours fwd ms | ours fwd+bwd ms | slow path fwd ms | "
        "ref fwd ms | fwd vs slow | fwd vs ref | floor ms | fwd / floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = []
    for (b, d, L, n), dtype in shapes:
        x = inputs(b, d, L, n, dtype)
        reps = 3 if args.quick else 7
        fwd = median_ms(lambda: selective_scan_fn(*x, delta_softplus=True), reps)
        leaves = [t.clone().requires_grad_() for t in x]

        def fb():
            out = selective_scan_fn(*leaves, delta_softplus=True)
            out.backward(torch.ones_like(out))

        fwdbwd = median_ms(fb, max(3, reps // 2))
        slow = median_ms(lambda: selective_scan_slow_path(*x, delta_softplus=True), 3, warmup=1)
        ref = median_ms(lambda: selective_scan_ref(*x, delta_softplus=True), 1, warmup=0)
        floor_ms = b * d * L * n / rate * 1e3
        rows.append(((b, d, L, n), dtype, fwd, fwdbwd, slow, ref, floor_ms))
        lines.append(
            f"| ({b}, {d}, {L}, {n}) | {str(dtype).split('.')[-1]} | {fwd:.1f} | {fwdbwd:.1f} | "
            f"{slow:.1f} | {ref:.1f} | {slow / fwd:.1f}x | {ref / fwd:.1f}x | {floor_ms:.1f} | "
            f"{fwd / floor_ms:.2f} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print()
    print(text)
    text = naming.header("cpu") + "\n\n" + text
    if not args.quick:
        with open(naming.result_path("cpu", device="cpu"), "w") as f:
            f.write(text + "\n")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(8, 4))
            labels = [f"{s}\n{str(dt).split('.')[-1]}" for s, dt, *_ in rows]
            xs = range(len(rows))
            w = 0.2
            for i, (name, idx) in enumerate([("ours fwd", 2), ("ours fwd+bwd", 3),
                                              ("slow path fwd", 4), ("ref fwd", 5)]):  # fmt: skip
                ax.bar([x + i * w for x in xs], [r[idx] for r in rows], w, label=name)
            ax.set_yscale("log")
            ax.set_ylabel("ms (log)")
            ax.set_xticks([x + 1.5 * w for x in xs], labels, fontsize=7)
            ax.legend()
            ax.set_title("mamba-scan CPU selective scan")
            fig.tight_layout()
            fig.savefig(naming.result_path("cpu", "png", device="cpu"), dpi=120)
        except ImportError:
            print("(matplotlib not installed: no plot)")


if __name__ == "__main__":
    main()
