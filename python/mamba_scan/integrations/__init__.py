"""Drop-in integrations: ``patch()`` for code written against mamba_ssm / causal_conv1d and
for Hugging Face transformers' Mamba."""

from .patch import PatchHandle, patch, unpatch

__all__ = ["PatchHandle", "patch", "unpatch"]
