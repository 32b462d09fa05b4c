"""mamba_inner_fn: mamba_ssm's fused Mamba-1 mixer (conv1d + silu, x_proj, dt_proj, selective
scan with z gating, out_proj) with its signature and semantics.

One autograd Function (``MambaInnerFn``) runs the conv and scan kernels and the projections
(cuBLAS / the CPU BLAS through torch) and writes its own backward: with ``checkpoint_lvl=1`` it
saves xz, x_dbl, the gated scan output and one state per chunk, and recomputes the conv output
and delta in the backward instead of saving them (two (batch, d_inner, seqlen) tensors fewer).
The RMS-norm variants (b/c/dt_rms_weight) and widths the kernels do not take run the composition
``reference.mamba_inner_composition`` over mamba-scan's conv and scan ops (autograd through
torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._boundary import check_devices, require_float, require_tensor
from .._native import ShapeError
from ..reference import mamba_inner_composition
from .conv1d import causal_conv1d_fn, conv_backward, conv_forward, kernel_ok
from .selective_scan import _backward, _forward, _prepare, _prepare_seq, selective_scan_fn


def _bias_grad(g, dtype):
    """Sum over steps of a (b l, n) gradient, accumulated in at least float32."""
    if dtype is None:
        return None
    return g.sum(0, dtype=torch.promote_types(g.dtype, torch.float32)).to(dtype)


class MambaInnerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                out_proj_weight, out_proj_bias, A, B, C, D, delta_bias, B_proj_bias,
                C_proj_bias, delta_softplus, checkpoint_lvl, seq_idx=None):  # fmt: skip
        batch, two_d, L = xz.shape
        d = two_d // 2
        n = A.shape[-1]
        r = delta_proj_weight.shape[1]
        if xz.stride(-1) != 1:
            xz = xz.contiguous()
        x, z = xz[:, :d], xz[:, d:]
        w = conv1d_weight.squeeze(1)
        conv_out, _ = conv_forward(x, w, conv1d_bias, seq_idx, None, True)
        # (b l, r + 2n): the input-dependent dt, B and C of every step.
        x_dbl = F.linear(conv_out.transpose(1, 2).reshape(batch * L, d), x_proj_weight)
        delta = (delta_proj_weight @ x_dbl[:, :r].t()).view(d, batch, L).transpose(0, 1)
        var_b, var_c = B is None, C is None
        if var_b:
            B = x_dbl[:, r : r + n]
            if B_proj_bias is not None:
                B = B + B_proj_bias.to(B.dtype)
            B = B.view(batch, L, n).transpose(1, 2).contiguous()
        if var_c:
            # mamba_ssm's columns: variable B right after dt_rank, variable C the last d_state
            # (with B fixed, x_dbl is (b l, dt_rank + d_state) and C starts at dt_rank).
            C = x_dbl[:, -n:]
            if C_proj_bias is not None:
                C = C + C_proj_bias.to(C.dtype)
            C = C.view(batch, L, n).transpose(1, 2).contiguous()
        u, delta, A, B, C, D, z, delta_bias, _ = _prepare(
            conv_out, delta, A, B, C, D, z, delta_bias, None
        )
        out_z, states = _forward(u, delta, A, B, C, D, z, delta_bias, None, delta_softplus,
                                 seq_idx)  # fmt: skip
        out = F.linear(out_z.transpose(1, 2), out_proj_weight, out_proj_bias)
        ctx.lvl = checkpoint_lvl
        ctx.var_b, ctx.var_c = var_b, var_c
        ctx.delta_softplus = bool(delta_softplus)
        ctx.b_bias_dtype = B_proj_bias.dtype if B_proj_bias is not None else None
        ctx.c_bias_dtype = C_proj_bias.dtype if C_proj_bias is not None else None
        ctx.has_out_bias = out_proj_bias is not None
        if checkpoint_lvl >= 1:
            u, delta = None, None  # recomputed in the backward
        ctx.save_for_backward(xz, conv1d_weight, conv1d_bias, x_dbl, x_proj_weight,
                              delta_proj_weight, out_proj_weight, A, B, C, D, delta_bias,
                              states, out_z, u, delta, seq_idx)  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, dout):
        (xz, conv1d_weight, conv1d_bias, x_dbl, x_proj_weight, delta_proj_weight,
         out_proj_weight, A, B, C, D, delta_bias, states, out_z, u, delta,
         seq_idx) = ctx.saved_tensors  # fmt: skip
        batch, two_d, L = xz.shape
        d = two_d // 2
        n = A.shape[-1]
        r = delta_proj_weight.shape[1]
        x, z = xz[:, :d], xz[:, d:]
        w = conv1d_weight.squeeze(1)
        if u is None:  # checkpoint_lvl 1: recompute the conv output and delta
            u, _ = conv_forward(x, w, conv1d_bias, seq_idx, None, True)
            delta = (delta_proj_weight @ x_dbl[:, :r].t()).view(d, batch, L).transpose(0, 1)
        dout2 = dout.reshape(batch * L, dout.shape[-1])
        # out = out_z^T W_out^T + b: gradients of the projection, then of the scan.
        dout_proj_weight = dout2.t() @ out_z.transpose(1, 2).reshape(batch * L, d)
        dout_proj_bias = dout2.sum(0) if ctx.has_out_bias else None
        # W_out^T dout^T is (d, b l): as (b, d, l) its steps are contiguous, no copy for the scan.
        dy = (out_proj_weight.t() @ dout2.t()).view(d, batch, L).transpose(0, 1)
        dxz = torch.empty_like(xz)
        dz = dxz[:, d:]
        # du is written in the (d, b l) layout of the x_proj product below, which then adds
        # into it in place (cuBLAS' beta = 1): no separate pass for dconv = du + W_x^T dx_dbl^T.
        du2 = torch.empty(d, batch * L, device=u.device, dtype=u.dtype)
        du, ddelta, dA, dB, dC, dD, _, ddelta_bias, _ = _backward(
            u, delta, A, B, C, D, z, delta_bias, None, states, dy, None, ctx.delta_softplus,
            du=du2.view(d, batch, L).transpose(0, 1), dz=dz, seq_idx=seq_idx,
        )  # fmt: skip
        # x_dbl = u^T W_x^T: its gradient collects ddelta (through W_dt), and dB / dC when
        # they are input-dependent.
        dx_dbl = torch.empty_like(x_dbl)
        ddelta2 = ddelta.transpose(0, 1).reshape(d, batch * L)  # (d, b l)
        ddelta_proj_weight = (ddelta2 @ x_dbl[:, :r]).to(delta_proj_weight.dtype)
        dx_dbl[:, :r] = (ddelta2.t() @ delta_proj_weight.to(ddelta2.dtype)).to(dx_dbl.dtype)
        dB_proj_bias = dC_proj_bias = None
        if not (ctx.var_b and ctx.var_c and x_dbl.shape[1] == r + 2 * n):
            dx_dbl[:, r:] = 0  # columns that feed neither B nor C get no gradient
        if ctx.var_b:
            dB2 = dB.transpose(1, 2).reshape(batch * L, n)
            dx_dbl[:, r : r + n] = dB2
            dB = None
            dB_proj_bias = _bias_grad(dB2, ctx.b_bias_dtype)
        if ctx.var_c:
            dC2 = dC.transpose(1, 2).reshape(batch * L, n)
            dx_dbl[:, -n:] = dC2
            dC = None
            dC_proj_bias = _bias_grad(dC2, ctx.c_bias_dtype)
        u2 = u.transpose(1, 2).reshape(batch * L, d)
        dx_proj_weight = dx_dbl.t() @ u2
        # dconv = du + W_x^T dx_dbl^T, accumulated into du's (d, b l) storage.
        du2.addmm_(x_proj_weight.t().to(du2.dtype), dx_dbl.t().to(du2.dtype))
        dconv = du
        _, dw, db, _ = conv_backward(x, w, conv1d_bias, seq_idx, None, dconv, None, True,
                                     dx=dxz[:, :d])  # fmt: skip
        return (dxz, dw.view_as(conv1d_weight), db, dx_proj_weight, ddelta_proj_weight,
                dout_proj_weight, dout_proj_bias, dA, dB, dC, dD, ddelta_bias, dB_proj_bias,
                dC_proj_bias, None, None, None)  # fmt: skip


_REQUIRED = ("xz", "conv1d_weight", "x_proj_weight", "delta_proj_weight", "out_proj_weight", "A")


def _check_args(**args):
    """The arguments' types, devices and shapes, named as the caller passed them (the kernels
    below would name them by their own parameters)."""
    for name, t in args.items():
        require_tensor(t, name, optional=name not in _REQUIRED)
        if name not in ("A", "B", "C"):  # complex with a complex A
            require_float(t, name)
    check_devices(**args)
    xz, A = args["xz"], args["A"]
    if xz.dim() != 3 or xz.shape[1] % 2:
        raise ShapeError(f"xz: must have shape (batch, 2 d_inner, seqlen); got {tuple(xz.shape)}")
    d_inner = xz.shape[1] // 2
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ShapeError(f"A: must have shape (d_inner, d_state) = ({d_inner}, d_state); got "
                         f"{tuple(A.shape)}")  # fmt: skip
    d_state = A.shape[1]
    w = args["conv1d_weight"]
    if not (w.dim() == 3 and w.shape[:2] == (d_inner, 1) or w.dim() == 2 and w.shape[0] == d_inner):
        raise ShapeError(f"conv1d_weight: must have shape (d_inner, 1, width) = ({d_inner}, 1, "
                         f"width); got {tuple(w.shape)}")  # fmt: skip
    dp = args["delta_proj_weight"]
    if dp.dim() != 2 or dp.shape[0] != d_inner:
        raise ShapeError(f"delta_proj_weight: must have shape (d_inner, dt_rank) = ({d_inner}, "
                         f"dt_rank); got {tuple(dp.shape)}")  # fmt: skip
    cols = dp.shape[1] + (2 if A.is_complex() else 1) * d_state * (
        (args["B"] is None) + (args["C"] is None)
    )
    xp = args["x_proj_weight"]
    if xp.dim() != 2 or xp.shape[0] < cols or xp.shape[1] != d_inner:  # extra rows unused
        raise ShapeError(f"x_proj_weight: must have shape (dt_rank + d_state per variable B / C "
                         f"or more, d_inner) = (>= {cols}, {d_inner}); got {tuple(xp.shape)}")  # fmt: skip
    op = args["out_proj_weight"]
    if op.dim() != 2 or op.shape[1] != d_inner:
        raise ShapeError(f"out_proj_weight: must have shape (d_model, d_inner) = (d_model, "
                         f"{d_inner}); got {tuple(op.shape)}")  # fmt: skip
    want = {"conv1d_bias": (d_inner,), "out_proj_bias": (op.shape[0],), "B": (d_inner, d_state),
            "C": (d_inner, d_state), "D": (d_inner,), "delta_bias": (d_inner,)}  # fmt: skip
    for name, shape in want.items():
        t = args[name]
        if t is not None and tuple(t.shape) != shape:
            raise ShapeError(f"{name}: must have shape {shape}; got {tuple(t.shape)}")


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                   out_proj_weight, out_proj_bias, A, B=None, C=None, D=None, delta_bias=None,
                   B_proj_bias=None, C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1,
                   b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                   b_c_dt_rms_eps=1e-6, *, seq_idx=None):  # fmt: skip
    """xz: (batch, 2 d_inner, seqlen); conv1d_weight: (d_inner, 1, width); x_proj_weight:
    (dt_rank + 2 d_state, d_inner); delta_proj_weight: (d_inner, dt_rank); out_proj_weight:
    (d_model, d_inner); A: (d_inner, d_state); B / C None for input-dependent B / C (from
    x_proj), else fixed. Returns (batch, seqlen, d_model). A complex A (mamba_ssm's complex
    mode) takes 2 d_state columns of x_proj each for B and C, (real, imag) pairs, and runs the
    composition over the complex scan (``ops/complex_scan.py``).

    seq_idx (mamba-scan extension): (batch, seqlen) int32, sequences packed along the rows; the
    conv and the scan both restart where it changes (causal-conv1d's and selective_scan_fn's
    convention; -1 marks padding)."""
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"checkpoint_lvl: expected 0 or 1; got {checkpoint_lvl}")
    _check_args(xz=xz, conv1d_weight=conv1d_weight, conv1d_bias=conv1d_bias,
                x_proj_weight=x_proj_weight, delta_proj_weight=delta_proj_weight,
                out_proj_weight=out_proj_weight, out_proj_bias=out_proj_bias, A=A, B=B, C=C, D=D,
                delta_bias=delta_bias, B_proj_bias=B_proj_bias, C_proj_bias=C_proj_bias,
                b_rms_weight=b_rms_weight, c_rms_weight=c_rms_weight,
                dt_rms_weight=dt_rms_weight)  # fmt: skip
    if torch.is_autocast_enabled():
        dt = torch.get_autocast_gpu_dtype() if xz.is_cuda else torch.get_autocast_cpu_dtype()
        x_proj_weight, delta_proj_weight, out_proj_weight = (
            w.to(dt) for w in (x_proj_weight, delta_proj_weight, out_proj_weight)
        )
        out_proj_bias = out_proj_bias.to(dt) if out_proj_bias is not None else None
    if seq_idx is not None:
        seq_idx = _prepare_seq(seq_idx, xz)
    if (
        not A.is_complex()  # complex A: the composition over the complex scan
        and b_rms_weight is None
        and c_rms_weight is None
        and dt_rms_weight is None
        and kernel_ok(xz, conv1d_weight.view(conv1d_weight.shape[0], -1))
    ):
        return MambaInnerFn.apply(xz, conv1d_weight, conv1d_bias, x_proj_weight,
                                  delta_proj_weight, out_proj_weight, out_proj_bias, A, B, C, D,
                                  delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
                                  checkpoint_lvl, seq_idx)  # fmt: skip
    return mamba_inner_composition(
        causal_conv1d_fn, selective_scan_fn, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
        out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
        b_rms_weight, c_rms_weight, dt_rms_weight, b_c_dt_rms_eps, seq_idx=seq_idx,
    )  # fmt: skip
