"""Every CUDA kernel specialisation compiles with NVRTC for sm_80 and sm_90 without register
spills, and one source compiles to one cubin however often and under whatever load it is
compiled. Needs libnvrtc only (torch's CUDA wheels bring it), no GPU: this runs in CI."""

import io
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from mamba_scan import _native
from mamba_scan._boundary import ensure_cuda_libs
from mamba_scan._compile import ProgressBar


@pytest.fixture(scope="module", autouse=True)
def nvrtc():
    ensure_cuda_libs()
    try:
        _native.nvrtc_version()
    except _native.LibraryError:
        pytest.fail("libnvrtc not found: torch's CUDA wheels should provide it")


def test_all_kernels_compile_without_spills(all_kernel_reports):
    # Both architectures through one pool of all cores, longest programs first; started in the
    # background when the tests were collected, this test runs last (tests/conftest.py).
    assert set(all_kernel_reports) == {"sm_80", "sm_90"}
    for arch, reports in all_kernel_reports.items():
        assert len(reports) == len(_native.cuda_program_names()) > 100
        spills = [(name, regs, spill) for name, regs, spill, _ in reports if spill]
        regs = max(r for _, r, _, _ in reports if r)
        print(f"{arch}: {len(reports)} programs, max registers {regs}")
        assert not spills, f"register spills on {arch}: {spills}"
        assert all(regs is not None for _, regs, _, _ in reports)


# Specialisations whose cubin varied between compiles in one process (each compiled 3 times on 2
# threads; benchmarks/results/compile_variance_in_process_sm_90.md lists all 164 of 1057 programs
# then): the backward that spilled in CI (fp32 in the deep layout, which fp32 no longer uses; here
# its wide counterpart), the main shape's forward and backward, and the 8-states-per-lane
# backward. The compile servers must give one cubin each, under the same load.
VARIED = [
    "ssm_bwd in0 ks2 g8 varB1 varC1 z0 chunk32 tile32",
    "ssm_bwd in2 ks4 g4 varB1 varC1 z1 chunk32 tile32",
    "ssm_fwd in2 ks4 g4 varB1 varC1 z1 chunk32 tile64",
    "ssm_bwd in2 ks8 g32 varB1 varC1 z1 chunk16 tile16",
]


def test_one_source_one_cubin_under_load():
    assert _native.compile_worker_active()
    names = _native.cuda_program_names()
    jobs = [names.index(n) for n in VARIED for _ in range(2)]
    # All compiles at once on every core: the load under which the cubins used to differ.
    with ThreadPoolExecutor(max_workers=max(2, len(os.sched_getaffinity(0)))) as pool:
        out = list(pool.map(lambda i: _native.cuda_compile_program("sm_90", i), jobs))
    digests: dict[str, set[int]] = {}
    for name, _, _, digest in out:
        digests.setdefault(name, set()).add(digest)
    varied = {name: len(d) for name, d in digests.items() if len(d) > 1}
    assert not varied, f"one source compiled to several cubins: {varied}"


# Compiles a program in a fresh process: alone, or after two others in the same compile server.
ORDER_SCRIPT = """
import sys
from mamba_scan import _native
from mamba_scan._boundary import ensure_cuda_libs
ensure_cuda_libs()
names = _native.cuda_program_names()
for n in sys.argv[1:]:
    print(_native.cuda_compile_program("sm_90", names.index(n))[3])
"""


def test_cubin_does_not_depend_on_what_the_server_compiled_before():
    # A server forks each compile from the same state: what it compiled before must not matter.
    first, other = VARIED[2], "ssm_fwd in0 ks2 g8 varB1 varC1 z1 chunk32 tile32"
    run = lambda *progs: subprocess.run(  # noqa: E731
        [sys.executable, "-c", ORDER_SCRIPT, *progs],
        check=True,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(__file__),
    ).stdout.split()
    alone = run(first)
    after = run(other, VARIED[2].replace("tile64", "tile32"), first)
    assert alone[0] == after[2]


def test_first_cold_compile_is_logged_once_and_cached(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MAMBA_SCAN_CACHE_DIR", str(tmp_path))
    prog = VARIED[2]
    index = _native.cuda_program_names().index(prog)
    with caplog.at_level(logging.DEBUG, logger="mamba_scan"):
        first = _native.cuda_compile_program("sm_90", index, use_cache=True)
        again = _native.cuda_compile_program("sm_90", index, use_cache=True)
    cold = [r for r in caplog.records if f"compiling CUDA kernel {prog}" in r.getMessage()]
    # One cold compile, logged at INFO with the cache directory and the warmup hint (the first
    # of this process) or at DEBUG; the second call is served by the disk cache, silently.
    assert len(cold) == 1, [r.getMessage() for r in caplog.records]
    if cold[0].levelno == logging.INFO:
        assert str(tmp_path) in cold[0].getMessage() and "warmup" in cold[0].getMessage()
    assert first[3] == again[3]
    assert len(list(tmp_path.iterdir())) == 1


def test_progress_bar_lines_without_a_terminal():
    out = io.StringIO()
    bar = ProgressBar("cache /x", stream=out)
    for i in range(1, 21):
        bar(i, 20)
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("[" + "#" * 30 + "] 20/20 kernels")
    assert all("cache /x" in line for line in lines)


def test_backward_workspace_holds_one_partial_per_tile():
    """The CUDA backward's workspace (sized without a GPU) holds, by default, one fp32 dB / dC
    partial per tile of channels of the layout the launch picks: grouped B / C take no more
    than ungrouped ones, fixed ones none, and no dtype / z flag sizes it for another layout."""
    size = _native.cuda_bwd_workspace_size
    shape = (8, 1536, 64, 2048)
    per_channel = 8 * 1536 * (3 * 64 + 2)
    grouped = size(*shape, 4, 4, "bfloat16", True)
    assert grouped == size(*shape, 1, 1, "bfloat16", True)
    assert size(*shape, 0, 0, "bfloat16", True) == per_channel
    partials = grouped - per_channel
    copies = partials / (2 * 8 * 64 * 2048)
    # 1536 channels in tiles of 8 to 32: 48 to 192 copies, where sizing for every layout took 384.
    assert copies == int(copies) and 48 <= copies <= 192, copies
    with pytest.raises(_native.DTypeError, match="dtype"):
        size(*shape, 1, 1, "float64", True)


# The kernel cache (one small forward program, ~1 s of NVRTC per compile).
SMALL = "ssm_fwd in0 ks2 g2 varB1 varC1 z0 chunk32 tile32"


def _entries(d):
    return sorted(p for p in d.iterdir() if p.suffix == ".cubin")


@pytest.mark.parametrize("damage", ["bit flip", "truncated", "empty"])
def test_damaged_cache_entry_is_recompiled(damage, tmp_path, monkeypatch, caplog):
    """An entry whose bytes no longer match its checksum is not loaded: the kernel is compiled
    again (the same cubin) and the entry rewritten."""
    monkeypatch.setenv("MAMBA_SCAN_CACHE_DIR", str(tmp_path))
    index = _native.cuda_program_names().index(SMALL)
    first = _native.cuda_compile_program("sm_90", index, use_cache=True)
    (entry,) = _entries(tmp_path)
    good = entry.read_bytes()
    data = bytearray(good)
    if damage == "bit flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[: len(data) // 2] if damage == "truncated" else bytearray()
    entry.write_bytes(bytes(data))
    with caplog.at_level(logging.DEBUG, logger="mamba_scan"):
        again = _native.cuda_compile_program("sm_90", index, use_cache=True)
    assert any(f"compiling CUDA kernel {SMALL}" in r.getMessage() for r in caplog.records)
    assert again[3] == first[3]
    assert entry.read_bytes() == good


# Compiles SMALL twice through the disk cache of MAMBA_SCAN_CACHE_DIR (after limiting the size
# of files this process may write, if asked: a full disk) and reports the warnings it got.
UNWRITABLE_SCRIPT = """
import resource, signal, sys, warnings
if sys.argv[2] == "full":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from mamba_scan import _native
from mamba_scan._boundary import ensure_cuda_libs
ensure_cuda_libs()
i = _native.cuda_program_names().index(sys.argv[1])
with warnings.catch_warnings(record=True) as got:
    warnings.simplefilter("always")
    a = _native.cuda_compile_program("sm_90", i, use_cache=True)
    b = _native.cuda_compile_program("sm_90", i, use_cache=True)
assert a[3] == b[3]
print(len(got), got[0].category.__name__ if got else "", got[0].message if got else "")
"""


@pytest.mark.parametrize("kind", ["not a directory", "full"])
def test_unwritable_cache_warns_once_and_compiles_in_memory(kind, tmp_path):
    """A cache directory that cannot take the kernel (a path under a file; a disk that takes no
    more bytes) gives one RuntimeWarning naming it, and the kernels still compile and run."""
    if kind == "full":
        cache = tmp_path / "cache"
    else:
        (tmp_path / "file").write_text("x")
        cache = tmp_path / "file" / "cache"
    env = dict(os.environ, MAMBA_SCAN_CACHE_DIR=str(cache))
    out = subprocess.run(
        [sys.executable, "-c", UNWRITABLE_SCRIPT, SMALL, "full" if kind == "full" else "-"],
        check=True, capture_output=True, text=True, env=env, cwd=os.path.dirname(__file__),
    ).stdout  # fmt: skip
    count, category, message = out.strip().split(" ", 2)
    assert (count, category) == ("1", "RuntimeWarning"), out
    assert "cannot write the CUDA kernel cache" in message and str(cache.parent) in message
    assert not cache.exists() or not _entries(cache)


CONCURRENT_SCRIPT = """
import sys
from mamba_scan import _native
from mamba_scan._boundary import ensure_cuda_libs
ensure_cuda_libs()
print(_native.cuda_compile_program("sm_90", _native.cuda_program_names().index(sys.argv[1]),
                                   use_cache=True)[3])
"""


def test_processes_filling_one_cache_at_once(tmp_path):
    """8 processes compile the same kernel into one empty cache directory at once: the same
    cubin everywhere, one complete entry, no temporary file left; a ninth process loads it."""
    env = dict(os.environ, MAMBA_SCAN_CACHE_DIR=str(tmp_path))
    cmd = [sys.executable, "-c", CONCURRENT_SCRIPT, SMALL]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(8)]
    digests = {p.communicate()[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(digests) == 1
    assert len(_entries(tmp_path)) == 1
    (entry,) = _entries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]
    stamp = entry.stat().st_mtime_ns, entry.stat().st_ino
    ninth = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    assert ninth.stdout.strip() in digests
    assert (entry.stat().st_mtime_ns, entry.stat().st_ino) == stamp  # loaded, not rewritten
