"""The anchors of the GPU benchmarks, built on the device from their PyPI sdists (never
committed; they live in the git-ignored .anchor/): mamba_ssm 2.3.2.post1's selective_scan_cuda,
causal-conv1d 1.7.0's causal_conv1d_cuda (both compiled with torch's cpp_extension for this GPU's
arch only), and their Python packages (mamba_ssm's Mamba block, mamba_inner_fn and Triton
selective_state_update; causal_conv1d's functions) imported from source.

    .anchor/src/selective_scan/    mamba_ssm's csrc/selective_scan
    .anchor/causal_conv1d_src/     causal-conv1d's csrc
    .anchor/pkgs/{mamba_ssm,causal_conv1d}/   the Python packages
"""

from __future__ import annotations

import os
import sys
import time
import types

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".anchor")
FLAGS = [
    "-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
]  # fmt: skip


def _prebuilt(name):
    """An extension built earlier (on another run of the same machine type) and kept in
    .anchor/prebuilt/: the anchors take minutes to build."""
    import importlib.machinery
    import importlib.util

    path = os.path.join(ROOT, "prebuilt", f"{name}.so")
    if not os.path.exists(path):
        return None
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules[name] = mod
    print(f"{name}: prebuilt {path}", flush=True)
    return mod


def _build(name, src, build_dir):
    from torch.utils.cpp_extension import load

    pre = _prebuilt(name)
    if pre is not None:
        return pre

    cc = torch.cuda.get_device_capability()
    arch = f"{cc[0]}{cc[1]}"
    files = sorted(f for f in os.listdir(src) if f.endswith((".cu", ".cpp")))
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
    os.makedirs(build_dir, exist_ok=True)
    t = time.time()
    mod = load(
        name=name,
        sources=[os.path.join(src, f) for f in files],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=FLAGS + [f"-gencode=arch=compute_{arch},code=sm_{arch}"],
        build_directory=build_dir,
        verbose=False,
    )
    print(f"{name} built in {time.time() - t:.0f} s", flush=True)
    sys.modules[name] = mod
    return mod


def build_all(build_root="/tmp/anchor_build"):
    """Build both extensions (in parallel processes would race on torch's lock; sequentially)."""
    ss = _build("selective_scan_cuda", os.path.join(ROOT, "src", "selective_scan"),
                os.path.join(build_root, "ss"))  # fmt: skip
    cc = _build("causal_conv1d_cuda", os.path.join(ROOT, "causal_conv1d_src"),
                os.path.join(build_root, "cc"))  # fmt: skip
    return ss, cc


def import_mamba_ssm():
    """mamba_ssm's modules from source, without running its package __init__ (which imports
    Mamba2/Mamba3 and their optional dependencies)."""
    pkgs = os.path.join(ROOT, "pkgs")
    if pkgs not in sys.path:
        sys.path.insert(0, pkgs)
    if "mamba_ssm" not in sys.modules:
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = [os.path.join(pkgs, "mamba_ssm")]
        sys.modules["mamba_ssm"] = pkg
    import causal_conv1d  # noqa: F401  (needs causal_conv1d_cuda built first)
    from mamba_ssm.modules.mamba_simple import Mamba
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    return types.SimpleNamespace(
        Mamba=Mamba, mamba_inner_fn=mamba_inner_fn, selective_state_update=selective_state_update,
        causal_conv1d_update=causal_conv1d.causal_conv1d_update,
        causal_conv1d_fn=causal_conv1d.causal_conv1d_fn,
    )  # fmt: skip
