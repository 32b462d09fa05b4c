"""``python -m mamba_scan``: report the device, check parity, time a small benchmark.

``python -m mamba_scan``        parity check + small benchmark on CUDA if present, else the CPU.
``python -m mamba_scan info``   only the environment report.
``python -m mamba_scan warmup [sm_XY]``  compile every CUDA kernel specialisation for this GPU's
                                 architecture (or sm_XY) into the disk cache ahead of time.
"""

from __future__ import annotations

import sys
import time

import torch

from . import _native, selective_scan_fn, selective_scan_ref


def _inputs(batch, dim, seqlen, dstate, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, dim, seqlen, generator=g).to(device, dtype)
    delta = (torch.rand(batch, dim, seqlen, generator=g) * 2 - 1.5).to(device, dtype)
    A = -(0.5 + torch.rand(dim, dstate, generator=g) * 3).to(device)
    B = torch.randn(batch, dstate, seqlen, generator=g).to(device, dtype)
    C = torch.randn(batch, dstate, seqlen, generator=g).to(device, dtype)
    D = torch.randn(dim, generator=g).to(device)
    z = torch.randn(batch, dim, seqlen, generator=g).to(device, dtype)
    bias = (torch.randn(dim, generator=g) * 0.5).to(device)
    return (u, delta, A, B, C, D, z, bias)


def _time(fn, device, reps=5):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def _err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def _layer_checks(device):
    """The other kernels a Mamba layer calls, fp32 on `device`, with their PyTorch references
    in fp32 (same device) and float64 (CPU): (ours, ref fp32, ref fp64) per check."""
    import torch.nn.functional as F

    from . import (
        Mamba,
        causal_conv1d_update,
        causal_conv1d_update_ref,
        mamba_inner_fn,
        mamba_inner_ref,
        selective_state_update,
        selective_state_update_ref,
    )

    torch.manual_seed(0)
    m = Mamba(d_model=32, d_state=16).to(device)
    h = torch.randn(2, 50, 32, device=device)
    with torch.no_grad():
        xz = F.linear(h, m.in_proj.weight).transpose(1, 2)
        args = [xz, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight,
                m.out_proj.weight, m.out_proj.bias, -torch.exp(m.A_log.float())]  # fmt: skip
        kw = dict(D=m.D.float(), delta_bias=m.dt_proj.bias.float())
        cpu64 = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
        res = {
            "mamba_inner_fn (Mamba block) fp32": (
                mamba_inner_fn(*args, **kw),
                mamba_inner_ref(*args, **kw),
                mamba_inner_ref(*map(cpu64, args), **{k: cpu64(v) for k, v in kw.items()}),
            )
        }
        b, d, n = 3, 64, 16
        g = torch.Generator().manual_seed(1)
        r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
        st, x, dt, B, C = r(b, d, n), r(b, d), r(b, d), r(b, n), r(b, n)
        A = -torch.rand(d, n, generator=g).to(device) - 0.5
        outs = []
        for fn, cast in ((selective_state_update, None), (selective_state_update_ref, None),
                         (selective_state_update_ref, cpu64)):  # fmt: skip
            c = (lambda t: t.clone()) if cast is None else cast
            outs.append(fn(c(st), c(x), c(dt), c(A), c(B), c(C), dt_softplus=True))
        res["selective_state_update fp32"] = tuple(outs)
        cs, w = r(b, d, 3), r(d, 4)
        outs = []
        for fn, cast in ((causal_conv1d_update, None), (causal_conv1d_update_ref, None),
                         (causal_conv1d_update_ref, cpu64)):  # fmt: skip
            c = (lambda t: t.clone()) if cast is None else cast
            outs.append(fn(c(x), c(cs), c(w), None, "silu"))
        res["causal_conv1d_update fp32"] = tuple(outs)
    return res


def info() -> str:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [f"mamba_scan {sys.modules['mamba_scan'].__version__}, torch {torch.__version__}"]
    lines.append(
        f"CPU path: {_native.cpu_isa()} kernels, {_native.cpu_threads()} threads, "
        f"chunk {_native.cpu_chunk_size()}"
    )
    if dev == "cuda":
        lines.append(f"device: {torch.cuda.get_device_name()} (cuda:{torch.cuda.current_device()})")
    else:
        lines.append("device: no CUDA device found; using the CPU path")
    return "\n".join(lines)


def warmup(arch: str | None) -> int:
    from ._boundary import ensure_cuda_libs

    ensure_cuda_libs()
    if arch is None:
        if not torch.cuda.is_available():
            print("no CUDA device: name an architecture, e.g. `python -m mamba_scan warmup sm_90`")
            return 2
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    from ._compile import ProgressBar, compile_all

    cache = _native.cuda_cache_dir()
    if cache is None:
        print("MAMBA_SCAN_CACHE_DIR is empty: the disk cache is off, nothing to warm up")
        return 2
    t = time.perf_counter()
    done = compile_all(arch, use_cache=True, progress=ProgressBar(f"cache {cache}"))
    print(f"{len(done)} kernels for {arch} in {cache} ({time.perf_counter() - t:.1f} s)")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["warmup"]:
        return warmup(argv[1] if len(argv) > 1 else None)
    print(info())
    if argv[:1] == ["info"]:
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ok = True
    print("\nparity vs float64 reference (max abs error; pytorch fp32 reference in brackets)")
    args = _inputs(2, 16, 300, 16, torch.float32, device)
    ref64 = selective_scan_ref(*[a.double() for a in args], delta_softplus=True)
    ref32 = selective_scan_ref(*args, delta_softplus=True)
    out = selective_scan_fn(*args, delta_softplus=True)
    e, ept = (out.double() - ref64).abs().max().item(), (ref32.double() - ref64).abs().max().item()
    good = e <= 2 * ept + 1e-6
    ok &= good
    print(f"  forward fp32 (2,16,300,16): {e:.2e} [{ept:.2e}] {'ok' if good else 'FAIL'}")
    for name, (got, ref32, ref64) in _layer_checks(device).items():
        e, ept = _err(got, ref64), _err(ref32, ref64)
        good = e <= 2 * ept + 1e-5 * max(ref64.abs().max().item(), 1.0)
        ok &= good
        print(f"  {name}: {e:.2e} [{ept:.2e}] {'ok' if good else 'FAIL'}")

    shape = (2, 1536, 1024, 16) if device == "cpu" else (8, 1536, 2048, 16)
    b, d, L, n = shape
    print(f"\nbenchmark (batch={b}, dim={d}, seqlen={L}, dstate={n}), fp32, median ms")
    args = _inputs(b, d, L, n, torch.float32, device)
    ours = _time(lambda: selective_scan_fn(*args, delta_softplus=True), device)
    small = tuple(a[:, :64] if a.dim() == 3 and a.shape[1] == d else a for a in args)
    small = (small[0], small[1], args[2][:64], small[3], small[4], args[5][:64], small[6],
             args[7][:64])  # fmt: skip
    ref_small = _time(lambda: selective_scan_ref(*small, delta_softplus=True), device, reps=1)
    ref_est = ref_small * d / 64
    print(f"  mamba_scan forward: {ours:8.2f} ms")
    print(f"  selective_scan_ref: {ref_est:8.2f} ms (measured on 64 of {d} channels, scaled)")
    print(f"  speed-up: {ref_est / ours:.1f}x")
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
