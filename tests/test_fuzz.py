"""Fuzzing every public function with hypothesis (CPU; the same cases run on CUDA when
FUZZ_DEVICE=cuda).

Each generated call starts from a valid configuration (shapes including 0 and 1, every dtype,
every optional argument present or None, channel-first and channel-last layouts, packed
sequences, state indices) and applies at most one change to one argument: a wrong rank or size,
a wrong dtype or device, a numpy array, Python scalar, list or None in its place, other strides
(non-contiguous, or overlapping with stride 0), a NaN / Inf in one element, a negative or huge
index. The property, for every call:

- it returns, and then what it returns (and every in-place update) equals the float64 reference
  on the same inputs (non-finite exactly where the reference is non-finite), and its gradients
  equal the reference's (for a drawn share of the differentiable cases); or
- it raises one of mamba_scan's typed exceptions (ShapeError, DTypeError, DeviceError,
  LayoutError, or NotImplementedError for what the originals do not support either) whose
  message names an argument of the call; an unchanged valid configuration must not raise;
- it never crashes, panics, hangs, raises an untyped error, or modifies an input the API does not
  say it updates.

Derandomised (the same examples on every run); FUZZ_EXAMPLES scales the counts (1.0 by default,
10,200 calls over the seven functions: the counts in the @fuzz decorators below).
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mamba_scan import (
    DeviceError,
    DTypeError,
    LayoutError,
    ShapeError,
    causal_conv1d_fn,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
    mamba_inner_fn,
    mamba_inner_ref,
    selective_scan_fn,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
    seq_idx_from_cu_seqlens,
    serving,
)

DEVICE = os.environ.get("FUZZ_DEVICE", "cpu")
SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))
TYPED = (ShapeError, DTypeError, DeviceError, LayoutError, NotImplementedError)
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Relative tolerance (to max(1, max |reference|)) by the lowest-precision floating input: the
# kernels accumulate in float32, the reference in float64; low-precision outputs are rounded.
TOL = {torch.float64: 1e-7, torch.float32: 5e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def fuzz(n):
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        # FUZZ_SHRINK=0 reports the first failing example as found (faster while developing).
        phases=[p for p in Phase if os.environ.get("FUZZ_SHRINK", "1") == "1" or p != Phase.shrink],
    )


class Case:
    """One call: ``kw`` the arguments of ``fn``; ``ref`` the reference with the same signature;
    ``inplace`` the arguments the API updates; ``grads`` the differentiable arguments."""

    def __init__(self, fn, ref, kw, inplace=(), grads=(), index=(), low=torch.float32,
                 unspecified_nan=False):  # fmt: skip
        self.fn, self.ref, self.kw = fn, ref, kw
        # The reference marks with NaN the outputs the API leaves unspecified.
        self.unspecified_nan = unspecified_nan
        self.inplace, self.grads, self.index, self.low = set(inplace), list(grads), set(index), low

    def __repr__(self):
        def show(v):
            if isinstance(v, torch.Tensor):
                return f"{tuple(v.shape)} {str(v.dtype)[6:]} {tuple(v.stride())}"
            return repr(v)

        args = ", ".join(f"{k}={show(v)}" for k, v in self.kw.items())
        return f"{self.fn.__module__}.{self.fn.__name__}({args})"


def rand(gen, *shape, dtype=torch.float32, lo=None, hi=None):
    x = torch.randn(*shape, generator=gen) if lo is None else lo + (hi - lo) * torch.rand(
        *shape, generator=gen)  # fmt: skip
    return x.to(dtype=dtype, device=DEVICE)


def seq_idx_rows(draw, batch, seqlen):
    """(batch, seqlen) int32 packed-sequence numbers, each number one run of one row, numbered
    across rows; trailing -1 padding sometimes. Returns (seq_idx, num_seqs)."""
    rows, n = [], 0
    for _ in range(batch):
        pad = draw(st.integers(0, min(3, seqlen))) if draw(st.booleans()) else 0
        used = seqlen - pad
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, used - 1)), max_size=4))))
        cuts = [c for c in cuts if 0 < c < used]
        row, start = [], 0
        for c in cuts + [used]:
            if c > start:
                row += [n] * (c - start)
                n += 1
                start = c
        rows.append(row + [-1] * pad)
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE).view(batch, seqlen), n


# ---------------------------------------------------------------------------------------------
# The valid configurations, one builder per public function.


@st.composite
def scan_case(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    batch, dim, L, N = (draw(st.integers(0, 2)), draw(st.integers(1, 5)),
                        draw(st.sampled_from([0, 1, 2, 7, 16, 33, 40])), draw(st.integers(1, 6)))  # fmt: skip
    dtype = draw(st.sampled_from(FLOATS))
    cplx = draw(st.integers(0, 9)) == 0 and dtype != torch.float64
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    softplus = draw(st.booleans())
    delta = rand(gen, batch, dim, L, dtype=dtype, lo=-1.5 if softplus else 0.01,
                 hi=0.5 if softplus else 0.3)  # fmt: skip
    A = -rand(gen, dim, N, dtype=wdt, lo=0.5, hi=3.5)
    if cplx:
        A = torch.complex(A, torch.pi * torch.arange(N, device=DEVICE).float().expand(dim, N))

    def bc():
        mode = draw(st.sampled_from(["fixed", "var", "group"]))
        if mode == "fixed":
            x = rand(gen, dim, N, dtype=wdt)
            return torch.complex(x, rand(gen, dim, N)) if cplx else x
        Lb = 2 * L if cplx else L
        if mode == "var":
            return rand(gen, batch, N, Lb, dtype=dtype)
        g = draw(st.sampled_from([d for d in range(1, dim + 1) if dim % d == 0]))
        return rand(gen, batch, g, N, Lb, dtype=dtype)

    B, C = bc(), bc()
    opt = lambda make: make() if draw(st.booleans()) else None  # noqa: E731
    kw = dict(u=rand(gen, batch, dim, L, dtype=dtype), delta=delta, A=A, B=B, C=C,
              D=opt(lambda: rand(gen, dim, dtype=wdt)),
              z=opt(lambda: rand(gen, batch, dim, L, dtype=dtype)),
              # Without softplus a negative dt makes the state grow without bound (A < 0).
              delta_bias=opt(lambda: rand(gen, dim, dtype=wdt, lo=-0.5 if softplus else 0.0,
                                          hi=0.5 if softplus else 0.1)),
              delta_softplus=softplus, return_last_state=draw(st.booleans()))  # fmt: skip
    index = ()
    if not cplx and batch > 0 and L > 0 and draw(st.integers(0, 2)) == 0:
        kw["seq_idx"], n = seq_idx_rows(draw, batch, L)
        if draw(st.booleans()):
            kw["initial_state"] = rand(gen, n, dim, N, dtype=wdt)
        kw["num_seqs"] = n
        index = ("seq_idx",)
    elif draw(st.booleans()):
        h0 = rand(gen, batch, dim, N, dtype=wdt)
        kw["initial_state"] = torch.complex(h0, rand(gen, batch, dim, N)) if cplx else h0
    grads = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    return Case(selective_scan_fn, selective_scan_ref, kw, grads=grads, index=index, low=dtype)


@st.composite
def conv_case(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    batch, dim, L = draw(st.integers(0, 2)), draw(st.integers(1, 9)), draw(st.integers(0, 20))
    width = draw(st.sampled_from([2, 3, 4, 4, 1, 5]))
    dtype = draw(st.sampled_from(FLOATS))
    x = rand(gen, batch, dim, L, dtype=dtype)
    if draw(st.booleans()):  # channel-last, as causal-conv1d takes it
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    wdt = draw(st.sampled_from([dtype, torch.float32]))
    kw = dict(x=x, weight=rand(gen, dim, width, dtype=wdt),
              bias=rand(gen, dim, dtype=wdt) if draw(st.booleans()) else None,
              activation=draw(st.sampled_from([None, "silu", "swish"])))  # fmt: skip
    index = ()
    if batch > 0 and L > 0 and draw(st.integers(0, 2)) == 0:
        kw["seq_idx"], _ = seq_idx_rows(draw, batch, L)
        index = ("seq_idx",)
    else:
        if draw(st.booleans()):
            kw["initial_states"] = rand(gen, batch, dim, width - 1, dtype=dtype)
        kw["return_final_states"] = draw(st.booleans())
    return Case(causal_conv1d_fn, causal_conv1d_ref, kw, grads=["x", "weight", "bias",
                "initial_states"], index=index, low=min_prec(dtype, wdt))  # fmt: skip


def min_prec(*dts):
    order = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    return min(dts, key=order.index)


def slot_indices(draw, batch, rows):
    """(batch,) int32 distinct state rows in [0, rows), some -1 (padding)."""
    perm = draw(st.permutations(list(range(rows))))
    idx = [perm[i] if i < rows and draw(st.integers(0, 4)) else -1 for i in range(batch)]
    return torch.tensor(idx, dtype=torch.int32, device=DEVICE)


@st.composite
def conv_update_case(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    batch, dim, width = draw(st.integers(0, 3)), draw(st.integers(1, 9)), draw(
        st.sampled_from([2, 3, 4]))  # fmt: skip
    dtype = draw(st.sampled_from(FLOATS))
    x = rand(gen, batch, dim, dtype=dtype)
    if draw(st.booleans()):
        x = rand(gen, batch, dim, draw(st.integers(1, 4)), dtype=dtype)
    indexed = draw(st.booleans())
    rows = batch + (draw(st.integers(0, 2)) if indexed else 0)
    kw = dict(x=x, conv_state=rand(gen, rows, dim, width - 1 + draw(st.integers(0, 3)),
                                   dtype=dtype),
              weight=rand(gen, dim, width, dtype=dtype),
              bias=rand(gen, dim, dtype=dtype) if draw(st.booleans()) else None,
              activation=draw(st.sampled_from([None, "silu", "swish"])))  # fmt: skip
    index = []
    if draw(st.booleans()):
        kw["cache_seqlens"] = torch.tensor(draw(st.lists(st.integers(0, 50), min_size=batch,
                                                         max_size=batch)),
                                           dtype=torch.int32, device=DEVICE)  # fmt: skip
        index.append("cache_seqlens")
    if indexed:
        kw["conv_state_indices"] = slot_indices(draw, batch, rows)
        index.append("conv_state_indices")
    return Case(causal_conv1d_update, causal_conv1d_update_ref, kw, inplace=["conv_state"],
                index=index, low=dtype)  # fmt: skip


@st.composite
def state_update_case(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    batch, dim, N = draw(st.integers(0, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    heads = draw(st.sampled_from([None, 1, 2]))
    dtype = draw(st.sampled_from(FLOATS))
    sdt = draw(st.sampled_from([dtype, torch.float32]))
    h = () if heads is None else (heads,)
    rows = batch + draw(st.integers(0, 2))
    ng = () if heads is None or not draw(st.booleans()) else (draw(st.sampled_from(
        [g for g in (1, 2) if heads % g == 0])),)  # fmt: skip
    kw = dict(state=rand(gen, rows, *h, dim, N, dtype=sdt),
              x=rand(gen, batch, *h, dim, dtype=dtype),
              dt=rand(gen, batch, *h, dim, dtype=dtype, lo=-1.0, hi=0.5),
              A=-rand(gen, *h, dim, N, lo=0.5, hi=3.0),
              B=rand(gen, batch, *ng, N, dtype=dtype), C=rand(gen, batch, *ng, N, dtype=dtype),
              D=rand(gen, *h, dim) if draw(st.booleans()) else None,
              z=rand(gen, batch, *h, dim, dtype=dtype) if draw(st.booleans()) else None,
              dt_bias=rand(gen, *h, dim) if draw(st.booleans()) else None,
              dt_softplus=draw(st.booleans()))  # fmt: skip
    index = ()
    if draw(st.booleans()):
        kw["state_batch_indices"] = slot_indices(draw, batch, rows)
        index = ("state_batch_indices",)
    elif rows != batch:
        kw["state"] = kw["state"][:batch].clone()
    return Case(selective_state_update, selective_state_update_ref, kw, inplace=["state"],
                index=index, low=min_prec(dtype, sdt))  # fmt: skip


@st.composite
def inner_case(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    batch, d_in, L = draw(st.integers(0, 2)), draw(st.integers(1, 6)), draw(st.integers(0, 12))
    N, R, d_model, width = (draw(st.integers(1, 4)), draw(st.integers(1, 3)),
                            draw(st.integers(1, 5)), draw(st.sampled_from([2, 3, 4])))  # fmt: skip
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    fixed_b, fixed_c = draw(st.booleans()), draw(st.booleans())
    ncol = R + (0 if fixed_b else N) + (0 if fixed_c else N)
    kw = dict(xz=rand(gen, batch, 2 * d_in, L, dtype=dtype),
              conv1d_weight=rand(gen, d_in, 1, width, dtype=dtype),
              conv1d_bias=rand(gen, d_in, dtype=dtype) if draw(st.booleans()) else None,
              x_proj_weight=rand(gen, ncol, d_in, dtype=dtype) * 0.5,
              delta_proj_weight=rand(gen, d_in, R, dtype=dtype) * 0.5,
              out_proj_weight=rand(gen, d_model, d_in, dtype=dtype),
              out_proj_bias=rand(gen, d_model, dtype=dtype) if draw(st.booleans()) else None,
              A=-rand(gen, d_in, N, dtype=torch.float64 if dtype == torch.float64 else
                      torch.float32, lo=0.5, hi=3.0),
              B=rand(gen, d_in, N) if fixed_b else None,
              C=rand(gen, d_in, N) if fixed_c else None,
              D=rand(gen, d_in) if draw(st.booleans()) else None,
              delta_bias=rand(gen, d_in, lo=-0.5, hi=0.5) if draw(st.booleans()) else None,
              delta_softplus=True)  # fmt: skip
    if dtype == torch.float64:
        kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    index = ()
    if batch > 0 and L > 0 and draw(st.integers(0, 2)) == 0:
        kw["seq_idx"], _ = seq_idx_rows(draw, batch, L)
        index = ("seq_idx",)
    grads = [k for k in kw if k not in ("delta_softplus", "seq_idx")]
    return Case(mamba_inner_fn, mamba_inner_ref, kw, grads=grads, index=index, low=dtype)


def _cu(draw, n_seqs, lo=1, hi=9):
    lens = draw(st.lists(st.integers(lo, hi), min_size=n_seqs, max_size=n_seqs))
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=DEVICE)


def serving_scan_ref(u, ssm_states, delta, A, B, C, D=None, z=None, delta_bias=None,
                     delta_softplus=False, query_start_loc=None, cache_indices=None,
                     has_initial_state=None, pad_slot_id=serving.PAD_SLOT_ID):  # fmt: skip
    """vLLM's prefill scan, one sequence at a time through selective_scan_ref; the outputs of
    tokens in no sequence (past query_start_loc[-1], or of a pad entry) are unspecified (NaN)."""
    out = torch.full_like(u, float("nan"))
    for i in range(query_start_loc.numel() - 1):
        s, e = int(query_start_loc[i]), int(query_start_loc[i + 1])
        slot = i if cache_indices is None else int(cache_indices[i])
        if slot == pad_slot_id:
            continue
        h0 = ssm_states[slot].to(torch.float64)[None]
        if has_initial_state is not None and not bool(has_initial_state[i]):
            h0 = torch.zeros_like(h0)
        if e <= s:  # an empty sequence ends in its start state
            ssm_states[slot] = h0[0].to(ssm_states.dtype)
            continue
        sl = lambda t: None if t is None else t[None, ..., s:e]  # noqa: E731
        y, last = selective_scan_ref(sl(u), sl(delta), A, sl(B), sl(C), D, sl(z), delta_bias,
                                     delta_softplus, True, initial_state=h0)  # fmt: skip
        out[:, s:e] = y[0]
        ssm_states[slot] = last[0].to(ssm_states.dtype)
    (z if z is not None else delta).copy_(out)
    return out


@st.composite
def serving_scan_case(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    n, dim, N = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    qsl = _cu(draw, n)
    T = int(qsl[-1])
    rows = n + draw(st.integers(0, 2))
    kw = dict(u=rand(gen, dim, T, dtype=dtype), ssm_states=rand(gen, rows, dim, N, dtype=wdt),
              delta=rand(gen, dim, T, dtype=dtype, lo=-1.0, hi=0.5),
              A=-rand(gen, dim, N, dtype=wdt, lo=0.5, hi=3.0),
              B=rand(gen, N, T, dtype=dtype), C=rand(gen, N, T, dtype=dtype),
              D=rand(gen, dim, dtype=wdt) if draw(st.booleans()) else None,
              z=rand(gen, dim, T, dtype=dtype) if draw(st.booleans()) else None,
              delta_bias=rand(gen, dim, dtype=wdt) if draw(st.booleans()) else None,
              delta_softplus=True, query_start_loc=qsl)  # fmt: skip
    if draw(st.booleans()):
        kw["cache_indices"] = torch.tensor(draw(st.permutations(list(range(rows))))[:n],
                                           dtype=torch.int32, device=DEVICE)  # fmt: skip
    if draw(st.booleans()):
        kw["has_initial_state"] = torch.tensor(draw(st.lists(st.booleans(), min_size=n,
                                                             max_size=n)), device=DEVICE)  # fmt: skip
    inplace = ["ssm_states", "z" if kw["z"] is not None else "delta"]
    return Case(serving.selective_scan_fn, serving_scan_ref, kw, inplace=inplace,
                index=("query_start_loc", "cache_indices"), low=dtype, unspecified_nan=True)  # fmt: skip


def cu_ref(cu_seqlens, seqlen=None):
    cu = [int(c) for c in cu_seqlens]
    total = cu[-1] if seqlen is None else seqlen
    row = [-1] * total
    for i in range(len(cu) - 1):
        for t in range(cu[i], min(cu[i + 1], total)):
            row[t] = i
    return torch.tensor(row, dtype=torch.int32).view(1, total)


@st.composite
def cu_seqlens_case(draw):
    qsl = _cu(draw, draw(st.integers(0, 5)), lo=0).to(draw(st.sampled_from([torch.int32,
                                                                            torch.int64])))  # fmt: skip
    kw = dict(cu_seqlens=qsl)
    if draw(st.booleans()):
        kw["seqlen"] = int(qsl[-1]) + draw(st.integers(0, 3))
    return Case(seq_idx_from_cu_seqlens, cu_ref, kw, index=("cu_seqlens",))


# ---------------------------------------------------------------------------------------------
# The one change to one argument.

KINDS = ["none"] * 6 + ["rank", "size", "dtype", "meta", "numpy", "scalar", "list", "None",
                        "strides", "overlap", "nonfinite", "index"]  # fmt: skip


def _changed(draw, name, x, case):
    """(kind, new value) for argument ``name``; kind 'none' leaves it as it is."""
    kind = draw(st.sampled_from(KINDS))
    if kind == "none" or not isinstance(x, torch.Tensor):
        return "none", x
    if kind == "rank":
        return kind, x.unsqueeze(0) if draw(st.booleans()) or x.dim() == 0 else x.reshape(-1)[
            :1
        ].sum() if x.dim() == 1 else x.flatten(0, 1)  # noqa: E501
    if kind == "size":
        if x.dim() == 0:
            return "none", x
        shape = list(x.shape)
        d = draw(st.integers(0, x.dim() - 1))
        shape[d] += 1 if shape[d] <= 1 or draw(st.booleans()) else -1
        return kind, torch.zeros(
            shape, dtype=x.dtype, device=x.device
        ) if not x.is_floating_point() else torch.randn(shape, device=x.device).to(x.dtype)  # noqa: E501
    if kind == "dtype":
        dt = draw(st.sampled_from([torch.int32, torch.int64, torch.bool, torch.float64,
                                   torch.float16, torch.complex64, torch.uint8]))  # fmt: skip
        return kind, x.to(dt) if not (x.is_complex() and not dt.is_complex) else x.real.to(dt)
    if kind == "meta":
        return kind, x.to("meta")
    if kind == "numpy":
        return kind, (x.float() if x.dtype == torch.bfloat16 else x).cpu().numpy()
    if kind == "scalar":
        return kind, draw(st.sampled_from([1.5, 3, True]))
    if kind == "list":
        return kind, x.tolist()
    if kind == "None":
        return kind, None
    if kind == "strides":
        if x.dim() == 0 or x.numel() == 0:
            return "none", x
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        big[..., ::2] = x
        y = big[..., ::2]
        if x.dim() >= 2 and draw(st.booleans()):
            y = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        return kind, y
    if kind == "overlap":
        if x.dim() == 0 or x.shape[-1] < 2:
            return "none", x
        return kind, x[..., :1].expand(x.shape)
    if kind == "nonfinite":
        if not (x.is_floating_point() and x.numel()):
            return "none", x
        y = x.clone()
        at = np.unravel_index(draw(st.integers(0, x.numel() - 1)), tuple(x.shape))
        y[at] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        return kind, y
    if kind == "index":
        if name not in case.index or x.numel() == 0:
            return "none", x
        y = x.clone()
        at = np.unravel_index(draw(st.integers(0, x.numel() - 1)), tuple(x.shape))
        # (cu_seqlens' last entry is the length of its result: no 2^31 there)
        big = [10**6] if case.fn is seq_idx_from_cu_seqlens else [2**31 - 1, 10**6]
        v = draw(st.sampled_from([-2, -(2**31), 1, 0] + big))
        y[at] = v if y.dtype != torch.int32 or -(2**31) <= v < 2**31 else 0
        return kind, y
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------------------
# The property.


def _snapshot(v):
    if isinstance(v, torch.Tensor) and v.device.type != "meta":
        return (v.dtype, tuple(v.shape), v.detach().cpu().clone(memory_format=torch.contiguous_format)
                .reshape(-1).view(torch.uint8) if v.numel() else None)  # fmt: skip
    if isinstance(v, np.ndarray):
        return v.copy()
    return None


def _same(a, b):
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b, equal_nan=True)
    if a is None:
        return b is None
    return a[:2] == b[:2] and (a[2] is None or torch.equal(a[2], b[2]))


def _up(v):
    """The reference's copy of an argument: floating tensors in float64 (complex128)."""
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v.copy())
    if isinstance(v, torch.Tensor) and v.device.type != "meta":
        v = v.detach()
        if v.is_complex():
            return v.to(torch.complex128, copy=True)
        return v.to(torch.float64, copy=True) if v.is_floating_point() else v.clone()
    return v


def _flat(res):
    if isinstance(res, (tuple, list)):
        return [t for r in res for t in _flat(r)]
    if isinstance(res, np.ndarray):
        return [torch.from_numpy(res)]
    return [res] if isinstance(res, torch.Tensor) else []


def _close(got, want, tol, what, unspecified_nan=False):
    got = got.detach().cpu()
    want = want.detach().cpu()
    if unspecified_nan:
        got = torch.where(torch.isnan(want), want, got.to(want.dtype))
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.is_complex():
        got, want = torch.view_as_real(got), torch.view_as_real(want)
    got, want = got.to(torch.float64), want.to(torch.float64)
    fin = torch.isfinite(want)
    bad_fin = fin & ~torch.isfinite(got)
    assert not bad_fin.any(), f"{what}: non-finite where the reference is finite"
    assert torch.isfinite(got[~fin]).sum() == 0 or not (~fin).any(), (
        f"{what}: finite where the reference is not"
    )
    if fin.any():
        scale = max(1.0, want[fin].abs().max().item())
        err = (got[fin] - want[fin]).abs().max().item()
        assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


def _names_an_argument(msg, names):
    return any(re.search(rf"(^|[^A-Za-z_]){re.escape(n)}([^A-Za-z_0-9]|$)", msg) for n in names)


def check(case, data, mutate=True):
    try:
        _check(case, data, mutate)
    except AssertionError:
        if os.environ.get("FUZZ_DUMP"):  # the failing call's arguments, for a regression test
            torch.save(dict(case.kw), os.environ["FUZZ_DUMP"])
        raise


def _check(case, data, mutate):
    kw = dict(case.kw)
    kind, name = "none", None
    if mutate:
        name = data.draw(st.sampled_from(sorted(kw)))
        kind, kw[name] = _changed(data.draw, name, kw[name], case)
    # On CUDA index tensors stay on the device, unchecked (no host synchronisation): repeated
    # slots, out-of-range entries and out-of-order cumulative lengths are the caller's error
    # there (documented); such a call must still not crash, but its result is not compared.
    unchecked = DEVICE == "cuda" and name in case.index and kind in ("overlap", "index")
    grad = (kind in ("none", "strides", "overlap") and case.grads
            and data.draw(st.integers(0, 2)) == 0)  # fmt: skip
    ours_kw = {k: (_up(v).to(v.dtype) if isinstance(v, torch.Tensor) and v.device.type != "meta"
                   and k in case.inplace else v) for k, v in kw.items()}  # fmt: skip
    leaves = {}
    if grad:
        for k in case.grads:
            v = ours_kw.get(k)
            if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
                ours_kw[k] = leaves[k] = v.detach().requires_grad_()
    before = {k: _snapshot(v) for k, v in ours_kw.items() if k not in case.inplace}
    label = f"{case.fn.__name__} with {kind} on {name}"
    try:
        res = case.fn(**ours_kw)
    except TYPED as e:
        if DEVICE == "cuda" and isinstance(e, DTypeError) and "CPU only" in str(e):
            return  # float64 runs on the CPU only (as in mamba_ssm, whose kernels have none)
        assert kind != "none", f"{label}: a valid call raised {type(e).__name__}: {e}"
        assert _names_an_argument(str(e), kw), f"{label}: the message names no argument: {e}"
        return
    except Exception as e:  # noqa: BLE001 - the property is that nothing else escapes
        raise AssertionError(f"{label}: untyped {type(e).__name__}: {e}") from e
    for k, snap in before.items():
        assert _same(snap, _snapshot(ours_kw[k])), f"{label}: input {k} was modified"
    if unchecked:
        torch.cuda.synchronize()  # a device-side fault would surface here
        return
    ref_kw = {k: _up(v) for k, v in kw.items()}
    for k in leaves:
        ref_kw[k] = ref_kw[k].requires_grad_()
    try:
        want = case.ref(**ref_kw)
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{label}: accepted, but the reference refuses it: "
                             f"{type(e).__name__}: {e}") from e  # fmt: skip
    got_t, want_t = _flat(res), _flat(want)
    assert len(got_t) == len(want_t), f"{label}: {len(got_t)} outputs, reference {len(want_t)}"
    tol = TOL[case.low]
    for i, (g, w) in enumerate(zip(got_t, want_t)):
        _close(g, w, tol, f"{label}: output {i}", case.unspecified_nan)
    for k in case.inplace:
        if isinstance(ours_kw.get(k), torch.Tensor):
            _close(ours_kw[k], ref_kw[k], tol, f"{label}: updated {k}", case.unspecified_nan)
    if leaves and kind != "nonfinite":
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
        pairs = [(g, w) for g, w in zip(got_t, want_t) if g.requires_grad or w.requires_grad]
        ws = [torch.randn(_real(w).shape, generator=gen, dtype=torch.float64) for _, w in pairs]
        for outs in ([g for g, _ in pairs], [w for _, w in pairs]):
            loss = sum((_real(o).to(torch.float64) * w.to(o.device)).sum()
                       for o, w in zip(outs, ws) if o.requires_grad)  # fmt: skip
            if isinstance(loss, torch.Tensor):
                loss.backward()
        for k, leaf in leaves.items():
            rg = ref_kw[k].grad
            if leaf.grad is None and rg is None:
                continue
            assert leaf.grad is not None, f"{label}: no gradient for {k}"
            _close(leaf.grad, rg if rg is not None else torch.zeros_like(ref_kw[k]), tol * 4,
                   f"{label}: d{k}")  # fmt: skip


def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


@fuzz(3000)
@given(st.data())
def test_fuzz_selective_scan(data):
    check(data.draw(scan_case()), data)


@fuzz(1800)
@given(st.data())
def test_fuzz_causal_conv1d(data):
    check(data.draw(conv_case()), data)


@fuzz(1300)
@given(st.data())
def test_fuzz_causal_conv1d_update(data):
    check(data.draw(conv_update_case()), data)


@fuzz(1500)
@given(st.data())
def test_fuzz_selective_state_update(data):
    check(data.draw(state_update_case()), data)


@fuzz(1200)
@given(st.data())
def test_fuzz_mamba_inner_fn(data):
    check(data.draw(inner_case()), data)


@fuzz(1000)
@given(st.data())
def test_fuzz_serving_selective_scan(data):
    check(data.draw(serving_scan_case()), data)


@fuzz(400)
@given(st.data())
def test_fuzz_seq_idx_from_cu_seqlens(data):
    check(data.draw(cu_seqlens_case()), data)
