"""Type stubs of the native module (Rust, PyO3)."""

from typing import Any

class ShapeError(ValueError): ...
class DTypeError(TypeError): ...
class DeviceError(ValueError): ...
class LayoutError(ValueError): ...
class CudaError(RuntimeError): ...
class CompileError(CudaError): ...
class LibraryError(RuntimeError): ...

def scan_fwd(
    u: Any,
    delta: Any,
    a: Any,
    b: Any,
    c: Any,
    d: Any | None,
    z: Any | None,
    delta_bias: Any | None,
    initial_state: Any | None,
    out: Any,
    states: Any,
    delta_softplus: bool,
    chunk_size: int,
    stream: int = 0,
    seq_idx: Any | None = None,
    num_seqs: int = -1,
    final_states: Any | None = None,
) -> None: ...
def scan_bwd(
    u: Any,
    delta: Any,
    a: Any,
    b: Any,
    c: Any,
    d: Any | None,
    z: Any | None,
    delta_bias: Any | None,
    initial_state: Any | None,
    states: Any,
    dout: Any,
    dlast_state: Any | None,
    du: Any,
    ddelta: Any,
    da: Any,
    db: Any,
    dc: Any,
    dd: Any | None,
    dz: Any | None,
    ddelta_bias: Any | None,
    dinitial_state: Any | None,
    delta_softplus: bool,
    chunk_size: int,
    stream: int = 0,
    workspace: Any | None = None,
    seq_idx: Any | None = None,
    num_seqs: int = -1,
) -> None: ...
def state_update(
    state: Any,
    x: Any,
    dt: Any,
    a: Any,
    b: Any,
    c: Any,
    d: Any | None,
    z: Any | None,
    dt_bias: Any | None,
    out: Any,
    dt_softplus: bool,
    state_batch_indices: list[int] | Any | None = None,  # list (CPU) or capsule (CUDA)
    stream: int = 0,
) -> None: ...
def conv1d_fwd(
    x: Any,
    weight: Any,
    bias: Any | None,
    seq_idx: list[int] | Any | None,
    initial_states: Any | None,
    out: Any,
    final_states: Any | None,
    silu: bool,
    stream: int = 0,
) -> None: ...
def conv1d_bwd(
    x: Any,
    weight: Any,
    bias: Any | None,
    seq_idx: list[int] | Any | None,
    initial_states: Any | None,
    dout: Any,
    dfinal: Any | None,
    dx: Any,
    dweight: Any,
    dbias: Any | None,
    dinitial: Any | None,
    silu: bool,
    workspace: Any | None = None,
    stream: int = 0,
) -> None: ...
def conv1d_update(
    x: Any,
    conv_state: Any,
    weight: Any,
    bias: Any | None,
    silu: bool,
    cache_seqlens: list[int] | Any | None,
    conv_state_indices: list[int] | Any | None,
    out: Any,
    stream: int = 0,
) -> None: ...
def cuda_conv1d_workspace_size(x: Any, width: int) -> int: ...
def cpu_chunk_size() -> int: ...
def cpu_isa() -> str: ...
def cpu_threads() -> int: ...
def cuda_chunk_size(dstate: int) -> int: ...
def cuda_bwd_workspace_size(
    batch: int,
    dim: int,
    dstate: int,
    seqlen: int,
    b_ngroups: int,
    c_ngroups: int,
    dtype: str,
    has_z: bool,
) -> int: ...
def cuda_program_names() -> list[str]: ...
def cuda_compile_program(
    arch: str, index: int, use_cache: bool = False
) -> tuple[str, int | None, int, int]: ...
def cuda_cache_dir() -> str | None: ...
def cuda_cubin(
    arch: str,
    backward: bool,
    in_type: int,
    dstate: int,
    var_b: bool,
    var_c: bool,
    has_z: bool,
    wide: bool = False,
) -> tuple[bytes, str]: ...
def nvrtc_version() -> tuple[int, int]: ...
