"""Ahead-of-time compilation of every CUDA kernel specialisation: the ``warmup`` command and the
CI compile check. NVRTC releases the GIL (the native call detaches), so a thread pool compiles
on all cores."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

from . import _native

Report = tuple[str, "int | None", int, int]  # name, registers, spill bytes, cubin digest


def compile_all(
    arch: str,
    use_cache: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Report]:
    """Compile every kernel program for ``arch`` (e.g. ``"sm_90"``), ``workers`` at a time (default:
    the usable cores). With ``use_cache`` the cubins go to the disk cache; otherwise each is
    compiled afresh and reported with ptxas' register and spill counts. ``progress(done, total)``
    is called after each program. Results come back in program order."""
    return compile_archs([arch], use_cache, workers, progress)[arch]


def compile_archs(
    archs: list[str],
    use_cache: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[Report]]:
    """:func:`compile_all` for several architectures through one pool (no idle workers between
    them): ``{arch: reports in program order}``."""
    names = _native.cuda_program_names()
    workers = workers or len(os.sched_getaffinity(0))
    results: dict[str, list[Report | None]] = {a: [None] * len(names) for a in archs}
    # Longest first, so that no long compile runs alone at the end: the small ops' modules (one
    # program of all the conv1d kernels, one of the state-update ones), then the backward
    # programs (~3x a forward one).
    rank = {"conv1d": 0, "state_update": 0, "ssm_bwd": 1}
    order = sorted(range(len(names)), key=lambda i: rank.get(names[i].split()[0], 2))
    jobs = [(a, i) for i in order for a in archs]
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(_native.cuda_compile_program, a, i, use_cache): (a, i) for a, i in jobs
        }
        for fut in as_completed(futures):
            a, i = futures[fut]
            results[a][i] = fut.result()
            done += 1
            if progress is not None:
                progress(done, len(jobs))
    return results  # type: ignore[return-value]


class ProgressBar:
    """A one-line progress bar on stderr: count, elapsed time, and a fixed note (the cache
    directory). Redrawn in place on a terminal; elsewhere (logs, CI) a line every 10%."""

    def __init__(self, note: str, stream=None, width: int = 30):
        self.note, self.stream, self.width = note, stream or sys.stderr, width
        self.t0 = time.perf_counter()
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.t0
        filled = self.width * done // max(total, 1)
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} kernels, "
            f"{elapsed:.0f} s, {self.note}"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == total else ""))
            self.stream.flush()
        elif done * 10 // max(total, 1) != self.last_decile:
            self.last_decile = done * 10 // max(total, 1)
            self.stream.write(line + "\n")
            self.stream.flush()
