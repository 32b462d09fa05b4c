"""mamba-scan: Mamba's selective scan and the kernels around it, for PyTorch.

``from mamba_scan import selective_scan_fn`` is a drop-in for
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``.
"""

from . import _native
from ._native import (
    CompileError,
    CudaError,
    DeviceError,
    DTypeError,
    LayoutError,
    LibraryError,
    ShapeError,
)
from .integrations import patch, unpatch
from .modules import Mamba
from .ops.conv1d import causal_conv1d_fn, causal_conv1d_update
from .ops.mamba_inner import mamba_inner_fn
from .ops.selective_scan import SelectiveScanFn, selective_scan_fn, seq_idx_from_cu_seqlens
from .ops.state_update import selective_state_update
from .reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    mamba_inner_ref,
    selective_scan_ref,
    selective_state_update_ref,
)

__version__ = "0.1.0"

__all__ = [
    "CompileError",
    "CudaError",
    "DTypeError",
    "DeviceError",
    "LayoutError",
    "LibraryError",
    "Mamba",
    "SelectiveScanFn",
    "ShapeError",
    "_native",
    "causal_conv1d_fn",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "causal_conv1d_update_ref",
    "mamba_inner_fn",
    "mamba_inner_ref",
    "patch",
    "unpatch",
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "seq_idx_from_cu_seqlens",
]
