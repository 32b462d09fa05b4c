"""Host time per call of the public functions at tiny shapes (the kernel takes microseconds, so
back-to-back calls are bound by the host): wall time of N calls without synchronisation, divided
by N, median of 5 rounds. Where the custom ops exist (torch.ops.mamba_scan), the same calls
through the op dispatcher are timed too: what eager calls would pay without the fast path.

    python benchmarks/bench_host_time.py [--device cpu|cuda] [--calls 3000] [--label TEXT]

Run it under two builds (PYTHONPATH) for a before / after table; prints markdown rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def tiny_calls(dev: str):
    """The timed public calls at batch 1, dim 16, dstate 16, L 1 (bf16 on CUDA, fp32 on the CPU):
    [(name, call, under no_grad)], and the scan / state-update tensors they use."""
    from mamba_scan import causal_conv1d_update, selective_scan_fn, selective_state_update

    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    b, d, n, L = 1, 16, 16, 1
    u, delta, z = r(b, d, L).to(dt), r(b, d, L).to(dt), r(b, d, L).to(dt)
    A, D, bias = -r(d, n).abs(), r(d), r(d)
    B, C = r(b, 1, n, L).to(dt), r(b, 1, n, L).to(dt)
    ug = u.clone().requires_grad_()
    state, x, dtt = r(b, d, n), r(b, d).to(dt), r(b, d).to(dt)
    Bs, Cs = r(b, n).to(dt), r(b, n).to(dt)
    conv_state, w, cb = r(b, d, 3).to(dt), r(d, 4).to(dt), r(d).to(dt)
    rows = [
        ("selective_scan_fn, no grad", lambda: selective_scan_fn(u, delta, A, B, C, D, z, bias, True), True),
        ("selective_scan_fn, u requires grad (forward)",
         lambda: selective_scan_fn(ug, delta, A, B, C, D, z, bias, True), False),
        ("selective_state_update", lambda: selective_state_update(state, x, dtt, A, Bs, Cs, D, x, bias, True), True),
        ("causal_conv1d_update", lambda: causal_conv1d_update(x, conv_state, w, cb, "silu"), True),
    ]  # fmt: skip
    return rows, (u, delta, A, B, C, D, z, bias, state, x, dtt, Bs, Cs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    import mamba_scan

    dev = a.device
    rows, (u, delta, A, B, C, D, z, bias, state, x, dtt, Bs, Cs) = tiny_calls(dev)
    ops = getattr(torch.ops, "mamba_scan", None)
    if ops is not None and hasattr(ops, "selective_scan_fwd"):
        rows += [
            ("torch.ops.mamba_scan.selective_scan_fwd (op dispatch)",
             lambda: ops.selective_scan_fwd(u, delta, A, B, C, D, z, bias, None, True, False), True),
            ("torch.ops.mamba_scan.selective_state_update (op dispatch)",
             lambda: ops.selective_state_update(state, x, dtt, A, Bs, Cs, D, x, bias, True, None), True),
        ]  # fmt: skip
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    head = f"{a.label} " if a.label else ""
    print(f"| {head}call ({dev}, batch 1, dim 16, dstate 16, L 1) | host us per call |")
    print("| --- | --- |")
    for name, fn, no_grad in rows:
        with torch.no_grad() if no_grad else torch.enable_grad():
            for _ in range(200):
                fn()
            sync()
            per = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(a.calls):
                    fn()
                sync()
                per.append((time.perf_counter() - t) / a.calls * 1e6)
        print(f"| {name} | {statistics.median(per):.1f} |", flush=True)
    print(f"\ntorch {torch.__version__}, mamba_scan from {mamba_scan.__file__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
