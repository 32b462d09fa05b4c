"""Compile every CUDA kernel specialisation several times at once and report which ones do not
always give the same cubin, which spill registers, and how long it took. Needs libnvrtc only
(torch's CUDA wheels bring it), no GPU.

    python benchmarks/compile_check.py [--arch sm_90] [--repeat 3] [--workers N] [--out FILE]

Compiles run as the library runs them: in the compile worker (a fresh interpreter per compile,
src/cuda/compile.rs), or in this process with MAMBA_SCAN_COMPILE_IN_PROCESS=1 (where NVVM's
output varies from compile to compile). The passes' compiles are shuffled together, so that
every program is compiled while others run on all the workers.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch  # noqa: F401  (its libnvrtc)

from mamba_scan import _native
from mamba_scan._boundary import ensure_cuda_libs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--only", default="", help="substring of the program names to compile")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    ensure_cuda_libs()
    names = _native.cuda_program_names()
    picks = [i for i, n in enumerate(names) if a.only in n]
    jobs = [i for i in picks for _ in range(a.repeat)]
    random.Random(0).shuffle(jobs)
    digests: dict[int, set[int]] = {}
    spills: dict[int, set[int]] = {}
    regs: dict[int, set[int]] = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=a.workers) as pool:
        futs = {pool.submit(_native.cuda_compile_program, a.arch, i): i for i in jobs}
        for k, fut in enumerate(as_completed(futs), 1):
            i = futs[fut]
            _, r, s, d = fut.result()
            digests.setdefault(i, set()).add(d)
            spills.setdefault(i, set()).add(s)
            regs.setdefault(i, set()).add(r or 0)
            if k % 200 == 0:
                print(f"{k}/{len(jobs)} compiles, {time.perf_counter() - t0:.0f} s", flush=True)
    wall = time.perf_counter() - t0
    varied = [i for i in picks if len(digests[i]) > 1]
    spilled = [i for i in picks if max(spills[i]) > 0]
    where = "compile worker" if _native.compile_worker_active() else "in process"
    lines = [
        f"# Compile check, {a.arch}",
        "",
        f"NVRTC {'.'.join(map(str, _native.nvrtc_version()))}, compiles {where}; "
        f"{len(picks)} programs x {a.repeat} compiles on {a.workers} workers in {wall:.0f} s "
        f"({wall * a.workers / max(len(jobs), 1):.2f} core-s per compile).",
        "",
        f"- programs with more than one cubin: **{len(varied)}**",
        f"- programs that spilled in some compile: **{len(spilled)}**",
        "",
    ]
    shown = sorted(set(varied) | set(spilled))
    if shown:
        lines += ["| program | cubins | registers | spill bytes |", "| --- | --- | --- | --- |"]
        for i in shown:
            lines.append(
                f"| {names[i]} | {len(digests[i])} | {sorted(regs[i])} | {sorted(spills[i])} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 1 if (varied or spilled) else 0


if __name__ == "__main__":
    sys.exit(main())
