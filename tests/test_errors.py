"""Bad inputs raise clear, typed exceptions that name the argument; nothing crashes."""

import numpy as np
import pytest
import torch

import mamba_scan
from helpers import make_inputs
from mamba_scan import DeviceError, DTypeError, LayoutError, ShapeError, selective_scan_fn


def call(**over):
    inp = make_inputs(dim=8, seqlen=32, dstate=4, has_z=True)
    inp.pop("initial_state")
    inp.update(over)
    return selective_scan_fn(**inp)


def test_exception_hierarchy():
    assert issubclass(ShapeError, ValueError)
    assert issubclass(DTypeError, TypeError)
    assert issubclass(DeviceError, ValueError)
    assert issubclass(LayoutError, ValueError)
    assert issubclass(mamba_scan.CompileError, mamba_scan.CudaError)
    assert issubclass(mamba_scan.CudaError, RuntimeError)


@pytest.mark.parametrize(
    "over,exc,pattern",
    [
        (dict(u=torch.randn(2, 8)), ShapeError, r"u: must have shape \(batch, dim, seqlen\)"),
        (dict(delta=torch.rand(2, 8, 31)), ShapeError, r"delta: must have shape"),
        (dict(A=-torch.rand(7, 4)), ShapeError, r"A: must have shape \(dim, dstate\) with dim = 8"),
        (dict(B=torch.randn(2, 4, 31)), ShapeError, r"B: must have shape"),
        (dict(B=torch.randn(2, 5, 32)), ShapeError, r"B: must have shape"),
        (dict(C=torch.randn(3, 4, 32)), ShapeError, r"C: must have shape"),
        (dict(B=torch.randn(2, 3, 4, 32)), ShapeError, r"ngroups dividing dim = 8"),
        (dict(B=torch.randn(8, 5)), ShapeError, r"B: must have shape"),
        (dict(D=torch.randn(7)), ShapeError, r"D: must have shape \(dim,\)"),
        (dict(z=torch.randn(2, 8, 33)), ShapeError, r"z: must have shape"),
        (dict(delta_bias=torch.randn(8, 1)), ShapeError, r"delta_bias: must have shape"),
        (dict(A=-torch.rand(8, 4, dtype=torch.float64)), DTypeError, r"A: must be float32"),
        (dict(A=-torch.rand(8, 4).half()), DTypeError, r"A: must be float32"),
        (dict(delta=torch.rand(2, 8, 32).half()), DTypeError, r"delta: must be float32"),
        (dict(B=torch.randn(2, 4, 32).bfloat16()), DTypeError, r"B: must be float32"),
        (dict(B=torch.randn(8, 4).half()), DTypeError, r"B: must be float32"),
        (dict(D=torch.randn(8).half()), DTypeError, r"D: must be float32"),
        (
            dict(u=torch.randint(0, 3, (2, 8, 32))),
            DTypeError,
            r"u: expected float32.*got torch.int64",
        ),
        (
            dict(delta=torch.randint(0, 3, (2, 8, 32))),
            DTypeError,
            r"delta: expected float32.*got int64",
        ),
        (dict(u=[1, 2, 3]), DTypeError, r"u: expected a torch.Tensor; got list"),
        (dict(D=3.0), DTypeError, r"D: expected a torch.Tensor or None; got float"),
        (dict(A=torch.tensor(1.0)), ShapeError, r"A: expected a tensor with at least one dim"),
        # Complex A (mamba_ssm's complex mode) takes a variable B as (real, imag) pairs: 2 L.
        (dict(A=torch.randn(8, 4, dtype=torch.complex64)), ShapeError, r"B: with complex A"),
        (
            dict(u=torch.randn(2, 8, 32, device="meta")),
            DeviceError,
            r"u: tensors must be on a CPU or CUDA",
        ),
    ],
)
def test_bad_input(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(**over)


def test_initial_state_shape_and_dtype():
    with pytest.raises(ShapeError, match=r"initial_state: must have shape \(batch, dim, dstate\)"):
        call(initial_state=torch.randn(2, 8, 5))
    with pytest.raises(DTypeError, match=r"initial_state: must be float32"):
        call(initial_state=torch.randn(2, 8, 4).half())


def test_numpy_bad_shapes():
    inp = make_inputs(dim=8, seqlen=16, dstate=4)
    args = {k: v.numpy() for k, v in inp.items() if v is not None}
    args["delta"] = args["delta"][:, :, :8].copy()
    with pytest.raises(ShapeError, match="delta"):
        selective_scan_fn(**args)
    args = {k: v.numpy() for k, v in inp.items() if v is not None}
    args["A"] = args["A"].astype(np.float64)
    with pytest.raises(DTypeError, match="A: must be float32"):
        selective_scan_fn(**args)


def test_cuda_unavailable_is_clear():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises((RuntimeError, AssertionError)):
        call(u=torch.randn(2, 8, 32, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices():
    inp = make_inputs(dim=8, seqlen=32, dstate=4)
    inp.pop("initial_state")
    inp = {k: (v.cuda() if k != "A" else v) for k, v in inp.items()}
    with pytest.raises(DeviceError, match="A: is on cpu but u is on cuda"):
        selective_scan_fn(**inp)


def test_bindings_name_index_arguments_of_the_wrong_kind():
    """One binding per op serves both devices: CPU tensors take index arguments as lists, and a
    tensor capsule there is refused with the argument's name (runs without a GPU)."""
    from mamba_scan import _native
    from mamba_scan._boundary import capsule

    x, w = torch.randn(2, 4, 9), torch.randn(4, 3)
    out = torch.empty_like(x)
    with pytest.raises(DTypeError, match="seq_idx: expected a list of ints for CPU tensors"):
        _native.conv1d_fwd(capsule(x), capsule(w), None, capsule(torch.zeros(2, 9, dtype=torch.int32)),
                           None, capsule(out), None, True)  # fmt: skip
    st = torch.randn(2, 1, 4, 8)
    x3, A, B = torch.randn(2, 1, 4), -torch.rand(1, 4, 8), torch.randn(2, 1, 8)
    with pytest.raises(DTypeError, match="state_batch_indices: expected a list of ints"):
        _native.state_update(capsule(st), capsule(x3), capsule(x3), capsule(A), capsule(B),
                             capsule(B), None, None, None, capsule(torch.empty_like(x3)),
                             False, capsule(torch.zeros(2, dtype=torch.int64)))  # fmt: skip
    with pytest.raises(DTypeError, match="cache_seqlens: expected a list of ints"):
        _native.conv1d_update(capsule(x[..., :1]), capsule(torch.randn(2, 4, 2)), capsule(w),
                              None, True, capsule(torch.zeros(2, dtype=torch.int32)), None,
                              capsule(torch.empty(2, 4, 1)))  # fmt: skip
