"""The paper's synthetic-task models: 2 layers of d_model 64 (pre-norm residual blocks), on
mamba_scan's kernels. ``kind``: "s6" (mamba_scan.Mamba: delta, B, C functions of the input) or
"lti" (the same block with B, C fixed (d_inner, d_state) parameters and delta a fixed per-channel
parameter: a time-invariant, S4D-like SSM run by the same selective-scan kernel)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_scan import Mamba, causal_conv1d_fn, selective_scan_fn


class LTIMamba(Mamba):
    """Mamba's block with a time-invariant SSM: fixed B, C and delta (the ablation)."""

    def __init__(self, d_model, d_state=16, **kw):
        super().__init__(d_model, d_state=d_state, **kw)
        di = self.d_inner
        self.B = nn.Parameter(torch.randn(di, d_state) * d_state**-0.5)
        self.C = nn.Parameter(torch.randn(di, d_state) * d_state**-0.5)
        # x_proj / dt_proj's weight stay unused; dt_proj.bias is the fixed per-channel delta.

    def forward(self, hidden_states, **_):
        batch, seqlen, _ = hidden_states.shape
        xz = self.in_proj(hidden_states).transpose(1, 2)
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                             activation="silu")  # fmt: skip
        A = -torch.exp(self.A_log.float())
        zero = x.new_zeros(())  # delta = softplus(0 + bias): the same at every step
        y = selective_scan_fn(x, zero.expand_as(x), A, self.B.float(), self.C.float(),
                              self.D.float(), z, self.dt_proj.bias.float(), True)  # fmt: skip
        return self.out_proj(y.transpose(1, 2))


class TaskModel(nn.Module):
    def __init__(self, vocab=16, d_model=64, n_layers=2, d_state=16, kind="s6"):
        super().__init__()
        block = {"s6": Mamba, "lti": LTIMamba}[kind]
        self.embed = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(block(d_model, d_state=d_state, layer_idx=i)
                                    for i in range(n_layers))  # fmt: skip
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.norm_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        for norm, layer in zip(self.norms, self.layers):
            h = h + layer(norm(h))
        return self.head(self.norm_f(h))


def masked_loss_and_accuracy(logits, targets, mask):
    sel = logits[mask]
    loss = F.cross_entropy(sel.float(), targets[mask])
    acc = (sel.argmax(-1) == targets[mask]).float().mean()
    return loss, acc
