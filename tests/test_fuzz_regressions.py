"""The defects tests/test_fuzz.py found, one regular test each (each failed before its fix)."""

import numpy as np
import pytest
import torch

from mamba_scan import (
    DeviceError,
    DTypeError,
    ShapeError,
    causal_conv1d_fn,
    causal_conv1d_ref,
    causal_conv1d_update,
    mamba_inner_fn,
    mamba_inner_ref,
    selective_scan_fn,
    selective_state_update,
    seq_idx_from_cu_seqlens,
    serving,
)


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))).to(dtype)


def scan_args(batch=2, dim=3, L=8, N=4):
    return dict(u=r(batch, dim, L), delta=r(batch, dim, L).sigmoid(), A=-r(dim, N).abs() - 0.5,
                B=r(batch, N, L), C=r(batch, N, L))  # fmt: skip


def serving_args(dim=2, N=3, lens=(3, 4), rows=4, dtype=torch.float32):
    T = sum(lens)
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    return dict(u=r(dim, T, dtype=dtype), ssm_states=r(rows, dim, N, dtype=dtype),
                delta=r(dim, T, dtype=dtype), A=-r(dim, N).abs().to(dtype) - 0.5,
                B=r(N, T, dtype=dtype), C=r(N, T, dtype=dtype), delta_softplus=True,
                query_start_loc=qsl)  # fmt: skip


BAD = {
    "conv x a list": (lambda: causal_conv1d_fn([1.0, 2.0], r(2, 3)), DTypeError, "x:"),
    "conv x uint8": (
        lambda: causal_conv1d_fn(r(1, 2, 5).to(torch.uint8), r(2, 3)),
        DTypeError,
        "x:",
    ),  # fmt: skip
    "conv seq_idx of rank 3": (
        lambda: causal_conv1d_fn(
            r(2, 3, 4), r(3, 2), seq_idx=torch.zeros(1, 2, 4, dtype=torch.int32)
        ),
        ShapeError,
        "seq_idx:",
    ),  # fmt: skip
    "conv update bias a list": (
        lambda: causal_conv1d_update(r(1, 4), r(1, 4, 3), r(4, 4), bias=[0.0] * 4),
        DTypeError,
        "bias:",
    ),  # fmt: skip
    "conv update indices of rank 2": (
        lambda: causal_conv1d_update(
            r(2, 4), r(2, 4, 3), r(4, 4), conv_state_indices=torch.zeros(1, 2, dtype=torch.int32)
        ),
        ShapeError,
        "conv_state_indices:",
    ),  # fmt: skip
    "state update on meta": (
        lambda: selective_state_update(
            r(2, 3, 4).to("meta"), r(2, 3), r(2, 3), r(3, 4), r(2, 4), r(2, 4)
        ),
        DeviceError,
        "state:",
    ),  # fmt: skip
    "state update x int64": (
        lambda: selective_state_update(
            r(2, 3, 4), torch.ones(2, 3, dtype=torch.int64), r(2, 3), r(3, 4), r(2, 4), r(2, 4)
        ),
        DTypeError,
        "x:",
    ),  # fmt: skip
    "cu_seqlens None": (lambda: seq_idx_from_cu_seqlens(None), DTypeError, "cu_seqlens:"),
    "cu_seqlens ending below 0": (
        lambda: seq_idx_from_cu_seqlens(torch.tensor([-(2**31)])),
        ShapeError,
        "cu_seqlens:",
    ),  # fmt: skip
    "cu_seqlens decreasing": (
        lambda: seq_idx_from_cu_seqlens(torch.tensor([0, 5, 3])),
        ShapeError,
        "cu_seqlens:",
    ),  # fmt: skip
    "cu_seqlens on meta": (
        lambda: seq_idx_from_cu_seqlens(torch.tensor([0, 2]).to("meta")),
        DeviceError,
        "cu_seqlens:",
    ),  # fmt: skip
    "scan numpy u, torch B": (
        lambda: selective_scan_fn(**{**scan_args(), "u": scan_args()["u"].numpy()}),
        DTypeError,
        "delta:",
    ),  # fmt: skip
    "scan seq_idx, initial_state a list": (
        lambda: selective_scan_fn(
            **scan_args(), seq_idx=torch.zeros(2, 8, dtype=torch.int32), initial_state=[0.0]
        ),
        DTypeError,
        "initial_state:",
    ),  # fmt: skip
    "complex scan delta_bias of the wrong size": (
        lambda: selective_scan_fn(
            r(1, 3, 4),
            r(1, 3, 4),
            torch.complex(-r(3, 2).abs(), r(3, 2)),
            r(1, 2, 8),
            r(1, 2, 8),
            delta_bias=r(4),
        ),
        ShapeError,
        "delta_bias:",
    ),  # fmt: skip
    "mamba_inner conv1d_weight of the wrong shape": (
        lambda: mamba_inner_fn(
            r(1, 6, 5), r(3, 2, 4), None, r(9, 3), r(3, 1), r(2, 3), None, -r(3, 4).abs()
        ),
        ShapeError,
        "conv1d_weight:",
    ),  # fmt: skip
    "serving cache index past the cache": (
        lambda: serving.selective_scan_fn(
            **serving_args(), cache_indices=torch.tensor([2**31 - 1, 0], dtype=torch.int32)
        ),
        ShapeError,
        "cache_indices:",
    ),  # fmt: skip
    "serving two sequences in one slot": (
        lambda: serving.selective_scan_fn(
            **serving_args(), cache_indices=torch.tensor([1, 1], dtype=torch.int32)
        ),
        ShapeError,
        "cache_indices:",
    ),  # fmt: skip
    "serving query_start_loc numpy": (
        lambda: serving.selective_scan_fn(
            **{**serving_args(), "query_start_loc": np.array([0, 3, 7], dtype=np.int32)}
        ),
        DTypeError,
        "query_start_loc:",
    ),  # fmt: skip
    "serving query_start_loc starting past 0": (
        lambda: serving.selective_scan_fn(
            **{**serving_args(), "query_start_loc": torch.tensor([1, 3, 7], dtype=torch.int32)}
        ),
        ShapeError,
        "query_start_loc:",
    ),  # fmt: skip
    "serving has_initial_state of rank 0": (
        lambda: serving.selective_scan_fn(**serving_args(), has_initial_state=torch.tensor(True)),
        ShapeError,
        "has_initial_state:",
    ),  # fmt: skip
    "serving complex ssm_states": (
        lambda: serving.selective_scan_fn(
            **{**serving_args(), "ssm_states": r(4, 2, 3).to(torch.complex64)}
        ),
        DTypeError,
        "ssm_states:",
    ),  # fmt: skip
    "serving ssm_states of the wrong dstate": (
        lambda: serving.selective_scan_fn(**{**serving_args(), "ssm_states": r(4, 2, 5)}),
        ShapeError,
        "ssm_states:",
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(BAD))
def test_found_by_fuzzing_is_refused_by_name(name):
    call, exc, arg = BAD[name]
    with pytest.raises(exc, match=arg):
        call()


def test_conv_reference_of_zero_length():
    x, w = r(2, 3, 0), r(3, 4)
    for kw in ({}, {"initial_states": r(2, 3, 3)}):
        assert causal_conv1d_ref(x, w, **kw).shape == (2, 3, 0)
        assert causal_conv1d_fn(x, w, **kw).shape == (2, 3, 0)


def test_mamba_inner_of_batch_zero_forward_and_backward():
    args = [r(0, 4, 0), r(2, 1, 2), None, r(5, 2), r(2, 1), r(3, 2), None, -r(2, 2).abs()]
    leaves = [a.requires_grad_() if a is not None else None for a in args]
    out = mamba_inner_fn(*leaves)
    assert out.shape == (0, 0, 3)
    out.sum().backward()
    assert mamba_inner_ref(*args).shape == (0, 0, 3)


def test_serving_float64_states():
    a = serving_args(dtype=torch.float64)
    a["A"] = a["A"].double()
    states = a["ssm_states"].clone()
    serving.selective_scan_fn(**a)
    assert not torch.equal(states[:2], a["ssm_states"][:2])
    assert torch.equal(states[2:], a["ssm_states"][2:])


def test_serving_empty_sequence_keeps_its_start_state():
    a = serving_args(lens=(0, 4))
    states = a["ssm_states"].clone()
    serving.selective_scan_fn(**a)
    assert torch.equal(a["ssm_states"][0], states[0])  # empty: ends where it started
    assert not torch.equal(a["ssm_states"][1], states[1])
    a = serving_args(lens=(0, 4))
    serving.selective_scan_fn(**a, has_initial_state=torch.tensor([False, True]))
    assert (a["ssm_states"][0] == 0).all()  # empty, started from zero


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_zero_length_writes_final_and_last_states():
    """Found by the CUDA fuzz run: at seqlen 0 the kernels left the conv's final states and the
    scan's last state unwritten (NaN-poisoned)."""
    x, w = r(1, 3, 0).cuda(), r(3, 2).cuda()
    out, fin = causal_conv1d_fn(x, w, return_final_states=True)
    assert out.shape == (1, 3, 0) and (fin == 0).all()
    h0 = r(1, 3, 1).cuda()
    _, fin = causal_conv1d_fn(x, w, initial_states=h0, return_final_states=True)
    assert torch.equal(fin, h0)
    a = {k: v.cuda() for k, v in scan_args(batch=1, L=0).items()}
    h0 = r(1, 3, 4).cuda()
    _, last = selective_scan_fn(**a, return_last_state=True, initial_state=h0)
    assert torch.equal(last, h0)
    _, last = selective_scan_fn(**a, return_last_state=True)
    assert (last == 0).all()
