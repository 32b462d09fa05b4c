"""Context parallelism: one sequence split along its length across the ranks of a
torch.distributed process group, computed exactly.

The scan's state follows ``h_t = a_t * h_{t-1} + b_t`` with ``a_t = exp(dt_t A)`` elementwise, so
a slice maps the state it starts from to the state it ends in by ``h_end = P * h_start + s``:
``P = exp(A * sum_t dt_t)`` (the slice's total decay) and ``s`` its final state from zero. Each
rank

1. scans its slice from zero and forms its (s, P), both (batch, dim, dstate) float32;
2. all-gathers them (one collective of 2 x batch x dim x dstate floats per rank; nothing of
   length L crosses the ranks) and folds the ranks before it, starting from the initial state
   (taken from group rank 0): its true start state, and the whole sequence's final state;
3. scans its slice again from that start state: its slice of the output.

The backward runs through the same exchange in reverse (an all-reduce of the gathered states'
gradients; each rank keeps its own): the gradient of a slice's start state flows to the final
states and decays of the ranks before it and to the initial state. Cost per rank: two scans
forward and two backward over its slice, two collectives of O(world x batch x dim x dstate);
float16 / bfloat16 slices run in float32 inside (one float32 copy of u, delta, z, B, C: their
gradients arrive by three paths and are summed before the one rounding).
The result equals the single-device scan of the whole sequence up to rounding (the parity rule).

``Mamba.forward(..., process_group=...)`` runs a sequence-sharded layer on top of it: the causal
conv reads the last ``d_conv - 1`` inputs of the rank before (an all-gather of those halos).
Works with any backend that has all_gather and all_reduce (NCCL, gloo); the ranks of the group
hold consecutive slices in group-rank order. Composes with DDP / FSDP over another group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._native import ShapeError
from .ops.selective_scan import dt_of, selective_scan_fn


class _AllGather(torch.autograd.Function):
    """(world, *x.shape) of every rank's x; the backward sums every rank's gradient of the
    gathered tensor (all_reduce, which every backend has) and keeps this rank's part."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g[dist.get_rank(ctx.group)], None


def all_gather_with_grad(x, group=None):
    """The stacked (world, ...) x of every rank of ``group``, differentiable."""
    return _AllGather.apply(x, group)


def context_parallel_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False, *, initial_state=None,
                          group=None):  # fmt: skip
    """``selective_scan_fn`` over a sequence split along its length across ``group``'s ranks.

    u, delta, z, and a variable B / C hold this rank's slice of the sequence (slices may differ
    in length, including 0); A, a fixed B / C, D and delta_bias are the same on every rank.
    initial_state (batch, dim, dstate), the state before the whole sequence, is read on group
    rank 0 (the others may pass None) and its gradient arrives there. Returns this rank's slice
    of the output, and with ``return_last_state`` also the whole sequence's final state (the
    same on every rank). Real A only; no seq_idx (packed sequences) here."""
    if A.is_complex():
        raise NotImplementedError("A: context parallelism takes a real A")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if u.dim() != 3:
        raise ShapeError(f"u: must have shape (batch, dim, seqlen); got {tuple(u.shape)}")
    batch, dim, _ = u.shape
    N, dtype = A.shape[-1], u.dtype
    wt = torch.float64 if u.dtype == torch.float64 else torch.float32
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, N):
        raise ShapeError(f"initial_state: must have shape (batch, dim, dstate) = "
                         f"({batch}, {dim}, {N}); got {tuple(initial_state.shape)}")  # fmt: skip
    h0 = initial_state if rank == 0 and initial_state is not None else None
    low = u.dtype in (torch.float16, torch.bfloat16)
    if low:
        # The gradients of u, delta, B, C arrive by three paths (both scans, the decay): in
        # half precision each would be rounded before their sum. One float32 copy each, used
        # by every path: the sum is rounded once, as on a single device.
        u, delta, z = (t.float() if t is not None else None for t in (u, delta, z))
        B, C = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in (B, C))
    # 1. This slice from zero: its final state s and its total decay P.
    _, s = selective_scan_fn(u, delta, A, B, C, None, None, delta_bias, delta_softplus, True)
    dt = dt_of(delta, delta_bias, delta_softplus, wt)
    P = torch.exp(A.to(wt)[None] * dt.sum(-1)[..., None])
    zero = torch.zeros(batch, dim, N, dtype=wt, device=u.device)
    mine = torch.stack([s.to(wt), P, h0.to(wt) if h0 is not None else zero])
    # 2. Every rank's (s, P) and rank 0's initial state; fold the ranks before this one.
    allr = all_gather_with_grad(mine, group)
    h = allr[0, 2]
    start = None
    for k in range(world):
        if k == rank:
            start = h
        h = allr[k, 1] * h + allr[k, 0]
    # 3. This slice from its true start state.
    out = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False,
                            initial_state=start)  # fmt: skip
    if low:
        out = out.to(dtype)
    return (out, h) if return_last_state else out


class _Halo(torch.autograd.Function):
    """The k steps before this rank's slice from the ranks before it (zeros before the start).
    One Function, so that every rank's graph holds it (rank 0's halo is zeros but still its
    output): the backward's all_reduce then runs on every rank, in the same order."""

    @staticmethod
    def forward(ctx, tail, n, group):
        rank, world, k = dist.get_rank(group), dist.get_world_size(group), tail.shape[-1]
        parts = [torch.empty_like(tail) for _ in range(world)]
        dist.all_gather(parts, tail.contiguous(), group=group)
        lens = [torch.zeros(1, dtype=torch.int64, device=tail.device) for _ in range(world)]
        dist.all_gather(lens, torch.tensor([n], dtype=torch.int64, device=tail.device), group=group)
        lens = [int(v) for v in lens]
        # Where each of the k halo steps comes from: (rank, step of its padded tail).
        src = [(j, t) for j in range(rank) for t in range(k - lens[j], k)][-k:]
        ctx.src, ctx.group, ctx.shape = src, group, tail.shape
        halo = torch.zeros_like(tail)
        for i, (j, t) in enumerate(src):
            halo[..., k - len(src) + i] = parts[j][..., t]
        return halo

    @staticmethod
    def backward(ctx, g):
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        k = ctx.shape[-1]
        buf = g.new_zeros((world,) + tuple(ctx.shape))
        for i, (j, t) in enumerate(ctx.src):
            buf[j][..., t] += g[..., k - len(ctx.src) + i]
        dist.all_reduce(buf, group=ctx.group)
        return buf[rank], None, None


def conv_halo(x, width, group=None):
    """The ``width - 1`` steps before this rank's slice of x (from the ranks before it; zeros
    before the sequence's start), (batch, dim, width - 1), differentiable: the causal conv's
    initial_states for this rank's slice. Slices of any length, 0 included."""
    k = width - 1
    n = min(k, x.shape[-1])
    tail = torch.nn.functional.pad(x[..., x.shape[-1] - n :], (k - n, 0))
    return _Halo.apply(tail, n, group)
