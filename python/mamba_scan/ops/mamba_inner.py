"""mamba_inner_fn: mamba_ssm's fused Mamba-1 mixer (conv1d + silu, x_proj, dt_proj, selective
scan with z gating, out_proj) with its signature and semantics.

For now it is a composition: the causal convolution and the projections run in PyTorch and
the scan in mamba-scan's fused kernel; autograd flows through all of it. ``checkpoint_lvl`` is
accepted for compatibility; the composition keeps the conv output and delta for the backward
(checkpoint_lvl=0's memory behaviour) until the fused autograd Function lands."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv1d import causal_conv1d_fn
from .selective_scan import selective_scan_fn


def _rms_norm(x, weight, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                   out_proj_weight, out_proj_bias, A, B=None, C=None, D=None, delta_bias=None,
                   B_proj_bias=None, C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1,
                   b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                   b_c_dt_rms_eps=1e-6):  # fmt: skip
    """xz: (batch, 2 d_inner, seqlen); conv1d_weight: (d_inner, 1, width); x_proj_weight:
    (dt_rank + 2 d_state, d_inner); delta_proj_weight: (d_inner, dt_rank); out_proj_weight:
    (d_model, d_inner); A: (d_inner, d_state); B / C None for input-dependent B / C (from
    x_proj), else fixed. Returns (batch, seqlen, d_model)."""
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"checkpoint_lvl: expected 0 or 1; got {checkpoint_lvl}")
    if A.is_complex():
        raise NotImplementedError("mamba_scan: complex A is not supported yet")
    if torch.is_autocast_enabled():
        dt = torch.get_autocast_gpu_dtype() if xz.is_cuda else torch.get_autocast_cpu_dtype()
        x_proj_weight, delta_proj_weight, out_proj_weight = (
            w.to(dt) for w in (x_proj_weight, delta_proj_weight, out_proj_weight)
        )
        out_proj_bias = out_proj_bias.to(dt) if out_proj_bias is not None else None
    L = xz.shape[-1]
    d_state = A.shape[-1]
    dt_rank = delta_proj_weight.shape[1]
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d_fn(x, conv1d_weight.squeeze(1), conv1d_bias, activation="silu")
    x_dbl = F.linear(x.transpose(1, 2).reshape(-1, x.shape[1]), x_proj_weight)  # (b l, r + 2n)
    delta = (delta_proj_weight @ x_dbl[:, :dt_rank].t()).view(-1, xz.shape[0], L).transpose(0, 1)
    if dt_rms_weight is not None:
        delta = _rms_norm(delta.transpose(1, 2), dt_rms_weight, b_c_dt_rms_eps).transpose(1, 2)
    if B is None:
        B = x_dbl[:, dt_rank : dt_rank + d_state]
        if B_proj_bias is not None:
            B = B + B_proj_bias.to(B.dtype)
        if b_rms_weight is not None:
            B = _rms_norm(B, b_rms_weight, b_c_dt_rms_eps)
        B = B.view(xz.shape[0], L, d_state).transpose(1, 2).contiguous()
    if C is None:
        C = x_dbl[:, -d_state:]
        if C_proj_bias is not None:
            C = C + C_proj_bias.to(C.dtype)
        if c_rms_weight is not None:
            C = _rms_norm(C, c_rms_weight, b_c_dt_rms_eps)
        C = C.view(xz.shape[0], L, d_state).transpose(1, 2).contiguous()
    y = selective_scan_fn(x, delta.contiguous(), A, B, C, D, z=z, delta_bias=delta_bias,
                          delta_softplus=delta_softplus)  # fmt: skip
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)
