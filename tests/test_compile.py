"""Inside compiled and captured PyTorch: every op a torch.library custom op (opcheck: schema,
fake tensors, registered autograd, AOT dispatch with dynamic shapes), zero graph breaks from our
code, torch.compile(fullgraph=True) and torch.export equal to eager, no recompiles across
sequence lengths marked dynamic, decoding steps that mutate their caches under compile.

CPU in CI (backend aot_eager: the same graphs and fakes without a C++ build); the same tests
run on CUDA where there is a GPU (inductor there)."""

import pytest
import torch
import torch.nn as nn
from torch.library import opcheck

import mamba_scan
from mamba_scan import Mamba, causal_conv1d_fn, causal_conv1d_update, selective_scan_fn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OPS = torch.ops.mamba_scan


def backend(device):
    return "inductor" if device == "cuda" else "aot_eager"


def rnd(*shape, device="cpu", dtype=torch.float32, scale=1.0, grad=False, gen=None):
    t = (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(device, dtype)
    return t.requires_grad_(grad)


def scan_inputs(device, dtype, b=2, d=8, n=4, L=37, bc="var", groups=1, opts=True, h0=False):
    g = torch.Generator().manual_seed(0)
    u = rnd(b, d, L, device=device, dtype=dtype, gen=g)
    delta = (torch.rand(b, d, L, generator=g) * 0.5).to(device, dtype)
    A = -torch.rand(d, n, generator=g).to(device) - 0.5
    if bc == "var":
        B = rnd(b, groups, n, L, device=device, dtype=dtype, gen=g)
        C = rnd(b, groups, n, L, device=device, dtype=dtype, gen=g)
    else:
        B, C = rnd(d, n, device=device, gen=g), rnd(d, n, device=device, gen=g)
    D = rnd(d, device=device, gen=g) if opts else None
    z = rnd(b, d, L, device=device, dtype=dtype, gen=g) if opts else None
    bias = rnd(d, device=device, scale=0.1, gen=g) if opts else None
    init = rnd(b, d, n, device=device, gen=g) if h0 else None
    return u, delta, A, B, C, D, z, bias, init


SCAN_CASES = [
    dict(dtype=torch.float32),
    dict(dtype=torch.float32, bc="fixed", opts=False),
    dict(dtype=torch.float32, groups=2, h0=True),
    dict(dtype=torch.bfloat16, L=70),
    dict(dtype=torch.float16, n=16, L=5),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(SCAN_CASES)))
def test_opcheck_selective_scan(device, case):
    args = scan_inputs(device, **SCAN_CASES[case])
    args = [a.requires_grad_() if a is not None and a.is_floating_point() else a for a in args]
    for softplus, last in ((True, True), (False, False)):
        opcheck(OPS.selective_scan_fwd.default, (*args, softplus, last))
    with torch.no_grad():
        out, states, _ = OPS.selective_scan_fwd(*args, True, True)
    dout = torch.randn_like(out)
    dlast = torch.randn_like(states[:, :, -1])
    detached = [a.detach() if a is not None else None for a in args]
    opcheck(OPS.selective_scan_bwd.default, (*detached, states, dout, dlast, True))
    opcheck(OPS.selective_scan_bwd.default, (*detached, states, dout, None, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads", [False, True])
def test_opcheck_state_update(device, heads):
    g = torch.Generator().manual_seed(1)
    b, h, d, n = 3, 2, 8, 16
    lead = (b, h) if heads else (b,)
    state = rnd(*lead, d, n, device=device, gen=g)
    x, dt, z = (rnd(*lead, d, device=device, gen=g) for _ in range(3))
    A = -torch.rand(*lead[1:], d, n, generator=g).to(device)
    B, C = (rnd(*lead, n, device=device, gen=g) for _ in range(2))
    D, dt_bias = rnd(*lead[1:], d, device=device, gen=g), rnd(*lead[1:], d, device=device, gen=g)
    idx = torch.tensor([2, 0, 1], device=device)
    for args in ((D, z, dt_bias, True, None), (None, None, None, False, idx)):
        opcheck(OPS.selective_state_update.default, (state, x, dt, A, B, C, *args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_conv1d(device, dtype):
    g = torch.Generator().manual_seed(2)
    b, d, L, w = 2, 8, 33, 4
    x = rnd(b, d, L, device=device, dtype=dtype, grad=True, gen=g)
    x_cl = rnd(b, L, d, device=device, dtype=dtype, gen=g).transpose(1, 2).requires_grad_()
    weight = rnd(d, w, device=device, dtype=dtype, grad=True, gen=g)
    bias = rnd(d, device=device, dtype=dtype, grad=True, gen=g)
    h0 = rnd(b, d, w - 1, device=device, dtype=dtype, grad=True, gen=g)
    seq_idx = torch.tensor([[0] * 10 + [1] * 23, [0] * 33], dtype=torch.int32, device=device)
    cases = [
        (x, weight, bias, None, None, False, True),
        (x_cl, weight, None, None, None, False, False),
        (x, weight, bias, None, h0, True, True),
        (x, weight, bias, seq_idx, None, False, True),
    ]
    for args in cases:
        opcheck(OPS.causal_conv1d_fwd.default, args)
        out, fin = OPS.causal_conv1d_fwd(*[a.detach() if torch.is_tensor(a) else a for a in args])
        dfin = torch.randn_like(fin) if args[5] else None
        det = [a.detach() if torch.is_tensor(a) else a for a in args[:5]]
        opcheck(OPS.causal_conv1d_bwd.default, (*det, torch.randn_like(out), dfin, args[6]))
    state = rnd(b, d, w - 1 + 2, device=device, dtype=dtype, gen=g)
    xs = rnd(b, d, device=device, dtype=dtype, gen=g)
    opcheck(OPS.causal_conv1d_update.default,
            (xs, state, weight.detach(), bias.detach(), True, None, None))  # fmt: skip
    opcheck(OPS.causal_conv1d_update.default,
            (xs, state, weight.detach(), None, False, torch.tensor([1, 3], dtype=torch.int32,
             device=device), torch.tensor([1, 0], dtype=torch.int32, device=device)))  # fmt: skip


class Stack(nn.Module):
    def __init__(self, d_model=32, layers=2, fast=True, device="cpu"):
        super().__init__()
        self.layers = nn.ModuleList(
            Mamba(d_model, d_state=16, use_fast_path=fast, device=device) for _ in range(layers)
        )

    def forward(self, x):
        for m in self.layers:
            x = x + m(x)
        return x


def grads_of(model, x):
    model.zero_grad()
    y = model(x)
    y.square().mean().backward()
    named = model.named_parameters()
    return y.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in named}


def close(a, b, name):
    # The same kernels on both sides; the compiled graph may reorder torch's own ops (linear
    # layers, reductions), so compare with a tolerance of float32 round-off over the layers.
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"{name}: max diff {(a - b).abs().max()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fast", [True, False], ids=["mamba_inner_fn", "split"])
def test_mamba_layer_has_no_graph_breaks(device, fast):
    torch._dynamo.reset()
    m = Mamba(32, d_state=16, use_fast_path=fast, device=device)
    x = torch.randn(2, 24, 32, device=device)
    ex = torch._dynamo.explain(m)(x)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fast", [True, False], ids=["mamba_inner_fn", "split"])
def test_compiled_stack_matches_eager(device, fast):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Stack(fast=fast, device=device)
    x = torch.randn(2, 40, 32, device=device)
    y_e, g_e = grads_of(model, x)
    compiled = torch.compile(model, fullgraph=True, backend=backend(device))
    y_c, g_c = grads_of(compiled, x)
    close(y_c, y_e, "output")
    for name in g_e:
        close(g_c[name], g_e[name], name)


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_seqlen_compiles_once(device):
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    model = Stack(layers=1, device=device)
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    # Lengths past one saved-state chunk (256 steps on the CPU, 32 on CUDA): the chunk count of
    # the saved states is a size, and a count of 1 is specialised like any size 1 (one more
    # compile when a run starts below one chunk and then grows past it, not one per length).
    for L in (300, 400, 513, 700):
        x = torch.randn(2, L, 32, device=device)
        y_e, g_e = grads_of(model, x)
        y_c, g_c = grads_of(compiled, x)
        close(y_c, y_e, f"output L={L}")
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"


@pytest.mark.parametrize("device", DEVICES)
def test_selective_scan_fn_compiled_with_last_and_initial_state(device):
    torch._dynamo.reset()
    args = scan_inputs(device, torch.float32, h0=True)
    args = [a.requires_grad_() if a is not None else None for a in args]
    u, delta, A, B, C, D, z, bias, h0 = args

    def f(*a):
        out, last = selective_scan_fn(*a[:8], delta_softplus=True, return_last_state=True,
                                      initial_state=a[8])  # fmt: skip
        return out.square().sum() + (last * 0.5).sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend(device))
    g_e = torch.autograd.grad(f(*args), args)
    g_c = torch.autograd.grad(compiled(*args), args)
    for name, a, b in zip("u delta A B C D z bias h0".split(), g_c, g_e):
        close(a, b, name)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_algorithms_accepted(device):
    torch._dynamo.reset()
    model = Stack(layers=1, device=device)
    x = torch.randn(2, 16, 32, device=device)
    torch.use_deterministic_algorithms(True)
    try:
        y1, g1 = grads_of(model, x)
        y2, g2 = grads_of(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    finally:
        torch.use_deterministic_algorithms(False)
    close(y2, y1, "output")


@pytest.mark.parametrize("device", DEVICES)
def test_export_matches_eager(device):
    torch.manual_seed(0)
    m = Mamba(32, d_state=16, device=device).eval()
    x = torch.randn(2, 24, 32, device=device)
    with torch.no_grad():
        ep = torch.export.export(m, (x,))
        want = m(x)
        got = ep.module()(x)
        x2 = torch.randn(2, 24, 32, device=device)
        close(ep.module()(x2), m(x2), "exported, new input")
    close(got, want, "exported")
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("mamba_scan" in t for t in names), names


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decode_step_mutates_caches_like_eager(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = Mamba(32, d_state=16, layer_idx=0, device=device).eval()
    batch = 3
    conv_e, ssm_e = m.allocate_inference_cache(batch, 16)
    conv_c, ssm_c = conv_e.clone(), ssm_e.clone()
    step = torch.compile(m.step, fullgraph=True, backend=backend(device))
    with torch.no_grad():
        for _ in range(4):
            h = torch.randn(batch, 1, 32, device=device)
            out_e, _, _ = m.step(h, conv_e, ssm_e)
            out_c, _, _ = step(h, conv_c, ssm_c)
            close(out_c, out_e, "step output")
            close(conv_c, conv_e, "conv_state")
            close(ssm_c, ssm_e, "ssm_state")


@pytest.mark.parametrize("device", DEVICES)
def test_update_ops_compiled(device):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    b, d, w = 2, 8, 4
    x = rnd(b, d, device=device, gen=g)
    weight, bias = rnd(d, w, device=device, gen=g), rnd(d, device=device, gen=g)
    state = rnd(b, d, w - 1, device=device, gen=g)
    st2 = state.clone()

    def f(x, state):
        return causal_conv1d_update(x, state, weight, bias, activation="silu")

    out_c = torch.compile(f, fullgraph=True, backend=backend(device))(x, st2)
    out_e = f(x, state)
    close(out_c, out_e, "conv update")
    close(st2, state, "conv_state")
    y = torch.randn(b, d, 20, device=device)
    conv = torch.compile(
        lambda y: causal_conv1d_fn(y, weight, bias, activation="silu"),
        fullgraph=True,
        backend=backend(device),
    )
    close(conv(y), causal_conv1d_fn(y, weight, bias, activation="silu"), "conv fn")


def test_transformers_mamba_compiled_matches_eager():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from transformers import MambaConfig, MambaForCausalLM

    torch._dynamo.reset()
    with mamba_scan.patch():
        cfg = MambaConfig(vocab_size=64, hidden_size=32, state_size=16, num_hidden_layers=2,
                          expand=2, conv_kernel=4, use_cache=False)  # fmt: skip
        torch.manual_seed(0)
        model = MambaForCausalLM(cfg).train()
        ids = torch.randint(0, 64, (2, 24))

        def loss_and_grads(fn):
            model.zero_grad()
            loss = fn(ids, labels=ids).loss
            loss.backward()
            return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

        l_e, g_e = loss_and_grads(model)
        ex = torch._dynamo.explain(model)(ids, labels=ids)
        ours = [
            r for r in ex.break_reasons if any("mamba_scan" in f.filename for f in r.user_stack)
        ]
        assert not ours, ours
        compiled = torch.compile(model, backend="aot_eager")
        l_c, g_c = loss_and_grads(compiled)
    close(l_c, l_e, "loss")
    for k in g_e:
        close(g_c[k], g_e[k], k)
    print(f"transformers MambaForCausalLM: {ex.graph_break_count} graph breaks, none in mamba_scan")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_reduce_overhead_decode_gives_eager_tokens():
    torch._dynamo.reset()
    torch.manual_seed(0)
    d, vocab, batch = 64, 50, 3

    class Decoder(nn.Module):
        """Greedy decoding of a tiny LM: embedding, two Mamba layers stepping on caches held as
        buffers (static addresses for the CUDA graph), a linear head."""

        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.stack = Stack(d_model=d, device="cpu")
            self.head = nn.Linear(d, vocab)
            for i, m in enumerate(self.stack.layers):
                m.layer_idx = i
                conv, ssm = m.allocate_inference_cache(batch, 1, dtype=torch.float32)
                self.register_buffer(f"conv{i}", conv)
                self.register_buffer(f"ssm{i}", ssm)

        def forward(self, tok):
            h = self.emb(tok)
            for i, m in enumerate(self.stack.layers):
                out, _, _ = m.step(h, getattr(self, f"conv{i}"), getattr(self, f"ssm{i}"))
                h = h + out
            return self.head(h).argmax(-1)

    dec = Decoder().cuda().eval()
    start = torch.randint(0, vocab, (batch, 1), device="cuda")

    def generate(fn, steps=12):
        for buf in dec.buffers():
            buf.zero_()
        tok, toks = start, []
        with torch.no_grad():
            for _ in range(steps):
                tok = fn(tok).clone()
                toks.append(tok)
        return torch.cat(toks, 1)

    eager = generate(dec)
    graphed = generate(torch.compile(dec, mode="reduce-overhead", fullgraph=True))
    assert torch.equal(graphed, eager), (graphed, eager)
