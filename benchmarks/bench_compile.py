"""Eager vs torch.compile on a GPU, through mamba_scan.Mamba:

- training step of a stack of Mamba layers (pre-norm residual, bf16 autocast, AdamW): ms per
  step (median of CUDA-event timings after warm-up) and peak memory, eager vs compiled;
- decoding tokens/s with the inference cache (one token per step, every layer's ``step``):
  eager vs ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), and the greedy tokens of the
  two compared.

    python benchmarks/bench_compile.py [--layers 24] [--d-model 1024] [--batch 8] [--seqlen 2048]
        [--decode-layers 64] [--decode-d-model 2560] [--skip-train] [--skip-decode]

Writes benchmarks/results/compile_<gpu>.md (BENCH_OUT overrides the directory).
"""

from __future__ import annotations

import argparse
import statistics
import time

import naming
import torch
import torch.nn as nn

from mamba_scan import Mamba


class Stack(nn.Module):
    def __init__(self, layers, d_model, device):
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, device=device) for _ in range(layers))
        self.layers = nn.ModuleList(
            Mamba(d_model, layer_idx=i, device=device) for i in range(layers)
        )

    def forward(self, x):
        for norm, m in zip(self.norms, self.layers):
            x = x + m(norm(x))
        return x


class Decoder(nn.Module):
    """One decoding step of every layer; the caches are buffers (static addresses for CUDA
    graphs), updated in place."""

    def __init__(self, stack, batch):
        super().__init__()
        self.stack = stack
        for i, m in enumerate(stack.layers):
            conv, ssm = m.allocate_inference_cache(batch, 1, dtype=torch.bfloat16)
            self.register_buffer(f"conv{i}", conv)
            self.register_buffer(f"ssm{i}", ssm)

    def forward(self, h):
        for i, (norm, m) in enumerate(zip(self.stack.norms, self.stack.layers)):
            out, _, _ = m.step(norm(h), getattr(self, f"conv{i}"), getattr(self, f"ssm{i}"))
            h = h + out
        return h


def cuda_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def train(args):
    torch.manual_seed(0)
    model = Stack(args.layers, args.d_model, "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(args.batch, args.seqlen, args.d_model, device="cuda")
    rows = []
    for name, fwd in (("eager", model), ("torch.compile", torch.compile(model))):

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", torch.bfloat16):
                loss = fwd(x).float().square().mean()
            loss.backward()
            opt.step()

        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        ms = cuda_ms(step, 3, 10)
        peak = torch.cuda.max_memory_allocated() / 2**20
        rows.append(f"| {name} | {ms:.1f} | {peak:.0f} | {first:.1f} |")
        print(rows[-1], flush=True)
    return [
        f"## Training step: {args.layers} layers, d_model {args.d_model}, batch {args.batch}, "
        f"L {args.seqlen}, bf16 autocast, fused AdamW",
        "",
        "| mode | ms per step | peak MiB | first step s (incl. compile) |",
        "| --- | --- | --- | --- |",
        *rows,
    ]


def decode(args):
    torch.manual_seed(0)
    stack = Stack(args.decode_layers, args.decode_d_model, "cuda").to(torch.bfloat16).eval()
    rows = []
    for batch in (1, 64):
        dec = Decoder(stack, batch).cuda()
        h0 = torch.randn(batch, 1, args.decode_d_model, device="cuda", dtype=torch.bfloat16)
        outs = {}
        for name, fn in (("eager", dec),
                         ("reduce-overhead", torch.compile(dec, mode="reduce-overhead",
                                                           fullgraph=True))):  # fmt: skip
            for buf in dec.buffers():
                buf.zero_()
            with torch.no_grad():
                t0 = time.perf_counter()
                fn(h0)
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                for buf in dec.buffers():
                    buf.zero_()
                seq = []
                h = h0
                for _ in range(16):  # a fixed input sequence: the same states on both sides
                    h = fn(h0 + 0.01 * len(seq)).clone()
                    seq.append(h)
                outs[name] = torch.stack(seq).float()
                ms = cuda_ms(lambda: fn(h0), 20, 100)
            rows.append(f"| {batch} | {name} | {ms * 1e3:.0f} | {batch / ms * 1e3:.0f} | "
                        f"{first:.1f} |")  # fmt: skip
            print(rows[-1], flush=True)
        diff = (outs["eager"] - outs["reduce-overhead"]).abs().max().item()
        rows.append(f"| {batch} | max abs diff of 16 steps' outputs, compiled vs eager | "
                    f"{diff:.3g} | | |")  # fmt: skip
    return [
        f"## Decoding: {args.decode_layers} layers, d_model {args.decode_d_model}, bf16, one "
        "token per step through every layer's step() with the inference cache",
        "",
        "| batch | mode | us per step | tokens/s | first call s (incl. compile) |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--decode-layers", type=int, default=64)
    ap.add_argument("--decode-d-model", type=int, default=2560)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    lines = ["# torch.compile vs eager, mamba_scan.Mamba", "", naming.header(), ""]
    if not args.skip_train:
        lines += train(args) + [""]
    if not args.skip_decode:
        lines += decode(args) + [""]
    text = "\n".join(lines)
    print(text)
    with open(naming.result_path("compile"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
