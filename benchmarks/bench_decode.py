"""Decoding step of a Mamba-1 layer on the GPU: one causal_conv1d_update + one
selective_state_update, at Mamba-1.4b (d_inner 4096) and Mamba-2.8b (d_inner 5120) shapes
(d_state 16, d_conv 4, bf16 states and inputs, as mamba_ssm's allocate_inference_cache gives a
bf16 model), batch 1 and 64. mamba-scan vs mamba_ssm (Triton selective_state_update +
causal-conv1d's CUDA update; see anchors.py) vs the PyTorch reference.

Two numbers per row: eager microseconds per step (N back-to-back steps, wall clock, one
synchronisation at the end: host overhead included), and CUDA-graph replay of the same step
(CUDA-event median). Writes benchmarks/results/decode_<gpu>.md.

    python benchmarks/bench_decode.py [--anchors]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import naming
import torch

import mamba_scan
from mamba_scan.reference import causal_conv1d_update_ref, selective_state_update_ref

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [("1.4b", 4096), ("2.8b", 5120)]


def make(batch, d, n=16, w=4, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    return dict(
        x=r(batch, d).to(dtype), conv_state=r(batch, d, w).to(dtype), conv_w=r(d, w).to(dtype),
        conv_b=r(d).to(dtype), ssm_state=r(batch, d, n).to(dtype), dt=r(batch, d).to(dtype),
        A=-torch.rand(d, n, device="cuda") - 0.5, B=r(batch, n).to(dtype), C=r(batch, n).to(dtype),
        D=r(d), z=r(batch, d).to(dtype), dt_bias=r(d),
    )  # fmt: skip


def step_fn(conv_update, state_update, t):
    def step():
        xc = conv_update(t["x"], t["conv_state"], t["conv_w"], t["conv_b"], "silu")
        return state_update(t["ssm_state"], xc, t["dt"], t["A"], t["B"], t["C"], t["D"],
                            z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)  # fmt: skip

    return step


def eager_us(fn, n=500):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        per.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(per)


def graph_us(fn, reps=200):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(10):
        g.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]  # fmt: skip
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchors", action="store_true", help="build and time mamba_ssm too")
    args = ap.parse_args()
    impls = [("mamba-scan", mamba_scan.causal_conv1d_update, mamba_scan.selective_state_update)]
    if args.anchors:
        try:
            import anchors

            anchors.build_all()
            ms = anchors.import_mamba_ssm()
            impls.append(("mamba_ssm (Triton) + causal-conv1d", ms.causal_conv1d_update,
                          ms.selective_state_update))  # fmt: skip
        except Exception as e:  # report and go on without the anchor
            print(f"anchors unavailable: {type(e).__name__}: {str(e)[-1500:]}", flush=True)
    impls.append(("PyTorch reference", causal_conv1d_update_ref, selective_state_update_ref))
    lines = [
        "Decode step (causal_conv1d_update + selective_state_update), d_state 16, d_conv 4, bf16;",
        "eager: host wall time per step over 500 back-to-back steps (median of 5); graph: CUDA",
        f"graph replay, CUDA-event median of 200. {torch.cuda.get_device_name()}.",
        "",
        "| model (d_inner) | batch | implementation | eager us | graph us |",
        "| --- | --- | --- | --- | --- |",
    ]
    with torch.no_grad():
        for name, d in SHAPES:
            for batch in (1, 64):
                t = make(batch, d)
                outs = {}
                for label, cu, su in impls:
                    tt = {k: v.clone() for k, v in t.items()}
                    outs[label] = step_fn(cu, su, tt)()
                    fn = step_fn(cu, su, tt)
                    row = (f"| {name} ({d}) | {batch} | {label} | {eager_us(fn):.1f} "
                           f"| {graph_us(fn):.1f} |")  # fmt: skip
                    lines.append(row)
                    print(row, flush=True)
                ref = outs[impls[-1][0]].float()
                for label, o in outs.items():
                    e = (o.float() - ref).abs().max().item()
                    print(f"  {label}: max |out - torch ref| after one step = {e:.2e}")
    text = naming.header() + "\n\n" + "\n".join(lines)
    print(text)
    with open(naming.result_path("decode"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
