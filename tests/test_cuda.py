"""CUDA path: parity with the float64 reference, runtime behaviour (streams, graphs, devices),
determinism. Skipped without a GPU; run on the device machine."""

import itertools

import pytest
import torch

from helpers import DTYPES, check_parity, make_inputs
from mamba_scan import _native, selective_scan_fn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("seqlen", [1, 7, 64, 255, 2048 + 5, 16384 + 3])
@pytest.mark.parametrize("dstate", [1, 16, 64])
def test_parity_grid_cuda(dtype, seqlen, dstate):
    if seqlen > 10000 and dstate == 64:
        pytest.skip("covered by dstate 16 at this length (reference loop cost)")
    inp = make_inputs(batch=2, dim=4 if seqlen > 1000 else 8, seqlen=seqlen, dstate=dstate,
                      dtype=DTYPES[dtype], device="cuda", has_h0=True, seed=seqlen + dstate)  # fmt: skip
    check_parity(inp, label=f"cuda {dtype} L={seqlen} N={dstate}")


@cuda
@pytest.mark.parametrize("tile", ["32", "64"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("seqlen", [33, 255, 2048 + 5])
def test_backward_tiles_cuda(tile, dtype, seqlen, monkeypatch):
    """The 32- and 64-step tiles of the forward and the backward (the saved states are 32 steps
    apart): the choice is by grid size, so small test shapes would only see one of them."""
    monkeypatch.setenv("MAMBA_SCAN_CUDA_TILE", tile)
    inp = make_inputs(batch=2, dim=16, seqlen=seqlen, dstate=16, dtype=DTYPES[dtype],
                      device="cuda", has_h0=True, seed=seqlen)  # fmt: skip
    check_parity(inp, label=f"cuda tile {tile} {dtype} L={seqlen}")


BC = ["fixed", "var", "g1", "g2", "g4"]


@cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("b_mode,c_mode", list(itertools.product(BC, BC)))
@pytest.mark.parametrize("layout", ["deep", "wide"])
def test_bc_modes_cuda(dtype, b_mode, c_mode, layout, monkeypatch):
    monkeypatch.setenv("MAMBA_SCAN_CUDA_LAYOUT", layout)
    inp = make_inputs(dim=8, seqlen=300, dstate=16, dtype=DTYPES[dtype], device="cuda",
                      b_mode=b_mode, c_mode=c_mode, has_h0=True)  # fmt: skip
    check_parity(inp, label=f"cuda {dtype} B={b_mode} C={c_mode}")


@cuda
@pytest.mark.parametrize(
    "has_d,has_z,has_bias,softplus,last,has_h0", list(itertools.product([False, True], repeat=6))
)
def test_options_cuda(has_d, has_z, has_bias, softplus, last, has_h0):
    inp = make_inputs(dim=8, seqlen=200, dstate=16, device="cuda", has_d=has_d, has_z=has_z,
                      has_bias=has_bias, has_h0=has_h0, softplus=softplus)  # fmt: skip
    check_parity(inp, softplus=softplus, last=last)


@cuda
@pytest.mark.parametrize("dim", [6, 24, 40])
def test_odd_group_sizes_cuda(dim):
    # Channels per block fall back to 2 or 1 when group sizes are not multiples of 8.
    inp = make_inputs(dim=dim, seqlen=130, dstate=16, device="cuda", b_mode="g2", c_mode="var")
    check_parity(inp)


@cuda
def test_matches_cpu_path():
    inp = make_inputs(dim=16, seqlen=500, dstate=16, has_h0=True)
    kw = {k: v for k, v in inp.items() if k != "initial_state"}
    cpu, lc = selective_scan_fn(**kw, delta_softplus=True, return_last_state=True,
                                initial_state=inp["initial_state"])  # fmt: skip
    gpu, lg = selective_scan_fn(**{k: v.cuda() for k, v in kw.items()}, delta_softplus=True,
                                return_last_state=True, initial_state=inp["initial_state"].cuda())  # fmt: skip
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lg.cpu(), lc, rtol=1e-4, atol=1e-4)


@cuda
def test_non_default_stream():
    inp = make_inputs(dim=16, seqlen=300, dstate=16, device="cuda")
    kw = {k: v for k, v in inp.items() if k != "initial_state"}
    want = selective_scan_fn(**kw, delta_softplus=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = selective_scan_fn(**kw, delta_softplus=True)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@cuda
def test_cuda_graph_capture_and_replay():
    inp = make_inputs(dim=16, seqlen=300, dstate=16, device="cuda")
    kw = {k: v for k, v in inp.items() if k != "initial_state"}
    want = selective_scan_fn(**kw, delta_softplus=True)  # compiles outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        selective_scan_fn(**kw, delta_softplus=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = selective_scan_fn(**kw, delta_softplus=True)
    kw["u"].copy_(kw["u"] * 0.5)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, selective_scan_fn(**kw, delta_softplus=True), rtol=0, atol=0)
    assert not torch.equal(out, want)


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_other_device_current():
    inp = make_inputs(dim=16, seqlen=100, dstate=16, device="cuda:1")
    kw = {k: v for k, v in inp.items() if k != "initial_state"}
    with torch.cuda.device(0):
        got = selective_scan_fn(**kw, delta_softplus=True)
    want = selective_scan_fn(**{k: v.cpu() for k, v in kw.items()}, delta_softplus=True)
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("tile", ["32", "64"])
@pytest.mark.parametrize("layout", ["deep", "wide"])
@pytest.mark.parametrize("dstate", [3, 5, 8, 16, 24, 33, 64, 128, 200, 256])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_layout_cuda(dstate, dtype, layout, tile, monkeypatch):
    """Each (states per lane, lanes per channel) layout of both families, incl. padded ones,
    with a tail tile, and both tile lengths where a layout has two: output,
    last_state and every gradient."""
    monkeypatch.setenv("MAMBA_SCAN_CUDA_LAYOUT", layout)
    monkeypatch.setenv("MAMBA_SCAN_CUDA_TILE", tile)
    inp = make_inputs(dim=8, seqlen=100, dstate=dstate, dtype=DTYPES[dtype], device="cuda",
                      has_h0=True, seed=dstate)  # fmt: skip
    check_parity(inp, label=f"cuda {dtype} N={dstate}")


@cuda
@pytest.mark.parametrize("has_z", [False, True])
@pytest.mark.parametrize(
    "b_mode,c_mode", [("fixed", "var"), ("var", "fixed"), ("fixed", "fixed"), ("fixed", "g2")]
)
@pytest.mark.parametrize("dstate", [3, 8, 16, 24, 33, 64, 128, 200, 256])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fixed_bc_every_layout_cuda(dstate, dtype, b_mode, c_mode, has_z):
    """A fixed B or C takes the generic kernels (run-time B / C / z flags; compile-time ones at
    8 states per lane in the backward): every layout, with and without z, output, last_state
    and every gradient. 64 channels: more blocks of channels than the variable-B/C layout of
    the dstate has, so the backward's workspace must be sized for the layout actually taken."""
    inp = make_inputs(dim=64, seqlen=100, dstate=dstate, dtype=DTYPES[dtype], device="cuda",
                      b_mode=b_mode, c_mode=c_mode, has_z=has_z, has_h0=True, seed=dstate)  # fmt: skip
    check_parity(inp, label=f"cuda {dtype} N={dstate} B={b_mode} C={c_mode} z={has_z}")


def test_chunk_size_rule():
    assert _native.cuda_chunk_size(16) == 32
    assert _native.cuda_chunk_size(1) == 32
    assert _native.cuda_chunk_size(64) == 32
    assert _native.cuda_chunk_size(65) == 32
    assert _native.cuda_chunk_size(256) == 16


# Gradients of one call in a fresh process whose backward uses `slots` chains for the variable
# dB / dC sums (MAMBA_SCAN_BWD_SLOTS is read once per process); prints them as a torch.save
# file's path.
SLOTS_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from helpers import make_inputs
from mamba_scan import selective_scan_fn
inp = make_inputs(batch=2, dim=int(sys.argv[2]), seqlen=300, dstate=int(sys.argv[3]),
                  dtype=torch.bfloat16, device="cuda", b_mode="g2", c_mode="g4", seed=3)
leaves = {k: v.requires_grad_() for k, v in inp.items() if v is not None}
out = selective_scan_fn(**leaves, delta_softplus=True)
out.float().square().sum().backward()
torch.save([out] + [v.grad for v in leaves.values()], sys.argv[4])
"""


@cuda
@pytest.mark.parametrize("dim,dstate", [(768, 16), (96, 64), (40, 16)])
def test_backward_chains_any_count(dim, dstate, tmp_path):
    """The variable dB / dC sums go through `slots` ordered chains of the channel tiles (fewer
    chains than tiles of a group, more, not dividing them; groups of B and C that differ): every
    count gives the same gradients up to the order of the fp32 sums, and each is bitwise
    reproducible."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    got = {}
    for slots in (1, 3, 8, 64, 3):
        f = tmp_path / f"s{slots}_{len(got)}.pt"
        env = dict(os.environ, MAMBA_SCAN_BWD_SLOTS=str(slots))
        subprocess.run([sys.executable, "-c", SLOTS_SCRIPT, here, str(dim), str(dstate), str(f)],
                       check=True, env=env, cwd=here)  # fmt: skip
        got.setdefault(slots, []).append(torch.load(f))
    for a, b in zip(*got[3]):
        assert torch.equal(a, b), "one chain count, two runs, different bits"
    for slots in (1, 8, 64):
        for a, b in zip(got[3][0], got[slots][0]):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
