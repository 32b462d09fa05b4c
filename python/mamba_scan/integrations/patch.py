"""``mamba_scan.patch()``: run code written for mamba_ssm and causal_conv1d, and transformers'
Mamba mixer, on mamba-scan.

1. Where ``mamba_ssm`` / ``causal_conv1d`` are not installed, stand-in modules go into
   ``sys.modules`` under their import paths (``mamba_ssm``, ``mamba_ssm.ops.selective_scan_interface``,
   ``mamba_ssm.ops.triton.selective_state_update``, ``mamba_ssm.modules.mamba_simple``,
   ``causal_conv1d``), so ``from mamba_ssm import Mamba`` and friends import mamba-scan's.
   Installed packages are left alone.
2. transformers (5.x) resolves its Mamba kernels when ``transformers.models.mamba.modeling_mamba``
   is imported, by importing ``mamba_ssm`` / ``causal_conv1d``: imported after ``patch()``, it
   finds the stand-ins. Imported before, its module-level kernel functions are replaced (and
   restored by ``unpatch()``). A transformers module imported while patched keeps mamba-scan's
   kernels after ``unpatch()`` (it resolved them at import); re-import it to undo that.

``patch()`` returns a handle (also a context manager) that says what it patched.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
import types

_TF_MODULE = "transformers.models.mamba.modeling_mamba"


def _filtered(fn):
    """``fn`` accepting and dropping keyword arguments it does not know (transformers passes a
    few, e.g. use_mambapy)."""
    names = set(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return fn(*args, **{k: v for k, v in kwargs.items() if k in names})

    return call


def _installed(name: str) -> bool:
    if name in sys.modules:
        return not getattr(sys.modules[name], "__mamba_scan_shim__", False)
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _module(name, attrs, package=False):
    m = types.ModuleType(name, f"mamba-scan stand-in for {name}")
    m.__mamba_scan_shim__ = True
    if package:
        m.__path__ = []
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def _shims():
    import mamba_scan as ms

    ssi = _module("mamba_ssm.ops.selective_scan_interface", {
        "selective_scan_fn": ms.selective_scan_fn, "selective_scan_ref": ms.selective_scan_ref,
        "mamba_inner_fn": ms.mamba_inner_fn,
    })  # fmt: skip
    ssu = _module("mamba_ssm.ops.triton.selective_state_update", {
        "selective_state_update": ms.selective_state_update,
        "selective_state_update_ref": ms.selective_state_update_ref,
    })  # fmt: skip
    triton = _module("mamba_ssm.ops.triton", {"selective_state_update": ssu}, package=True)
    ops = _module(
        "mamba_ssm.ops", {"selective_scan_interface": ssi, "triton": triton}, package=True
    )
    simple = _module("mamba_ssm.modules.mamba_simple", {"Mamba": ms.Mamba})
    modules = _module("mamba_ssm.modules", {"mamba_simple": simple}, package=True)
    root = _module("mamba_ssm", {
        "Mamba": ms.Mamba, "selective_scan_fn": ms.selective_scan_fn,
        "mamba_inner_fn": ms.mamba_inner_fn, "ops": ops, "modules": modules,
        "__version__": f"mamba-scan {ms.__version__}",
    }, package=True)  # fmt: skip
    conv = _module("causal_conv1d", {
        "causal_conv1d_fn": ms.causal_conv1d_fn, "causal_conv1d_update": ms.causal_conv1d_update,
        "causal_conv1d_ref": ms.causal_conv1d_ref,
        "causal_conv1d_update_ref": ms.causal_conv1d_update_ref,
    }, package=True)  # fmt: skip
    return {
        "mamba_ssm": [root, ops, ssi, triton, ssu, modules, simple],
        "causal_conv1d": [conv],
    }


class PatchHandle:
    """What one ``patch()`` call changed; ``undo()`` (or leaving the ``with`` block) restores it."""

    def __init__(self):
        self.modules: list[str] = []  # stand-in modules put into sys.modules
        self.functions: list[str] = []  # module attributes replaced
        self.skipped: list[str] = []
        self._saved: list[tuple[object, str, object]] = []
        self.active = True

    def __repr__(self):
        return (f"PatchHandle(modules={self.modules}, functions={self.functions}, "
                f"skipped={self.skipped})")  # fmt: skip

    def undo(self):
        if not self.active:
            return
        for obj, name, old in reversed(self._saved):
            setattr(obj, name, old)
        for name in self.modules:
            if getattr(sys.modules.get(name), "__mamba_scan_shim__", False):
                del sys.modules[name]
        self.active = False
        if self in _HANDLES:
            _HANDLES.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()


_HANDLES: list[PatchHandle] = []


def patch(transformers: bool = True, verbose: bool = False) -> PatchHandle:
    """Route mamba_ssm / causal_conv1d imports and transformers' Mamba kernels to mamba-scan."""
    import mamba_scan as ms

    h = PatchHandle()
    for pkg, mods in _shims().items():
        if _installed(pkg):
            h.skipped.append(f"{pkg} (installed: left as is)")
            continue
        for m in mods:
            sys.modules[m.__name__] = m
            h.modules.append(m.__name__)
    if transformers and _TF_MODULE in sys.modules:
        tf = sys.modules[_TF_MODULE]
        for attr, fn in (
            ("mamba_inner_fn", ms.mamba_inner_fn),
            ("mamba_selective_scan", ms.selective_scan_fn),
            ("mamba_selective_state_update", ms.selective_state_update),
            ("causal_conv1d_fn", ms.causal_conv1d_fn),
            ("causal_conv1d_update", ms.causal_conv1d_update),
        ):
            if hasattr(tf, attr):
                h._saved.append((tf, attr, getattr(tf, attr)))
                setattr(tf, attr, _filtered(fn))
                h.functions.append(f"{_TF_MODULE}.{attr}")
    _HANDLES.append(h)
    if verbose:
        print(f"mamba_scan.patch(): {h}")
    return h


def unpatch() -> None:
    """Undo every active ``patch()``, newest first."""
    for h in reversed(list(_HANDLES)):
        h.undo()
