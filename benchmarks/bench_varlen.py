"""Packed sequences (seq_idx) on CUDA, through the public selective_scan_fn: what packing saves
against padding, what seq_idx costs where no sequence starts, and a packed prefill against a
loop over sequences. Medians of CUDA-event timings after warm-up; peak memory of one call.

    python benchmarks/bench_varlen.py [--quick]

Writes benchmarks/results/varlen_<gpu>.md.
"""

from __future__ import annotations

import argparse
import statistics

import naming
import torch

from mamba_scan import selective_scan_fn


def timed(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(ts), peak


def inputs(batch, dim, N, L, dtype, gen, grad):
    dev = "cuda"
    mk = lambda *s: torch.randn(*s, generator=gen, device=dev).to(dtype)  # noqa: E731
    u, z = mk(batch, dim, L), mk(batch, dim, L)
    delta = (torch.rand(batch, dim, L, generator=gen, device=dev) - 1.5).to(dtype)
    A = -(0.5 + torch.rand(dim, N, generator=gen, device=dev))
    B, C = mk(batch, N, L), mk(batch, N, L)
    D = torch.randn(dim, generator=gen, device=dev)
    bias = torch.randn(dim, generator=gen, device=dev) * 0.5
    leaves = [u, delta, B, C, z]
    if grad:
        for x in leaves:
            x.requires_grad_()
    return u, delta, A, B, C, D, z, bias


def fwd_bwd(args, grad, **kw):
    def run():
        out = selective_scan_fn(*args, delta_softplus=True, **kw)
        if isinstance(out, tuple):
            out = out[0]
        if grad:
            out.backward(torch.ones_like(out))

    return run


def pack(lengths, row_len):
    """First-fit decreasing into rows of row_len steps: (rows [[seq numbers]], seq_idx)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows, free = [], []
    for i in order:
        for r, f in enumerate(free):
            if f >= lengths[i]:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lengths[i])
    seq = torch.full((len(rows), row_len), -1, dtype=torch.int32)
    for r, ids in enumerate(rows):
        t = 0
        for i in ids:
            seq[r, t : t + lengths[i]] = i
            t += lengths[i]
    return rows, seq.cuda()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    lines = [f"# Packed sequences (seq_idx), {naming.header()}", ""]
    lines += ["Through `selective_scan_fn` (variable B/C, z, D, delta_bias, softplus), bf16, "
              "dstate 16. Medians of CUDA-event timings after warm-up; peak = extra memory of "
              "one call.", ""]  # fmt: skip

    # 1. Overhead of seq_idx where no sequence starts inside a tile: one sequence per row.
    lines += ["## seq_idx on equal-length rows (one sequence per row) vs the dense path", "",
              "| shape (b, d, N, L) | pass | dense ms | seq_idx ms | overhead |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    shapes = [(8, 1536, 16, 2048), (16, 2048, 16, 512), (1, 5120, 16, 16384)]
    if a.quick:
        shapes = shapes[:1]
    for shape in shapes:
        b, d, N, L = shape
        seq = torch.arange(b, dtype=torch.int32, device="cuda")[:, None].expand(b, L).contiguous()
        for grad in (False, True):
            args = inputs(b, d, N, L, torch.bfloat16, gen, grad)
            t_dense, _ = timed(fwd_bwd(args, grad))
            t_seq, _ = timed(fwd_bwd(args, grad, seq_idx=seq))
            lines.append(f"| {shape} | {'fwd+bwd' if grad else 'fwd'} | {t_dense:.3f} | "
                         f"{t_seq:.3f} | {100 * (t_seq / t_dense - 1):+.1f}% |")  # fmt: skip
            print(lines[-1], flush=True)

    # 2. Packed vs padded training batch.
    n_seqs, dim = (16, 1536) if a.quick else (64, 1536)
    lens = torch.randint(64, 4097, (n_seqs,), generator=torch.Generator().manual_seed(1)).tolist()
    total = sum(lens)
    row_len = 8192
    rows, seq = pack(lens, row_len)
    lines += ["", f"## Packed vs padded: {n_seqs} sequences, lengths 64..4096 (total {total} "
              f"tokens), dim {dim}", "",
              "| layout | shape (b, L) | fwd+bwd ms | tokens/s (real tokens) | peak MB |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    pad_args = inputs(n_seqs, dim, 16, max(lens), torch.bfloat16, gen, True)
    t_pad, m_pad = timed(fwd_bwd(pad_args, True), reps=10)
    lines.append(f"| padded to the longest | ({n_seqs}, {max(lens)}) | {t_pad:.2f} | "
                 f"{total / t_pad * 1e3:.3e} | {m_pad:.0f} |")  # fmt: skip
    pk_args = inputs(len(rows), dim, 16, row_len, torch.bfloat16, gen, True)
    t_pk, m_pk = timed(fwd_bwd(pk_args, True, seq_idx=seq), reps=10)
    lines.append(f"| packed, rows of {row_len} | ({len(rows)}, {row_len}) | {t_pk:.2f} | "
                 f"{total / t_pk * 1e3:.3e} | {m_pk:.0f} |")  # fmt: skip
    lines.append(f"\nPacked / padded speed: {t_pad / t_pk:.2f}x; memory {m_pk / m_pad:.2f}x.")
    print("\n".join(lines[-4:]), flush=True)

    # 3. Prefill of a mixed batch with cached states: one packed call vs a loop.
    n_req, dim = 64, 2560
    plens = torch.randint(16, 513, (n_req,), generator=torch.Generator().manual_seed(2)).tolist()
    L = sum(plens)
    seq = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(plens)])
    seq = seq[None].cuda()
    u, delta, A, B, C, D, z, bias = inputs(1, dim, 16, L, torch.bfloat16, gen, False)
    h0 = torch.randn(n_req, dim, 16, generator=gen, device="cuda")

    def packed():
        return selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True, initial_state=h0,
                                 seq_idx=seq, num_seqs=n_req)  # fmt: skip

    starts = [0]
    for n in plens:
        starts.append(starts[-1] + n)

    def loop():
        for i in range(n_req):
            s_ = slice(starts[i], starts[i + 1])
            selective_scan_fn(u[..., s_], delta[..., s_], A, B[..., s_], C[..., s_], D,
                              z[..., s_], bias, True, True, initial_state=h0[i : i + 1])  # fmt: skip

    with torch.no_grad():
        t_one, _ = timed(packed)
        t_loop, _ = timed(loop)
        o1, l1 = packed()
        err = 0.0
        for i in range(n_req):
            s_ = slice(starts[i], starts[i + 1])
            o2, l2 = selective_scan_fn(u[..., s_], delta[..., s_], A, B[..., s_], C[..., s_], D,
                                       z[..., s_], bias, True, True, initial_state=h0[i : i + 1])  # fmt: skip
            err = max(err, (o1[..., s_].float() - o2.float()).abs().max().item(),
                      (l1[i] - l2[0]).abs().max().item())  # fmt: skip
    lines += ["", f"## Prefill of {n_req} requests (lengths 16..512, {L} tokens, dim {dim}) "
              "with cached initial states, forward", "",
              "| how | ms |", "| --- | --- |",
              f"| one packed call (seq_idx, per-sequence initial/final states) | {t_one:.3f} |",
              f"| a loop of {n_req} calls | {t_loop:.3f} |",
              "", f"Speed-up {t_loop / t_one:.2f}x; max difference packed vs loop {err:.2e}."]  # fmt: skip
    print("\n".join(lines[-6:]), flush=True)
    path = naming.result_path("varlen")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
