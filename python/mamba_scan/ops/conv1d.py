"""causal_conv1d_fn / causal_conv1d_update with causal-conv1d 1.7's signatures and semantics.

CPU tensors run the Rust kernels (forward, backward, update). CUDA tensors run the PyTorch
compositions of ``mamba_scan.reference`` for now (grouped conv1d, autograd through torch); a
CUDA kernel, and conv1d + silu fused into the scan's input load, are planned."""

from __future__ import annotations

import torch

from .. import _native
from .._boundary import capsule, new_empty
from .._native import DTypeError, ShapeError
from ..reference import causal_conv1d_ref, causal_conv1d_update_ref


def _ints(t):
    return None if t is None else t.reshape(-1).tolist()


class CausalConv1dFn(torch.autograd.Function):
    """The Rust CPU kernels under autograd (x, weight, bias, initial_states differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, initial_states, return_final, final_out, silu):
        out = new_empty(x.shape, x.dtype, x.device)
        fin = None
        if return_final:
            fin = new_empty((x.shape[0], x.shape[1], weight.shape[1] - 1), x.dtype, x.device)
        seq = _ints(seq_idx)
        _native.conv1d_fwd(capsule(x), capsule(weight), capsule(bias), seq,
                           capsule(initial_states), capsule(out), capsule(fin), silu)  # fmt: skip
        ctx.save_for_backward(x, weight, bias, initial_states)
        ctx.seq, ctx.silu, ctx.return_final = seq, silu, return_final
        if return_final:
            if final_out is not None:  # the caller's buffer gets the values too
                final_out.copy_(fin)
            return out, fin
        return out

    @staticmethod
    def backward(ctx, dout, *rest):
        x, weight, bias, h0 = ctx.saved_tensors
        dfin = rest[0] if ctx.return_final and rest else None
        dx = new_empty(x.shape, x.dtype, x.device)
        dw = new_empty(weight.shape, weight.dtype, weight.device)
        db = new_empty(bias.shape, bias.dtype, bias.device) if bias is not None else None
        dh = new_empty(h0.shape, h0.dtype, h0.device) if h0 is not None else None
        _native.conv1d_bwd(capsule(x), capsule(weight), capsule(bias), ctx.seq, capsule(h0),
                           capsule(dout.contiguous()), capsule(dfin), capsule(dx), capsule(dw),
                           capsule(db), capsule(dh), ctx.silu)  # fmt: skip
        return dx, dw, db, None, dh, None, None, None


def _check(x, weight, name="x"):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise DTypeError(f"{name} and weight: expected torch.Tensors")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ShapeError(
            f"weight: must have shape (dim, width) = ({x.shape[1]}, width); got {tuple(weight.shape)}"
        )


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None,
                     return_final_states=False, final_states_out=None, activation=None):  # fmt: skip
    """x: (batch, dim, seqlen) (channel-first or channel-last strides); weight: (dim, width);
    bias: (dim,); seq_idx: (batch, seqlen); initial_states / final_states_out: (batch, dim,
    width - 1); activation: None, "silu" or "swish". Differentiable in x, weight, bias and
    initial_states."""
    if x.dim() != 3:
        raise ShapeError(f"x: must have shape (batch, dim, seqlen); got {tuple(x.shape)}")
    _check(x, weight)
    if seq_idx is not None and (initial_states is not None or return_final_states):
        raise ValueError("seq_idx: cannot be combined with initial_states or return_final_states")
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    if x.is_cpu and weight.is_cpu:
        return CausalConv1dFn.apply(x, weight, bias, seq_idx, initial_states,
                                    bool(return_final_states), final_states_out,
                                    activation is not None)  # fmt: skip
    return causal_conv1d_ref(x, weight, bias, seq_idx, initial_states, return_final_states,
                             final_states_out, activation)  # fmt: skip


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):  # fmt: skip
    """x: (batch, dim) or (batch, dim, seqlen); conv_state: (batch, dim, state_len) updated in
    place (state_len >= width - 1); see ``causal_conv1d_update_ref``. Inference only."""
    if x.dim() not in (2, 3):
        raise ShapeError(
            f"x: must have shape (batch, dim) or (batch, dim, seqlen); got {tuple(x.shape)}"
        )
    _check(x, weight)
    if (
        conv_state.dim() != 3
        or conv_state.shape[1] != x.shape[1]
        or conv_state.shape[2] < weight.shape[1] - 1
    ):
        raise ShapeError(
            f"conv_state: must have shape (batch, dim, state_len >= width - 1) = (batch, {x.shape[1]}, "
            f">= {weight.shape[1] - 1}); got {tuple(conv_state.shape)}"
        )
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    if x.is_cpu and conv_state.is_cpu and weight.is_cpu:
        x3 = x if x.dim() == 3 else x.unsqueeze(-1)
        out = new_empty(x3.shape, x.dtype, x.device)
        _native.conv1d_update(capsule(x3), capsule(conv_state), capsule(weight), capsule(bias),
                              activation is not None, _ints(cache_seqlens),
                              _ints(conv_state_indices), capsule(out))  # fmt: skip
        return out if x.dim() == 3 else out.squeeze(-1)
    with torch.no_grad():
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation, cache_seqlens,
                                        conv_state_indices)  # fmt: skip
