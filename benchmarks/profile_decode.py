"""GPU time per kernel of the decode step (conv update + state update) at Mamba-2.8b, batch 64,
bf16: torch.profiler over 50 steps."""

import torch
from bench_decode import make, step_fn
from torch.profiler import ProfilerActivity, profile

import mamba_scan

t = make(64, 5120)
fn = step_fn(mamba_scan.causal_conv1d_update, mamba_scan.selective_state_update, t)
with torch.no_grad():
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=50))
