"""Continuous batching over state caches, with vLLM's Mamba-1 semantics
(``vllm.model_executor.layers.mamba.ops``): prefills of different lengths packed along the
token axis, each reading its start state from a slot of a cache and writing its final state back
to that slot in place. ``selective_scan_fn`` runs the packed scan
(``selective_scan_fn(..., seq_idx=, initial_state=)``), ``causal_conv1d_fn`` the packed causal
conv1d (``causal_conv1d_fn(..., seq_idx=)``), ``causal_conv1d_update`` and
``selective_state_update`` the decoding steps: one kernel call over the whole batch each, no
host synchronisation (the indices stay on the device), so they can be captured in a CUDA graph.
Forward only (serving)."""

from __future__ import annotations

import torch

from ._boundary import check_devices, check_index, require_float, require_tensor
from ._native import DTypeError, ShapeError
from .ops.conv1d import causal_conv1d_fn as _conv
from .ops.conv1d import causal_conv1d_update as _conv_update
from .ops.selective_scan import _seq_idx_of_starts
from .ops.selective_scan import selective_scan_fn as _scan

PAD_SLOT_ID = -1


def _seq_layout(u, query_start_loc):
    """(batch-first u view, seq_idx, num_seqs) for varlen (dim, total) or (batch, dim, seqlen)."""
    if query_start_loc is not None:
        check_index(query_start_loc, "query_start_loc")
        if u.dim() != 2:
            raise ShapeError(f"u: with query_start_loc must be (dim, total_tokens); got "
                             f"{tuple(u.shape)}")  # fmt: skip
        total = u.shape[1]
        return (
            True,
            _seq_idx_of_starts(query_start_loc, total, "query_start_loc"),
            query_start_loc.numel() - 1,
        )
    if u.dim() != 3:
        raise ShapeError(f"u: must be (batch, dim, seqlen) without query_start_loc; got "
                         f"{tuple(u.shape)}")  # fmt: skip
    batch, _, seqlen = u.shape
    seq = torch.arange(batch, dtype=torch.int32, device=u.device)[:, None].expand(batch, seqlen)
    return False, seq.contiguous(), batch


def _slots(cache_indices, num_seqs, pad_slot_id, dev, rows):
    """(slot per sequence as int64, valid mask, slot safe to read) from vLLM's cache_indices.
    An entry outside [0, rows) that is not pad_slot_id, or two entries naming one slot, are
    refused on the CPU; on CUDA (where checking would read the indices back to the host) the
    first is treated as padding and the second is the caller's error."""
    if cache_indices is None:
        cache_indices = torch.arange(num_seqs, device=dev)
    check_index(cache_indices, "cache_indices", num_seqs)
    idx = cache_indices.to(torch.long)
    valid = (idx != pad_slot_id) & (idx >= 0) & (idx < rows)
    if not idx.is_cuda and bool(((idx != pad_slot_id) & ~valid).any()):
        raise ShapeError(f"cache_indices: entries must be pad_slot_id ({pad_slot_id}) or slots in "
                         f"[0, {rows}); got {idx.tolist()}")  # fmt: skip
    if not idx.is_cuda and idx[valid].unique().numel() != int(valid.sum()):
        raise ShapeError(f"cache_indices: two sequences name one slot; got {idx.tolist()}")
    return idx, valid, torch.where(valid, idx, torch.zeros_like(idx))


def _check_flags(has_initial_state, num_seqs):
    if has_initial_state is None:
        return
    if not isinstance(has_initial_state, torch.Tensor):
        raise DTypeError(f"has_initial_state: expected a bool tensor or None; got "
                         f"{type(has_initial_state).__name__}")  # fmt: skip
    if has_initial_state.shape != (num_seqs,):
        raise ShapeError(f"has_initial_state: must have shape ({num_seqs},) (one flag per "
                         f"sequence); got {tuple(has_initial_state.shape)}")  # fmt: skip


def _write_slots(cache, idx, valid, values):
    """cache[idx[i]] = values[i] for the valid entries, in place, without a host read: pad
    entries are aimed at the slot of the first valid entry with that entry's value (duplicate
    writes of one value), or, with no valid entry, at slot 0 with its own value."""
    any_valid = valid.any()
    # index_select, not idx[k]: indexing with a 0-dim tensor reads it on the host.
    k = valid.to(torch.int32).argmax().view(1)
    first_idx = idx.index_select(0, k)[0]
    fb_idx = torch.where(any_valid, first_idx, torch.zeros_like(first_idx))
    fb_val = torch.where(any_valid, values.index_select(0, k)[0], cache[0].to(values.dtype))
    tgt = torch.where(valid, idx, fb_idx)
    shape = (-1,) + (1,) * (values.dim() - 1)
    vals = torch.where(valid.view(shape), values, fb_val)
    cache.index_copy_(0, tgt, vals.to(cache.dtype))


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
    for name, t in (("u", u), ("ssm_states", ssm_states), ("delta", delta), ("A", A), ("B", B),
                    ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):  # fmt: skip
        require_tensor(t, name, optional=name in ("D", "z", "delta_bias"))
    require_float(ssm_states, "ssm_states")
    check_devices(u=u, ssm_states=ssm_states, delta=delta, A=A, B=B, C=C, D=D, z=z,
                  delta_bias=delta_bias, query_start_loc=query_start_loc,
                  cache_indices=cache_indices, has_initial_state=has_initial_state)  # fmt: skip
    varlen, seq_idx, num_seqs = _seq_layout(u, query_start_loc)
    dev = u.device
    if ssm_states.dim() != 3:
        raise ShapeError(f"ssm_states: must be (cache_rows, dim, dstate); got "
                         f"{tuple(ssm_states.shape)}")  # fmt: skip
    dim = u.shape[0] if varlen else u.shape[1]
    if A.dim() != 2 or tuple(ssm_states.shape[1:]) != (dim, A.shape[-1]):
        raise ShapeError(f"ssm_states: must be (cache_rows, dim, dstate) = (cache_rows, {dim}, "
                         f"{A.shape[-1]}); got {tuple(ssm_states.shape)}")  # fmt: skip
    idx, valid, safe = _slots(cache_indices, num_seqs, pad_slot_id, dev, ssm_states.shape[0])
    # Pad entries: their tokens become padding (-1) for the scan (no state read or written).
    seq_idx = torch.where(
        (seq_idx >= 0) & valid[seq_idx.clamp(min=0).long()], seq_idx, torch.full_like(seq_idx, -1)
    )
    h0 = ssm_states[safe].to(torch.float64 if u.dtype == torch.float64 else torch.float32)
    _check_flags(has_initial_state, num_seqs)
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
        # An empty sequence ends where it starts (the scan reports 0 for a number it never saw).
        qsl = query_start_loc.to(device=dev, dtype=torch.long)
        final = torch.where((qsl[1:] > qsl[:-1])[:, None, None], final, h0.to(final.dtype))
    _write_slots(ssm_states, idx, valid, final)
    dst = z if z is not None else delta
    dst.copy_(out)
    return dst


def causal_conv1d_fn(x, weight, bias, conv_states, query_start_loc, cache_indices=None,
                     has_initial_state=None, activation="silu", pad_slot_id=PAD_SLOT_ID):  # fmt: skip
    """vLLM's prefill causal conv1d over sequences packed along the token axis.

    Args:
        x: (dim, total_tokens), sequences back to back (any strides; vLLM's are channel-last).
        weight: (dim, width); bias: (dim,) or None.
        conv_states: (cache_rows, dim, state_len >= width - 1), updated in place: the first
            width - 1 columns of the slot of each sequence (``cache_indices[i]``, else i) are its
            start state (oldest first) when ``has_initial_state[i]``, else zeros, and receive the
            last width - 1 inputs of [start state, the sequence's tokens]. Other slots and pad
            entries are left untouched, bit for bit.
        query_start_loc: (num_seqs + 1,) int, the cumulative lengths [0, l0, l0 + l1, ...].
        cache_indices: (num_seqs,) int; ``pad_slot_id`` marks an entry that is not processed.
        has_initial_state: (num_seqs,) bool, or None (all start from zeros).
        activation: None, "silu", "swish" or True (silu).

    Returns the output, (dim, total_tokens) in x's dtype. One call of the packed kernel
    (``causal_conv1d_fn(..., seq_idx=)``) over the tokens with each sequence's start state
    placed in front of it (dim x (total_tokens + num_seqs (width - 1)) values): each output is
    the kernel's own fp32 sum, as running the sequence alone from its state gives.
    """
    if activation is True:
        activation = "silu"
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation: must be None, silu, swish or True")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ShapeError(f"x: must be (dim, total_tokens); got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")  # fmt: skip
    dim, total = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != dim:
        raise ShapeError(f"weight: must be (dim, width) = ({dim}, width)")
    k = weight.shape[1] - 1
    if conv_states.dim() != 3 or conv_states.shape[1] != dim or conv_states.shape[2] < k:
        raise ShapeError(f"conv_states: must be (cache_rows, {dim}, state_len >= {k}); got "
                         f"{tuple(conv_states.shape)}")  # fmt: skip
    if (not isinstance(query_start_loc, torch.Tensor) or query_start_loc.dim() != 1
            or query_start_loc.numel() < 1 or query_start_loc.is_floating_point()):  # fmt: skip
        raise ShapeError("query_start_loc: must be a (num_seqs + 1,) integer tensor of "
                         "cumulative lengths")  # fmt: skip
    dev = x.device
    n = query_start_loc.numel() - 1
    idx, valid, safe = _slots(cache_indices, n, pad_slot_id, dev, conv_states.shape[0])
    qsl = query_start_loc.to(torch.long)
    starts, lens = qsl[:-1], qsl[1:] - qsl[:-1]
    _check_flags(has_initial_state, n)
    if has_initial_state is None:
        use = torch.zeros_like(valid)
    else:
        use = valid & has_initial_state.to(dev, torch.bool)
    S = conv_states[safe][:, :, :k].to(x.dtype)  # (n, dim, k), oldest first
    S = torch.where(use[:, None, None], S, torch.zeros_like(S))
    # The extended row: sequence i's k state columns, then its tokens; tokens past the last
    # sequence (seq_idx -1) go after everything.
    seq = _seq_idx_of_starts(query_start_loc, total, "query_start_loc").reshape(-1).to(torch.long)
    tok = torch.arange(total, device=dev)
    pos_tok = tok + k * torch.where(seq >= 0, seq + 1, torch.full_like(seq, n))
    j = torch.arange(k, device=dev)
    first = starts + k * torch.arange(n, device=dev)  # where sequence i's range begins
    pos_state = (first[:, None] + j).reshape(-1)
    ext = total + n * k
    xt = torch.empty(ext, dim, dtype=x.dtype, device=dev)
    xt.index_copy_(0, pos_tok, x.t())
    xt.index_copy_(0, pos_state, S.permute(0, 2, 1).reshape(n * k, dim))
    st = torch.empty(ext, dtype=torch.int32, device=dev)
    st.index_copy_(0, pos_tok, seq.to(torch.int32))
    st.index_copy_(
        0, pos_state, torch.arange(n, device=dev, dtype=torch.int32).repeat_interleave(k)
    )
    out_t = _conv(xt.t()[None], weight, bias, seq_idx=st[None], activation=activation)[0].t()
    out = out_t.index_select(0, pos_tok).t()
    if k > 0 and n > 0:
        # The new states: the last k columns of each sequence's extended range.
        last = (first + lens)[:, None] + j
        new = xt.index_select(0, last.reshape(-1)).reshape(n, k, dim).permute(0, 2, 1)
        _write_slots(conv_states[:, :, :k], idx, valid, new)
    return out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None,
                         conv_state_indices=None, pad_slot_id=PAD_SLOT_ID):  # fmt: skip
    """vLLM's decoding conv1d update: x (batch, dim) or (batch, dim, seqlen); conv_state
    (cache_rows, dim, state_len >= width - 1) updated in place at the rows
    ``conv_state_indices`` (else 0..batch-1); entries equal to ``pad_slot_id`` leave their row
    untouched and give 0. activation: None, "silu", "swish" or True."""
    if activation is True:
        activation = "silu"
    if conv_state_indices is not None and pad_slot_id != -1:
        conv_state_indices = torch.where(conv_state_indices == pad_slot_id,
                                         torch.full_like(conv_state_indices, -1),
                                         conv_state_indices)  # fmt: skip
    return _conv_update(x, conv_state, weight, bias, activation,
                        conv_state_indices=conv_state_indices)  # fmt: skip
