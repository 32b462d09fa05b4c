"""Continuous-batching prefill over a state cache, with vLLM's Mamba-1 semantics
(``vllm.model_executor.layers.mamba.ops.mamba_ssm.selective_scan_fn``): prefills of different
lengths packed along the token axis, each reading its start state from a slot of ``ssm_states``
and writing its final state back to that slot in place. Built on the packed scan
(``selective_scan_fn(..., seq_idx=, initial_state=)``): one kernel call for the whole batch,
no host synchronisation (the indices stay on the device), so it can be captured in a CUDA graph.
Forward only (serving)."""

from __future__ import annotations

import torch

from ._native import DTypeError, ShapeError
from .ops.selective_scan import selective_scan_fn as _scan
from .ops.selective_scan import seq_idx_from_cu_seqlens

PAD_SLOT_ID = -1


def _seq_layout(u, query_start_loc):
    """(batch-first u view, seq_idx, num_seqs) for varlen (dim, total) or (batch, dim, seqlen)."""
    if query_start_loc is not None:
        if u.dim() != 2:
            raise ShapeError(f"u: with query_start_loc must be (dim, total_tokens); got "
                             f"{tuple(u.shape)}")  # fmt: skip
        total = u.shape[1]
        return True, seq_idx_from_cu_seqlens(query_start_loc, total), query_start_loc.numel() - 1
    if u.dim() != 3:
        raise ShapeError(f"u: must be (batch, dim, seqlen) without query_start_loc; got "
                         f"{tuple(u.shape)}")  # fmt: skip
    batch, _, seqlen = u.shape
    seq = torch.arange(batch, dtype=torch.int32, device=u.device)[:, None].expand(batch, seqlen)
    return False, seq.contiguous(), batch


def selective_scan_fn(u, ssm_states, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False, query_start_loc=None, cache_indices=None,
                      has_initial_state=None, pad_slot_id=PAD_SLOT_ID):  # fmt: skip
    """vLLM's prefill scan.

    Args:
        u, delta, z: (dim, total_tokens) with ``query_start_loc`` (sequences back to back), else
            (batch, dim, seqlen).
        ssm_states: (cache_rows, dim, dstate), updated in place: the slot of each sequence
            (``cache_indices[i]``, else i) receives its final state; other slots and pad
            entries are left untouched, bit for bit.
        A: (dim, dstate); B, C: (ngroups, dstate, total_tokens) with query_start_loc (or
            (dstate, total_tokens)), else (batch, ngroups, dstate, seqlen) / (batch, dstate,
            seqlen); D, delta_bias: (dim,).
        query_start_loc: (num_seqs + 1,) int, the cumulative lengths [0, l0, l0 + l1, ...].
        cache_indices: (num_seqs,) int, the slot of each sequence; ``pad_slot_id`` marks an
            entry that is not processed (its slot is not read or written).
        has_initial_state: (num_seqs,) bool: start from the slot's state, else from 0.

    Returns the output, shaped like u; like vLLM it is also written into ``z`` (or ``delta``
    without z) in place.
    """
    varlen, seq_idx, num_seqs = _seq_layout(u, query_start_loc)
    dev = u.device
    if ssm_states.dim() != 3:
        raise ShapeError(f"ssm_states: must be (cache_rows, dim, dstate); got "
                         f"{tuple(ssm_states.shape)}")  # fmt: skip
    if cache_indices is None:
        cache_indices = torch.arange(num_seqs, device=dev)
    if cache_indices.dim() != 1 or cache_indices.numel() != num_seqs:
        raise ShapeError(f"cache_indices: must be ({num_seqs},) (one slot per sequence); got "
                         f"{tuple(cache_indices.shape)}")  # fmt: skip
    if cache_indices.is_floating_point():
        raise DTypeError(f"cache_indices: expected an integer tensor; got {cache_indices.dtype}")
    idx = cache_indices.to(torch.long)
    valid = idx != pad_slot_id
    # Pad entries: their tokens become padding (-1) for the scan (no state read or written).
    seq_idx = torch.where(
        (seq_idx >= 0) & valid[seq_idx.clamp(min=0).long()], seq_idx, torch.full_like(seq_idx, -1)
    )
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    h0 = ssm_states[safe].to(torch.float32)
    start = valid if has_initial_state is None else valid & has_initial_state.to(torch.bool)
    h0 = torch.where(start[:, None, None], h0, torch.zeros_like(h0))
    if varlen:
        u_, delta_, z_ = (x[None] if x is not None else None for x in (u, delta, z))
        B_, C_ = (x[None] if x.dim() in (2, 3) and x.shape[-1] == u.shape[1] else x for x in (B, C))
    else:
        u_, delta_, z_, B_, C_ = u, delta, z, B, C
    out, final = _scan(u_, delta_, A, B_, C_, D, z_, delta_bias, delta_softplus, True,
                       initial_state=h0, seq_idx=seq_idx, num_seqs=num_seqs)  # fmt: skip
    if varlen:
        out = out[0]
    # Write the final states back without a host read: pad entries are aimed at the slot of
    # the first valid entry with that entry's value (duplicate writes of one value), or, with
    # no valid entry, at slot 0 with its own value.
    any_valid = valid.any()
    k = valid.to(torch.int32).argmax()
    fb_idx = torch.where(any_valid, idx[k], torch.zeros_like(idx[k]))
    fb_val = torch.where(any_valid, final[k], ssm_states[0].to(final.dtype))
    tgt = torch.where(valid, idx, fb_idx)
    vals = torch.where(valid[:, None, None], final, fb_val)
    ssm_states.index_copy_(0, tgt, vals.to(ssm_states.dtype))
    dst = z if z is not None else delta
    dst.copy_(out)
    return dst
