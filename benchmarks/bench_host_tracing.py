"""What the custom-op dispatch costs eager calls, in one process: the public functions check
``mamba_scan._ops.tracing()`` once per call (torch.compile / export / a dispatch mode) and
otherwise take the same direct path as before the ops existed. Times each call with that check
and with it replaced by ``lambda: False`` (the code before the ops, plus a trivial call), in
alternating rounds of the same process, so that the difference is not drowned by the 5-15 us
spread between processes of one build.

    python benchmarks/bench_host_tracing.py [--device cpu|cuda] [--rounds 20] [--calls 2000]

Prints a markdown table (medians over rounds; the difference is the median of paired rounds).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=2000)
    a = ap.parse_args()
    from bench_host_time import tiny_calls

    import mamba_scan

    names = ("selective_scan", "state_update", "conv1d")
    mods = [importlib.import_module(f"mamba_scan.ops.{m}") for m in names]
    real = mamba_scan._ops.tracing
    count = [0]

    def counting():
        count[0] += 1
        return real()

    def off():
        return False

    def use(f):
        for m in mods:
            m.tracing = f

    dev = a.device
    rows, _ = tiny_calls(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    print(f"| call ({dev}, batch 1, dim 16, dstate 16, L 1) | tracing() per call | us, as shipped "
          "| us, check replaced by `lambda: False` | difference, median of paired rounds |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for name, fn, no_grad in rows:
        with torch.no_grad() if no_grad else torch.enable_grad():
            use(counting)
            count[0] = 0
            fn()
            calls = count[0]
            for _ in range(300):
                fn()
            on, off_, diff = [], [], []
            for k in range(a.rounds):
                res = {}
                order = (("on", real), ("off", off)) if k % 2 == 0 else (("off", off), ("on", real))
                for which, f in order:
                    use(f)
                    sync()
                    t = time.perf_counter()
                    for _ in range(a.calls):
                        fn()
                    sync()
                    res[which] = (time.perf_counter() - t) / a.calls * 1e6
                on.append(res["on"])
                off_.append(res["off"])
                diff.append(res["on"] - res["off"])
        use(real)
        print(f"| {name} | {calls} | {statistics.median(on):.2f} | {statistics.median(off_):.2f} "
              f"| {statistics.median(diff):+.2f} |", flush=True)  # fmt: skip
    print(f"\ntorch {torch.__version__}, mamba_scan from {mamba_scan.__file__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
