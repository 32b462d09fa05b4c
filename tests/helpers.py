"""Input builders and the tolerance rule shared by the tests."""

from __future__ import annotations

import torch

from mamba_scan import selective_scan_fn, selective_scan_ref

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def make_bc(mode: str, batch: int, dim: int, dstate: int, seqlen: int, dtype, device, gen,
            cplx=False):  # fmt: skip
    """mode: 'fixed', 'var' (batch, dstate, L), or 'gK' (batch, K, dstate, L). cplx (complex
    A): fixed complex64, variable real with (real, imag) interleaved along 2 L."""
    if mode == "fixed":
        if cplx:
            return torch.randn(dim, dstate, 2, generator=gen).to(device).contiguous().view(
                torch.complex64).squeeze(-1)  # fmt: skip
        return torch.randn(dim, dstate, generator=gen).to(device)
    L = 2 * seqlen if cplx else seqlen
    if mode == "var":
        return torch.randn(batch, dstate, L, generator=gen).to(device=device, dtype=dtype)
    g = int(mode[1:])
    return torch.randn(batch, g, dstate, L, generator=gen).to(device=device, dtype=dtype)


def make_inputs(batch=2, dim=8, seqlen=64, dstate=16, dtype=torch.float32, device="cpu",
                b_mode="var", c_mode="var", has_d=True, has_z=True, has_bias=True,
                has_h0=False, seed=0, softplus=True, cplx=False):  # fmt: skip
    """cplx: mamba_ssm's complex mode (A complex64 with S4D-Lin's imaginary parts pi n)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, seqlen, generator=gen).to(device=device, dtype=dtype)
    # delta around softplus^-1 of typical dt values; a spread of magnitudes.
    # With softplus: raw values around softplus^-1 of typical dt; without: dt itself, positive
    # (a negative dt with A < 0 makes the state grow without bound).
    raw = torch.rand(batch, dim, seqlen, generator=gen)
    raw = raw * 2 - 1.5 if softplus else raw * 0.3 + 0.01
    delta = raw.to(device=device, dtype=dtype)
    A = -(0.5 + torch.rand(dim, dstate, generator=gen) * 3).to(device)
    if cplx:
        imag = torch.pi * torch.arange(dstate, dtype=torch.float32).repeat(dim, 1).to(device)
        A = torch.complex(A, imag)
    B = make_bc(b_mode, batch, dim, dstate, seqlen, dtype, device, gen, cplx)
    C = make_bc(c_mode, batch, dim, dstate, seqlen, dtype, device, gen, cplx)
    D = torch.randn(dim, generator=gen).to(device) if has_d else None
    z = (
        torch.randn(batch, dim, seqlen, generator=gen).to(device=device, dtype=dtype)
        if has_z
        else None
    )
    bias = (
        torch.randn(dim, generator=gen) * 0.5 if softplus else torch.rand(dim, generator=gen) * 0.1
    )
    bias = bias.to(device) if has_bias else None
    h0 = torch.randn(batch, dim, dstate, generator=gen).to(device) if has_h0 else None
    if cplx and has_h0:
        h0 = torch.complex(h0, torch.randn(batch, dim, dstate, generator=gen).to(device))
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias, initial_state=h0)


def _run(fn, inputs, softplus, last, grads_out, extra=None):
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None)
              for k, v in inputs.items()}  # fmt: skip
    kw = dict(leaves)
    h0 = kw.pop("initial_state")
    res = fn(**kw, delta_softplus=softplus, return_last_state=last, initial_state=h0,
             **(extra or {}))  # fmt: skip
    out, ls = res if last else (res, None)
    loss = (out.double() * grads_out["out"]).sum()
    if last:
        lr = torch.view_as_real(ls) if ls.is_complex() else ls
        loss = loss + (lr.double() * grads_out["last"]).sum()
    loss.backward()
    grads = {k: (v.grad if v is not None else None) for k, v in leaves.items()}
    return out.detach(), (ls.detach() if ls is not None else None), grads


def _wide(v):
    return v.to(torch.complex128) if v.is_complex() else v.double()


def upcast(inputs):
    return {k: (_wide(v) if v is not None else None) for k, v in inputs.items()}


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (_wide(a) - _wide(b)).abs().max().item()


def check_parity(inputs, softplus=True, last=True, fn=selective_scan_fn, label="", seq_idx=None,
                 num_seqs=None, slack=None):  # fmt: skip
    """flash-attention's rule: the kernel's error against float64 is at most twice the error of
    the same-precision PyTorch reference against float64 (plus a floor of a few float32 ulps of
    the result's magnitude, for results the same-precision reference gets exactly). With
    ``seq_idx`` (packed sequences) last_state is per sequence: (num_seqs, dim, dstate).
    ``slack`` {name: factor} widens named quantities' tolerance (documented deviations only)."""
    u = inputs["u"]
    batch, dim, seqlen = u.shape
    dstate = inputs["A"].shape[1]
    gen = torch.Generator().manual_seed(123)
    rows_last = batch if seq_idx is None else num_seqs
    grads_out = {
        "out": torch.randn(batch, dim, seqlen, generator=gen, dtype=torch.float64).to(u.device),
        "last": torch.randn(
            rows_last,
            dim,
            dstate,
            *((2,) if inputs["A"].is_complex() else ()),
            generator=gen,
            dtype=torch.float64,
        ).to(u.device),  # fmt: skip
    }
    extra = None if seq_idx is None else {"seq_idx": seq_idx, "num_seqs": num_seqs}
    ref64 = _run(selective_scan_ref, upcast(inputs), softplus, last, grads_out, extra)
    refpt = _run(selective_scan_ref, inputs, softplus, last, grads_out, extra)
    ours = _run(fn, inputs, softplus, last, grads_out, extra)
    rows = []
    names = ["out", "last_state"] + [f"d{k}" for k in GRAD_NAMES]
    vals = [(ref64[0], refpt[0], ours[0]), (ref64[1], refpt[1], ours[1])] + [
        (ref64[2][k], refpt[2][k], ours[2][k]) for k in GRAD_NAMES
    ]
    worst = 0.0
    for name, (r64, rpt, got) in zip(names, vals):
        if r64 is None:
            assert got is None or name == "last_state", f"{label} {name}: unexpected gradient"
            continue
        assert got is not None, f"{label} {name}: missing"
        assert got.shape == r64.shape, f"{label} {name}: shape {tuple(got.shape)}"
        assert got.dtype == rpt.dtype, f"{label} {name}: dtype {got.dtype} != {rpt.dtype}"
        assert not torch.isnan(got).any(), f"{label} {name}: NaN (unwritten output?)"
        e_ours, e_pt = max_err(got, r64), max_err(rpt, r64)
        scale = r64.abs().max().item() if r64.numel() else 0.0
        tol = (2 * e_pt + 8 * 1.2e-7 * max(scale, 1.0)) * (slack or {}).get(name, 1.0)
        rows.append((name, e_ours, e_pt, tol))
        worst = max(worst, e_ours / tol)
        assert e_ours <= tol, (
            f"{label} {name}: kernel err {e_ours:.3e} > tol {tol:.3e} (ref err {e_pt:.3e})"
        )
    return rows, worst
