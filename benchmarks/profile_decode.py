"""GPU time per kernel of the decode step (conv update + state update) at Mamba-2.8b, batch 64,
bf16: torch.profiler over 50 steps."""

import torch
from bench_cuda import cuda_profile
from bench_decode import make, step_fn

import mamba_scan

t = make(64, 5120)
fn = step_fn(mamba_scan.causal_conv1d_update, mamba_scan.selective_state_update, t)
with torch.no_grad():
    print(cuda_profile(fn, warmup=10, reps=50, rows=10))
