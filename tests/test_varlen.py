"""Packed sequences through the selective scan (seq_idx): the state restarts where seq_idx changes
along a row, per-sequence initial and final states, every gradient. CPU always; CUDA where a GPU
is present (run on the device machine)."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from helpers import DTYPES, check_parity, make_inputs
from mamba_scan import DTypeError, ShapeError, selective_scan_fn, seq_idx_from_cu_seqlens

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_seq_idx(rows, seqlen, gen, pad=0, min_len=1, max_len=None):
    """Random packed rows: sequences of random lengths numbered globally across rows, the last
    ``pad`` steps of each row -1. Returns (seq_idx int32 (batch, seqlen), num_seqs)."""
    out, s = [], 0
    max_len = max_len or seqlen
    for _ in range(rows):
        row = []
        while len(row) < seqlen - pad:
            n = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
            row += [s] * n
            s += 1
        row = row[: seqlen - pad] + [-1] * pad
        out.append(row)
    # Numbers that were cut off entirely do not occur: num_seqs counts them anyway (their
    # final states must come back zero).
    return torch.tensor(out, dtype=torch.int32), s


def from_lengths(lengths_per_row, seqlen):
    out, s = [], 0
    for lengths in lengths_per_row:
        row = []
        for n in lengths:
            row += [s] * n
            s += 1
        out.append((row + [-1] * seqlen)[:seqlen])
    return torch.tensor(out, dtype=torch.int32), s


def per_seq_h0(num_seqs, dim, dstate, device, gen):
    return torch.randn(num_seqs, dim, dstate, generator=gen).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("b_mode,c_mode", [("var", "var"), ("g2", "var"), ("fixed", "var"),
                                           ("var", "fixed"), ("fixed", "fixed")])  # fmt: skip
@pytest.mark.parametrize("has_h0", [False, True])
def test_varlen_parity(device, dtype, b_mode, c_mode, has_h0):
    """Random boundaries (lengths 1..70: many inside one tile, some across tile and chunk edges),
    padding at the end of a row; output, per-sequence final states and every gradient against
    float64 by the parity rule. The CUDA backward takes per-sequence states only where
    sequences start at multiples of its tile: there the random layout runs without states, and
    an aligned layout (32-step multiples) with them."""
    # A seed that is the same in every process (str hashes are randomised per process, which
    # made the layout, and so the test, differ between runs).
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype} {b_mode} {c_mode} {has_h0}".encode()))
    seqlen = 300
    seq, ns = make_seq_idx(2, seqlen, gen, pad=5, max_len=70)
    states = device == "cpu"
    if device == "cuda" and has_h0:
        seq, ns = from_lengths([[32, 96, 64, 32, 76], [64, 64, 172]], seqlen)
        states = True
    inp = make_inputs(batch=2, dim=8, seqlen=seqlen, dstate=16, dtype=DTYPES[dtype],
                      device=device, b_mode=b_mode, c_mode=c_mode, seed=3)  # fmt: skip
    if has_h0 and states:
        inp["initial_state"] = per_seq_h0(ns, 8, 16, device, gen)
    check_parity(inp, seq_idx=seq.to(device), num_seqs=ns, last=states,
                 label=f"{device} {dtype} B={b_mode} C={c_mode} h0={has_h0}")  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dstate", [1, 5, 16, 64, 128, 256])
def test_varlen_layouts(device, dstate):
    """Every state layout (states per lane / lanes per channel differ with dstate), with
    length-1 sequences and boundaries on 8-, 16-, 32- and 64-step edges."""
    gen = torch.Generator().manual_seed(dstate)
    lengths = [[1, 7, 8, 16, 1, 31, 1, 64, 2], [32, 32, 1, 1, 60, 40]]
    seqlen = max(sum(x) for x in lengths)
    seq, ns = from_lengths(lengths, seqlen)
    inp = make_inputs(batch=2, dim=4, seqlen=seqlen, dstate=dstate, device=device, seed=dstate)
    states = device == "cpu"
    if states:
        inp["initial_state"] = per_seq_h0(ns, 4, dstate, device, gen)
    check_parity(inp, seq_idx=seq.to(device), num_seqs=ns, last=states,
                 label=f"{device} N={dstate}")  # fmt: skip
    if device == "cuda":
        # Per-sequence states where sequences start at multiples of the tile (16 or 32 steps).
        seq, ns = from_lengths([[32, 64, 32, 32], [96, 32, 32]], 160)
        inp = make_inputs(batch=2, dim=4, seqlen=160, dstate=dstate, device=device, seed=dstate)
        inp["initial_state"] = per_seq_h0(ns, 4, dstate, device, gen)
        check_parity(inp, seq_idx=seq.to(device), num_seqs=ns, label=f"cuda aligned N={dstate}")


def _grads(fn_out, leaves):
    out, last = fn_out
    gen = torch.Generator().manual_seed(7)
    go = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
    gl = torch.randn(last.shape, generator=gen, dtype=torch.float64).to(out.device)
    loss = (out.double() * go).sum() + (last.double() * gl).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_equals_each_sequence_alone(device):
    """A packed row equals running each sequence alone with its own initial state: outputs,
    final states and the gradients of every per-sequence input (on CUDA with sequences starting
    at multiples of 32 steps, where its backward takes per-sequence states)."""
    dt = torch.float64 if device == "cpu" else torch.float32
    gen = torch.Generator().manual_seed(11)
    lengths = [1, 45, 3, 100, 2] if device == "cpu" else [32, 64, 96, 1]
    L = sum(lengths)
    seq, ns = from_lengths([lengths], L)
    dim, N = 6, 16
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=dt).to(device)  # noqa: E731
    u, z = mk(1, dim, L), mk(1, dim, L)
    delta = (torch.rand(1, dim, L, generator=gen, dtype=dt) - 1).to(device)
    A = -(0.5 + torch.rand(dim, N, generator=gen, dtype=dt)).to(device)
    B, C = mk(1, N, L), mk(1, N, L)
    D, bias = mk(dim), mk(dim)
    h0 = mk(ns, dim, N)
    wd = torch.float64 if dt == torch.float64 else torch.float32
    A, D, bias, h0 = (x.to(wd) for x in (A, D, bias, h0))
    packed = [x.clone().requires_grad_() for x in (u, delta, B, C, z, h0)]
    pu, pdelta, pB, pC, pz, ph0 = packed
    res = selective_scan_fn(pu, pdelta, A, pB, pC, D, pz, bias, True, True, initial_state=ph0,
                            seq_idx=seq.to(device))  # fmt: skip
    g_packed = _grads(res, packed)
    t0 = 0
    tol = 1e-10 if dt == torch.float64 else 2e-4
    for s_, n in enumerate(lengths):
        sl = slice(t0, t0 + n)
        alone = [x[..., sl].clone().requires_grad_() for x in (u, delta, B, C, z)]
        ah0 = h0[s_ : s_ + 1].clone().requires_grad_()
        au, adelta, aB, aC, az = alone
        out, last = selective_scan_fn(au, adelta, A, aB, aC, D, az, bias, True, True,
                                      initial_state=ah0)  # fmt: skip
        torch.testing.assert_close(res[0][..., sl], out, atol=tol, rtol=tol)
        torch.testing.assert_close(res[1][s_ : s_ + 1], last, atol=tol, rtol=tol)
        # Gradients: the same upstream gradients, restricted to this sequence.
        gen2 = torch.Generator().manual_seed(7)
        go = torch.randn(res[0].shape, generator=gen2, dtype=torch.float64).to(device)
        gl = torch.randn(res[1].shape, generator=gen2, dtype=torch.float64).to(device)
        loss = (out.double() * go[..., sl]).sum() + (last.double() * gl[s_ : s_ + 1]).sum()
        ga = torch.autograd.grad(loss, alone + [ah0])
        for name, gp, gs in zip(["u", "delta", "B", "C", "z"], g_packed[:5], ga[:5]):
            torch.testing.assert_close(gp[..., sl], gs, atol=tol, rtol=tol, msg=name)
        torch.testing.assert_close(g_packed[5][s_ : s_ + 1], ga[5], atol=tol, rtol=tol)
        t0 += n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_sequence_equals_dense_bitwise(device, dtype):
    """seq_idx all one sequence: the same arithmetic as the dense path with initial_state,
    bit for bit, output, last state and every gradient."""
    inp = make_inputs(batch=1, dim=16, seqlen=517, dstate=16, dtype=DTYPES[dtype], device=device,
                      has_h0=True)  # fmt: skip
    seq = torch.zeros(1, 517, dtype=torch.int32, device=device)

    def run(**kw):
        leaves = {k: v.clone().requires_grad_() for k, v in inp.items() if v is not None}
        out, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, **kw)
        g = _grads((out, last), list(leaves.values()))
        return out, last, g

    dense = run()
    packed = run(seq_idx=seq)
    assert torch.equal(dense[0], packed[0])
    assert torch.equal(dense[1], packed[1])
    for a, b in zip(dense[2], packed[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_absent_and_padding(device):
    """Numbers that do not occur get zero final states and zero initial-state gradients; -1
    (padding) steps read and write no state; out-of-range numbers are padding on CUDA and an
    error on the CPU."""
    gen = torch.Generator().manual_seed(0)
    seq = torch.tensor([[-1] * 32 + [2] * 64 + [0] * 32 + [-1] * 7], dtype=torch.int32,
                       device=device)  # fmt: skip
    inp = make_inputs(batch=1, dim=4, seqlen=135, dstate=4, device=device)
    h0 = per_seq_h0(4, 4, 4, device, gen).requires_grad_()
    kw = {k: v for k, v in inp.items() if k != "initial_state"}
    out, last = selective_scan_fn(**kw, delta_softplus=True, return_last_state=True,
                                  initial_state=h0, seq_idx=seq)  # fmt: skip
    assert last.shape == (4, 4, 4)
    assert torch.equal(last[1], torch.zeros_like(last[1]))
    assert torch.equal(last[3], torch.zeros_like(last[3]))
    (out.sum() + last.sum()).backward()
    assert torch.equal(h0.grad[1], torch.zeros_like(h0.grad[1]))
    assert torch.equal(h0.grad[3], torch.zeros_like(h0.grad[3]))
    assert h0.grad[0].abs().sum() > 0 and h0.grad[2].abs().sum() > 0


def test_errors():
    inp = make_inputs(batch=2, dim=4, seqlen=10, dstate=4)
    kw = {k: v for k, v in inp.items() if k != "initial_state"}
    with pytest.raises(ShapeError, match="seq_idx"):
        selective_scan_fn(**kw, seq_idx=torch.zeros(2, 9, dtype=torch.int32))
    with pytest.raises(DTypeError, match="seq_idx"):
        selective_scan_fn(**kw, seq_idx=torch.zeros(2, 10))
    seq = torch.tensor([[0] * 5 + [1] * 5, [2] * 10], dtype=torch.int32)
    with pytest.raises(ShapeError, match="out of range"):
        selective_scan_fn(**kw, return_last_state=True, seq_idx=seq, num_seqs=2)
    again = torch.tensor([[0] * 5 + [1] * 5, [1] * 10], dtype=torch.int32)
    with pytest.raises(ShapeError, match="contiguous run"):
        selective_scan_fn(**kw, return_last_state=True, seq_idx=again, num_seqs=2)
    # Without per-sequence states rows may reuse numbers (seq_idx only marks restarts).
    selective_scan_fn(**kw, seq_idx=again)
    with pytest.raises(ShapeError, match="initial_state"):
        selective_scan_fn(**kw, seq_idx=seq, initial_state=torch.zeros(2, 4, 4))
    with pytest.raises(ShapeError, match="num_seqs"):
        selective_scan_fn(**kw, seq_idx=seq, initial_state=torch.zeros(3, 4, 4), num_seqs=4)


@pytest.mark.parametrize("device", DEVICES)
def test_num_seqs_default(device):
    """Without num_seqs or initial_state, return_last_state sizes the final states by
    seq_idx.max() + 1."""
    inp = make_inputs(batch=1, dim=4, seqlen=12, dstate=4, device=device)
    kw = {k: v for k, v in inp.items() if k != "initial_state"}
    seq = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4], dtype=torch.int32, device=device)
    _, last = selective_scan_fn(**kw, return_last_state=True, seq_idx=seq)
    assert last.shape == (3, 4, 4)


def test_seq_idx_from_cu_seqlens():
    cu = torch.tensor([0, 3, 4, 9])
    assert seq_idx_from_cu_seqlens(cu).tolist() == [[0, 0, 0, 1, 2, 2, 2, 2, 2]]
    assert seq_idx_from_cu_seqlens(cu, 11).tolist() == [[0, 0, 0, 1, 2, 2, 2, 2, 2, -1, -1]]
    assert seq_idx_from_cu_seqlens(cu).dtype == torch.int32
    with pytest.raises(ShapeError):
        seq_idx_from_cu_seqlens(torch.zeros(2, 2, dtype=torch.int64))


def test_opcheck_varlen():
    """The custom op with seq_idx: fake tensors, schema, autograd registration."""
    gen = torch.Generator().manual_seed(1)
    seq, ns = make_seq_idx(2, 40, gen, pad=3, max_len=15)
    for has_h0, last in itertools.product([False, True], repeat=2):
        inp = make_inputs(batch=2, dim=4, seqlen=40, dstate=8)
        h0 = per_seq_h0(ns, 4, 8, "cpu", gen).requires_grad_() if has_h0 else None
        args = [inp[k].requires_grad_() if inp[k] is not None and inp[k].is_floating_point()
                else inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]  # fmt: skip
        torch.library.opcheck(torch.ops.mamba_scan.selective_scan_fwd,
                              (*args, h0, True, last, seq, ns))  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("var_b,var_c", [(True, True), (False, True), (True, False)])
def test_mamba_inner_fn_seq_idx(device, var_b, var_c):
    """mamba_inner_fn with seq_idx (conv and scan both restart) against the float64
    composition of the references: output and every gradient."""
    from mamba_scan import mamba_inner_fn, mamba_inner_ref

    gen = torch.Generator().manual_seed(5)
    batch, d, L, n, r, dm = 2, 16, 70, 8, 4, 12
    seq, _ = from_lengths([[1, 20, 3, 46], [35, 2, 33]], L)
    seq = seq.to(device)
    mk = lambda *s: (torch.randn(*s, generator=gen) * 0.3).to(device)  # noqa: E731
    w = dict(
        xz=mk(batch, 2 * d, L), conv1d_weight=mk(d, 1, 4), conv1d_bias=mk(d),
        x_proj_weight=mk(r + (n if var_b else 0) + (n if var_c else 0), d),
        delta_proj_weight=mk(d, r), out_proj_weight=mk(dm, d), out_proj_bias=mk(dm),
        A=-(0.5 + torch.rand(d, n, generator=gen)).to(device),
        B=None if var_b else mk(d, n), C=None if var_c else mk(d, n), D=mk(d), delta_bias=mk(d),
    )  # fmt: skip
    leaves = {k: v.clone().requires_grad_() for k, v in w.items() if v is not None}
    out = mamba_inner_fn(**leaves, seq_idx=seq)
    leaves64 = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    ref = mamba_inner_ref(**leaves64, seq_idx=seq)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    go = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
    g1 = torch.autograd.grad((out.double() * go).sum(), list(leaves.values()))
    g2 = torch.autograd.grad((ref * go).sum(), list(leaves64.values()))
    for name, a, b in zip(leaves, g1, g2):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=name)
    # The restart matters: without seq_idx the result differs.
    assert (mamba_inner_fn(**leaves) - out).abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fast", [True, False])
def test_mamba_module_cu_seqlens(device, fast):
    """Mamba.forward(cu_seqlens=...) on one packed row equals the sequences run as separate
    rows: outputs and parameter gradients."""
    from mamba_scan import Mamba

    torch.manual_seed(0)
    m = Mamba(d_model=16, d_state=8, use_fast_path=fast).to(device)
    lengths = [5, 17, 1, 9]
    cu = torch.tensor([0, 5, 22, 23, 32], device=device)
    x = torch.randn(1, 32, 16, device=device)
    out = m(x, cu_seqlens=cu)
    g_packed = torch.autograd.grad(out.square().sum(), list(m.parameters()))
    outs, t = [], 0
    for n in lengths:
        outs.append(m(x[:, t : t + n]))
        t += n
    alone = torch.cat(outs, dim=1)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-4)
    g_alone = torch.autograd.grad(alone.square().sum(), list(m.parameters()))
    for a, b in zip(g_packed, g_alone):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    seq = seq_idx_from_cu_seqlens(cu, 32)
    torch.testing.assert_close(m(x, seq_idx=seq), out)
    with pytest.raises(ShapeError, match="cu_seqlens"):
        m(x.expand(2, -1, -1), cu_seqlens=cu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [8, 32, 64])
def test_realigned_layout_equals_direct(device, chunk):
    """Per-sequence states where sequences start off the tile grid: the scan over the layout
    realigned to multiples of ``chunk`` (what CUDA runs for such calls, where its backward needs
    tile-aligned starts) gives the direct call's output, final states and every gradient."""
    from mamba_scan.ops.selective_scan import _scan_realigned

    if device == "cuda" and chunk % 32:
        pytest.skip("the CUDA backward of this layout takes starts at multiples of 32 only")

    inp = make_inputs(batch=2, dim=4, seqlen=50, dstate=4, device=device, b_mode="g2")
    lens = [[3, 20, 1, 26], [7, 33, 10]]
    seq = torch.tensor([sum(([i + 4 * r] * n for i, n in enumerate(row)), []) for r, row in
                        enumerate(lens)], dtype=torch.int32, device=device)  # fmt: skip
    seq[1, 45:] = -1  # padding at the end of a row
    h0 = torch.randn(8, 4, 4, device=device)
    g_out = torch.randn(2, 4, 50, device=device)
    g_last = torch.randn(8, 4, 4, device=device)
    res = []
    for realign in (False, True):
        leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None)
                  for k, v in inp.items() if k != "initial_state"}  # fmt: skip
        h = h0.clone().requires_grad_()
        args = [leaves[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        if realign:
            out, last = _scan_realigned(*args, True, True, h, seq, 8, chunk)
        else:
            out, last = selective_scan_fn(*args, True, True, initial_state=h, seq_idx=seq,
                                          num_seqs=8)  # fmt: skip
        ((out * g_out).sum() + (last * g_last).sum()).backward()
        res.append((out, last, [x.grad for x in args if x is not None] + [h.grad]))
    (o1, l1, g1), (o2, l2, g2) = res
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_states_inside_tiles():
    """On CUDA, per-sequence states with a sequence starting inside a tile run on the realigned
    layout: output, final states and every gradient as on the CPU."""
    inp = make_inputs(batch=1, dim=4, seqlen=50, dstate=4)
    seq = torch.tensor([[0] * 20 + [1] * 30], dtype=torch.int32)
    h0 = torch.randn(2, 4, 4)
    res = []
    for dev in ("cpu", "cuda"):
        kw = {k: v.detach().to(dev).requires_grad_() for k, v in inp.items() if v is not None}
        h = h0.detach().to(dev).requires_grad_()
        out, last = selective_scan_fn(**kw, delta_softplus=True, return_last_state=True,
                                      initial_state=h, seq_idx=seq.to(dev))  # fmt: skip
        (out.sum() + (last * last).sum()).backward()
        res.append([out, last] + [v.grad for v in kw.values()] + [h.grad])
    for c, g in zip(*res):
        torch.testing.assert_close(g.cpu(), c, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed,has_h0", [(19, True), (29, False)])
def test_fp32_sums_over_time_meet_the_rule(seed, has_h0):
    """Inputs where the CPU backward's fp32 sums over time (dA with fixed B and C) exceeded the
    parity rule while each 256-step chunk was summed step by step (now in 16-step blocks)."""
    gen = torch.Generator().manual_seed(seed)
    seq, ns = make_seq_idx(2, 300, gen, pad=5, max_len=70)
    inp = make_inputs(batch=2, dim=8, seqlen=300, dstate=16, b_mode="fixed", c_mode="fixed",
                      seed=3)  # fmt: skip
    if has_h0:
        inp["initial_state"] = per_seq_h0(ns, 8, 16, "cpu", gen)
    check_parity(inp, seq_idx=seq, num_seqs=ns, last=True, label=f"seed {seed}")
