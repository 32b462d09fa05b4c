"""Reliability: threads, forked DataLoader workers, memory over many calls, NaN locality, results
independent of the CPU thread count. CPU in CI; the CUDA variants run where a GPU is present
(benchmarks/bench_soak.py measures the long runs: 100,000 calls and 10,000 decode steps)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from helpers import make_inputs
from mamba_scan import (
    causal_conv1d_fn,
    causal_conv1d_update,
    selective_scan_fn,
    selective_state_update,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def fwd_bwd(seed, device="cpu", dim=16, seqlen=96, dstate=8):
    """One forward + backward through the public functions (scan and conv): output and every
    gradient, on the CPU."""
    inp = make_inputs(batch=2, dim=dim, seqlen=seqlen, dstate=dstate, seed=seed, device=device)
    inp.pop("initial_state")
    leaves = {k: inp[k].requires_grad_() for k in GRADS}
    w = torch.randn(dim, 4, generator=torch.Generator().manual_seed(seed)).to(device)
    w.requires_grad_()
    x = causal_conv1d_fn(inp["u"], w, activation="silu")
    out = selective_scan_fn(**{**inp, "u": x}, delta_softplus=True)
    grads = torch.autograd.grad(out.sum(), [*leaves.values(), w])
    return [t.detach().cpu() for t in (out, *grads)]


def _run_threads(work, n=8, timeout=120):
    results, errors = [None] * n, []

    def body(i):
        try:
            results[i] = work(i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish (deadlock?)"
    assert not errors, errors
    return results


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_eight_threads_cpu_equal_serial():
    """8 Python threads calling forward + backward at once (the native calls release the GIL;
    torch's intra-op pool and rayon both active) give the serial results bit for bit."""
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        serial = [fwd_bwd(i) for i in range(8)]
        for _ in range(3):
            got = _run_threads(fwd_bwd)
            assert all(_same(g, s) for g, s in zip(got, serial))
    finally:
        torch.set_num_threads(prev)


def test_threads_decode_distinct_states_cpu():
    """Decoding steps from 8 threads, each on its own state: equal to the serial run."""

    def decode(i, steps=50):
        g = torch.Generator().manual_seed(i)
        st = torch.zeros(2, 16, 8)
        cs = torch.zeros(2, 16, 3)
        A, w = -torch.rand(16, 8, generator=g) - 0.5, torch.randn(16, 4, generator=g)
        outs = []
        for _ in range(steps):
            x = causal_conv1d_update(torch.randn(2, 16, generator=g), cs, w, None, "silu")
            y = selective_state_update(st, x, torch.rand(2, 16, generator=g), A,
                                       torch.randn(2, 8, generator=g),
                                       torch.randn(2, 8, generator=g))  # fmt: skip
            outs.append(y)
        return [torch.stack(outs), st, cs]

    serial = [decode(i) for i in range(8)]
    got = _run_threads(decode)
    assert all(_same(g, s) for g, s in zip(got, serial))


@cuda
def test_eight_threads_cuda_own_streams_equal_serial():
    serial = [fwd_bwd(i, "cuda") for i in range(8)]

    def work(i):
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            r = fwd_bwd(i, "cuda")
        s.synchronize()
        return r

    for _ in range(3):
        got = _run_threads(work)
        assert all(_same(g, s) for g, s in zip(got, serial))


_DATALOADER = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_reliability import fwd_bwd

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return fwd_bwd(i, dim=8, seqlen=40)[:3]

if __name__ == "__main__":
    torch.set_num_threads(1)
    want = [fwd_bwd(i, dim=8, seqlen=40)[:3] for i in range(16)]  # the parent uses the kernels
    dl = torch.utils.data.DataLoader(Items(), batch_size=None, num_workers=4,
                                     multiprocessing_context="fork", timeout=120)
    got = list(dl)
    assert len(got) == 16
    assert all(all(torch.equal(x, y) for x, y in zip(g, w)) for g, w in zip(got, want))
    print("ok")
"""


@pytest.mark.skipif(os.name != "posix", reason="fork is POSIX-only")
def test_dataloader_forked_workers(tmp_path):
    """A DataLoader with 4 forked workers whose items call the CPU kernels (forward and backward)
    after the parent used them: every item equals the parent's own result. In a fresh process:
    torch's autograd cannot run in a child forked after the parent ran a CUDA backward."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "dataloader_fork.py"
    script.write_text(_DATALOADER)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, str(script), here], env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


_FORK_CHILD = r"""
import os, sys, torch
from mamba_scan import selective_scan_fn
sys.path.insert(0, sys.argv[1])
from helpers import make_inputs
inp = make_inputs(batch=1, dim=4, seqlen=16, dstate=4, device="cuda")
inp.pop("initial_state")
selective_scan_fn(**inp)  # the parent initialises CUDA
pid = os.fork()
if pid == 0:
    try:
        selective_scan_fn(**inp)
        os._exit(3)
    except RuntimeError as e:  # ours (CudaError) or torch's own, both naming fork
        print(type(e).__name__, e, file=sys.stderr)
        os._exit(0 if "fork" in str(e) else 4)
    except BaseException:
        os._exit(5)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@cuda
def test_forked_child_after_cuda_init_gets_a_clear_error():
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", _FORK_CHILD, here], timeout=120)
    assert r.returncode == 0, f"child exit code {r.returncode} (3: ran, 4/5: unclear error)"


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_rss_flat_over_many_calls_cpu():
    """RSS over 6,000 forward + backward calls of a small shape stays flat after warm-up: at most
    4 MB growth between call 1,000 and call 6,000 (a leak of one 64-byte allocation per call
    would show as 0.3 MB; of one output, 12 MB). benchmarks/bench_soak.py runs 100,000."""
    torch.set_num_threads(1)
    inp = make_inputs(batch=1, dim=4, seqlen=16, dstate=4)
    inp.pop("initial_state")
    leaves = [inp[k].requires_grad_() for k in GRADS]
    rss = []
    for i in range(6000):
        out = selective_scan_fn(**inp, delta_softplus=True)
        torch.autograd.grad(out.sum(), leaves)
        if i in (1000, 5999):
            rss.append(_rss_bytes())
    assert rss[1] - rss[0] < 4 << 20, f"RSS grew {(rss[1] - rss[0]) / 2**20:.1f} MB"


@pytest.mark.parametrize("where", ["u", "delta", "z", "B"])
def test_nan_stays_where_the_math_puts_it(where, device="cpu"):
    """A NaN in one element of u, delta or z at (b, c, t) makes the output NaN only at
    (b, c, t' >= t) for u / delta (the state carries it on) and at (b, c, t) for z; in variable
    B at (b, n, t) every channel of batch b from t on. Everything else is finite and equal to
    the clean run."""
    inp = make_inputs(batch=3, dim=8, seqlen=70, dstate=4, device=device)
    inp.pop("initial_state")
    clean = selective_scan_fn(**inp, delta_softplus=True)
    b, c, t = 1, 5, 33
    bad = dict(inp)
    bad[where] = inp[where].clone()
    if where == "B":
        bad["B"][b, 2, t] = float("nan")
    else:
        bad[where][b, c, t] = float("nan")
    out = selective_scan_fn(**bad, delta_softplus=True)
    expect = torch.zeros_like(out, dtype=torch.bool)
    if where == "z":
        expect[b, c, t] = True
    elif where == "B":
        expect[b, :, t:] = True
    else:
        expect[b, c, t:] = True
    assert torch.equal(torch.isnan(out), expect)
    assert torch.equal(out[~expect], clean[~expect])


@cuda
@pytest.mark.parametrize("where", ["u", "delta", "z", "B"])
def test_nan_stays_where_the_math_puts_it_cuda(where):
    test_nan_stays_where_the_math_puts_it(where, device="cuda")


_DIGEST = r"""
import hashlib, sys, torch
sys.path.insert(0, sys.argv[1])
from test_reliability import fwd_bwd
h = hashlib.sha256()
for seed in range(3):
    for t in fwd_bwd(seed, dim=24, seqlen=300, dstate=16):
        h.update(t.numpy().tobytes())
print(h.hexdigest())
"""


def test_results_independent_of_cpu_thread_count():
    """Forward and every gradient bit for bit the same with 1, 2 and 3 rayon threads."""
    here = os.path.dirname(os.path.abspath(__file__))
    digests = set()
    for n in (1, 2, 3):
        env = {**os.environ, "RAYON_NUM_THREADS": str(n), "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-c", _DIGEST, here], env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr
        digests.add(r.stdout.strip())
    assert len(digests) == 1, digests


def test_thread_count_check_is_live():
    """The digest above covers real work: it changes with the inputs."""
    a = fwd_bwd(0, dim=24, seqlen=300, dstate=16)
    b = fwd_bwd(1, dim=24, seqlen=300, dstate=16)
    ha = hashlib.sha256(b"".join(t.numpy().tobytes() for t in a)).hexdigest()
    hb = hashlib.sha256(b"".join(t.numpy().tobytes() for t in b)).hexdigest()
    assert ha != hb and np.isfinite(a[0].numpy()).all()
