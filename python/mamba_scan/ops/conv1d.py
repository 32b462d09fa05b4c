"""causal_conv1d_fn / causal_conv1d_update with causal-conv1d 1.7's signatures and semantics.

CPU and CUDA tensors run mamba-scan's kernels (forward, backward with deterministic weight
sums, decoding update). On CUDA, widths outside 2..4 and float64 run the PyTorch compositions of
``mamba_scan.reference``; sequence / row index tensors stay on the device (no host
synchronisation)."""

from __future__ import annotations

import torch

from .. import _native
from .._boundary import (
    capsule,
    check_devices,
    check_index,
    ensure_cuda_libs,
    new_empty,
    new_like,
    require_float,
    require_tensor,
    stream_of,
)
from .._native import ShapeError
from .._ops import tracing
from ..reference import causal_conv1d_ref, causal_conv1d_update_ref


def _ints(t, like):
    """An index tensor for the native call: a list of ints for CPU calls (checked by the host),
    a capsule for CUDA calls (stays on the device, no synchronisation)."""
    if t is None:
        return None
    if like.is_cuda:
        return capsule(t)
    return t.reshape(-1).tolist()


def _conv_forward_outputs(x, weight, return_final):
    """The forward's outputs, allocated: out (x's layout), final states or None."""
    out = new_like(x)
    fin = None
    if return_final:
        fin = new_empty((x.shape[0], x.shape[1], weight.shape[1] - 1), x.dtype, x.device)
    return out, fin


def _conv_forward_impl(x, weight, bias, seq_idx, initial_states, silu, return_final=False):
    """The kernel's forward: (out, final_states or None). out keeps x's layout (channel-first or
    channel-last), as causal-conv1d's does."""
    out, fin = _conv_forward_outputs(x, weight, return_final)
    if x.is_cuda:
        ensure_cuda_libs()
    _native.conv1d_fwd(capsule(x), capsule(weight), capsule(bias), _ints(seq_idx, x),
                       capsule(initial_states), capsule(out), capsule(fin), silu,
                       stream_of(x))  # fmt: skip
    return out, fin


def conv_forward(x, weight, bias, seq_idx, initial_states, silu, return_final=False):
    """:func:`_conv_forward_impl`, through the custom op when traced."""
    if tracing():
        out, fin = torch.ops.mamba_scan.causal_conv1d_fwd(
            x, weight, bias, seq_idx, initial_states, bool(return_final), bool(silu)
        )
        return out, (fin if return_final else None)
    return _conv_forward_impl(x, weight, bias, seq_idx, initial_states, silu, return_final)


def _conv_backward_outputs(x, weight, bias, initial_states, need_dinitial=True, dx=None):
    """The backward's gradients, allocated: (dx, dweight, dbias or None, dinitial or None); a
    given ``dx`` (a view into a larger gradient) is used as is."""
    dx = new_like(x) if dx is None else dx
    dw = new_empty(weight.shape, weight.dtype, weight.device)
    db = new_empty(bias.shape, bias.dtype, bias.device) if bias is not None else None
    h0 = initial_states
    dh = new_empty(h0.shape, h0.dtype, h0.device) if h0 is not None and need_dinitial else None
    return dx, dw, db, dh


def _conv_backward_impl(x, weight, bias, seq_idx, initial_states, dout, dfinal, silu, dx=None,
                        need_dinitial=True):  # fmt: skip
    """The kernel's backward: (dx, dweight, dbias, dinitial_states). ``dx`` may be given (a
    view into a larger gradient, e.g. mamba_inner_fn's dxz)."""
    dx, dw, db, dh = _conv_backward_outputs(x, weight, bias, initial_states, need_dinitial, dx)
    h0 = initial_states
    ws = None
    if x.is_cuda:
        ws = torch.empty(_native.cuda_conv1d_workspace_size(capsule(x), weight.shape[1]),
                         dtype=torch.float32, device=x.device)  # fmt: skip
    else:
        dout = dout.contiguous()
    _native.conv1d_bwd(capsule(x), capsule(weight), capsule(bias), _ints(seq_idx, x),
                       capsule(h0), capsule(dout), capsule(dfinal), capsule(dx), capsule(dw),
                       capsule(db), capsule(dh), silu, capsule(ws), stream_of(x))  # fmt: skip
    return dx, dw, db, dh


def conv_backward(x, weight, bias, seq_idx, initial_states, dout, dfinal, silu, dx=None,
                  need_dinitial=True):  # fmt: skip
    """:func:`_conv_backward_impl`, through the custom op when traced (a given ``dx`` then
    receives a copy of the op's fresh gradient)."""
    if not tracing():
        return _conv_backward_impl(x, weight, bias, seq_idx, initial_states, dout, dfinal, silu,
                                   dx, need_dinitial)  # fmt: skip
    gx, dw, db, dh = torch.ops.mamba_scan.causal_conv1d_bwd(
        x, weight, bias, seq_idx, initial_states, dout, dfinal, bool(silu)
    )
    if dx is not None:
        gx = dx.copy_(gx)
    return (gx, dw, db if bias is not None else None,
            dh if initial_states is not None and need_dinitial else None)  # fmt: skip


def kernel_ok(x, weight):
    """Whether the kernels take these tensors (else the shim runs the PyTorch reference)."""
    if x.is_cpu and weight.is_cpu:
        return True
    # (A CUDA call without steps has nothing for a kernel to do: the reference writes the
    # final states, the initial states or zeros, which the kernel would leave unwritten.)
    return (
        x.is_cuda
        and x.shape[-1] > 0
        and 2 <= weight.shape[1] <= 4
        and x.dtype != torch.float64
        and weight.dtype != torch.float64
    )


class CausalConv1dFn(torch.autograd.Function):
    """The kernels under autograd (x, weight, bias, initial_states differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, initial_states, return_final, final_out, silu):
        out, fin = conv_forward(x, weight, bias, seq_idx, initial_states, silu, return_final)
        ctx.save_for_backward(x, weight, bias, initial_states, seq_idx)
        ctx.silu, ctx.return_final = silu, return_final
        if return_final:
            if final_out is not None:  # the caller's buffer gets the values too
                final_out.copy_(fin)
            return out, fin
        return out

    @staticmethod
    def backward(ctx, dout, *rest):
        x, weight, bias, h0, seq_idx = ctx.saved_tensors
        dfin = rest[0] if ctx.return_final and rest else None
        dx, dw, db, dh = conv_backward(x, weight, bias, seq_idx, h0, dout, dfin, ctx.silu)
        return dx, dw, db, None, dh, None, None, None


def _check(x, weight, name="x", **optional):
    """Types and devices of the arguments (the kernels' contract checks shapes and dtypes)."""
    require_tensor(x, name)
    require_tensor(weight, "weight")
    require_float(x, name)
    for k, t in optional.items():
        require_tensor(t, k, optional=True)
    check_devices(**{name: x, "weight": weight}, **optional)
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
    require_tensor(x, "x")
    if x.dim() != 3:
        raise ShapeError(f"x: must have shape (batch, dim, seqlen); got {tuple(x.shape)}")
    _check(x, weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states,
           final_states_out=final_states_out)  # fmt: skip
    check_index(seq_idx, "seq_idx", (x.shape[0], x.shape[2]))
    if seq_idx is not None and (initial_states is not None or return_final_states):
        raise ValueError("seq_idx: cannot be combined with initial_states or return_final_states")
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    if not kernel_ok(x, weight):
        return causal_conv1d_ref(x, weight, bias, seq_idx, initial_states, return_final_states,
                                 final_states_out, activation)  # fmt: skip
    if tracing():
        out, fin = conv_forward(x, weight, bias, seq_idx, initial_states, activation is not None,
                                bool(return_final_states))  # fmt: skip
        if not return_final_states:
            return out
        if final_states_out is not None:
            final_states_out.copy_(fin)
        return out, fin
    return CausalConv1dFn.apply(x, weight, bias, seq_idx, initial_states,
                                bool(return_final_states), final_states_out,
                                activation is not None)  # fmt: skip


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):  # fmt: skip
    """x: (batch, dim) or (batch, dim, seqlen); conv_state: (batch, dim, state_len) updated in
    place (state_len >= width - 1); see ``causal_conv1d_update_ref``. Inference only."""
    require_tensor(x, "x")
    if x.dim() not in (2, 3):
        raise ShapeError(
            f"x: must have shape (batch, dim) or (batch, dim, seqlen); got {tuple(x.shape)}"
        )
    require_tensor(conv_state, "conv_state")
    _check(x, weight, conv_state=conv_state, bias=bias, cache_seqlens=cache_seqlens,
           conv_state_indices=conv_state_indices)  # fmt: skip
    check_index(cache_seqlens, "cache_seqlens", x.shape[0])
    check_index(conv_state_indices, "conv_state_indices", x.shape[0])
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
    if tracing():
        return torch.ops.mamba_scan.causal_conv1d_update(
            x, conv_state, weight, bias, activation is not None, cache_seqlens,
            conv_state_indices,
        )  # fmt: skip
    return _conv_update_impl(x, conv_state, weight, bias, activation is not None, cache_seqlens,
                             conv_state_indices)  # fmt: skip


def _conv_update_impl(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices):
    """The decoding update over checked arguments (the public function and the custom op)."""
    activation = "silu" if silu else None
    x3 = x if x.dim() == 3 else x.unsqueeze(-1)
    cuda_ok = x.is_cuda and not any(
        t is not None and t.dtype == torch.float64 for t in (x, conv_state, weight, bias)
    )
    if cuda_ok or (x.is_cpu and conv_state.is_cpu and weight.is_cpu):
        if x.is_cuda:
            ensure_cuda_libs()
        out = new_empty(x3.shape, x.dtype, x.device)
        _native.conv1d_update(capsule(x3), capsule(conv_state), capsule(weight), capsule(bias),
                              activation is not None, _ints(cache_seqlens, x),
                              _ints(conv_state_indices, x), capsule(out),
                              stream_of(x))  # fmt: skip
        return out if x.dim() == 3 else out.squeeze(-1)
    with torch.no_grad():
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation, cache_seqlens,
                                        conv_state_indices)  # fmt: skip
