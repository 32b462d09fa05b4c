"""patch(): mamba_ssm / causal_conv1d imports resolve to mamba-scan where those packages are
absent, and a tiny random transformers MambaForCausalLM runs its mixer on mamba-scan with the
same logits, gradients and generated tokens as its own PyTorch path."""

import subprocess
import sys
import textwrap

import pytest
import torch

import mamba_scan

transformers = pytest.importorskip("transformers")


def _absent(name):
    import importlib.util

    return importlib.util.find_spec(name) is None


needs_absent = pytest.mark.skipif(
    not (_absent("mamba_ssm") and _absent("causal_conv1d")),
    reason="mamba_ssm / causal_conv1d installed: patch() leaves them alone",
)


@needs_absent
def test_imports_resolve_and_unpatch():
    with mamba_scan.patch() as h:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
        from mamba_ssm import Mamba
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        assert selective_scan_fn is mamba_scan.selective_scan_fn
        assert mamba_inner_fn is mamba_scan.mamba_inner_fn
        assert selective_state_update is mamba_scan.selective_state_update
        assert causal_conv1d_fn is mamba_scan.causal_conv1d_fn
        assert causal_conv1d_update is mamba_scan.causal_conv1d_update
        assert Mamba is mamba_scan.Mamba
        assert "mamba_ssm" in h.modules and "causal_conv1d" in h.modules
    assert "mamba_ssm" not in sys.modules and "causal_conv1d" not in sys.modules
    with pytest.raises(ImportError):
        import mamba_ssm  # noqa: F401


def tiny_model(seed=0):
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(vocab_size=64, hidden_size=32, state_size=16, num_hidden_layers=2,
                      expand=2, conv_kernel=4, use_cache=True)  # fmt: skip
    torch.manual_seed(seed)
    return MambaForCausalLM(cfg).eval()


def run_model(model, ids):
    model.zero_grad()
    model.train()
    loss = model(ids, labels=ids).loss  # training path: mamba_inner_fn when patched
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids[:, :5], max_new_tokens=8, do_sample=False)
    return loss.detach(), logits, grads, gen


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@needs_absent
@pytest.mark.parametrize("device", DEVICES)
def test_transformers_after_import_matches_its_torch_path(device, monkeypatch):
    import transformers.models.mamba.modeling_mamba  # noqa: F401 (imported before patch())

    # Its torch path convolves through cuDNN: keep that in full fp32 (no TF32) on CUDA.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = tiny_model().to(device)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    want = run_model(model, ids)
    with mamba_scan.patch() as h:
        assert any(f.endswith("mamba_selective_scan") for f in h.functions)
        got = run_model(model, ids)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    assert got[2].keys() == want[2].keys()
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], rtol=1e-3, atol=1e-5, msg=n)
    assert torch.equal(got[3], want[3])
    after = run_model(model, ids)  # unpatched again: its own path
    torch.testing.assert_close(after[1], want[1])


@needs_absent
def test_transformers_patched_before_import():
    """A fresh interpreter: patch() first, then transformers resolves the kernels at import."""
    code = textwrap.dedent(
        """
        import torch, mamba_scan
        mamba_scan.patch()
        from transformers import MambaConfig, MambaForCausalLM
        import transformers.models.mamba.modeling_mamba as mm
        calls = []
        orig = mamba_scan.selective_scan_fn
        cfg = MambaConfig(vocab_size=64, hidden_size=32, state_size=16, num_hidden_layers=2)
        torch.manual_seed(0)
        model = MambaForCausalLM(cfg).eval()
        ids = torch.randint(0, 64, (2, 12))
        import mamba_scan.ops.mamba_inner as mi
        n = [0]
        f = mi.MambaInnerFn.apply
        def count(*a, **k):
            n[0] += 1
            return f(*a, **k)
        mi.MambaInnerFn.apply = count
        model.train()
        model(ids, labels=ids).loss.backward()
        assert n[0] == 2, n[0]  # one fused mixer per layer: mamba-scan's mamba_inner_fn
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
