"""Tensors past 2^31 elements on CUDA: every offset is 64-bit.

The scan over u of (4, 8192, 65600) bf16 (2.15e9 elements) forward and backward, and the
decoding step and conv update reading state rows whose offsets pass 2^31 elements. The results
of channels (and state rows) that lie past 2^31 are checked against the same kernels on a small
tensor holding only those channels: channels are independent, so any offset truncated to 32
bits shows up as other channels' data (the scan's launches may round a few elements differently
in the last bf16 place; the state rows must agree bit for bit). Needs a GPU with ~48 GB free (skipped otherwise)."""

import pytest
import torch

from mamba_scan import causal_conv1d_update, selective_scan_fn, selective_state_update

GIB = 1 << 30


def _free_gib():
    if not torch.cuda.is_available():
        return 0
    free, _ = torch.cuda.mem_get_info()
    return free / GIB


large = pytest.mark.skipif(_free_gib() < 60, reason="needs a CUDA device with 60 GiB free")


@large
def test_scan_past_two_to_the_31_elements_forward_and_backward():
    torch.manual_seed(0)
    batch, dim, N, L = 4, 8192, 16, 65600
    assert batch * dim * L > 2**31
    dev, dt = "cuda", torch.bfloat16
    u = torch.randn(batch, dim, L, device=dev, dtype=dt)
    delta = (torch.rand(batch, dim, L, device=dev) * 2 - 1.5).to(dt)
    A = -(0.5 + torch.rand(dim, N, device=dev) * 3)
    B = torch.randn(batch, N, L, device=dev, dtype=dt)
    C = torch.randn(batch, N, L, device=dev, dtype=dt)
    D = torch.randn(dim, device=dev)
    bias = torch.randn(dim, device=dev) * 0.5
    leaves = [t.requires_grad_() for t in (u, delta, D)]
    out = selective_scan_fn(u, delta, A, B, C, D, None, bias, True)
    dout = torch.randn_like(out)
    du, ddelta, dD = torch.autograd.grad(out, leaves, dout)
    # The last batch row's top channels start past 2^31 elements; rerun them alone.
    sl = (slice(batch - 1, batch), slice(dim - 16, dim))
    assert (batch - 1) * dim * L + (dim - 16) * L > 2**31
    u2, d2 = u.detach()[sl].clone().requires_grad_(), delta.detach()[sl].clone().requires_grad_()
    D2 = D.detach()[dim - 16 :].clone().requires_grad_()
    out2 = selective_scan_fn(
        u2, d2, A[dim - 16 :], B[-1:], C[-1:], D2, None, bias[dim - 16 :], True
    )
    du2, dd2 = torch.autograd.grad(out2, (u2, d2), dout[sl])
    assert torch.isfinite(out).all()
    # The two launches split the channels differently (rounding may differ in the last bf16
    # place of a few elements); a truncated offset would read other channels' data instead.
    for name, big, small in (("out", out[sl], out2), ("du", du[sl], du2),
                             ("ddelta", ddelta[sl], dd2)):  # fmt: skip
        diff = (big.float() - small.float()).abs()
        scale = small.float().abs().max().item()
        assert (diff > 0).float().mean().item() < 1e-3, f"{name}: many elements differ"
        assert diff.max().item() <= 2**-6 * scale, f"{name}: max difference {diff.max().item()}"
    assert torch.isfinite(dD).all()


@large
def test_state_rows_past_two_to_the_31_elements():
    """selective_state_update and causal_conv1d_update on state rows whose offsets pass 2^31."""
    torch.manual_seed(0)
    rows, dim, N = 70_000, 2048, 16
    assert (rows - 1) * dim * N > 2**31
    dev = "cuda"
    state = torch.zeros(rows, dim, N, device=dev)
    idx = torch.tensor([rows - 1, 5, rows - 2, -1], device=dev, dtype=torch.int32)
    state[idx[:3].long()] = torch.randn(3, dim, N, device=dev)
    x, dt = torch.randn(4, dim, device=dev), torch.rand(4, dim, device=dev)
    A = -(0.5 + torch.rand(dim, N, device=dev))
    B, C = torch.randn(4, N, device=dev), torch.randn(4, N, device=dev)
    small = state[idx[:3].long()].clone()
    out = selective_state_update(state, x, dt, A, B, C, state_batch_indices=idx)
    out2 = selective_state_update(small, x[:3], dt[:3], A, B[:3], C[:3])
    torch.testing.assert_close(out[:3], out2, rtol=0, atol=0)
    assert (out[3] == 0).all()
    torch.testing.assert_close(state[idx[:3].long()], small, rtol=0, atol=0)
    del state
    # conv state (rows, dim, 3) past 2^31 elements: 2^31 / (dim * 3) rows and more.
    crow = (2**31) // (dim * 3) + 8
    conv_state = torch.zeros(crow, dim, 3, device=dev, dtype=torch.bfloat16)
    cidx = torch.tensor([crow - 1, 0], device=dev, dtype=torch.int32)
    conv_state[cidx.long()] = torch.randn(2, dim, 3, device=dev, dtype=torch.bfloat16)
    w = torch.randn(dim, 4, device=dev, dtype=torch.bfloat16)
    xc = torch.randn(2, dim, device=dev, dtype=torch.bfloat16)
    csmall = conv_state[cidx.long()].clone()
    y = causal_conv1d_update(xc, conv_state, w, None, "silu", conv_state_indices=cidx)
    y2 = causal_conv1d_update(xc, csmall, w, None, "silu")
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    torch.testing.assert_close(conv_state[cidx.long()], csmall, rtol=0, atol=0)
