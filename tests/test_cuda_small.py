"""The small CUDA kernels (cuda/conv1d.cu, cuda/state_update.cu) and the fused mamba_inner_fn on the GPU: parity with
float64 oracles by flash-attention's rule (kernel error <= 2x the same-precision PyTorch
reference's), every option, layouts, deterministic backward, device-side indices, CUDA graphs.
Skipped without a GPU; run on the device machine."""

import pytest
import torch

import mamba_scan
from mamba_scan import (
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba_inner_fn,
    selective_state_update,
)
from mamba_scan.reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    mamba_inner_ref,
    selective_state_update_ref,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item() if a.numel() else 0.0


def within(name, got, pt, f64):
    """flash-attention's rule plus a floor of a few fp32 ulps of the result's magnitude."""
    assert got.shape == f64.shape, name
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten output?)"
    tol = 2 * err(pt, f64) + 8 * 1.2e-7 * max(f64.abs().max().item(), 1.0)
    e = err(got, f64)
    assert e <= tol, f"{name}: kernel err {e:.3e} > tol {tol:.3e} (ref err {err(pt, f64):.3e})"


# ------------------------------------------------------------------ causal conv1d forward/backward


def conv_inputs(b, d, L, W, dtype, channel_last, h0, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, L, generator=g)
    if channel_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    w = torch.randn(d, W, generator=g) * 0.5
    bias = torch.randn(d, generator=g)
    h = torch.randn(b, d, W - 1, generator=g) if h0 else None
    s = None
    if seq:
        cuts = torch.sort(torch.randint(1, max(L, 2), (b, 3), generator=g), dim=1).values
        s = (torch.arange(L).view(1, L, 1) >= cuts.view(b, 1, 3)).sum(-1).to(torch.int32)
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731
    return dev(x.to(dtype)), dev(w), dev(bias), dev(h), dev(s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("mode", ["plain", "states", "seq"])
# 1040 and 1096: rows 16-byte aligned, so the plain channel-first case takes the fast kernels
# (several warp tiles, a partial last tile; 1096 also a lane with a partial run).
@pytest.mark.parametrize("L", [1, 3, 130, 1029, 1040, 1096])
def test_conv_parity_fwd_bwd(dtype, width, channel_last, mode, L):
    h0, seq = mode == "states", mode == "seq"
    x, w, bias, h, s = conv_inputs(2, 40, L, width, dtype, channel_last, h0, seq, seed=L + width)
    final = mode == "states"
    gen = torch.Generator().manual_seed(7)
    gout = torch.randn(2, 40, L, generator=gen, dtype=torch.float64).cuda()
    gfin = torch.randn(2, 40, width - 1, generator=gen, dtype=torch.float64).cuda()

    def run(fn, cast):
        leaves = [
            t.detach().clone().to(cast(t)).requires_grad_() if t is not None else None
            for t in (x, w, bias, h)
        ]
        res = fn(leaves[0], leaves[1], leaves[2], seq_idx=s, initial_states=leaves[3],
                 return_final_states=final, activation="silu")  # fmt: skip
        out, fin = res if final else (res, None)
        loss = (out.double() * gout).sum()
        if final:
            loss = loss + (fin.double() * gfin).sum()
        loss.backward()
        return [out, fin] + [t.grad if t is not None else None for t in leaves]

    f64 = run(causal_conv1d_ref, lambda t: torch.float64)
    pt = run(causal_conv1d_ref, lambda t: t.dtype)
    got = run(causal_conv1d_fn, lambda t: t.dtype)
    if channel_last:
        assert got[0].stride(1) == 1, "out keeps x's channel-last layout"
    for name, a, p, r in zip(["out", "final", "dx", "dweight", "dbias", "dinitial"], got, pt, f64):
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == p.dtype, name
        within(f"{name} {dtype} W{width} {mode} L{L}", a, p, r)


@pytest.mark.parametrize("L", [4096, 4099])  # the fast and the general kernels
def test_conv_backward_is_deterministic(L):
    x, w, bias, _, _ = conv_inputs(4, 256, L, 4, torch.bfloat16, False, False, False)
    gout = torch.randn(4, 256, L, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, bias)]
        causal_conv1d_fn(*leaves, activation="silu").backward(gout)
        grads.append([t.grad for t in leaves])
    for g in grads[1:]:
        for a, b in zip(g, grads[0]):
            assert torch.equal(a, b)


def test_conv_inputs_unmodified_and_xz_view():
    """mamba_inner's case: x a channel slice of xz (non-dense strides)."""
    g = torch.Generator().manual_seed(3)
    xz = torch.randn(2, 64, 100, generator=g).cuda().to(torch.bfloat16)
    x = xz[:, :32]
    w = torch.randn(32, 4, generator=g).cuda()
    before = xz.clone()
    out = causal_conv1d_fn(x, w, activation="silu")
    assert torch.equal(xz, before)
    ref = causal_conv1d_ref(x.double(), w.double(), activation="silu")
    pt = causal_conv1d_ref(x, w, activation="silu")
    within("xz view", out, pt, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("bias_on", [False, True])
def test_conv_fast_path_weight_dtype_activation_xz_view(dtype, activation, bias_on):
    """The fast kernels with weights in x's dtype, no activation / no bias, x a slice of xz."""
    g = torch.Generator().manual_seed(11)
    L = 2056
    xz = torch.randn(3, 2 * 24, L, generator=g).to(dtype).cuda()
    w = (torch.randn(24, 4, generator=g) * 0.5).to(dtype).cuda()
    bias = torch.randn(24, generator=g).to(dtype).cuda() if bias_on else None
    gout = torch.randn(3, 24, L, generator=g, dtype=torch.float64).cuda()

    def run(fn, cast):
        leaves = [t.detach().clone().to(cast(t)).requires_grad_() if t is not None else None
                  for t in (xz, w, bias)]  # fmt: skip
        out = fn(leaves[0][:, :24], leaves[1], leaves[2], activation=activation)
        (out.double() * gout).sum().backward()
        return [out] + [t.grad if t is not None else None for t in leaves]

    f64 = run(causal_conv1d_ref, lambda t: torch.float64)
    pt = run(causal_conv1d_ref, lambda t: t.dtype)
    got = run(causal_conv1d_fn, lambda t: t.dtype)
    for name, a, p, r in zip(["out", "dxz", "dweight", "dbias"], got, pt, f64):
        if r is not None:
            within(f"{name} {dtype} {activation}", a, p, r)


def test_conv_bindings_name_bad_cuda_arguments():
    """CUDA calls take index tensors on the device and a workspace for the backward."""
    from mamba_scan import DTypeError, ShapeError, _native
    from mamba_scan._boundary import capsule

    x, w = torch.randn(2, 4, 9, device="cuda"), torch.randn(4, 3, device="cuda")
    out = torch.empty_like(x)
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(DTypeError, match="seq_idx: expected int32 or int64; got float32"):
        _native.conv1d_fwd(capsule(x), capsule(w), None, capsule(torch.zeros(2, 9, device="cuda")),
                           None, capsule(out), None, True, stream)  # fmt: skip
    with pytest.raises(ShapeError, match="workspace: required by the CUDA backward"):
        _native.conv1d_bwd(capsule(x), capsule(w), None, None, None, capsule(out), None,
                           capsule(torch.empty_like(x)), capsule(torch.empty_like(w)), None, None,
                           True, None, stream)  # fmt: skip


# ------------------------------------------------------------------------ causal conv1d update


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("tokens", [1, 3])
def test_conv_update_parity(dtype, circular, tokens):
    g = torch.Generator().manual_seed(tokens)
    b, d, W, S = 5, 48, 4, 6
    x = torch.randn(b, d, tokens, generator=g).cuda().to(dtype)
    state = torch.randn(b, d, S, generator=g).cuda().to(dtype)
    w = torch.randn(d, W, generator=g).cuda()
    bias = torch.randn(d, generator=g).cuda()
    cs = torch.tensor([0, 2, 5, 7, 11], dtype=torch.int32).cuda() if circular else None
    s64, s_pt, s_k = state.double(), state.clone(), state.clone()
    o64 = causal_conv1d_update_ref(x.double(), s64, w.double(), bias.double(), "silu", cs)
    o_pt = causal_conv1d_update_ref(x, s_pt, w, bias, "silu", cs)
    o_k = causal_conv1d_update(x, s_k, w, bias, "silu", cs)
    within("out", o_k, o_pt, o64)
    assert torch.equal(s_k, s_pt), "the new state holds the inputs, exactly"


def test_conv_update_indices_padding_and_out_of_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g).cuda()
    state = torch.randn(4, 16, 3, generator=g).cuda()
    w = torch.randn(16, 4, generator=g).cuda()
    idx = torch.tensor([2, -1, 0], dtype=torch.int32).cuda()
    s_ref, s_k = state.clone(), state.clone()
    o_ref = causal_conv1d_update_ref(x, s_ref, w, None, None, None, idx)
    o_k = causal_conv1d_update(x, s_k, w, None, None, None, idx)
    torch.testing.assert_close(o_k, o_ref)
    torch.testing.assert_close(s_k, s_ref)
    assert (o_k[1] == 0).all() and torch.equal(s_k[1], state[1]) and torch.equal(s_k[3], state[3])
    # An index past the state's rows: NaN out, no state row touched (no host check on CUDA).
    s2 = state.clone()
    o = causal_conv1d_update(x, s2, w, None, None, None, torch.tensor([0, 9, 1]).cuda())
    assert torch.isnan(o[1]).all() and not torch.isnan(o[0]).any()
    assert torch.equal(s2[2:], state[2:])


# ------------------------------------------------------------------- selective_state_update


def ssu_inputs(batch, nheads, dim, dstate, ngroups, dtype, state_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inp = dict(
        state=r(batch, nheads, dim, dstate).to(state_dtype),
        x=r(batch, nheads, dim).to(dtype),
        dt=(torch.rand(batch, nheads, dim, generator=g) * 2 - 1.5).to(dtype),
        A=-(0.5 + torch.rand(nheads, dim, dstate, generator=g) * 3),
        B=r(batch, ngroups, dstate).to(dtype),
        C=r(batch, ngroups, dstate).to(dtype),
        D=r(nheads, dim),
        z=r(batch, nheads, dim).to(dtype),
        dt_bias=r(nheads, dim) * 0.5,
    )
    return {k: v.cuda() for k, v in inp.items()}


def ssu_check(inp, **kw):
    def run(fn, cast):
        c = {k: (v.clone().to(cast(v)) if v is not None else None) for k, v in inp.items()}
        return fn(**c, **kw), c["state"]

    o64, s64 = run(selective_state_update_ref, lambda v: torch.float64)
    opt, spt = run(selective_state_update_ref, lambda v: v.dtype)
    ok, sk = run(selective_state_update, lambda v: v.dtype)
    within("out", ok, opt, o64)
    within("state", sk, spt, s64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dstate", [1, 5, 16, 64, 128, 256])
@pytest.mark.parametrize("heads", [(1, 1), (4, 2)])
def test_state_update_parity(dtype, dstate, heads):
    inp = ssu_inputs(3, heads[0], 24, dstate, heads[1], dtype, torch.float32, seed=dstate)
    ssu_check(inp, dt_softplus=True)


@pytest.mark.parametrize("state_dtype", DTYPES)
@pytest.mark.parametrize("drop", [None, "D", "z", "dt_bias"])
def test_state_update_options(state_dtype, drop):
    inp = ssu_inputs(2, 2, 16, 16, 1, torch.bfloat16, state_dtype)
    if drop:
        inp[drop] = None
    ssu_check(inp, dt_softplus=drop is None)


def test_state_update_no_heads_broadcast_and_indices():
    g = torch.Generator().manual_seed(5)
    b, d, n = 3, 32, 16
    state = torch.randn(5, d, n, generator=g).cuda()
    x, dt = torch.randn(b, d, generator=g).cuda(), torch.rand(1, generator=g).cuda()
    A = -torch.rand(1, generator=g).cuda()
    B, C = torch.randn(b, n, generator=g).cuda(), torch.randn(b, n, generator=g).cuda()
    # Mamba-2 style stride-0 broadcasts of dt and A.
    dt_b, A_b = dt.expand(b, d), A.view(1, 1).expand(d, n)
    idx = torch.tensor([4, -1, 1]).cuda()
    s_ref, s_k = state.clone(), state.clone()
    o_ref = selective_state_update_ref(s_ref, x, dt_b, A_b, B, C, state_batch_indices=idx)
    o_k = selective_state_update(s_k, x, dt_b, A_b, B, C, state_batch_indices=idx)
    torch.testing.assert_close(o_k, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_k, s_ref, rtol=1e-5, atol=1e-5)
    assert (o_k[1] == 0).all() and torch.equal(s_k[0], state[0])
    s2 = state.clone()
    o = selective_state_update(
        s2, x, dt_b, A_b, B, C, state_batch_indices=torch.tensor([0, 7, 2]).cuda()
    )
    assert torch.isnan(o[1]).all() and torch.equal(s2[1], state[1])


def test_decode_step_graph_capture():
    """One Mamba decode step (conv update + state update) captured in a CUDA graph and replayed
    equals eager calls."""
    torch.manual_seed(0)
    m = mamba_scan.Mamba(d_model=64, d_state=16).cuda()
    conv, ssm = m.allocate_inference_cache(4, 1)
    h = torch.randn(4, 1, 64, device="cuda")
    conv_e, ssm_e = conv.clone(), ssm.clone()
    with torch.no_grad():
        eager = [m.step(h, conv_e, ssm_e)[0] for _ in range(3)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            m.step(h, conv.clone(), ssm.clone())  # warm-up (compiles the kernels)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m.step(h, conv, ssm)[0]
        replays = []
        for _ in range(3):
            graph.replay()
            replays.append(out.clone())
    for a, b in zip(replays, eager):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- mamba_inner_fn


def inner_inputs(dtype, d_model=48, d=64, n=16, r=4, L=300, b=2, fixed_bc=False, proj_bias=False):
    g = torch.Generator().manual_seed(11)
    r_ = lambda *s, s_=1.0: torch.randn(*s, generator=g) * s_  # noqa: E731
    args = dict(
        xz=r_(b, 2 * d, L).to(dtype),
        conv1d_weight=r_(d, 1, 4, s_=0.5),
        conv1d_bias=r_(d),
        x_proj_weight=r_(r + 2 * n, d, s_=d**-0.5),
        delta_proj_weight=r_(d, r, s_=r**-0.5),
        out_proj_weight=r_(d_model, d, s_=d**-0.5),
        out_proj_bias=r_(d_model),
        A=-(0.5 + torch.rand(d, n, generator=g) * 3),
        D=r_(d),
        delta_bias=r_(d, s_=0.5) - 1,
    )
    if fixed_bc:
        args["B"], args["C"] = r_(d, n), r_(d, n)
    if proj_bias:
        args["B_proj_bias"], args["C_proj_bias"] = r_(n, s_=0.1), r_(n, s_=0.1)
    # Weights in the activations' dtype (as under autocast); A, D, delta_bias stay fp32.
    for k in ("conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight",
              "out_proj_weight", "out_proj_bias"):  # fmt: skip
        args[k] = args[k].to(dtype)
    return {k: v.cuda() for k, v in args.items()}


def inner_run(fn, args, cast, gout, **kw):
    leaves = {k: v.detach().clone().to(cast(v)).requires_grad_() for k, v in args.items()}
    out = fn(**leaves, **kw)
    (out.double() * gout).sum().backward()
    return out, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["var", "fixed_bc", "proj_bias"])
@pytest.mark.parametrize("lvl", [0, 1])
def test_mamba_inner_fn_parity(dtype, variant, lvl):
    args = inner_inputs(dtype, fixed_bc=variant == "fixed_bc", proj_bias=variant == "proj_bias")
    gout = torch.randn(2, 300, 48, dtype=torch.float64, device="cuda")
    # The oracle: the same mixer composed of the float64 references (conv, scan) and torch.
    f64 = inner_run(mamba_inner_ref, args, lambda v: torch.float64, gout)
    pt = inner_run(mamba_inner_ref, args, lambda v: v.dtype, gout)
    got = inner_run(mamba_inner_fn, args, lambda v: v.dtype, gout, checkpoint_lvl=lvl)
    within("out", got[0], pt[0], f64[0])
    for k in args:
        within(f"d{k}", got[1][k], pt[1][k], f64[1][k])


def test_mamba_inner_checkpoint_levels_agree_bitwise():
    args = inner_inputs(torch.bfloat16)
    gout = torch.randn(2, 300, 48, dtype=torch.float64, device="cuda")
    a = inner_run(mamba_inner_fn, args, lambda v: v.dtype, gout, checkpoint_lvl=0)
    b = inner_run(mamba_inner_fn, args, lambda v: v.dtype, gout, checkpoint_lvl=1)
    assert torch.equal(a[0], b[0])
    for k in args:
        assert torch.equal(a[1][k], b[1][k]), k


def test_mamba_module_cuda_matches_cpu_float64():
    torch.manual_seed(0)
    m = mamba_scan.Mamba(d_model=32, d_state=16)
    h = torch.randn(2, 70, 32)
    ref_m = m.double()
    h64 = h.double().requires_grad_()
    ref = ref_m(h64)
    ref.sum().backward()
    m_cuda = mamba_scan.Mamba(d_model=32, d_state=16).cuda()
    m_cuda.load_state_dict({k: v.float() for k, v in ref_m.state_dict().items()})
    hc = h.cuda().requires_grad_()
    out = m_cuda(hc)
    out.sum().backward()
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(hc.grad.double().cpu(), h64.grad, rtol=1e-3, atol=1e-4)
    for (n, p), (_, q) in zip(m_cuda.named_parameters(), ref_m.named_parameters()):
        torch.testing.assert_close(p.grad.double().cpu(), q.grad, rtol=2e-3, atol=2e-4, msg=n)
