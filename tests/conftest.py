import threading

import pytest

import mamba_scan._boundary as boundary

# The whole-program compile check (tests/test_cuda_compile.py) compiles every kernel program for
# two architectures: minutes of NVRTC on all cores. When it is selected, the compiles start in a
# background thread as soon as the tests are collected and run while the other tests do (those
# leave cores idle most of the time); the check itself is moved to the end of the run and only
# collects the reports. The compile servers make each cubin independent of the load. While it
# runs, torch's own CPU ops run single-threaded: libgomp's threads spin at every barrier and,
# with the cores taken by the compiles, a test file took 340 s instead of 106 s (torch's
# threading is not under test; mamba_scan's CPU kernels keep their rayon pool).
COMPILE_ALL_TEST = "test_all_kernels_compile_without_spills"
_compile_all: dict = {}


def _compile_in_background():
    from mamba_scan._boundary import ensure_cuda_libs
    from mamba_scan._compile import compile_archs

    try:
        ensure_cuda_libs()
        _compile_all["reports"] = compile_archs(["sm_80", "sm_90"])
    except BaseException as e:  # reported by the check itself
        _compile_all["error"] = e


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only a selected check starts it
def pytest_collection_modifyitems(config, items):
    last = [it for it in items if it.name == COMPILE_ALL_TEST]
    if not last:
        return
    items[:] = [it for it in items if it.name != COMPILE_ALL_TEST] + last
    import torch

    torch.set_num_threads(1)
    t = threading.Thread(target=_compile_in_background, name="compile-all", daemon=True)
    _compile_all["thread"] = t
    t.start()


@pytest.fixture(scope="module")
def all_kernel_reports():
    """{arch: reports} of every kernel program for sm_80 and sm_90 (see above)."""
    t = _compile_all.get("thread")
    if t is None:  # not started by the collection hook (e.g. the test was called directly)
        _compile_in_background()
    else:
        t.join()
    if "error" in _compile_all:
        raise _compile_all["error"]
    return _compile_all["reports"]


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every output the shim allocates is NaN-filled before the kernel runs."""
    boundary.POISON_OUTPUTS = True
    yield
    boundary.POISON_OUTPUTS = False
