"""The Mamba paper's synthetic tasks on mamba_scan's kernels: Selective Copying and Induction
Heads, a selective (S6) model against a time-invariant (LTI) ablation on the same kernels."""
