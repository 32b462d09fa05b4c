"""Helpers of the Python -> Rust boundary: DLPack capsules, streams, argument checks."""

from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from . import _native
from ._native import DTypeError, ShapeError


def capsule(t: torch.Tensor | None):
    """A DLPack capsule borrowing ``t`` (None passes through).

    ``to_dlpack`` makes no stream handshake; every kernel runs on the stream we pass to Rust,
    which is the caller's current stream, so no synchronisation is needed."""
    if t is None:
        return None
    return to_dlpack(t.detach())


def stream_of(t: torch.Tensor) -> int:
    """Raw handle of the current CUDA stream of ``t``'s device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def chunk_size_for(t: torch.Tensor) -> int:
    if t.device.type == "cuda" and hasattr(_native, "cuda_chunk_size"):
        return _native.cuda_chunk_size()
    return _native.cpu_chunk_size()


def require_tensor(x, name: str, optional: bool = False):
    if x is None and optional:
        return
    if not isinstance(x, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise DTypeError(f"{name}: expected {kind}; got {type(x).__name__}")
    if x.dim() == 0:
        raise ShapeError(f"{name}: expected a tensor with at least one dimension; got a scalar")


def last_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    """mamba_ssm's normalisation: copy only when the last dimension is not unit-stride."""
    if x is None:
        return None
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        return x.contiguous()
    return x


def weight_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


# Tests set this to fill every output with NaN before the kernel runs, so that an element the
# kernel fails to write shows up as NaN instead of as stale memory that happens to be right.
POISON_OUTPUTS = False


def new_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Output allocation (torch's caching allocator): like ``x`` (strides kept when ``x`` is
    dense), optionally in another dtype; NaN-filled when POISON_OUTPUTS is set."""
    t = torch.empty_like(x, dtype=dtype)
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


def new_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t
