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
