"""Every CUDA kernel specialisation compiles with NVRTC for sm_80 and sm_90 without register
spills. Needs libnvrtc only (torch's CUDA wheels bring it), no GPU: this runs in CI."""

import pytest

from mamba_scan import _native
from mamba_scan._boundary import ensure_cuda_libs


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_all_kernels_compile_without_spills(arch):
    ensure_cuda_libs()
    try:
        _native.nvrtc_version()
    except _native.LibraryError:
        pytest.fail("libnvrtc not found: torch's CUDA wheels should provide it")
    results = _native.cuda_compile_all(arch)
    assert len(results) > 100
    spills = [(name, regs, spill) for name, regs, spill in results if spill]
    print(f"{arch}: {len(results)} kernels, max registers {max(r for _, r, _ in results if r)}")
    assert not spills, f"register spills on {arch}: {spills}"
    assert all(regs is not None for _, regs, _ in results)
