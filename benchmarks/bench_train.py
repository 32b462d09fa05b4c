"""Training step of one Mamba-1 block on the GPU (forward + backward, bf16 autocast over fp32
weights, as AMP training runs): mamba_scan.Mamba vs mamba_ssm's Mamba (mamba_inner_fn over
selective_scan_cuda + causal-conv1d, built from their sdists, see anchors.py) vs transformers'
MambaMixer on its PyTorch path. All hold the same weights; CUDA-event medians after warm-up.

    python benchmarks/bench_train.py [--anchors] [--slow-path] [--out FILE]

The transformers row needs a process without the anchors (else transformers may resolve its
kernels to them). Writes benchmarks/results/<out>.
"""

from __future__ import annotations

import argparse
import os

import naming
import torch
from bench_cuda import cuda_ms  # CUDA-event median after warm-up

import mamba_scan

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(768, 8, 2048), (2048, 4, 2048)]  # (d_model, batch, seqlen)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchors", action="store_true")
    ap.add_argument("--slow-path", action="store_true", help="time transformers' torch path too")
    ap.add_argument("--out", default="", help="file name (default block_<gpu>.md)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--d-models", default="768,2048", help="subset of the shapes, by d_model")
    args = ap.parse_args()
    ms = None
    if args.anchors:
        try:
            import anchors

            if "selective_scan_cuda" not in __import__("sys").modules:
                anchors.build_all()
            ms = anchors.import_mamba_ssm()
        except Exception as e:
            print(f"anchors unavailable: {type(e).__name__}: {str(e)[-1500:]}", flush=True)
    lines = [
        f"One Mamba-1 block (d_state 16, d_conv 4, expand 2), forward + backward under bf16 "
        f"autocast, fp32 weights; CUDA-event median. {torch.cuda.get_device_name()}.",
        "",
        "| d_model | batch x seqlen | implementation | fwd ms | fwd+bwd ms | vs mamba-scan |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    keep = {int(x) for x in args.d_models.split(",")}
    for d_model, batch, L in [s for s in SHAPES if s[0] in keep]:
        torch.manual_seed(0)
        ours = mamba_scan.Mamba(d_model=d_model, d_state=16, d_conv=4, expand=2).cuda()
        impls = [("mamba_scan.Mamba", ours)]
        if ms is not None:
            theirs = ms.Mamba(d_model=d_model, d_state=16, d_conv=4, expand=2).cuda()
            theirs.load_state_dict(ours.state_dict())
            impls.append(("mamba_ssm Mamba (+ causal-conv1d)", theirs))
        if args.slow_path:
            from transformers import MambaConfig
            from transformers.models.mamba import modeling_mamba as mm

            cfg = MambaConfig(hidden_size=d_model, state_size=16, conv_kernel=4, expand=2,
                              time_step_rank=ours.dt_rank, use_bias=False, use_conv_bias=True)  # fmt: skip
            # Its PyTorch path: run this in a process without the anchors (nothing for
            # transformers to resolve its kernels to).
            mixer = mm.MambaMixer(cfg, layer_idx=0).cuda().train()
            mixer.load_state_dict(ours.state_dict())
            impls.append(("transformers MambaMixer (torch path)", mixer))
        h = torch.randn(batch, L, d_model, device="cuda")
        gout = torch.randn(batch, L, d_model, device="cuda", dtype=torch.bfloat16)
        base = None
        ref_out = None
        for label, m in impls:

            def fwd(m=m):
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return m(h)

            def step(m=m):
                x = h.clone().requires_grad_()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = m(x)
                y.backward(gout)

            o = fwd().float()
            if ref_out is None:
                ref_out = o
            else:
                print(f"  {label}: max |out - mamba-scan out| = {(o - ref_out).abs().max():.3e}")
            f_ms = cuda_ms(fwd, warmup=2, reps=args.reps)
            fb_ms = cuda_ms(step, warmup=2, reps=args.reps)
            base = fb_ms if base is None else base
            row = (f"| {d_model} | {batch} x {L} | {label} | {f_ms:.2f} | {fb_ms:.2f} "
                   f"| {fb_ms / base:.2f}x |")  # fmt: skip
            lines.append(row)
            print(row, flush=True)
            m.zero_grad(set_to_none=True)
    text = naming.header() + "\n\n" + "\n".join(lines)
    print(text)
    path = os.path.join(naming.out_dir(), args.out) if args.out else naming.result_path("block")
    with open(path, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
