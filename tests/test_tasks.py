"""The seed's claim in miniature (CPU, seconds): on Selective Copying the selective model (S6,
mamba_scan.Mamba) learns the task and the time-invariant ablation (LTI: fixed B, C and delta on
the same kernels) does not. benchmarks/tasks/train.py runs the full-size tasks on a GPU."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.tasks.data import induction_heads, selective_copying  # noqa: E402
from benchmarks.tasks.train import SMOKE, run  # noqa: E402


def test_task_generators():
    g = torch.Generator().manual_seed(0)
    x, y, m = selective_copying(3, 40, n_memorize=5, vocab=16, generator=g)
    assert x.shape == (3, 45) and m.sum() == 15
    for b in range(3):
        data = x[b, :40][x[b, :40] != 0]  # the data tokens, in order
        assert torch.equal(data, y[b, 40:]) and (x[b, 40:] == 15).all()
    x, y, m = induction_heads(4, 32, vocab=16, generator=g)
    for b in range(4):
        first = (x[b, :-1] == 15).nonzero()[0, 0]
        assert x[b, -1] == 15 and y[b, -1] == x[b, first + 1] and m[b].sum() == 1


@pytest.fixture(scope="module")
def smoke():
    torch.set_num_threads(1)
    cfg = dict(SMOKE["selective_copying"], task="selective_copying", log=lambda *_: None)
    return {kind: run(kind=kind, **cfg)["eval"][-1][1] for kind in ("s6", "lti")}


def test_selective_learns_selective_copying(smoke):
    assert smoke["s6"] >= 0.9, smoke


def test_time_invariant_ablation_does_not(smoke):
    assert smoke["lti"] <= 0.6 and smoke["s6"] - smoke["lti"] >= 0.3, smoke
