"""Pure-PyTorch references: the oracle of the tests and the documentation of the semantics.

Shapes follow mamba_ssm: ``u, delta, z: (batch, dim, seqlen)``; ``A: (dim, dstate)``;
``B, C``: fixed ``(dim, dstate)``, variable ``(batch, dstate, seqlen)`` or grouped
``(batch, ngroups, dstate, seqlen)`` (channel ``d`` uses group ``d // (dim // ngroups)``);
``D, delta_bias: (dim,)``; ``initial_state, last_state: (batch, dim, dstate)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_groups(X: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, ngroups, dstate, L) -> (batch, dim, dstate, L); (batch, dstate, L) -> same."""
    if X.dim() == 4:
        return X.repeat_interleave(dim // X.shape[1], dim=1)
    return X


def selective_scan_ref(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    initial_state=None,
    seq_idx=None,
    num_seqs=None,
):
    """Reference selective scan, step by step.

    ``delta += delta_bias``; ``delta = softplus(delta)`` if ``delta_softplus``;
    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t`` (``h_{-1} = initial_state`` or 0);
    ``y_t = C_t . h_t``; ``out = y + D u``; ``out *= silu(z)`` if ``z`` is given.
    Computes in float32 (float64 when ``u`` is float64); returns ``out`` in ``u``'s dtype, and
    ``last_state`` (float32/float64) when ``return_last_state``.

    Packed sequences (``seq_idx`` (batch, seqlen)): where seq_idx changes along a row (and at
    step 0) the state restarts from ``initial_state[seq_idx]`` (num_seqs, dim, dstate) or 0;
    negative values are padding (no state read or written). ``last_state`` is then
    (num_seqs, dim, dstate): each sequence's state after its last step, 0 for absent numbers.
    """
    dtype_in = u.dtype
    ct = torch.float64 if dtype_in == torch.float64 else torch.float32
    cplx = A.is_complex()
    if cplx and seq_idx is not None:
        raise NotImplementedError("seq_idx: packed sequences with a complex A are not supported")
    # Complex A (mamba_ssm's complex mode): a variable B / C is real with (real, imag)
    # interleaved along the length; the state is complex and y = 2 Re(C . h).
    st = (torch.complex128 if ct == torch.float64 else torch.complex64) if cplx else ct
    u = u.to(ct)
    delta = delta.to(ct)
    A = A.to(st)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(ct)
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    dstate = A.shape[1]
    var_b, var_c = B.dim() >= 3, C.dim() >= 3

    def states_of(X, var):
        if cplx and var and not X.is_complex():
            X = torch.view_as_complex(X.to(ct).reshape(*X.shape[:-1], L, 2).contiguous())
        return _expand_groups(X.to(st), dim)

    B = states_of(B, var_b)
    C = states_of(C, var_c)
    finals = {}
    if seq_idx is not None:
        seq = seq_idx.tolist()
        if num_seqs is None:
            num_seqs = initial_state.shape[0] if initial_state is not None else (
                max([v for row in seq for v in row], default=-1) + 1)  # fmt: skip
        h0 = initial_state.to(ct) if initial_state is not None else None
    if initial_state is not None and seq_idx is None:
        x = initial_state.to(st)
    else:
        x = u.new_zeros((batch, dim, dstate), dtype=st)
    ys = []
    for i in range(L):
        if seq_idx is not None:
            rows = []
            for b in range(batch):
                v = seq[b][i]
                if i > 0 and seq[b][i - 1] == v:
                    rows.append(x[b])
                    continue
                if i > 0 and 0 <= seq[b][i - 1] < num_seqs:
                    finals[seq[b][i - 1]] = x[b]
                ok = h0 is not None and 0 <= v < num_seqs
                rows.append(h0[v] if ok else x.new_zeros((dim, dstate)))
            x = torch.stack(rows)
        dA = torch.exp(delta[:, :, i, None] * A)
        if not var_b:
            bi = B
        elif B.dim() == 3:
            bi = B[:, None, :, i]
        else:
            bi = B[:, :, :, i]
        x = dA * x + (delta[:, :, i] * u[:, :, i])[..., None] * bi
        if not var_c:
            ci = C
        elif C.dim() == 3:
            ci = C[:, None, :, i]
        else:
            ci = C[:, :, :, i]
        ys.append((x * ci).sum(-1))
    y = torch.stack(ys, dim=2) if ys else u.new_zeros((batch, dim, 0), dtype=st)
    if cplx:
        y = y.real * 2
    out = y if D is None else y + u * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(dtype_in)
    if seq_idx is not None:
        for b in range(batch):
            if L and 0 <= seq[b][L - 1] < num_seqs:
                finals[seq[b][L - 1]] = x[b]
        zero = x.new_zeros((dim, dstate))
        x = torch.stack([finals.get(s_, zero) for s_ in range(num_seqs)]) if num_seqs else (
            x.new_zeros((0, dim, dstate)))  # fmt: skip
    return (out, x) if return_last_state else out


def selective_scan_slow_path(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False
):
    """The transformers-style slow path (MambaMixer.slow_forward): materialise exp(A dt) and
    dt B u as (batch, dim, seqlen, dstate) tensors, then loop over seqlen. Used by the benchmarks
    as the baseline that CPU users have today. Variable (batch, dstate, seqlen) B/C only."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    discrete_A = torch.exp(A[None, :, None, :].float() * delta[:, :, :, None])
    deltaB_u = delta[:, :, :, None] * B[:, None, :, :].float().transpose(-1, -2) * u[:, :, :, None]
    x = torch.zeros(u.shape[0], u.shape[1], A.shape[1], device=u.device, dtype=torch.float32)
    ys = []
    for i in range(u.shape[2]):
        x = discrete_A[:, :, i, :] * x + deltaB_u[:, :, i, :]
        ys.append(torch.matmul(x, C[:, :, i, None].float()))
    y = torch.stack(ys, dim=-1)[:, :, 0, :]
    y = y + u * D[None, :, None] if D is not None else y
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


def _heads(state, x, dt, A, B, C, D, z, dt_bias):
    """mamba_ssm's normalisation: add the heads axis where the caller has none."""
    has_heads = state.dim() > 3
    state = state if state.dim() > 3 else state.unsqueeze(1)
    x = x if x.dim() > 2 else x.unsqueeze(1)
    dt = dt if dt.dim() > 2 else dt.unsqueeze(1)
    A = A if A.dim() > 2 else A.unsqueeze(0)
    B = B if B.dim() > 2 else B.unsqueeze(1)
    C = C if C.dim() > 2 else C.unsqueeze(1)
    D = D.unsqueeze(0) if D is not None and D.dim() == 1 else D
    z = z.unsqueeze(1) if z is not None and z.dim() == 2 else z
    dt_bias = dt_bias.unsqueeze(0) if dt_bias is not None and dt_bias.dim() == 1 else dt_bias
    return has_heads, state, x, dt, A, B, C, D, z, dt_bias


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                               dt_softplus=False, state_batch_indices=None):  # fmt: skip
    """One decoding step of the scan with mamba_ssm 2.3.2's ``selective_state_update``
    semantics; updates ``state`` in place and returns ``out``.

    Shapes: state (batch, dim, dstate) or (batch, nheads, dim, dstate); x, dt, z (batch, dim) or
    (batch, nheads, dim); A (dim, dstate) or (nheads, dim, dstate); B, C (batch, dstate) or
    (batch, ngroups, dstate); D, dt_bias (dim,) or (nheads, dim); state_batch_indices (batch,)
    ints: the state row of each batch entry (a negative entry marks padding: state untouched,
    out 0). Arithmetic in float32 (float64 when state or x is float64); ``out`` is computed from
    the updated state before it is rounded to the state's dtype (as the Triton kernel does).
    """
    has_heads, st, x, dt, A, B, C, D, z, dt_bias = _heads(state, x, dt, A, B, C, D, z, dt_bias)
    wt = torch.float64 if torch.float64 in (st.dtype, x.dtype) else torch.float32
    nheads, ngroups = st.shape[1], B.shape[1]
    dt = dt.to(wt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(wt)
    if dt_softplus:
        dt = F.softplus(dt)
    idx = state_batch_indices
    if idx is None:
        rows = st
    else:
        valid = idx >= 0
        sel = idx.clamp(min=0).long()
        rows = st[sel]
    dA = torch.exp(dt.unsqueeze(-1) * A.to(wt))
    Bh = B.to(wt).repeat_interleave(nheads // ngroups, dim=1).unsqueeze(2)
    Ch = C.to(wt).repeat_interleave(nheads // ngroups, dim=1).unsqueeze(2)
    h = rows.to(wt) * dA + (dt * x.to(wt)).unsqueeze(-1) * Bh
    out = (h * Ch).sum(-1)
    if D is not None:
        out = out + x.to(wt) * D.to(wt)
    if z is not None:
        zf = z.to(wt)
        out = out * F.silu(zf)
    if idx is None:
        st.copy_(h.to(st.dtype))
    else:
        keep = valid.nonzero().squeeze(1)
        st[sel[keep]] = h[keep].to(st.dtype)
        out = torch.where(valid.view(-1, 1, 1), out, torch.zeros_like(out))
    out = out.to(x.dtype)
    return out if has_heads else out.squeeze(1)


def causal_conv1d_ref(x, weight, bias=None, seq_idx=None, initial_states=None,
                      return_final_states=False, final_states_out=None, activation=None):  # fmt: skip
    """Depthwise causal convolution with causal-conv1d 1.7's ``causal_conv1d_fn`` semantics.

    x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,); seq_idx: (batch, seqlen) ints
    (a tap reads x[t - k] only when seq_idx[t - k] == seq_idx[t]: packed sequences do not
    see each other; a negative index marks padding, whose output is 0); initial_states: (batch, dim, width - 1), the inputs before step 0;
    final_states_out: (batch, dim, width - 1), written with the last width - 1 inputs;
    activation: None, "silu" or "swish". Arithmetic in weight's dtype; out in x's dtype.
    """
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    dtype_in = x.dtype
    xw = x.to(weight.dtype)
    seqlen = x.shape[-1]
    dim, width = weight.shape
    if initial_states is not None:
        xp = torch.cat([initial_states.to(weight.dtype), xw], dim=-1)
    else:
        xp = F.pad(xw, (width - 1, 0))
    if seqlen == 0:
        out = xw.clone()
    elif seq_idx is None:
        out = F.conv1d(xp, weight.unsqueeze(1), bias, padding=0, groups=dim)
    else:
        out = (
            torch.zeros_like(xw)
            if bias is None
            else bias.view(1, -1, 1).to(xw.dtype).expand_as(xw).clone()
        )
        sp = F.pad(seq_idx, (width - 1, 0), value=-(2**31))
        for k in range(width):  # tap k reads x[t - (width - 1 - k)]
            same = (sp[:, k : k + seqlen] == seq_idx).unsqueeze(1)
            out = out + torch.where(same, xp[..., k : k + seqlen], 0) * weight[:, k].view(1, -1, 1)
    out = out[..., :seqlen]
    if return_final_states:
        final = xp[..., -(width - 1) :].to(dtype_in) if width > 1 else xp[..., :0].to(dtype_in)
        if final_states_out is not None:
            final_states_out.copy_(final)
        else:
            final_states_out = final
    out = out if activation is None else F.silu(out)
    if seq_idx is not None:
        out = torch.where((seq_idx < 0).unsqueeze(1), 0, out)  # padding: 0 out
    out = out.to(dtype_in)
    return (out, final_states_out) if return_final_states else out


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None,
                             cache_seqlens=None, conv_state_indices=None):  # fmt: skip
    """causal-conv1d 1.7's ``causal_conv1d_update``: x (batch, dim) or (batch, dim, seqlen) new
    inputs; conv_state (state_batch, dim, state_len >= width - 1) updated in place (the last
    state_len inputs; with ``cache_seqlens`` (batch,) a circular buffer written from
    cache_seqlens % state_len); ``conv_state_indices`` (batch,) picks the state rows (negative:
    padding, state untouched and out 0)."""
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError("activation must be None, silu, or swish")
    dtype_in = x.dtype
    unsqueeze = x.dim() == 2
    if unsqueeze:
        x = x.unsqueeze(-1)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    idx = conv_state_indices
    if idx is None:
        rows, valid = conv_state, None
    else:
        valid = idx >= 0
        sel = idx.clamp(min=0).long()
        rows = conv_state[sel]
    if cache_seqlens is None:
        x_new = torch.cat([rows.to(weight.dtype), x.to(weight.dtype)], dim=-1)
        new_rows = x_new[:, :, -state_len:].to(conv_state.dtype)
    else:
        cs = cache_seqlens.long().unsqueeze(1)
        wi = torch.remainder(
            torch.arange(-(width - 1), 0, device=x.device).unsqueeze(0) + cs, state_len
        )
        x_new = torch.cat(
            [
                rows.gather(2, wi.unsqueeze(1).expand(-1, dim, -1)).to(weight.dtype),
                x.to(weight.dtype),
            ],
            dim=-1,
        )
        # Only the last state_len inputs land (scatter_ with repeated indices is undefined on
        # CUDA): input t goes to (cache_seqlens + t) % state_len.
        keep = min(seqlen, state_len)
        t_kept = torch.arange(seqlen - keep, seqlen, device=x.device).unsqueeze(0)
        ci = torch.remainder(t_kept + cs, state_len)
        new_rows = rows.clone().scatter_(
            2, ci.unsqueeze(1).expand(-1, dim, -1), x[..., seqlen - keep :].to(conv_state.dtype)
        )
    out = F.conv1d(x_new, weight.unsqueeze(1), bias, padding=0, groups=dim)[:, :, -seqlen:]
    out = out if activation is None else F.silu(out)
    if idx is None:
        conv_state.copy_(new_rows)
    else:
        keep = valid.nonzero().squeeze(1)
        conv_state[sel[keep]] = new_rows[keep]
        out = torch.where(valid.view(-1, 1, 1), out, torch.zeros_like(out))
    out = out.to(dtype_in)
    return out.squeeze(-1) if unsqueeze else out


def _rms_norm(x, weight, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def mamba_inner_composition(conv_fn, scan_fn, xz, conv1d_weight, conv1d_bias, x_proj_weight,
                            delta_proj_weight, out_proj_weight, out_proj_bias, A, B=None, C=None,
                            D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                            delta_softplus=True, b_rms_weight=None, c_rms_weight=None,
                            dt_rms_weight=None, b_c_dt_rms_eps=1e-6, seq_idx=None):  # fmt: skip
    """mamba_ssm's Mamba-1 mixer (``mamba_inner_fn``) written out: conv1d + silu, x_proj,
    dt_proj (optional RMS norms of dt, B, C), the selective scan gated by z, out_proj. ``conv_fn``
    and ``scan_fn`` have the signatures of ``causal_conv1d_ref`` and ``selective_scan_ref``;
    autograd flows through all of it. xz: (batch, 2 d_inner, seqlen); returns (batch, seqlen,
    d_model). ``seq_idx`` (packed sequences) goes to both the conv and the scan."""
    L = xz.shape[-1]
    sq = {} if seq_idx is None else {"seq_idx": seq_idx}
    # Complex A: x_proj gives 2 d_state columns each for B and C, (real, imag) pairs, which
    # become (batch, d_state, 2 L) interleaved along the length (mamba_ssm's layout).
    n_cols = A.shape[-1] * (2 if A.is_complex() else 1)
    dt_rank = delta_proj_weight.shape[1]
    x, z = xz.chunk(2, dim=1)
    x = conv_fn(x, conv1d_weight.squeeze(1), conv1d_bias, activation="silu", **sq)
    x_dbl = F.linear(x.transpose(1, 2).reshape(-1, x.shape[1]), x_proj_weight)  # (b l, r + 2n)
    delta = (delta_proj_weight @ x_dbl[:, :dt_rank].t()).view(
        delta_proj_weight.shape[0], xz.shape[0], L
    )
    delta = delta.transpose(0, 1)
    if dt_rms_weight is not None:
        delta = _rms_norm(delta.transpose(1, 2), dt_rms_weight, b_c_dt_rms_eps).transpose(1, 2)

    def per_step(X):  # (b l, n_cols) -> (batch, d_state, L) or, complex, (batch, d_state, 2 L)
        X = X.view(xz.shape[0], L, A.shape[-1], n_cols // A.shape[-1])
        return X.permute(0, 2, 1, 3).reshape(xz.shape[0], A.shape[-1], X.shape[1] * X.shape[3])

    if B is None:
        B = x_dbl[:, dt_rank : dt_rank + n_cols]
        if B_proj_bias is not None:
            B = B + B_proj_bias.to(B.dtype)
        if b_rms_weight is not None:
            B = _rms_norm(B, b_rms_weight, b_c_dt_rms_eps)
        B = per_step(B)
    if C is None:
        C = x_dbl[:, -n_cols:]
        if C_proj_bias is not None:
            C = C + C_proj_bias.to(C.dtype)
        if c_rms_weight is not None:
            C = _rms_norm(C, c_rms_weight, b_c_dt_rms_eps)
        C = per_step(C)
    y = scan_fn(x, delta.contiguous(), A, B, C, D, z=z, delta_bias=delta_bias,
                delta_softplus=delta_softplus, **sq)  # fmt: skip
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                    out_proj_weight, out_proj_bias, A, B=None, C=None, D=None, delta_bias=None,
                    B_proj_bias=None, C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1,
                    b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                    b_c_dt_rms_eps=1e-6, *, seq_idx=None):  # fmt: skip
    """``mamba_inner_fn`` in pure PyTorch (``causal_conv1d_ref`` and ``selective_scan_ref``);
    ``checkpoint_lvl`` only changes memory, not values, and is ignored here."""
    return mamba_inner_composition(
        causal_conv1d_ref, selective_scan_ref, xz, conv1d_weight, conv1d_bias, x_proj_weight,
        delta_proj_weight, out_proj_weight, out_proj_bias, A, B, C, D, delta_bias, B_proj_bias,
        C_proj_bias, delta_softplus, b_rms_weight, c_rms_weight, dt_rms_weight, b_c_dt_rms_eps,
        seq_idx=seq_idx,
    )  # fmt: skip
