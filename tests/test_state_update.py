"""selective_state_update: parity with a float64 oracle (flash-attention's tolerance rule),
in-place state semantics, padding rows, heads / groups, and errors."""

import itertools

import pytest
import torch

from mamba_scan import ShapeError, selective_state_update, selective_state_update_ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(batch=3, nheads=None, dim=8, dstate=16, ngroups=1, dtype=torch.float32,
         state_dtype=torch.float32, has_d=True, has_z=True, has_bias=True, device="cpu",
         state_batch=None, seed=0):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    h = nheads or 1
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sb = state_batch or batch
    inp = dict(
        state=r(sb, h, dim, dstate).to(state_dtype),
        x=r(batch, h, dim).to(dtype),
        dt=(torch.rand(batch, h, dim, generator=g) * 2 - 1.5).to(dtype),
        A=-(0.5 + torch.rand(h, dim, dstate, generator=g) * 3),
        B=r(batch, ngroups, dstate).to(dtype),
        C=r(batch, ngroups, dstate).to(dtype),
        D=r(h, dim) if has_d else None,
        z=r(batch, h, dim).to(dtype) if has_z else None,
        dt_bias=r(h, dim) * 0.5 if has_bias else None,
    )
    if nheads is None:  # the no-heads form: state (batch, dim, dstate), x (batch, dim), ...
        for k in ("state", "x", "dt", "z"):
            if inp[k] is not None:
                inp[k] = inp[k].squeeze(1)
        inp["A"] = inp["A"].squeeze(0)
        for k in ("B", "C"):
            inp[k] = inp[k].squeeze(1)
        for k in ("D", "dt_bias"):
            if inp[k] is not None:
                inp[k] = inp[k].squeeze(0)
    return {k: (v.to(device) if v is not None else None) for k, v in inp.items()}


def run(fn, inp, **kw):
    inp = {k: (v.clone() if v is not None else None) for k, v in inp.items()}
    out = fn(**inp, **kw)
    return out, inp["state"]


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check(inp, **kw):
    f64 = {k: (v.double() if v is not None else None) for k, v in inp.items()}
    out64, st64 = run(selective_state_update_ref, f64, **kw)
    out_pt, st_pt = run(selective_state_update_ref, inp, **kw)
    out, st = run(selective_state_update, inp, **kw)
    assert out.dtype == inp["x"].dtype and st.dtype == inp["state"].dtype
    for name, got, ref, want in (("out", out, out_pt, out64), ("state", st, st_pt, st64)):
        assert not torch.isnan(got).any(), name
        tol = 2 * err(ref, want) + 8 * 1.2e-7 * max(want.abs().max().item(), 1.0)
        assert err(got, want) <= tol, f"{name}: {err(got, want):.3e} > {tol:.3e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [None, 4])
@pytest.mark.parametrize("dstate", [1, 16, 64])
def test_parity(device, dtype, heads, dstate):
    inp = make(nheads=heads, dstate=dstate, dtype=dtype, ngroups=2 if heads else 1, device=device)
    check(inp, dt_softplus=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "has_d,has_z,has_bias,softplus", list(itertools.product([False, True], repeat=4))
)
def test_options(device, has_d, has_z, has_bias, softplus):
    inp = make(nheads=2, has_d=has_d, has_z=has_z, has_bias=has_bias, device=device)
    check(inp, dt_softplus=softplus)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_state_dtypes(device, state_dtype):
    inp = make(nheads=2, state_dtype=state_dtype, device=device)
    check(inp, dt_softplus=True)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_indices_and_padding(device):
    inp = make(batch=4, nheads=2, state_batch=6, device=device)
    idx = torch.tensor([5, -1, 0, 3], device=device)
    before = inp["state"].clone()
    check(inp, dt_softplus=True, state_batch_indices=idx)
    st = inp["state"].clone()
    out = selective_state_update(**{**inp, "state": st}, dt_softplus=True, state_batch_indices=idx)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # padding row: output 0
    for row in (1, 2, 4):  # rows not named by an index (and the padding's) are untouched
        assert torch.equal(st[row], before[row])
    assert not torch.equal(st[5], before[5])


def test_inputs_other_than_state_unmodified():
    inp = make(nheads=2)
    keep = {k: v.clone() for k, v in inp.items() if v is not None and k != "state"}
    selective_state_update(**inp, dt_softplus=True)
    for k, v in keep.items():
        assert torch.equal(inp[k], v), k


def test_broadcast_views():
    """Mamba-2 style tied A / dt over dim (stride-0 views) give the same result as copies."""
    inp = make(nheads=4, dim=8, dstate=16)
    A = (-torch.rand(4, 1, 1) - 0.5).expand(4, 8, 16)
    dt = torch.rand(3, 4, 1).expand(3, 4, 8)
    a, b = dict(inp, A=A, dt=dt), dict(inp, A=A.contiguous(), dt=dt.contiguous())
    out_a, st_a = run(selective_state_update, a, dt_softplus=True)
    out_b, st_b = run(selective_state_update, b, dt_softplus=True)
    assert torch.equal(out_a, out_b) and torch.equal(st_a, st_b)


def test_matches_full_scan():
    """Decoding token by token equals the scan's output and last state."""
    from mamba_scan import selective_scan_fn

    g = torch.Generator().manual_seed(1)
    b, d, n, L = 2, 8, 16, 9
    u, delta, z = (torch.randn(b, d, L, generator=g) for _ in range(3))
    A = -(0.5 + torch.rand(d, n, generator=g))
    B, C = torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    out, last = selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True)
    state = torch.zeros(b, d, n)
    steps = [
        selective_state_update(
            state,
            u[..., t],
            delta[..., t],
            A,
            B[..., t],
            C[..., t],
            D,
            z[..., t],
            bias,
            dt_softplus=True,
        )  # fmt: skip
        for t in range(L)
    ]
    torch.testing.assert_close(torch.stack(steps, -1), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=torch.randn(3, 2, 7)), r"x: must have shape"),
        (dict(B=torch.randn(3, 3, 16)), r"B: ngroups \(3\) must divide nheads \(2\)"),
        (dict(A=torch.randn(2, 8, 15)), r"A: must have shape"),
        (dict(D=torch.randn(8)), r"D: must have shape"),
        (dict(state=torch.randn(8, 16)), r"state: must have shape"),
    ],
)
def test_errors_name_the_argument(change, match):
    inp = make(nheads=2)
    inp.update(change)
    with pytest.raises(ShapeError, match=match):
        selective_state_update(**inp)


def test_bad_indices():
    inp = make(batch=2, nheads=2, state_batch=3)
    with pytest.raises(ShapeError, match="appears twice"):
        selective_state_update(**inp, state_batch_indices=torch.tensor([1, 1]))
    with pytest.raises(ShapeError, match="out of range"):
        selective_state_update(**inp, state_batch_indices=torch.tensor([1, 3]))
    with pytest.raises(ShapeError, match=r"state: batch 3 must equal"):
        selective_state_update(**inp)
