"""Context parallelism (mamba_scan.distributed) over torch.distributed: 2 and 4 processes on the
gloo backend (CPU; NCCL on GPUs where several are present). Each rank holds a slice of one
sequence (uneven lengths, an empty slice among them); the output slices, the final state and
every gradient equal the single-process scan of the whole sequence. float64 (the CPU kernels'
precision for gradcheck: agreement to ~1e-12 shows the exchange is exact) and float32 / bfloat16
(within the parity rule against float64)."""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

# Slice lengths per world size: uneven, one empty slice, one shorter than the conv's halo.
SLICES = {2: [37, 91], 4: [50, 0, 2, 77]}
GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(L, dtype, b_mode, has_h0, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch, dim, N = 2, 6, 4
    wt = torch.float64 if dtype == torch.float64 else torch.float32
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g).to(dt)  # noqa: E731
    inp = dict(u=r(batch, dim, L), delta=(torch.rand(batch, dim, L, generator=g) * 2 - 1.5).to(dtype),
               A=-(0.5 + torch.rand(dim, N, generator=g) * 2).to(wt),
               B=r(dim, N, dt=wt) if b_mode == "fixed" else r(batch, N, L),
               C=r(batch, 2, N, L), D=r(dim, dt=wt), z=r(batch, dim, L),
               delta_bias=(torch.rand(dim, generator=g) * 0.5).to(wt),
               initial_state=r(batch, dim, N, dt=wt) if has_h0 else None)  # fmt: skip
    return inp


def _sliced(name, t, lo, hi):
    if t is None or name in ("A", "D", "delta_bias", "initial_state") or t.dim() == 2:
        return t
    return t[..., lo:hi]


def _case(rank, world, dtype, b_mode, has_h0):
    """One configuration on this rank: (the worst error ratio, which must be <= 1, and the
    failures). Nothing raises between collectives, so that one rank's failure cannot leave the
    others waiting."""
    from mamba_scan import selective_scan_fn
    from mamba_scan.distributed import context_parallel_scan

    lens = SLICES[world]
    L = sum(lens)
    lo, hi = sum(lens[:rank]), sum(lens[: rank + 1])
    full = _inputs(L, dtype, b_mode, has_h0)
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(2, 6, L, generator=g)
    dlast = torch.randn(2, 6, 4, generator=g)

    def run_single(inp, dt):
        leaves = {k: v.to(dt if v.is_floating_point() and v.dtype == dtype else v.dtype)
                  .detach().requires_grad_() for k, v in inp.items() if v is not None}  # fmt: skip
        if dt == torch.float64:
            leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
        out, last = selective_scan_fn(**{**inp, **leaves}, delta_softplus=True,
                                      return_last_state=True)  # fmt: skip
        loss = (out.double() * dout.double()).sum() + (last.double() * dlast.double()).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return out.detach().double(), last.detach().double(), dict(zip(leaves, grads))

    # This rank's slice through the context-parallel scan.
    leaves = {k: _sliced(k, v, lo, hi).detach().clone().requires_grad_()
              for k, v in full.items() if v is not None}  # fmt: skip
    args = {**{k: None for k in GRADS}, **leaves}
    if rank != 0:
        args["initial_state"] = None
    out, last = context_parallel_scan(**args, delta_softplus=True, return_last_state=True)
    loss = (out.double() * dout[..., lo:hi].double()).sum()
    if rank == world - 1:
        loss = loss + (last.double() * dlast.double()).sum()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
    # Replicated arguments: each rank holds the gradient of its own use; their sum is the total.
    import torch.distributed as dist

    for k in ("A", "D", "delta_bias") + (("B",) if b_mode == "fixed" else ()):
        dist.all_reduce(grads[k])
    # The single-process reference: same precision, and float64 for the rule.
    want_out, want_last, want_g = run_single(full, dtype)
    ref_out, ref_last, ref_g = run_single(full, torch.float64)
    worst, failures = 0.0, []

    def rule(name, got, same, ref):
        nonlocal worst
        got, same, ref = got.double(), same.double(), ref.double()
        if ref.numel() == 0:  # an empty slice
            if got.shape != ref.shape:
                failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
            return
        scale = ref.abs().max().item() + 1e-30
        err = (got - ref).abs().max().item()
        tol = (
            2 * (same - ref).abs().max().item()
            + (1e-11 if dtype == torch.float64 else 1e-6) * scale
        )
        worst = max(worst, err / tol)
        if not err <= tol:
            failures.append(f"{dtype} B {b_mode} h0 {has_h0} {name}: error {err:.3g} > {tol:.3g}")

    rule("out", out.detach(), want_out[..., lo:hi], ref_out[..., lo:hi])
    rule("last_state", last.detach(), want_last, ref_last)
    for k, v in grads.items():
        if k == "initial_state" and rank != 0:
            continue
        rule(f"d{k}", v, _sliced(k, want_g[k], lo, hi), _sliced(k, ref_g[k], lo, hi))
    return worst, failures


def _mamba_case(rank, world):
    """A sequence-sharded Mamba layer: this rank's output slice and the input gradient equal the
    single-process layer's; the parameter gradients, summed over the ranks, equal its."""
    import torch.distributed as dist

    from mamba_scan import Mamba

    torch.manual_seed(0)
    layer = Mamba(d_model=8, d_state=4, d_conv=4, expand=2).double()
    lens = SLICES[world]
    L = sum(lens)
    lo, hi = sum(lens[:rank]), sum(lens[: rank + 1])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, L, 8, generator=g, dtype=torch.float64)
    w = torch.randn(2, L, 8, generator=g, dtype=torch.float64)
    failures = []
    xs = x[:, lo:hi].clone().requires_grad_()
    (layer(xs, process_group=dist.group.WORLD) * w[:, lo:hi]).sum().backward()
    pg = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for v in pg.values():
        dist.all_reduce(v)
    layer.zero_grad()
    xf = x.clone().requires_grad_()
    y = layer(xf)
    (y * w).sum().backward()
    pairs = [("dx", xs.grad, xf.grad[:, lo:hi])]
    pairs += [(f"d{n}", pg[n], p.grad) for n, p in layer.named_parameters()]
    for name, got, want in pairs:
        if not torch.allclose(got, want, rtol=1e-9, atol=1e-11):
            failures.append(f"Mamba {name}: max error {(got - want).abs().max().item():.3g}")
    return failures


def _worker(rank, world, port, q):
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        worst, failures = 0.0, []
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for b_mode in ("fixed", "var"):
                for has_h0 in (False, True):
                    w, f = _case(rank, world, dtype, b_mode, has_h0)
                    worst, failures = max(worst, w), failures + f
        failures += _mamba_case(rank, world)
        dist.barrier()
        dist.destroy_process_group()
        q.put((rank, "\n".join(failures) or "ok", worst))
    except BaseException:
        q.put((rank, traceback.format_exc(), None))


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_equals_single_process(world):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in range(world)]
    for p in procs:
        p.join(60)
    failed = [r for r in results if r[1] != "ok"]
    assert not failed, "\n".join(f"rank {r}: {msg}" for r, msg, _ in failed)
    assert all(p.exitcode == 0 for p in procs)
