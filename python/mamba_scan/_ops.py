"""Every native entry point as a ``torch.library`` custom op in the ``mamba_scan`` namespace, with
a fake (meta) implementation and registered autograd, so that torch.compile, torch.export,
FakeTensor tracing and CUDA-graph capture see one op (and its backward) instead of an opaque
Python function with DLPack calls inside.

    mamba_scan::selective_scan_fwd      -> (out, states, last_state)  [optional seq_idx, num_seqs]
    mamba_scan::selective_scan_bwd      -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)
    mamba_scan::selective_state_update  mutates state -> out
    mamba_scan::causal_conv1d_fwd       -> (out, final_states)
    mamba_scan::causal_conv1d_bwd       -> (dx, dweight, dbias, dinitial_states)
    mamba_scan::causal_conv1d_update    mutates conv_state -> out

Absent optional outputs are empty tensors (a custom op returns tensors, not None). ``states``
holds one state per chunk (what the backward recomputes from); ``last_state`` is a copy of the
last one when asked for.

Eager calls do not go through the op dispatcher: the public functions call the same
implementations directly when :func:`tracing` is false (the generic dispatch costs several
microseconds per call, which decoding cannot afford). The kernels are deterministic (fixed-order
reductions), so none of the ops is tagged nondeterministic and
``torch.use_deterministic_algorithms(True)`` accepts them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_len_dispatch_stack = torch._C._len_torch_dispatch_stack


def tracing() -> bool:
    """True under torch.compile / torch.export or inside a dispatch mode (FakeTensorMode,
    make_fx): the public functions then call the custom ops."""
    return torch.compiler.is_compiling() or _len_dispatch_stack() > 0


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else _empty(like)


def _present(grad: Tensor, x: Tensor | None) -> Tensor | None:
    return grad if x is not None else None


# ------------------------------------------------------------------------------- selective scan


@torch.library.custom_op("mamba_scan::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    initial_state: Optional[Tensor],
    delta_softplus: bool,
    return_last_state: bool,
    seq_idx: Optional[Tensor] = None,
    num_seqs: int = -1,
) -> tuple[Tensor, Tensor, Tensor]:
    from .ops.selective_scan import _forward_impl, _last_state, _prepare

    args = _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state)
    out, states, final = _forward_impl(*args, delta_softplus, seq_idx, num_seqs,
                                       return_last_state)  # fmt: skip
    last = _last_state(states, final, return_last_state)
    return out, states, last if last is not None else _empty(u)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, return_last_state,
      seq_idx=None, num_seqs=-1):  # fmt: skip
    from .ops.selective_scan import _forward_outputs, _prepare

    args = _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state)
    out, states = _forward_outputs(args[0], args[2])
    batch, dim, _ = u.shape
    rows = batch if seq_idx is None else max(num_seqs, 0)
    last = states.new_empty((rows, dim, A.shape[1])) if return_last_state else _empty(u)
    return out, states, last


@torch.library.custom_op("mamba_scan::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    initial_state: Optional[Tensor],
    states: Tensor,
    dout: Optional[Tensor],
    dlast_state: Optional[Tensor],
    delta_softplus: bool,
    seq_idx: Optional[Tensor] = None,
    num_seqs: int = -1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .ops.selective_scan import _backward_impl, _prepare

    args = _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state)
    grads = _backward_impl(*args, states, dout, dlast_state, delta_softplus, seq_idx=seq_idx,
                           num_seqs=num_seqs)  # fmt: skip
    return tuple(_or_empty(g, u) for g in grads)  # type: ignore[return-value]


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, states, dout, dlast_state,
      delta_softplus, seq_idx=None, num_seqs=-1):  # fmt: skip
    from .ops.selective_scan import _backward_outputs, _prepare

    args = _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return tuple(_or_empty(g, u) for g in _backward_outputs(*args))


def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, _, seq_idx, num_seqs = (
        inputs
    )
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[1], seq_idx)
    ctx.delta_softplus = delta_softplus
    ctx.num_seqs = num_seqs
    ctx.set_materialize_grads(False)


def _scan_backward(ctx, dout, _dstates, dlast):
    u, delta, A, B, C, D, z, delta_bias, h0, states, seq_idx = ctx.saved_tensors
    if dlast is not None and dlast.numel() == 0:
        dlast = None  # the empty placeholder of return_last_state=False (or an empty state)
    g = torch.ops.mamba_scan.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, h0, states, dout, dlast, ctx.delta_softplus,
        seq_idx, ctx.num_seqs,
    )  # fmt: skip
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0 = g
    return (du, ddelta, dA, dB, dC, _present(dD, D), _present(dz, z),
            _present(ddelta_bias, delta_bias), _present(dh0, h0), None, None, None,
            None)  # fmt: skip


selective_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup)


# ------------------------------------------------------------------------------- decoding step


@torch.library.custom_op("mamba_scan::selective_state_update", mutates_args=("state",))
def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    dt_bias: Optional[Tensor],
    dt_softplus: bool,
    state_batch_indices: Optional[Tensor],
) -> Tensor:
    from .ops.state_update import _state_update_impl

    out = _state_update_impl(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                             state_batch_indices)  # fmt: skip
    return out.contiguous()


@selective_state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ------------------------------------------------------------------------------- causal conv1d


@torch.library.custom_op("mamba_scan::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    seq_idx: Optional[Tensor],
    initial_states: Optional[Tensor],
    return_final_states: bool,
    silu: bool,
) -> tuple[Tensor, Tensor]:
    from .ops.conv1d import _conv_forward_impl

    out, fin = _conv_forward_impl(x, weight, bias, seq_idx, initial_states, silu,
                                  return_final_states)  # fmt: skip
    return out, _or_empty(fin, x)


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, return_final_states, silu):
    from .ops.conv1d import _conv_forward_outputs

    out, fin = _conv_forward_outputs(x, weight, return_final_states)
    return out, _or_empty(fin, x)


@torch.library.custom_op("mamba_scan::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    seq_idx: Optional[Tensor],
    initial_states: Optional[Tensor],
    dout: Tensor,
    dfinal_states: Optional[Tensor],
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .ops.conv1d import _conv_backward_impl

    dx, dw, db, dh = _conv_backward_impl(x, weight, bias, seq_idx, initial_states, dout,
                                         dfinal_states, silu)  # fmt: skip
    return dx, dw, _or_empty(db, x), _or_empty(dh, x)


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu):
    from .ops.conv1d import _conv_backward_outputs

    dx, dw, db, dh = _conv_backward_outputs(x, weight, bias, initial_states)
    return dx, dw, _or_empty(db, x), _or_empty(dh, x)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, _, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.silu = silu
    ctx.set_materialize_grads(False)


def _conv_backward(ctx, dout, dfinal):
    x, weight, bias, seq_idx, h0 = ctx.saved_tensors
    if dfinal is not None and dfinal.numel() == 0:
        dfinal = None  # the empty placeholder of return_final_states=False
    if dout is None:
        dout = torch.zeros_like(x)
    dx, dw, db, dh = torch.ops.mamba_scan.causal_conv1d_bwd(
        x, weight, bias, seq_idx, h0, dout, dfinal, ctx.silu
    )
    return dx, dw, _present(db, bias), None, _present(dh, h0), None, None


causal_conv1d_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


@torch.library.custom_op("mamba_scan::causal_conv1d_update", mutates_args=("conv_state",))
def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    silu: bool,
    cache_seqlens: Optional[Tensor],
    conv_state_indices: Optional[Tensor],
) -> Tensor:
    from .ops.conv1d import _conv_update_impl

    out = _conv_update_impl(x, conv_state, weight, bias, silu, cache_seqlens,
                            conv_state_indices)  # fmt: skip
    return out.contiguous()


@causal_conv1d_update.register_fake
def _(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)
