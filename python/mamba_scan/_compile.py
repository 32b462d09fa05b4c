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
    names = _native.cuda_program_names()
    total = len(names)
    workers = workers or len(os.sched_getaffinity(0))
    results: list[Report | None] = [None] * total
    done = 0
    # The small-kernel module is one program of 56 kernels (~25 s): start it first, so that it
    # does not run alone at the end.
    order = sorted(range(total), key=lambda i: names[i] != "small kernels")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_native.cuda_compile_program, arch, i, use_cache): i for i in order}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            done += 1
            if progress is not None:
                progress(done, total)
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
