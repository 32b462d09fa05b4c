"""Memory over long runs: 100,000 forward + backward calls of small shapes (scan through the
conv, as a layer does) and 10,000 decoding steps (conv update + state update), measuring after
each tenth of the run the process RSS (CPU) or torch's allocated memory and the driver's used
memory (CUDA); reports the least-squares slope over the last nine tenths (bytes per call).

    python benchmarks/bench_soak.py [--device cpu|cuda] [--calls 100000] [--steps 10000]

Writes soak_<gpu>.md or soak_cpu_<n>core.md to BENCH_OUT (default benchmarks/results)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import naming  # noqa: E402

from mamba_scan import (  # noqa: E402
    causal_conv1d_fn,
    causal_conv1d_update,
    selective_scan_fn,
    selective_state_update,
)


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probes(dev):
    if dev == "cuda":
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return {"allocated": torch.cuda.memory_allocated(), "driver used": total - free,
                "rss": rss()}  # fmt: skip
    return {"rss": rss()}


def slope(xs, ys):
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0])


def soak(name, n, step, dev):
    marks, samples = [], []
    t0 = time.perf_counter()
    for i in range(n):
        step(i)
        if (i + 1) % (n // 10) == 0:
            marks.append(i + 1)
            samples.append(probes(dev))
    secs = time.perf_counter() - t0
    rows = []
    for key in samples[0]:
        ys = [s[key] for s in samples]
        rows.append((name, n, key, ys[0], ys[-1], slope(marks[1:], ys[1:]), secs))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=10_000)
    a = ap.parse_args()
    dev = a.device
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g).to(dev)

    b, d, L, N = 2, 16, 64, 8
    u, dlt, z = r(b, d, L), (r(b, d, L) * 0.5), r(b, d, L)
    A, B, C, D, w = -r(d, N).abs() - 0.5, r(b, N, L), r(b, N, L), r(d), r(d, 4)
    leaves = [t.requires_grad_() for t in (u, dlt, A, B, C, D, w)]

    def train_step(_):
        x = causal_conv1d_fn(u, w, activation="silu")
        out = selective_scan_fn(x, dlt, A, B, C, D, z, None, True)
        torch.autograd.grad(out.sum(), leaves)

    st, cs = torch.zeros(4, d, N, device=dev), torch.zeros(4, d, 3, device=dev)
    x1, dt1, B1, C1 = r(4, d), r(4, d).sigmoid(), r(4, N), r(4, N)
    Ad, wd = A.detach(), w.detach()

    def decode_step(_):
        x = causal_conv1d_update(x1, cs, wd, None, "silu")
        selective_state_update(st, x, dt1, Ad, B1, C1, dt_softplus=True)
        st.mul_(0.5)  # keep the state bounded over 10,000 steps

    rows = soak("forward + backward", a.calls, train_step, dev)
    rows += soak("decode step", a.steps, decode_step, dev)
    lines = [naming.header(dev), "",
             f"Memory over long runs on {dev} (benchmarks/bench_soak.py): scan + conv forward and "
             f"backward at (batch {b}, dim {d}, seqlen {L}, dstate {N}), and decoding steps "
             f"(conv update + state update, batch 4). Slope: least squares over the samples "
             f"after the first tenth.", "",
             "| run | calls | measure | after 1/10 (MB) | at the end (MB) | slope (bytes / call) "
             "| seconds |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, n, key, y0, y1, s, secs in rows:
        lines.append(f"| {name} | {n} | {key} | {y0 / 2**20:.1f} | {y1 / 2**20:.1f} | {s:.3f} "
                     f"| {secs:.0f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    kind = "soak" if dev == "cuda" else "soak_cpu"
    with open(naming.result_path(kind, device=dev), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
