"""selective_scan_fn: mamba_ssm's API on mamba-scan's kernels (CPU and CUDA)."""

from __future__ import annotations

import torch

from .. import _native
from .._boundary import (
    capsule,
    check_devices,
    chunk_size_for,
    last_contiguous,
    new_empty,
    new_like,
    require_tensor,
    stream_of,
    weight_dtype,
)
from .._native import DeviceError, DTypeError, ShapeError
from .._ops import tracing
from .complex_scan import check_complex_args, complex_selective_scan

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _check_types(args):
    """The slow path of the argument checks: names the first bad argument."""
    for name, x in zip(_NAMES, args):
        require_tensor(x, name, optional=name in ("D", "z", "delta_bias", "initial_state"))
    for name, x in zip(_NAMES, args):
        if x is not None and x.device.type not in ("cpu", "cuda"):
            raise DeviceError(f"{name}: tensors must be on a CPU or CUDA device; got {x.device}")


def _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state):
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    # Fast path first (per-call host time matters when decoding): every argument a CPU or CUDA
    # tensor (optional ones may be None) and no scalar; otherwise the detailed checks raise.
    Tensor = torch.Tensor
    ok = True
    for i, x in enumerate(args):
        if x is None:
            if i < 5:
                ok = False
                break
        elif type(x) is not Tensor and not isinstance(x, Tensor):
            ok = False
            break
        elif not (x.is_cuda or x.is_cpu) or x.dim() == 0:
            ok = False
            break
    if not ok:
        _check_types(args)
    if A.is_complex() or B.is_complex() or C.is_complex():
        # selective_scan_fn takes complex A before it gets here (ops/complex_scan.py).
        check_complex_args(A, B, C)
        raise NotImplementedError("A: a complex A goes through selective_scan_fn")
    if u.dtype not in _FLOAT_DTYPES:
        raise DTypeError(f"u: expected float32, float16, bfloat16 or float64; got {u.dtype}")
    if u.dim() != 3:
        raise ShapeError(f"u: must have shape (batch, dim, seqlen); got {tuple(u.shape)}")
    if A.dim() != 2:
        raise ShapeError(f"A: must have shape (dim, dstate); got {tuple(A.shape)}")
    u, delta, B, C, z = (last_contiguous(x) for x in (u, delta, B, C, z))
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    initial_state = initial_state.contiguous() if initial_state is not None else None
    return u, delta, A, B, C, D, z, delta_bias, initial_state


def _forward_outputs(u, A, chunk=None):
    """The forward's outputs, allocated: (out like ``u``, one fp32 state per chunk)."""
    batch, dim, seqlen = u.shape
    if chunk is None:
        chunk = chunk_size_for(u, A.shape[1])
    n_chunks = (seqlen + chunk - 1) // chunk
    # A symbolic seqlen (torch.compile with dynamic shapes) takes sym_max; ints the builtin.
    n_chunks = max(1, n_chunks) if type(n_chunks) is int else torch.sym_max(1, n_chunks)
    out = new_like(u)
    states = new_empty((batch, dim, n_chunks, A.shape[1]), weight_dtype(u), u.device)
    return out, states


def _prepare_seq(seq_idx, u):
    """seq_idx as the kernels take it: an int32 (batch, seqlen) tensor on u's device, contiguous
    along seqlen."""
    if seq_idx is None:
        return None
    if not isinstance(seq_idx, torch.Tensor):
        raise DTypeError(f"seq_idx: expected an int32 tensor; got {type(seq_idx).__name__}")
    if seq_idx.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise DTypeError(f"seq_idx: expected an integer tensor (int32); got {seq_idx.dtype}")
    if seq_idx.device != u.device:
        raise DeviceError(f"seq_idx: is on {seq_idx.device} but u is on {u.device}")
    if seq_idx.dim() != 2:
        raise ShapeError(
            f"seq_idx: must have shape (batch, seqlen) = {(u.shape[0], u.shape[2])}; "
            f"got {tuple(seq_idx.shape)}"
        )
    if seq_idx.dtype != torch.int32:
        seq_idx = seq_idx.to(torch.int32)
    return last_contiguous(seq_idx)


def _num_seqs(seq_idx, initial_state, return_last_state, num_seqs):
    """Rows of the per-sequence states: initial_state's rows, else ``num_seqs``, else (only when
    final states are asked for) seq_idx.max() + 1, which reads seq_idx back to the host. -1 when
    no per-sequence state is involved."""
    if seq_idx is None:
        return -1
    if initial_state is not None:
        if num_seqs is not None and num_seqs != initial_state.shape[0]:
            raise ShapeError(
                f"num_seqs: {num_seqs} differs from initial_state's {initial_state.shape[0]} rows"
            )
        return initial_state.shape[0]
    if num_seqs is not None:
        if num_seqs < 0:
            raise ShapeError(f"num_seqs: must be non-negative; got {num_seqs}")
        return int(num_seqs)
    if return_last_state:
        return int(seq_idx.max().item()) + 1 if seq_idx.numel() else 0
    return -1


def _forward_impl(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                  seq_idx=None, num_seqs=-1, return_final=False):  # fmt: skip
    """The kernel's forward over prepared arguments: (out, states, final_states or None). With
    ``seq_idx`` and ``return_final``, final_states is (num_seqs, dim, dstate): the state after
    each sequence's last step (zero for numbers that do not occur)."""
    chunk = chunk_size_for(u, A.shape[1])
    out, states = _forward_outputs(u, A, chunk)
    final = None
    if seq_idx is not None and return_final:
        final = torch.zeros((max(num_seqs, 0), u.shape[1], A.shape[1]), dtype=states.dtype,
                            device=u.device)  # fmt: skip
    _native.scan_fwd(
        capsule(u), capsule(delta), capsule(A), capsule(B), capsule(C), capsule(D),
        capsule(z), capsule(delta_bias), capsule(initial_state), capsule(out),
        capsule(states), bool(delta_softplus), chunk, stream_of(u),
        seq_idx=capsule(seq_idx), num_seqs=num_seqs, final_states=capsule(final),
    )  # fmt: skip
    return out, states, final


def _last_state(states, final, return_last_state):
    """What return_last_state returns: the per-sequence final states with seq_idx, else the last
    chunk's state."""
    if not return_last_state:
        return None
    return final if final is not None else states[:, :, -1].clone()


def _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, seq_idx=None):
    """:func:`_forward_impl` (no per-sequence states), through the custom op when traced
    (torch.compile, export): (out, states)."""
    if tracing():
        out, states, _ = torch.ops.mamba_scan.selective_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), False,
            seq_idx, -1,
        )  # fmt: skip
        return out, states
    out, states, _ = _forward_impl(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                   delta_softplus, seq_idx)  # fmt: skip
    return out, states


def _ngroups(X: torch.Tensor) -> int:
    """0 for a fixed (dim, dstate) B/C, else its number of groups."""
    return 0 if X.dim() == 2 else (1 if X.dim() == 3 else X.shape[1])


def _workspace(u, A, B, C, z):
    if u.device.type != "cuda":
        return None
    batch, dim, seqlen = u.shape
    n = _native.cuda_bwd_workspace_size(batch, dim, A.shape[1], seqlen, _ngroups(B), _ngroups(C),
                                        str(u.dtype).removeprefix("torch."), z is not None)  # fmt: skip
    return torch.empty(max(n, 1), dtype=torch.float32, device=u.device)


class SelectiveScanFn(torch.autograd.Function):
    """Autograd Function over the fused kernels. Saves only the inputs and one state per chunk;
    the backward recomputes the rest."""

    @staticmethod
    def forward(
        ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
        initial_state, seq_idx=None, num_seqs=-1,
    ):  # fmt: skip
        u, delta, A, B, C, D, z, delta_bias, initial_state = _prepare(
            u, delta, A, B, C, D, z, delta_bias, initial_state
        )
        out, states, final = _forward_impl(
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, seq_idx,
            num_seqs, return_last_state,
        )  # fmt: skip
        ctx.delta_softplus = bool(delta_softplus)
        ctx.num_seqs = num_seqs
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, states, seq_idx)
        last_state = _last_state(states, final, return_last_state)
        if last_state is None:
            return out
        return out, last_state

    @staticmethod
    def backward(ctx, dout, *rest):
        u, delta, A, B, C, D, z, delta_bias, initial_state, states, seq_idx = ctx.saved_tensors
        dlast = rest[0] if rest else None
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0 = _backward_impl(
            u, delta, A, B, C, D, z, delta_bias, initial_state, states, dout, dlast,
            ctx.delta_softplus, seq_idx=seq_idx, num_seqs=ctx.num_seqs,
        )  # fmt: skip
        return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, None, None, dh0, None, None


def _backward_outputs(u, delta, A, B, C, D, z, delta_bias, initial_state, du=None, dz=None):
    """The backward's gradients, allocated (None for absent inputs); a given ``du`` / ``dz``
    (a view into a larger gradient) is used as is."""
    du = new_like(u) if du is None else du
    ddelta, dA, dB, dC = (new_like(x) for x in (delta, A, B, C))
    dD, ddelta_bias, dh0 = (
        new_like(x) if x is not None else None for x in (D, delta_bias, initial_state)
    )
    if z is None:
        dz = None
    elif dz is None:
        dz = new_like(z)
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0


def _starts_off_grid(seq_idx, chunk):
    """Whether some run of seq_idx (a sequence or padding) starts off a multiple of ``chunk``
    (host read)."""
    L = seq_idx.shape[1]
    if L < 2:
        return False
    starts = seq_idx[:, 1:] != seq_idx[:, :-1]
    pos = torch.arange(1, L, device=seq_idx.device)
    return bool((starts & (pos % chunk != 0)).any())


def dt_of(delta, delta_bias, delta_softplus, wt):
    """dt = softplus(delta + delta_bias) (or without softplus) in ``wt``, differentiable: the
    kernels' discretisation, for the paths that compute dt outside them."""
    dt = delta.to(wt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(wt)[:, None]
    return torch.nn.functional.softplus(dt) if delta_softplus else dt


def _check_cuda_state_starts(seq_idx, chunk):
    """The CUDA backward takes per-sequence states (initial_state, gradients of the final
    states) only where sequences start at multiples of its tile length: it restarts a sequence
    inside a tile from 0 with no branch in its scans. Reads seq_idx back to the host."""
    if _starts_off_grid(seq_idx, chunk):
        raise NotImplementedError(
            f"seq_idx: on CUDA, gradients with per-sequence states (initial_state, or the final "
            f"states used in the loss) need every sequence (and padding run) to start at a "
            f"multiple of {chunk} steps; pad the packed sequences to that alignment, or run "
            f"without per-sequence states (the CPU takes any layout)"
        )


def _realign_layout(seq_idx, chunk):
    """A layout where every run of equal seq_idx values (a sequence, or padding) starts at a
    multiple of ``chunk``: each run keeps its row and order, shifted right to the next multiple;
    the steps of a gap belong to the run before it (run with dt = 0 by the caller, they leave
    its state as it is), so no run starts inside a tile. Returns (src, dst, new_seq, new_len):
    ``src`` (batch x new_len) the flat position b L + t each new step takes its inputs from
    (batch L: a gap, zeros), ``dst`` (batch x L) the flat new position of each original step,
    ``new_seq`` the new seq_idx. Reads seq_idx on the host."""
    seq = seq_idx.cpu()
    batch, L = seq.shape
    rows = []
    for b in range(batch):
        r = seq[b]
        cut = (torch.nonzero(r[1:] != r[:-1]).flatten() + 1).tolist()
        bounds = [0] + cut + [L]
        off, spans = 0, []
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            off = -(-off // chunk) * chunk
            spans.append((s0, s1, off))
            off += s1 - s0
        rows.append((spans, off))
    new_len = max([off for _, off in rows] + [1])
    src = torch.full((batch, new_len), batch * L, dtype=torch.long)
    new_seq = torch.full((batch, new_len), -1, dtype=torch.int32)
    dst = torch.empty((batch, L), dtype=torch.long)
    for b, (spans, _) in enumerate(rows):
        for k, (s0, s1, off) in enumerate(spans):
            n = s1 - s0
            nxt = spans[k + 1][2] if k + 1 < len(spans) else new_len
            src[b, off : off + n] = b * L + torch.arange(s0, s1)
            new_seq[b, off:nxt] = seq[b, s0]  # the run and the gap after it
            dst[b, s0:s1] = b * new_len + torch.arange(off, off + n)
    dev = seq_idx.device
    return src.to(dev).flatten(), dst.to(dev).flatten(), new_seq.to(dev), new_len


def _scan_realigned(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                    initial_state, seq_idx, num_seqs, chunk):  # fmt: skip
    """selective_scan_fn over a copy of the inputs where every sequence starts at a multiple of
    ``chunk`` (the CUDA backward's condition for per-sequence states), the outputs gathered back
    to their places: differentiable (the gathers' gradients scatter back). Padding steps get
    zero inputs and no output gradient, so they add nothing to any gradient."""
    batch, _, L = u.shape
    src, dst, new_seq, new_len = _realign_layout(seq_idx, chunk)
    # dt computed here (float32, as the kernels do), so that a gap's dt is exactly 0; the scan
    # below runs in float32 and its output is cast back to u's dtype.
    wt = torch.float64 if u.dtype == torch.float64 else torch.float32
    dt = dt_of(delta, delta_bias, delta_softplus, wt)
    cast = lambda x: x.to(wt) if x is not None and x.dim() >= 3 else x  # noqa: E731

    def along_steps(x):  # (batch, ..., L) -> (batch, ..., new_len)
        if x is None or x.dim() < 3:
            return x
        rest = x.shape[1:-1]
        flat = x.movedim(-1, 1).reshape(batch * L, rest.numel())
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
        return flat[src].view(batch, new_len, *rest).movedim(1, -1)

    res = _scan_core(
        along_steps(u.to(wt)), along_steps(dt), A, along_steps(cast(B)), along_steps(cast(C)), D,
        along_steps(cast(z)), None, False, return_last_state, initial_state, new_seq, num_seqs,
    )  # fmt: skip
    out, last = res if return_last_state else (res, None)
    dim = out.shape[1]
    out = out.movedim(-1, 1).reshape(batch * new_len, dim)[dst].view(batch, L, dim).movedim(1, -1)
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out


def _needs_realign(seq_idx, u, initial_state, return_last_state, args):
    """Whether a call must run on the realigned layout: per-sequence states with gradients on
    CUDA where some sequence starts off a multiple of the backward's tile length (host read)."""
    if not (u.is_cuda and (initial_state is not None or return_last_state)):
        return 0
    if not torch.is_grad_enabled() or not any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in args
    ):
        return 0
    chunk = chunk_size_for(u, args[2].shape[1])
    return chunk if _starts_off_grid(seq_idx, chunk) else 0


def _backward_impl(u, delta, A, B, C, D, z, delta_bias, initial_state, states, dout, dlast,
                   delta_softplus, du=None, dz=None, seq_idx=None, num_seqs=-1):  # fmt: skip
    """The fused backward (recomputes each chunk from its saved state): (du, ddelta, dA, dB, dC,
    dD, dz, ddelta_bias, dinitial_state), None for absent inputs. ``du`` / ``dz`` may be given
    (views into a larger gradient). With ``seq_idx``, ``dlast`` is the gradient of the
    per-sequence final states."""
    if dout is None:
        dout = torch.zeros_like(u)
    dout = last_contiguous(dout)
    if dlast is not None:
        dlast = dlast.contiguous()
    chunk = chunk_size_for(u, A.shape[1])
    if seq_idx is not None and u.is_cuda and (initial_state is not None or dlast is not None):
        _check_cuda_state_starts(seq_idx, chunk)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0 = _backward_outputs(
        u, delta, A, B, C, D, z, delta_bias, initial_state, du, dz
    )
    if seq_idx is not None and dh0 is not None:
        dh0.zero_()  # written at each sequence's start; numbers that do not occur get 0
    _native.scan_bwd(
        capsule(u), capsule(delta), capsule(A), capsule(B), capsule(C), capsule(D),
        capsule(z), capsule(delta_bias), capsule(initial_state), capsule(states),
        capsule(dout), capsule(dlast), capsule(du), capsule(ddelta), capsule(dA),
        capsule(dB), capsule(dC), capsule(dD), capsule(dz), capsule(ddelta_bias),
        capsule(dh0), bool(delta_softplus), chunk, stream_of(u),
        workspace=capsule(_workspace(u, A, B, C, z)), seq_idx=capsule(seq_idx), num_seqs=num_seqs,
    )  # fmt: skip
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0


def _backward(u, delta, A, B, C, D, z, delta_bias, initial_state, states, dout, dlast,
              delta_softplus, du=None, dz=None, seq_idx=None):  # fmt: skip
    """:func:`_backward_impl` (no per-sequence states), through the custom op when traced (the
    given ``du`` / ``dz`` then receive copies of the op's fresh gradients)."""
    if not tracing():
        return _backward_impl(u, delta, A, B, C, D, z, delta_bias, initial_state, states, dout,
                              dlast, delta_softplus, du, dz, seq_idx=seq_idx)  # fmt: skip
    g = list(torch.ops.mamba_scan.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, initial_state, states, dout, dlast,
        bool(delta_softplus), seq_idx, -1,
    ))  # fmt: skip
    for i, x in ((5, D), (6, z), (7, delta_bias), (8, initial_state)):
        if x is None:
            g[i] = None
    if du is not None:
        g[0] = du.copy_(g[0])
    if dz is not None and z is not None:
        g[6] = dz.copy_(g[6])
    return tuple(g)


def _numpy_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                   initial_state):  # fmt: skip
    import numpy as np

    for name, x in zip(_NAMES, (u, delta, A, B, C, D, z, delta_bias, initial_state)):
        if x is not None and not isinstance(x, np.ndarray):
            raise DTypeError(f"{name}: expected a numpy array (u is one) or None; got "
                             f"{type(x).__name__}")  # fmt: skip

    def cap(x):
        if x is None:
            return None
        x = np.asarray(x)
        if x.ndim and x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
            x = np.ascontiguousarray(x)
        return x

    u, delta, A, B, C, D, z, delta_bias, initial_state = (
        cap(x) for x in (u, delta, A, B, C, D, z, delta_bias, initial_state)
    )
    if u.ndim != 3 or A.ndim != 2:
        raise ShapeError("u: must have shape (batch, dim, seqlen) and A (dim, dstate)")
    chunk = _native.cpu_chunk_size()
    batch, dim, seqlen = u.shape
    wd = np.float64 if u.dtype == np.float64 else np.float32
    out = np.empty_like(u)
    states = np.empty((batch, dim, max(1, -(-seqlen // chunk)), A.shape[1]), dtype=wd)
    keep = [x for x in (u, delta, A, B, C, D, z, delta_bias, initial_state) if x is not None]
    caps = [None if x is None else x.__dlpack__() for x in
            (u, delta, A, B, C, D, z, delta_bias, initial_state, out, states)]  # fmt: skip
    _native.scan_fwd(*caps, bool(delta_softplus), chunk, 0)
    del keep
    if return_last_state:
        return out, states[:, :, -1].copy()
    return out


def selective_scan_fn(
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
    """Selective scan with mamba_ssm 2.3.2's semantics (see ``selective_scan_ref``).

    Args:
        u, delta: (batch, dim, seqlen), float32 / float16 / bfloat16 (float64 on the CPU).
        A: (dim, dstate) float32, or complex64 (mamba_ssm's complex mode, S4D-Lin style: see
            ``mamba_scan.ops.complex_scan``; then a fixed B / C is complex and a variable one
            real with (real, imag) interleaved along the length, (batch, [ngroups,] dstate,
            2 seqlen), the output is 2 Re(C . h) and the last state complex).
        B, C: (dim, dstate) float32, or (batch, dstate, seqlen) / (batch, ngroups, dstate,
            seqlen) in u's dtype.
        D, delta_bias: (dim,) float32, optional.
        z: (batch, dim, seqlen), optional; gates the output by silu(z).
        delta_softplus: apply softplus to delta (after adding delta_bias).
        return_last_state: also return the final state (batch, dim, dstate) float32 (with
            ``seq_idx``: the final state of every sequence, (num_seqs, dim, dstate)).
        initial_state: (batch, dim, dstate) float32, the state before step 0 (mamba-scan
            extension); with ``seq_idx``, (num_seqs, dim, dstate): row s is the state before
            sequence s. Gradients flow to it, and from last_state when the caller uses it.
        seq_idx: (batch, seqlen) int32, packed sequences (mamba-scan extension, causal-conv1d's
            convention): the state restarts wherever the value changes along a row, from
            ``initial_state[seq_idx]`` or zero. Negative values mark padding (no state read or
            written). With per-sequence states each number must be one contiguous run of one
            row (checked on the CPU). See :func:`seq_idx_from_cu_seqlens`.
        num_seqs: rows of the per-sequence states; defaults to initial_state's rows, else (only
            when ``return_last_state``) ``seq_idx.max() + 1``, which reads seq_idx back to the
            host: pass it to keep a CUDA call free of synchronisation (and under torch.compile).

    numpy arrays (CPU, forward only) are accepted too and give numpy results.
    """
    if isinstance(A, torch.Tensor) and A.is_complex():
        if seq_idx is not None:
            raise NotImplementedError(
                "seq_idx: packed sequences with a complex A are not supported"
            )
        _check_types((u, delta, A, B, C, D, z, delta_bias, initial_state))
        return complex_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      return_last_state, initial_state)  # fmt: skip
    if isinstance(u, torch.Tensor) and u.dim() == 3 and u.shape[2] == 0 and u.is_cuda:
        # No steps: nothing for a kernel to do; the composition gives the empty output and the
        # last state (the initial state, or 0) with their gradients.
        if not tracing() and seq_idx is None:
            from ..reference import selective_scan_ref

            _check_types((u, delta, A, B, C, D, z, delta_bias, initial_state))
            return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      return_last_state, initial_state=initial_state)  # fmt: skip
    if seq_idx is not None and isinstance(u, torch.Tensor):
        _check_types((u, delta, A, B, C, D, z, delta_bias, initial_state))
        seq_idx = _prepare_seq(seq_idx, u)
    n_seqs = _num_seqs(seq_idx, initial_state, return_last_state, num_seqs)
    if seq_idx is not None and not tracing():
        args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        chunk = _needs_realign(seq_idx, u, initial_state, return_last_state, args)
        if chunk:
            return _scan_realigned(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                   return_last_state, initial_state, seq_idx, n_seqs, chunk)  # fmt: skip
    return _scan_core(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                      initial_state, seq_idx, n_seqs)  # fmt: skip


def _scan_core(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
               initial_state, seq_idx, n_seqs):  # fmt: skip
    """selective_scan_fn after its argument handling (seq_idx prepared, num_seqs resolved)."""
    if tracing():
        out, _, last = torch.ops.mamba_scan.selective_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus),
            bool(return_last_state), seq_idx, n_seqs,
        )  # fmt: skip
        return (out, last) if return_last_state else out
    if not isinstance(u, torch.Tensor) and hasattr(u, "__array_interface__"):
        if seq_idx is not None:
            raise TypeError("seq_idx: packed sequences need torch tensors, not numpy arrays")
        return _numpy_forward(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state
        )
    if not torch.is_grad_enabled() or not any(
        isinstance(x, torch.Tensor) and x.requires_grad
        for x in (u, delta, A, B, C, D, z, delta_bias, initial_state)
    ):
        # Nothing to differentiate: skip the autograd Function (and its saved tensors).
        u, delta, A, B, C, D, z, delta_bias, initial_state = _prepare(
            u, delta, A, B, C, D, z, delta_bias, initial_state
        )
        out, states, final = _forward_impl(
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, seq_idx, n_seqs,
            return_last_state,
        )  # fmt: skip
        if return_last_state:
            return out, _last_state(states, final, True)
        return out
    return SelectiveScanFn.apply(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state,
        seq_idx, n_seqs,
    )  # fmt: skip


def seq_idx_from_cu_seqlens(cu_seqlens, seqlen=None):
    """The (1, total) int32 seq_idx of sequences packed back to back along one row, from their
    cumulative lengths ``cu_seqlens`` = [0, l0, l0 + l1, ..., total] (flash-attention's and
    vLLM's ``query_start_loc``). Steps past ``cu_seqlens[-1]`` (up to ``seqlen``) get -1
    (padding). No host synchronisation when ``seqlen`` is given."""
    return _seq_idx_of_starts(cu_seqlens, seqlen, "cu_seqlens")


def _seq_idx_of_starts(cu_seqlens, seqlen, name):
    """seq_idx_from_cu_seqlens with the argument's name for the errors."""
    if not isinstance(cu_seqlens, torch.Tensor):
        try:
            cu_seqlens = torch.as_tensor(cu_seqlens)
        except (TypeError, ValueError, RuntimeError) as e:
            raise DTypeError(f"{name}: expected integers (a tensor or a list); {e}") from None
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ShapeError(
            f"{name}: must be 1-D [0, l0, l0 + l1, ...]; got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise DTypeError(f"{name}: expected an integer tensor; got {cu_seqlens.dtype}")
    check_devices(**{name: cu_seqlens})
    if not cu_seqlens.is_cuda:  # checked where it costs no synchronisation
        if cu_seqlens[0] != 0 or (cu_seqlens[1:] < cu_seqlens[:-1]).any():
            raise ShapeError(f"{name}: must start at 0 and not decrease; got {cu_seqlens.tolist()}")
    if seqlen is None:
        seqlen = int(cu_seqlens[-1].item())
        if seqlen < 0:
            raise ShapeError(f"{name}: its last entry (the total length) is negative: {seqlen}")
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 0:
        raise ShapeError(f"seqlen: must be a non-negative int or None; got {seqlen!r}")
    if not cu_seqlens.is_cuda and int(cu_seqlens[-1]) > seqlen:
        raise ShapeError(f"{name}: the sequences end at {int(cu_seqlens[-1])}, past the "
                         f"{seqlen} steps there are")  # fmt: skip
    pos = torch.arange(seqlen, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    # Sequence of step t: the number of starts cu_seqlens[1:] at or before t.
    idx = torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)
    idx = torch.where(pos < cu_seqlens[-1], idx, torch.full_like(idx, -1))
    return idx.to(torch.int32).unsqueeze(0)
