"""Complex A (S4D-Lin style state spaces) on the real scan kernels.

mamba_ssm's semantics (``selective_scan_ref`` with a complex A): A complex (dim, dstate); a
fixed B / C complex (dim, dstate), a variable one real (batch, [ngroups,] dstate, 2 seqlen) with
(real, imag) interleaved along the length; ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``,
``y_t = 2 Re(C_t . h_t)``; the last state is complex.

How it runs: with ``A = a + i w`` the decay of step t is ``r_t e^{i theta_t}``, ``r_t =
exp(delta_t a)`` (real) and ``theta_t = delta_t w``. Rotating the state by the accumulated phase,
``g_t = h_t e^{-i Phi_t}`` with ``Phi_t = w sum_{s<=t} delta_s``, leaves a recurrence with the
real decay only: ``g_t = r_t g_{t-1} + delta_t (B_t e^{-i Phi_t}) u_t``. Its real and imaginary
parts are 2 dstate real states with the same decay, which is one call of the real selective
scan per channel group: A' = [a, a], B' = [Re, Im] of B e^{-i Phi}, C' = [2 Re, -2 Im] of
C e^{i Phi} (per channel: ngroups = dim), and ``y = C' . g`` exactly. The phase is accumulated in
float64 and restarts at every frame (16 steps on CUDA, 256 on the CPU): the state entering a
frame is the true complex state, carried from one real-scan call to the next through
``initial_state``. Autograd carries the gradients of A, B, C and delta through the rotation;
the gradient of delta through the phase is a sum over the frame's steps of terms that mostly
cancel, so in float32 the frame length bounds its error. The real scan runs in float64 on the
CPU and float32 on CUDA, whatever u's dtype. Measured on the H200, 3000 steps, S4D-Lin's
imaginary parts pi n (n < 4): every quantity within the parity rule but the gradient of
delta_bias (the sum of delta's over 3000 steps): 1.6x its tolerance (26x the float32
reference's error) with 16-step frames, 1.7x with 32-step ones; on the CPU (float64 scan) it is
within the rule. Without frames that gradient's error at 2048 steps was 27x the float32
reference's on the CPU in float32. Cost: B' and C' are (batch,
dim, 2 dstate, seqlen) tensors, so memory grows with dim x dstate x seqlen (as in mamba_ssm's
reference), the scan runs one channel per group and one call per frame: this mode is for
correctness and compatibility, not speed; real A keeps the fused kernels.
"""

from __future__ import annotations

import torch

from .._boundary import require_float
from .._native import DTypeError, ShapeError

# Steps per phase frame (see the module docstring): short where the real scan runs in float32
# (CUDA), long where it runs in float64 (the CPU), where the cancellation costs nothing.
_FRAME_F32 = 16
_FRAME_F64 = 256


def _as_complex_variable(X, name, L, batch):
    """A variable B / C for complex A: real (batch, [ngroups,] dstate, 2 L) interleaved, or
    complex (batch, [ngroups,] dstate, L). Returns complex (batch, ngroups, dstate, L)."""
    if X.is_complex():
        Xc = X
    else:
        if X.shape[-1] != 2 * L:
            raise ShapeError(
                f"{name}: with complex A a variable {name} is real with (real, imag) interleaved "
                f"along the length: last dimension 2 x seqlen = {2 * L}; got {tuple(X.shape)}"
            )
        Xc = torch.view_as_complex(X.double().reshape(*X.shape[:-1], L, 2).contiguous())
    if Xc.dim() == 3:
        Xc = Xc.unsqueeze(1)
    if Xc.dim() != 4 or Xc.shape[0] != batch or Xc.shape[-1] != L:
        raise ShapeError(
            f"{name}: expected (batch, [ngroups,] dstate, 2 seqlen) real or (batch, [ngroups,] "
            f"dstate, seqlen) complex; got {tuple(X.shape)}"
        )
    return Xc


def complex_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, return_last_state=False, initial_state=None):  # fmt: skip
    """The selective scan with a complex A (see the module docstring); called by
    ``selective_scan_fn`` when A is complex. Differentiable in every tensor argument."""
    from .selective_scan import dt_of, selective_scan_fn

    if u.dim() != 3 or delta.shape != u.shape:
        raise ShapeError(f"u, delta: must have shape (batch, dim, seqlen); got "
                         f"{tuple(u.shape)}, {tuple(delta.shape)}")  # fmt: skip
    batch, dim, L = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ShapeError(
            f"A: must have shape (dim, dstate) = ({dim}, dstate); got {tuple(A.shape)}"
        )
    N = A.shape[1]
    for name, t, shape in (("D", D, (dim,)), ("delta_bias", delta_bias, (dim,)),
                           ("z", z, (batch, dim, L))):  # fmt: skip
        if t is not None and tuple(t.shape) != shape:
            raise ShapeError(f"{name}: must have shape {shape}; got {tuple(t.shape)}")
    for name, t in (("u", u), ("delta", delta), ("z", z), ("D", D), ("delta_bias", delta_bias)):
        require_float(t, name)
    f64 = u.dtype == torch.float64
    # The real scan's precision: float64 on the CPU (its kernels have it; see the module
    # docstring), float32 on CUDA.
    wt = torch.float64 if f64 or not u.is_cuda else torch.float32
    ct = torch.complex128 if f64 else torch.complex64
    A = A.to(ct)
    dt = dt_of(delta, delta_bias, delta_softplus, wt)
    Bc = _complex_bc(B, "B", batch, dim, N, L)
    Cc = _complex_bc(C, "C", batch, dim, N, L)
    A2 = torch.cat([A.real, A.real], dim=1).to(wt)
    h = None
    if initial_state is not None:
        if initial_state.shape != (batch, dim, N):
            raise ShapeError(f"initial_state: must have shape (batch, dim, dstate) = "
                             f"({batch}, {dim}, {N}); got {tuple(initial_state.shape)}")  # fmt: skip
        h = initial_state.to(torch.complex128)
    Dw = D.to(wt) if D is not None else None
    zw = z.to(wt) if z is not None else None
    uw = u.to(wt)
    outs = []
    # Frames of at most `frame` steps: the phase restarts from 0 at each frame's start (the
    # state entering a frame is the true complex state), which bounds the float32 error of the
    # phase's gradient, a sum over the frame's steps of terms that mostly cancel.
    frame = _FRAME_F64 if wt == torch.float64 else _FRAME_F32
    for t0 in range(0, max(L, 1), frame):
        t1 = min(L, t0 + frame)
        sl = slice(t0, t1)
        dts = dt[..., sl]
        phi = torch.cumsum(dts.double(), dim=-1)[:, :, None, :] * A.imag.double()[None, :, :, None]
        E = torch.polar(torch.ones_like(phi), phi)  # e^{i Phi}, complex128
        Bp = Bc(sl) * E.conj()
        Cp = 2 * Cc(sl) * E
        # The real scan's parameters: 2 N states per channel (one group per channel).
        B2 = torch.cat([Bp.real, Bp.imag], dim=2).to(wt)
        C2 = torch.cat([Cp.real, -Cp.imag], dim=2).to(wt)
        h0 = None if h is None else torch.cat([h.real, h.imag], dim=2).to(wt)
        last_frame = t1 >= L
        keep = return_last_state or not last_frame
        res = selective_scan_fn(uw[..., sl], dts, A2, B2, C2, Dw,
                                zw[..., sl] if zw is not None else None, None, False, keep,
                                initial_state=h0)  # fmt: skip
        if keep:
            o, g = res
            h = torch.complex(g[:, :, :N].double(), g[:, :, N:].double())
            if t1 > t0:
                h = h * E[..., -1]
        else:
            o = res
        outs.append(o)
    out = (torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]).to(u.dtype)
    if not return_last_state:
        return out
    return out, h.to(ct)


def _complex_bc(X, name, batch, dim, N, L):
    """B or C as a function of a step slice giving complex128 (batch or 1, dim, N, steps)."""
    if X.dim() == 2:  # fixed, complex (dim, dstate)
        if X.shape != (dim, N):
            raise ShapeError(f"{name}: fixed {name} must have shape (dim, dstate) = ({dim}, {N}); "
                             f"got {tuple(X.shape)}")  # fmt: skip
        Xc = X.to(torch.complex128)[None, :, :, None]
        return lambda sl: Xc
    Xc = _as_complex_variable(X, name, L, batch)
    if dim % Xc.shape[1] != 0 or Xc.shape[2] != N:
        raise ShapeError(f"{name}: ngroups must divide dim and dstate match A's {N}; got "
                         f"{tuple(X.shape)}")  # fmt: skip
    rep = dim // Xc.shape[1]
    return lambda sl: Xc[..., sl].to(torch.complex128).repeat_interleave(rep, dim=1)


def check_complex_args(A, B, C):
    """Complex B / C need a complex A (mamba_ssm's rule): the clear error for the mix."""
    if not A.is_complex() and (B.is_complex() or C.is_complex()):
        raise DTypeError("B, C: complex B or C needs a complex A (mamba_ssm's complex mode)")
