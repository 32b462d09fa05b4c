"""Names and headers of the result files in benchmarks/results/: named by what they hold and
where it ran (``scan_h200.md``, ``cpu_2core.md``), with the date and versions inside."""

from __future__ import annotations

import datetime
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def machine_tag(device: str = "cuda") -> str:
    """``h200`` for an NVIDIA H200, ``a100_sxm4_80gb`` and so on; ``2core`` for a 2-core CPU."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name().lower().replace("nvidia", "")
        return re.sub(r"[^a-z0-9]+", "_", name).strip("_")
    return f"{len(os.sched_getaffinity(0))}core"


def out_dir() -> str:
    """BENCH_OUT if set (the GPU suite's output folder), else benchmarks/results."""
    d = os.environ.get("BENCH_OUT") or os.path.join(HERE, "results")
    os.makedirs(d, exist_ok=True)
    return d


def result_path(kind: str, ext: str = "md", device: str = "cuda") -> str:
    return os.path.join(out_dir(), f"{kind}_{machine_tag(device)}.{ext}")


def header(device: str = "cuda") -> str:
    """One line: machine, date, versions."""
    import torch

    import mamba_scan

    parts = [datetime.date.today().isoformat()]
    if device == "cuda":
        parts.append(
            f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs)"
        )
        parts.append(f"CUDA {torch.version.cuda}")
        try:
            parts.append("NVRTC {}.{}".format(*mamba_scan._native.nvrtc_version()))
        except Exception:  # noqa: BLE001  (the header must not fail the benchmark)
            pass
    else:
        parts.append(f"{len(os.sched_getaffinity(0))} CPU cores ({mamba_scan._native.cpu_isa()})")
    parts.append(f"torch {torch.__version__}")
    parts.append(f"mamba_scan {mamba_scan.__version__}")
    return "Measured " + ", ".join(parts) + "."
