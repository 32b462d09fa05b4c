"""causal_conv1d_fn / causal_conv1d_update with causal-conv1d 1.7's signatures and semantics.

For now both run the PyTorch compositions of ``mamba_scan.reference`` (grouped conv1d, autograd
through torch) on CPU and CUDA; fused Rust / CUDA kernels are planned (conv1d + silu fused into
the scan's input load)."""

from __future__ import annotations

import torch

from .._native import DTypeError, ShapeError
from ..reference import causal_conv1d_ref, causal_conv1d_update_ref


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
    with torch.no_grad():
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation, cache_seqlens,
                                        conv_state_indices)  # fmt: skip
