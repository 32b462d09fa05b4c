"""CUDA benchmark: mamba-scan vs mamba_ssm's selective_scan_cuda (the anchor) vs our PyTorch
reference, forward and backward, on the shape grid of FACTS.md. Medians of CUDA-event timings
after warm-up, ratios from one run, GB/s and fraction of the MUFU exp floor.

    python benchmarks/bench_cuda.py [--anchor-src DIR] [--build-only] [--quick]

--anchor-src: mamba_ssm's csrc/selective_scan sources (from the PyPI sdist); they are built
with torch's cpp_extension for this GPU's arch only (never committed). Without it, or when the
build fails, the anchor columns are left out. Writes benchmarks/results/scan_<gpu>.md and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import naming
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GRID = [
    ("bf16", (8, 1536, 16, 2048)),
    ("bf16", (4, 4096, 16, 2048)),
    ("bf16", (16, 2048, 16, 512)),
    ("bf16", (64, 1536, 16, 128)),
    ("bf16", (1, 5120, 16, 16384)),
    ("bf16", (2, 2048, 16, 65536)),
    ("bf16", (8, 1536, 64, 2048)),
    ("bf16", (4, 2048, 128, 1024)),
    ("fp32", (8, 1536, 16, 2048)),
]
MUFU_EXP_PER_S = 16 * 132 * 1.98e9  # H200: 16 ex2 per SM per clock (FACTS.md)
HBM_BPS = 4.217e12  # measured device-to-device copy (FACTS.md)


def build_anchor(src: str):
    from anchors import _prebuilt
    from torch.utils.cpp_extension import load

    pre = _prebuilt("selective_scan_cuda")  # built by an earlier run, in .anchor/prebuilt/
    if pre is not None:
        return pre

    cc = torch.cuda.get_device_capability()
    arch = f"{cc[0]}{cc[1]}"
    names = [f for f in os.listdir(src) if f.endswith((".cu", ".cpp"))]
    t = time.time()
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
    mod = load(
        name="selective_scan_cuda",
        sources=[os.path.join(src, f) for f in sorted(names)],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=[
            "-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
            "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
        ],
        build_directory=os.environ.get("ANCHOR_BUILD_DIR") or None,
        verbose=False,
    )  # fmt: skip
    print(f"anchor built in {time.time() - t:.0f} s", flush=True)
    return mod


def cuda_ms(fn, warmup=3, reps=30):
    for _ in range(warmup):
        fn()
    ev = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in ev)
    return ts[len(ts) // 2]


def cuda_profile(fn, warmup, reps, rows):
    """torch.profiler's table of the CUDA kernels of `reps` calls of fn after `warmup` calls,
    by total CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60
    )


def inputs(b, d, n, L, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    u = r(b, d, L).to(dtype)
    delta = (torch.rand(b, d, L, device="cuda", generator=g) * 2 - 1.5).to(dtype)
    A = -(0.5 + torch.rand(d, n, device="cuda", generator=g) * 3)
    B = r(b, 1, n, L).to(dtype)
    C = r(b, 1, n, L).to(dtype)
    D = r(d)
    z = r(b, d, L).to(dtype)
    bias = r(d) * 0.5
    return u, delta, A, B, C, D, z, bias


def overhead(anchor, calls=3000):
    """Host time per forward call with 8 tensor arguments at a tiny shape (the kernel takes a few
    microseconds, so back-to-back calls are bound by the host): wall time of `calls` calls
    without synchronisation, divided by `calls`, median of 5 rounds."""
    import statistics

    from mamba_scan import selective_scan_fn

    args = inputs(1, 16, 16, 1, torch.bfloat16)
    rows = [("mamba_scan.selective_scan_fn (no grad)",
             lambda: selective_scan_fn(*args, True))]  # fmt: skip
    if anchor is not None:
        rows.append(("mamba_ssm selective_scan_cuda.fwd (pybind)",
                     lambda: anchor.fwd(*args, True)))  # fmt: skip
    out = ["| call (batch 1, dim 16, dstate 16, L 1, bf16) | host us per call |", "| --- | --- |"]
    for name, fn in rows:
        with torch.no_grad():
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            per = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
                per.append((time.perf_counter() - t) / calls * 1e6)
        out.append(f"| {name} | {statistics.median(per):.1f} |")
        print(out[-1], flush=True)
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchor-src")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fwd-only", action="store_true", help="skip the backward timings")
    ap.add_argument("--overhead-only", action="store_true", help="only the host-overhead table")
    ap.add_argument("--shapes", help="comma-separated indices into the grid (default: all)")
    ap.add_argument("--no-overhead", action="store_true", help="skip the host-overhead table")
    ap.add_argument("--tag", default="", help="a label printed with each row (A/B runs)")
    args = ap.parse_args()
    anchor = None
    if args.anchor_src:
        try:
            anchor = build_anchor(args.anchor_src)
        except Exception as e:  # report and go on without the anchor
            print(f"anchor build failed: {type(e).__name__}: {str(e)[-2000:]}", flush=True)
    if args.build_only:
        return
    if args.overhead_only:
        print(overhead(anchor))
        return
    from mamba_scan import selective_scan_fn, selective_scan_ref

    grid = [GRID[0], GRID[2], GRID[5], GRID[6]] if args.quick else GRID
    if args.shapes:
        grid = [GRID[int(i)] for i in args.shapes.split(",")]
    lines = [
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; CUDA-event medians of 30 "
        "after 3 warm-ups; variable B/C (batch, 1, dstate, L), z, D, delta_bias, softplus.",
        "",
        "| dtype (b, d, N, L) | ours fwd ms | anchor fwd ms | fwd speed-up | ours bwd ms | anchor bwd ms "
        "| bwd speed-up | ours fwd GB/s | fwd exp rate / MUFU floor | ref fwd ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = []
    for dname, (b, d, n, L) in grid:
        dtype = torch.bfloat16 if dname == "bf16" else torch.float32
        u, delta, A, B, C, D, z, bias = inputs(b, d, n, L, dtype)
        with torch.no_grad():
            f_ours = cuda_ms(lambda: selective_scan_fn(u, delta, A, B, C, D, z, bias, True))
        leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
        out = selective_scan_fn(*leaves, True)
        dout = torch.randn_like(out)
        b_ours = float("nan")
        if not args.fwd_only:
            b_ours = cuda_ms(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True))
        f_anc = b_anc = float("nan")
        if anchor is not None:
            f_anc = cuda_ms(lambda: anchor.fwd(u, delta, A, B, C, D, z, bias, True))
            o, x, oz = anchor.fwd(u, delta, A, B, C, D, z, bias, True)
            if not args.fwd_only:
                b_anc = cuda_ms(
                    lambda: anchor.bwd(u, delta, A, B, C, D, z, bias, dout, x, o, None, True, False)
                )
        ref = float("nan")
        if L <= 512:  # the step-by-step reference is slow; time it where it is affordable
            with torch.no_grad():
                ref = cuda_ms(
                    lambda: selective_scan_ref(u, delta, A, B, C, D, z, bias, True),
                    warmup=1,
                    reps=3,
                )
        esz = dtype.itemsize
        fwd_bytes = 4 * b * d * L * esz + 2 * b * n * L * esz
        exps = b * d * L * n
        floor_ms = exps / MUFU_EXP_PER_S * 1e3
        rows.append((dname, (b, d, n, L), f_ours, f_anc, b_ours, b_anc))
        lines.append(
            f"| {args.tag}{dname} ({b}, {d}, {n}, {L}) | {f_ours:.3f} | {f_anc:.3f} | {f_anc / f_ours:.2f}x | "
            f"{b_ours:.3f} | {b_anc:.3f} | {b_anc / b_ours:.2f}x | {fwd_bytes / f_ours / 1e6:.0f} | "
            f"{floor_ms / f_ours:.2f} | {ref:.1f} |"
        )
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    if not args.no_overhead:
        lines += ["", overhead(anchor)]
    text = "\n".join(lines)
    print("\n" + text)
    text = naming.header() + "\n\n" + text
    with open(naming.result_path("scan"), "w") as f:
        f.write(text + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4))
        xs = range(len(rows))
        w = 0.2
        for i, (name, idx) in enumerate(
            [("ours fwd", 2), ("anchor fwd", 3), ("ours bwd", 4), ("anchor bwd", 5)]
        ):
            ax.bar([x + i * w for x in xs], [r[idx] for r in rows], w, label=name)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_xticks([x + 1.5 * w for x in xs], [f"{r[0]}\n{r[1]}" for r in rows], fontsize=6)
        ax.legend()
        ax.set_title(f"selective scan on {torch.cuda.get_device_name()}")
        fig.tight_layout()
        fig.savefig(naming.result_path("scan", "png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
