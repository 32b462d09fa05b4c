"""One Mamba block (mamba_ssm's Mamba-1 layout), forward and forward+backward: mamba-scan's
``Mamba`` vs transformers' ``MambaMixer`` on its PyTorch path (the "slow path" users get without
mamba_ssm), same weights, fp32 on the CPU (or the device given). Medians of wall-clock ms.

    python benchmarks/bench_block.py [--device cpu|cuda] [--d-model 768] [--batch 1] [--seqlen 1024]

Writes benchmarks/results/block_<machine>.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import naming
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(fn, device, reps):
    fn()
    ts = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    from mamba_scan import Mamba

    dev, d = args.device, args.d_model
    torch.manual_seed(0)
    ours = Mamba(d_model=d, d_state=16, d_conv=4, expand=2).to(dev)
    cfg = MambaConfig(hidden_size=d, state_size=16, conv_kernel=4, expand=2,
                      time_step_rank=ours.dt_rank, use_bias=False, use_conv_bias=True)  # fmt: skip
    theirs = MambaMixer(cfg, layer_idx=0).to(dev)
    missing = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert not missing.missing_keys
    h = torch.randn(args.batch, args.seqlen, d, device=dev)
    with torch.no_grad():
        torch.testing.assert_close(ours(h), theirs(h), rtol=1e-3, atol=1e-4)

    def fwd(m):
        with torch.no_grad():
            m(h)

    def fwd_bwd(m):
        x = h.clone().requires_grad_()
        m(x).sum().backward()

    rows = []
    for name, m in (("mamba_scan.Mamba", ours), ("transformers MambaMixer (torch path)", theirs)):
        m.train()  # transformers' mixer takes its training path (mamba_inner_fn) only in train mode
        rows.append(
            (name, timed(lambda: fwd(m), dev, args.reps), timed(lambda: fwd_bwd(m), dev, args.reps))
        )
        print(rows[-1], flush=True)
    n = torch.get_num_threads()
    lines = [
        f"Mamba block d_model {d} (d_inner {2 * d}, d_state 16, d_conv 4), batch {args.batch}, "
        f"seqlen {args.seqlen}, fp32 on {dev} ({n} torch threads); median of {args.reps} after one "
        "warm-up; both modules hold the same weights and agree on the output.",
        "",
        "| module | fwd ms | fwd+bwd ms |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {a} | {b:.1f} | {c:.1f} |" for a, b, c in rows]
    lines.append(f"| speed-up | {rows[1][1] / rows[0][1]:.1f}x | {rows[1][2] / rows[0][2]:.1f}x |")
    text = naming.header(dev) + "\n\n" + "\n".join(lines)
    print(text)
    out = naming.result_path("block", device=dev)
    with open(out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
