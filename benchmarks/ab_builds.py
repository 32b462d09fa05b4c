"""A/B of two builds of mamba_scan on one GPU, through the public ``selective_scan_fn``: forward
and forward + backward per shape, medians of CUDA-event timings after warm-up, the two builds
run alternately (each in its own process, several rounds) so that clock and thermal drift fall
on both.

    python benchmarks/ab_builds.py --a DIR_A --b DIR_B [--rounds 3] [--out FILE]

DIR_A / DIR_B: directories that hold an installed ``mamba_scan`` (``pip install --target``).
Writes a markdown table (ms, b / a) to --out, else to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# (label, dtype, (batch, dim, dstate, seqlen), variable B, variable C, z)
SHAPES = [
    ("main", "bf16", (8, 1536, 16, 2048), True, True, True),
    ("main fp16", "fp16", (8, 1536, 16, 2048), True, True, True),
    ("main fp32", "fp32", (8, 1536, 16, 2048), True, True, True),
    ("no z", "bf16", (8, 1536, 16, 2048), True, True, False),
    ("few channels", "bf16", (1, 5120, 16, 16384), True, True, True),
    ("short", "bf16", (64, 1536, 16, 128), True, True, True),
    ("dstate 64", "bf16", (8, 1536, 64, 2048), True, True, True),
    ("dstate 64 fp16", "fp16", (8, 1536, 64, 2048), True, True, True),
    ("fixed B", "bf16", (4, 2048, 16, 2048), False, True, True),
    ("fixed B dstate 64", "bf16", (4, 2048, 64, 2048), False, True, True),
    ("fixed B C", "fp16", (4, 2048, 16, 2048), False, False, False),
    ("fixed B fp32", "fp32", (4, 2048, 16, 2048), False, True, True),
    ("fixed C dstate 128", "bf16", (4, 2048, 128, 2048), True, False, True),
    ("dstate 4", "bf16", (8, 1536, 4, 2048), True, True, True),
]

CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import mamba_scan
shapes = json.loads(sys.argv[2])
dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
out = {}
def med(fn, n=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]
for label, dtype, (bs, d, n, L), vb, vc, hz in shapes:
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    t = dt[dtype]
    u = r(bs, d, L).to(t).requires_grad_()
    delta = (0.5 * r(bs, d, L)).to(t).requires_grad_()
    A = (-torch.rand(d, n, device="cuda", generator=g) - 0.5).requires_grad_()
    B = (r(bs, 1, n, L).to(t) if vb else r(d, n)).requires_grad_()
    C = (r(bs, 1, n, L).to(t) if vc else r(d, n)).requires_grad_()
    D = r(d).requires_grad_()
    z = r(bs, d, L).to(t).requires_grad_() if hz else None
    bias = (0.1 * r(d)).requires_grad_()
    f = lambda: mamba_scan.selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    y = f()
    gy = torch.randn_like(y)
    def fb():
        torch.autograd.grad(f(), [u, delta, A, B, C, D, bias] + ([z] if hz else []), gy)
    with torch.no_grad():
        fwd = med(f)
    out[label] = (fwd, med(fb))
print(json.dumps(out))
"""


def run(where: str, shapes: list) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, where, json.dumps(shapes)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--match",
        default="",
        help="only shapes whose label contains one of these (comma-separated)",
    )
    args = ap.parse_args()
    keys = [k for k in args.match.split(",") if k]
    shapes = [s for s in SHAPES if not keys or any(k in s[0] for k in keys)]
    res: dict[str, list[dict]] = {"a": [], "b": []}
    for _ in range(args.rounds):
        res["a"].append(run(os.path.abspath(args.a), shapes))
        res["b"].append(run(os.path.abspath(args.b), shapes))
    import torch

    lines = [
        f"# A/B: {args.a} (a) vs {args.b} (b), {torch.cuda.get_device_name()}",
        "",
        f"torch {torch.__version__}; public selective_scan_fn, delta_softplus, D, delta_bias; "
        f"medians of 20 CUDA-event timings per process, median over {args.rounds} alternating "
        "processes per build.",
        "",
        "| shape | dtype (b, d, N, L) | B, C, z | fwd a ms | fwd b ms | b / a | "
        "fwd+bwd a ms | fwd+bwd b ms | b / a |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, dtype, shape, vb, vc, hz in shapes:
        cols = []
        for k in (0, 1):
            a = statistics.median(r[label][k] for r in res["a"])
            b = statistics.median(r[label][k] for r in res["b"])
            cols += [f"{a:.3f}", f"{b:.3f}", f"{b / a:.3f}"]
        bcz = f"{'var' if vb else 'fixed'}, {'var' if vc else 'fixed'}, {'z' if hz else '-'}"
        lines.append(f"| {label} | {dtype} {shape} | {bcz} | " + " | ".join(cols) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
