"""Helpers of the Python -> Rust boundary: DLPack capsules, streams, argument checks."""

from __future__ import annotations

import os

import torch
from torch.utils.dlpack import to_dlpack

from . import _native
from ._native import DeviceError, DTypeError, ShapeError


def capsule(t: torch.Tensor | None):
    """A DLPack capsule borrowing ``t`` (None passes through).

    ``to_dlpack`` makes no stream handshake; every kernel runs on the stream we pass to Rust,
    which is the caller's current stream, so no synchronisation is needed."""
    if t is None:
        return None
    return to_dlpack(t.detach() if t.requires_grad else t)


def stream_of(t: torch.Tensor) -> int:
    """Raw handle of the current CUDA stream of ``t``'s device (0 for CPU tensors)."""
    if not t.is_cuda:
        return 0
    if _CUDA_PID != os.getpid():
        _check_not_forked()
    if _RAW_STREAM is not None:
        return _RAW_STREAM(t.get_device())
    return torch.cuda.current_stream(t.device).cuda_stream


# torch's own accessor of the current stream's raw handle (what its C++ extensions use): ~10x
# cheaper than building a torch.cuda.Stream object; the public API is the fallback.
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def chunk_size_for(t: torch.Tensor, dstate: int) -> int:
    """Steps per saved state: fixed on the CPU; on CUDA it shrinks as dstate grows (the
    backward keeps a tile's state history in registers)."""
    if t.is_cuda:
        ensure_cuda_libs()
        return _native.cuda_chunk_size(dstate)
    return _native.cpu_chunk_size()


_CUDA_LIBS_READY = False
_CUDA_PID = None  # the process that set CUDA up


def _check_not_forked() -> None:
    """A child forked after its parent used CUDA cannot use CUDA (the driver's state does not
    survive fork): a clear error instead of a failing or hanging driver call."""
    if _CUDA_PID is not None and _CUDA_PID != os.getpid():
        raise _native.CudaError(
            "CUDA was initialised in the parent process before fork(); a forked child cannot use "
            "it. Start the workers with the 'spawn' method (multiprocessing.get_context('spawn'), "
            "or DataLoader(multiprocessing_context='spawn')), or keep the child on the CPU."
        )


def ensure_cuda_libs() -> None:
    """Make libnvrtc loadable by name before the native module looks for it: torch's CUDA
    wheels ship it under site-packages/nvidia/*/lib, which is not on the loader path. Loading it
    once with RTLD_GLOBAL lets the later dlopen("libnvrtc.so.N") find the same copy. Then set up
    the compile worker (src/cuda/compile.rs): a fresh interpreter per kernel compile, so that one
    source gives one cubin on this machine whatever else the process did or the machine's load.
    MAMBA_SCAN_COMPILE_IN_PROCESS=1 compiles in this process instead."""
    global _CUDA_LIBS_READY, _CUDA_PID
    if _CUDA_LIBS_READY:
        if _CUDA_PID != os.getpid():
            _check_not_forked()
        return
    import ctypes
    import glob
    import sys

    found = None
    for p in sys.path:
        root = os.path.join(p, "nvidia")
        if not os.path.isdir(root) or found:
            continue
        for pat in ("*/lib/libnvrtc.so.*", "cuda_nvrtc/lib/libnvrtc.so.*"):
            for lib in sorted(glob.glob(os.path.join(root, pat))):
                if "builtins" in os.path.basename(lib) or "alt" in os.path.basename(lib):
                    continue
                try:
                    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    continue
                found = lib
                break
            if found:
                break
    # Without a copy in site-packages, the system loader path (a CUDA toolkit install).
    # The worker is this interpreter run again; an embedding host (uwsgi, a game engine) is not
    # one to start with Python's flags, so there the compiles stay in-process.
    exe = sys.executable or ""
    if os.environ.get("MAMBA_SCAN_COMPILE_IN_PROCESS") != "1" and os.path.basename(exe).startswith(
        "python"
    ):
        _native.set_compile_worker(exe, _native.__file__, found)
    _CUDA_LIBS_READY = True
    _CUDA_PID = os.getpid()


def require_tensor(x, name: str, optional: bool = False):
    if x is None and optional:
        return
    if not isinstance(x, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise DTypeError(f"{name}: expected {kind}; got {type(x).__name__}")
    if x.dim() == 0:
        raise ShapeError(f"{name}: expected a tensor with at least one dimension; got a scalar")


def check_devices(**tensors) -> None:
    """Every tensor given (anything else skipped: the type checks are elsewhere) on the first
    one's device, and that a CPU or CUDA device; the error names the argument."""
    first = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.device.type not in ("cpu", "cuda"):
            raise DeviceError(f"{name}: tensors must be on a CPU or CUDA device; got {t.device}")
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise DeviceError(
                f"{name}: is on {t.device} but {first[0]} is on {first[1]}; "
                "all tensors must be on one device"
            )


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def require_float(t, name: str) -> None:
    """A floating tensor (or None): the dtype check that must come before any allocation."""
    if t is not None and t.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"{name}: expected float32, float16, bfloat16 or float64; got {t.dtype}")


def check_index(t, name: str, n: int | tuple | None = None) -> None:
    """An optional index argument: an int32 / int64 tensor of shape (n,) (or the shape n)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise DTypeError(
            f"{name}: expected an integer torch.Tensor or None; got {type(t).__name__}"
        )
    if t.dtype not in (torch.int32, torch.int64):
        raise DTypeError(f"{name}: expected int32 or int64; got {t.dtype}")
    want = n if isinstance(n, tuple) else (n,)
    if t.dim() != len(want) or (n is not None and tuple(t.shape) != want):
        shown = (
            "(batch,)"
            if n is None
            else str(want).replace(",)", ")")
            if len(want) > 1
            else str(want)
        )
        raise ShapeError(f"{name}: must have shape {shown}; got {tuple(t.shape)}")


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
