"""causal_conv1d_fn / causal_conv1d_update against a direct float64 loop, gradients by
gradcheck, and token-by-token decoding equal to the full convolution."""

import pytest
import torch

from mamba_scan import ShapeError, causal_conv1d_fn, causal_conv1d_update

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def naive(x, w, b=None, h0=None, seq_idx=None, act=None):
    """out[t] = sum_k w[k] x[t - (W - 1 - k)], a direct loop in float64."""
    x, w = x.double(), w.double()
    bsz, dim, L = x.shape
    W = w.shape[1]
    prev = h0.double() if h0 is not None else torch.zeros(bsz, dim, W - 1, dtype=torch.float64)
    xp = torch.cat([prev.to(x.device), x], -1)
    out = torch.zeros_like(x)
    for t in range(L):
        acc = b.double().clone() if b is not None else torch.zeros(dim, dtype=torch.float64)
        acc = acc.unsqueeze(0).expand(bsz, -1).clone().to(x.device)
        for k in range(W):
            src = t - (W - 1 - k)
            v = xp[:, :, src + W - 1] * w[:, k]
            if seq_idx is not None:
                ok = (src >= 0) & (seq_idx[:, max(src, 0)] == seq_idx[:, t])
                v = torch.where(ok.unsqueeze(1), v, torch.zeros_like(v))
            acc = acc + v
        out[:, :, t] = acc
    out = torch.nn.functional.silu(out) if act else out
    if seq_idx is not None:  # padding (negative index): 0, as causal-conv1d
        out = torch.where((seq_idx < 0).unsqueeze(1).to(out.device), 0.0, out)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("act", [None, "silu", "swish"])
@pytest.mark.parametrize("channel_last", [False, True])
def test_forward_matches_loop(device, width, act, channel_last):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(2, 6, 11, generator=g)
    if channel_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    w, b = torch.randn(6, width, generator=g), torch.randn(6, generator=g)
    h0 = torch.randn(2, 6, width - 1, generator=g)
    out, fin = causal_conv1d_fn(x.to(device), w.to(device), b.to(device), initial_states=h0.to(device),
                                return_final_states=True, activation=act)  # fmt: skip
    torch.testing.assert_close(
        out.double().cpu(), naive(x, w, b, h0, act=act), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(fin.cpu(), torch.cat([h0, x], -1)[..., -(width - 1) :])


def test_seq_idx_keeps_sequences_apart():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 4, 10, generator=g), torch.randn(4, 4, generator=g)
    seq_idx = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3])
    out = causal_conv1d_fn(x, w, seq_idx=seq_idx, activation="silu")
    torch.testing.assert_close(
        out.double(), naive(x, w, seq_idx=seq_idx, act="silu"), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", [None, "silu"])
def test_seq_idx_padding_is_zero_and_a_boundary(device, act):
    # causal-conv1d's convention: seq_idx -1 on padded steps (here at the end of a row and
    # between two sequences); their output is 0 (not the convolution of the padding, not the
    # bias) and they separate the sequences around them.
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(2, 4, 12, generator=g), torch.randn(4, 4, generator=g), torch.randn(4)
    seq_idx = torch.tensor([[0] * 5 + [1] * 4 + [-1] * 3, [0] * 3 + [-1] * 2 + [1] * 7])
    out = causal_conv1d_fn(x.to(device), w.to(device), b.to(device),
                           seq_idx=seq_idx.to(device, torch.int32), activation=act)  # fmt: skip
    want = naive(x, w, b, seq_idx=seq_idx, act=act)
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5, atol=1e-5)
    assert (out.cpu()[0, :, 9:] == 0).all() and (out.cpu()[1, :, 3:5] == 0).all()
    # Gradients: those of the function computed (padding outputs are constants).
    xs = [t.to(device).requires_grad_() for t in (x, w, b)]
    got = torch.autograd.grad(
        causal_conv1d_fn(*xs, seq_idx=seq_idx.to(device), activation=act).square().sum(), xs
    )
    xr = [t.double().requires_grad_() for t in (x, w, b)]
    ref = torch.autograd.grad(naive(*xr, seq_idx=seq_idx, act=act).square().sum(), xr)
    for a_, r_ in zip(got, ref):
        torch.testing.assert_close(a_.double().cpu(), r_, rtol=1e-4, atol=1e-4)


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: causal_conv1d_fn(*a[:3], initial_states=a[3], activation="silu"), (x, w, b, h0)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("circular", [False, True])
def test_update_equals_full_conv(device, circular):
    g = torch.Generator().manual_seed(2)
    x, w, b = (
        torch.randn(2, 5, 9, generator=g),
        torch.randn(5, 4, generator=g),
        torch.randn(5, generator=g),
    )
    full = causal_conv1d_fn(x, w, b, activation="silu")
    state_len = 6 if circular else 3
    state = torch.zeros(2, 5, state_len, device=device)
    seqlens = torch.zeros(2, dtype=torch.int32, device=device) if circular else None
    outs = []
    for t in range(9):
        outs.append(causal_conv1d_update(x[:, :, t].to(device), state, w.to(device), b.to(device), "silu",
                                         cache_seqlens=seqlens))  # fmt: skip
        if circular:
            seqlens += 1
    torch.testing.assert_close(torch.stack(outs, -1).cpu(), full, rtol=1e-5, atol=1e-5)


def test_update_state_indices_and_padding():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 4, generator=g), torch.randn(4, 3, generator=g)
    state = torch.randn(3, 4, 2, generator=g)
    before = state.clone()
    out = causal_conv1d_update(x, state, w, conv_state_indices=torch.tensor([2, -1]))
    assert torch.equal(out[1], torch.zeros(4))
    assert torch.equal(state[0], before[0]) and torch.equal(state[1], before[1])
    torch.testing.assert_close(state[2], torch.stack([before[2][:, 1], x[0]], -1))


def test_errors_name_the_argument():
    with pytest.raises(ShapeError, match="weight: must have shape"):
        causal_conv1d_fn(torch.randn(2, 4, 5), torch.randn(3, 4))
    with pytest.raises(ShapeError, match="conv_state: must have shape"):
        causal_conv1d_update(torch.randn(2, 4), torch.randn(2, 4, 1), torch.randn(4, 4))
    with pytest.raises(NotImplementedError, match="activation"):
        causal_conv1d_fn(torch.randn(2, 4, 5), torch.randn(4, 4), activation="relu")


@pytest.mark.parametrize("seq", [False, True])
def test_rust_backward_matches_torch_autograd(seq):
    """Every gradient of the CPU kernel (incl. through final_states and with packed sequences)
    against autograd through the PyTorch reference, in float64."""
    from mamba_scan import causal_conv1d_ref

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    h0 = None if seq else torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [2] * 3]) if seq else None
    dout = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    dfin = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    results = []
    for fn in (causal_conv1d_fn, causal_conv1d_ref):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)] + (
            [h0.clone().requires_grad_()] if h0 is not None else []
        )
        kw = dict(seq_idx=seq_idx, activation="silu")
        if not seq:
            kw.update(initial_states=leaves[3], return_final_states=True)
        res = fn(*leaves[:3], **kw)
        out, fin = res if not seq else (res, None)
        loss = (out * dout).sum() + ((fin * dfin).sum() if fin is not None else 0)
        results.append([out.detach()] + list(torch.autograd.grad(loss, leaves)))
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-11)


def test_final_states_out_buffer_is_written():
    x, w = torch.randn(2, 3, 6), torch.randn(3, 4)
    buf = torch.zeros(2, 3, 3)
    _, fin = causal_conv1d_fn(x, w, return_final_states=True, final_states_out=buf)
    assert torch.equal(buf, x[..., -3:]) and torch.equal(fin, buf)
