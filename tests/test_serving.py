"""The continuous-batching prefill (vLLM's selective_scan_fn semantics) over the packed scan: the
listed slots of the state cache get exactly what running each prefill alone from its cached
state gives; other slots and pad entries stay untouched bit for bit."""

from __future__ import annotations

import pytest
import torch

from mamba_scan import selective_scan_fn
from mamba_scan.serving import selective_scan_fn as serving_scan

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _problem(device, lengths, dim=8, N=16, groups=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    mk = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    u, z = mk(dim, T), mk(dim, T)
    delta = (torch.rand(dim, T, generator=gen) - 1).to(device)
    A = -(0.5 + torch.rand(dim, N, generator=gen)).to(device)
    B, C = mk(groups, N, T), mk(groups, N, T)
    D, bias = mk(dim), mk(dim)
    qsl = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device)
    return u, delta, A, B, C, D, z, bias, qsl


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_z", [True, False])
def test_prefill_matches_each_alone(device, with_z):
    lengths = [5, 1, 40, 17, 9]
    u, delta, A, B, C, D, z, bias, qsl = _problem(device, lengths, groups=2)
    if not with_z:
        z = None
    cache = torch.randn(8, 8, 16, device=device)
    before = cache.clone()
    idx = torch.tensor([3, -1, 0, 6, 2], device=device, dtype=torch.int32)
    has = torch.tensor([True, True, False, True, False], device=device)
    zin = z.clone() if z is not None else None
    din = delta.clone()
    out = serving_scan(u, cache, din, A, B, C, D, zin, bias, True, query_start_loc=qsl,
                       cache_indices=idx, has_initial_state=has)  # fmt: skip
    assert out.data_ptr() == (zin if zin is not None else din).data_ptr()  # in place, as vLLM
    for i in range(len(lengths)):
        s = slice(int(qsl[i]), int(qsl[i + 1]))
        if idx[i] < 0:
            continue
        h0 = before[idx[i]][None] if has[i] else torch.zeros(1, 8, 16, device=device)
        o, last = selective_scan_fn(u[None, :, s], delta[None, :, s], A, B[None, ..., s],
                                    C[None, ..., s], D, z[None, :, s] if z is not None else None,
                                    bias, True, True, initial_state=h0)  # fmt: skip
        torch.testing.assert_close(out[:, s], o[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache[idx[i]], last[0], atol=1e-5, rtol=1e-5)
    for slot in (1, 4, 5, 7):
        assert torch.equal(cache[slot], before[slot])


@pytest.mark.parametrize("device", DEVICES)
def test_batch_mode_and_all_pad(device):
    """Without query_start_loc: (batch, dim, seqlen) rows, one slot per row."""
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(3, 4, 12, generator=gen).to(device)
    delta = torch.rand(3, 4, 12, generator=gen).to(device)
    A = -torch.rand(4, 8, generator=gen).to(device)
    B, C = (torch.randn(3, 1, 8, 12, generator=gen).to(device) for _ in range(2))
    cache = torch.randn(5, 4, 8, generator=gen).to(device)
    before = cache.clone()
    idx = torch.tensor([4, 0, -1], device=device)
    out = serving_scan(u, cache, delta.clone(), A, B, C, query_start_loc=None, cache_indices=idx,
                       has_initial_state=torch.tensor([True, False, True], device=device))  # fmt: skip
    o, last = selective_scan_fn(u[:1], delta[:1], A, B[:1], C[:1], return_last_state=True,
                                initial_state=before[4:5])  # fmt: skip
    torch.testing.assert_close(out[:1], o)
    torch.testing.assert_close(cache[4], last[0])
    for slot in (1, 2, 3):
        assert torch.equal(cache[slot], before[slot])
    # Every entry a pad: the cache does not change at all.
    cache2 = before.clone()
    serving_scan(u, cache2, delta.clone(), A, B, C, cache_indices=torch.full((3,), -1,
                 device=device))  # fmt: skip
    assert torch.equal(cache2, before)


@pytest.mark.parametrize("device", DEVICES)
def test_state_update_vllm_keywords(device):
    """selective_state_update with vLLM's pad_slot_id and out: the pad entry's state row is
    untouched, the others updated as without padding, the output lands in out."""
    from mamba_scan import selective_state_update

    gen = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    state = mk(6, 4, 8)
    x, dt, z = mk(3, 4), mk(3, 4), mk(3, 4)
    A = -torch.rand(4, 8, generator=gen).to(device)
    B, C = mk(3, 8), mk(3, 8)
    idx = torch.tensor([5, 2, 0], device=device)
    ref_state = state.clone()
    ref = selective_state_update(ref_state, x, dt, A, B, C, z=z, dt_softplus=True,
                                 state_batch_indices=idx)  # fmt: skip
    st = state.clone()
    out = torch.empty(3, 4, device=device)
    got = selective_state_update(st, x, dt, A, B, C, z=z, dt_softplus=True,
                                 state_batch_indices=idx, pad_slot_id=2, out=out)  # fmt: skip
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(st[2], state[2])  # the pad entry's slot
    for i, slot in ((0, 5), (2, 0)):
        torch.testing.assert_close(st[slot], ref_state[slot])
        torch.testing.assert_close(out[i], ref[i])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [2, 4])
def test_conv_prefill_matches_each_alone(device, dtype, width):
    """vLLM's varlen causal_conv1d_fn: each sequence's output and new cached state equal running
    it alone from its cached state (or zeros); pad entries' and other slots untouched. Lengths
    include 1 and lengths shorter than the state (the new state then keeps part of the old)."""
    from mamba_scan import causal_conv1d_fn
    from mamba_scan.serving import causal_conv1d_fn as serving_conv

    gen = torch.Generator().manual_seed(width)
    dim, k = 12, width - 1
    lengths = [1, 7, 2, 30, 5, 3]
    T = sum(lengths)
    # vLLM's layouts: x (dim, tokens) channel-last, the cache (rows, dim, k) with dim stride 1.
    x = torch.randn(T, dim, generator=gen).to(device, dtype).t()
    w = torch.randn(dim, width, generator=gen).to(device, dtype)
    bias = torch.randn(dim, generator=gen).to(device, dtype)
    cache = torch.randn(9, k, dim, generator=gen).to(device, dtype).transpose(1, 2)
    before = cache.clone()
    qsl = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device,
                       dtype=torch.int32)  # fmt: skip
    idx = torch.tensor([4, 7, -1, 0, 2, 8], device=device, dtype=torch.int32)
    has = torch.tensor([True, False, True, True, False, True], device=device)
    out = serving_conv(x, w, bias, cache, qsl, idx, has, activation="silu")
    assert out.shape == x.shape and out.dtype == dtype
    for i in range(len(lengths)):
        s = slice(int(qsl[i]), int(qsl[i + 1]))
        slot = int(idx[i])
        if slot < 0:
            continue
        h0 = before[slot][None] if has[i] else torch.zeros(1, dim, k, device=device, dtype=dtype)
        o, fin = causal_conv1d_fn(x[None, :, s], w, bias, initial_states=h0.contiguous(),
                                  return_final_states=True, activation="silu")  # fmt: skip
        torch.testing.assert_close(out[:, s], o[0], atol=0, rtol=0)
        torch.testing.assert_close(cache[slot], fin[0], atol=0, rtol=0)
    for slot in (1, 3, 5, 6):
        assert torch.equal(cache[slot], before[slot])


@pytest.mark.parametrize("device", DEVICES)
def test_conv_update_pad_slot(device):
    """vLLM's causal_conv1d_update: a pad_slot_id entry leaves its row untouched."""
    from mamba_scan import causal_conv1d_update
    from mamba_scan.serving import causal_conv1d_update as serving_update

    gen = torch.Generator().manual_seed(5)
    state = torch.randn(5, 6, 3, generator=gen).to(device)
    x = torch.randn(3, 6, generator=gen).to(device)
    w = torch.randn(6, 4, generator=gen).to(device)
    idx = torch.tensor([4, 3, 1], device=device, dtype=torch.int32)
    ref = state.clone()
    want = causal_conv1d_update(x, ref, w, None, "silu", conv_state_indices=idx)
    st = state.clone()
    got = serving_update(x, st, w, None, True, conv_state_indices=idx, pad_slot_id=3)
    assert torch.equal(st[3], state[3])
    for i, slot in ((0, 4), (2, 1)):
        torch.testing.assert_close(st[slot], ref[slot])
        torch.testing.assert_close(got[i], want[i])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_serving_under_cuda_graph():
    """The prefill conv + scan and a decode step captured in one CUDA graph, replayed on new
    inputs copied into the captured buffers: the same results as eager calls (no host sync
    inside, the indices stay on the device)."""
    from mamba_scan import selective_state_update
    from mamba_scan.serving import causal_conv1d_fn as serving_conv
    from mamba_scan.serving import causal_conv1d_update as serving_update

    dev = "cuda"
    lengths = [5, 1, 40, 17]
    u, delta, A, B, C, D, z, bias, qsl = _problem(dev, lengths, groups=1)
    w = torch.randn(8, 4, device=dev)
    conv_cache, ssm_cache = torch.randn(6, 8, 3, device=dev), torch.randn(6, 8, 16, device=dev)
    idx = torch.tensor([2, -1, 0, 5], device=dev, dtype=torch.int32)
    has = torch.tensor([True, True, False, True], device=dev)
    x1, dt1 = torch.randn(4, 8, device=dev), torch.randn(4, 8, device=dev)
    B1, C1 = torch.randn(4, 16, device=dev), torch.randn(4, 16, device=dev)

    def step(u, z, delta, conv_cache, ssm_cache):
        xc = serving_conv(u, w, bias, conv_cache, qsl, idx, has, activation="silu")
        y = serving_scan(xc, ssm_cache, delta, A, B, C, D, z, bias, True, query_start_loc=qsl,
                         cache_indices=idx, has_initial_state=has)  # fmt: skip
        xd = serving_update(x1, conv_cache, w, bias, True, conv_state_indices=idx)
        yd = selective_state_update(ssm_cache, xd, dt1, A, B1, C1, D, dt_softplus=True,
                                    state_batch_indices=idx, pad_slot_id=-1)  # fmt: skip
        return y, yd

    bufs = [t.clone() for t in (u, z, delta, conv_cache, ssm_cache)]
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (kernel compiles) outside the capture
        step(*[t.clone() for t in bufs])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gy, gyd = step(*bufs)
    for seed in (1, 2):
        gen = torch.Generator(device=dev).manual_seed(seed)
        new = [torch.randn(t.shape, device=dev, generator=gen) for t in (u, z, delta)]
        new[2] = new[2].sigmoid() - 1
        caches = [torch.randn(t.shape, device=dev, generator=gen) for t in (conv_cache, ssm_cache)]
        for dst, src in zip(bufs, new + caches):
            dst.copy_(src)
        g.replay()
        ey, eyd = step(*[t.clone() for t in new + caches])
        torch.cuda.synchronize()
        torch.testing.assert_close(gy, ey)
        torch.testing.assert_close(gyd, eyd)
