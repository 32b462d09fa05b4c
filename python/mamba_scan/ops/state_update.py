"""selective_state_update: mamba_ssm's decoding step on mamba-scan (CPU kernel in Rust)."""

from __future__ import annotations

import torch

from .. import _native
from .._boundary import (
    capsule,
    check_devices,
    check_index,
    ensure_cuda_libs,
    new_empty,
    require_float,
    require_tensor,
    stream_of,
)
from .._native import ShapeError
from .._ops import tracing
from ..reference import _heads, selective_state_update_ref

_NAMES = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False, state_batch_indices=None, *, pad_slot_id=-1,
                           out=None):  # fmt: skip
    """One decoding step: ``state`` is updated in place, ``out`` returned; the signature and
    semantics of ``mamba_ssm.ops.triton.selective_state_update.selective_state_update``
    (see ``selective_state_update_ref``). Inference only (no autograd).

    CPU and CUDA tensors run mamba-scan's kernels (float64 on CUDA runs the PyTorch
    composition ``selective_state_update_ref``). On CUDA, ``state_batch_indices`` stays on the
    device (no host synchronisation, CUDA-graph capturable) and is not checked by the host: a
    negative entry is padding (state untouched, output 0), an entry past the state's batch gives
    a NaN output and touches nothing, and two entries naming one state row are the caller's
    error (the CPU path refuses them). Under torch.compile / export this is the custom op
    ``mamba_scan::selective_state_update`` (mutates ``state``).

    vLLM's keywords: ``pad_slot_id`` marks padding entries of ``state_batch_indices`` (any
    negative entry is padding too), and ``out``, when given, receives the output (and is
    returned)."""
    if state_batch_indices is not None and isinstance(state_batch_indices, torch.Tensor):
        if pad_slot_id >= 0:
            state_batch_indices = torch.where(
                state_batch_indices == pad_slot_id,
                torch.full_like(state_batch_indices, -1),
                state_batch_indices,
            )
    if tracing():
        res = torch.ops.mamba_scan.selective_state_update(
            state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), state_batch_indices
        )
    else:
        res = _state_update_impl(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                 state_batch_indices)  # fmt: skip
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != res.shape:
            raise ShapeError(f"out: must be a tensor of shape {tuple(res.shape)}")
        return out.copy_(res)
    return res


def _state_update_impl(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                       dt_softplus=False, state_batch_indices=None):  # fmt: skip
    """The decoding step's implementation (the public function and the custom op call it)."""
    args = (state, x, dt, A, B, C, D, z, dt_bias)
    for name, t in zip(_NAMES, args):
        require_tensor(t, name, optional=name in ("D", "z", "dt_bias"))
        require_float(t, name)
    check_index(state_batch_indices, "state_batch_indices", x.shape[0])
    if state.dim() not in (3, 4):
        raise ShapeError(
            "state: must have shape (batch, dim, dstate) or (batch, nheads, dim, dstate); "
            f"got {tuple(state.shape)}"
        )
    check_devices(**dict(zip(_NAMES, args)), state_batch_indices=state_batch_indices)
    if state.is_cuda and any(t is not None and t.dtype == torch.float64 for t in args):
        with torch.no_grad():
            return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias,
                                              dt_softplus, state_batch_indices)  # fmt: skip
    has_heads, st, x4, dt4, A4, B4, C4, D4, z4, bias4 = _heads(state, x, dt, A, B, C, D, z, dt_bias)
    if x4.dim() != 3:
        raise ShapeError(
            f"x: must have shape (batch, dim) or (batch, nheads, dim); got {tuple(x.shape)}"
        )
    out = new_empty(x4.shape, x4.dtype, x4.device)
    if state.is_cuda:
        ensure_cuda_libs()
        idx = capsule(state_batch_indices)  # stays on the device
    else:
        idx = None if state_batch_indices is None else state_batch_indices.tolist()
    _native.state_update(
        capsule(st), capsule(x4), capsule(dt4), capsule(A4), capsule(B4), capsule(C4),
        capsule(D4), capsule(z4), capsule(bias4), capsule(out), bool(dt_softplus), idx,
        stream_of(state),
    )  # fmt: skip
    return out if has_heads else out.squeeze(1)
