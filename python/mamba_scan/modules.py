"""``mamba_scan.Mamba``: the Mamba-1 block with the constructor, parameter names and
initialisation of ``mamba_ssm.modules.mamba_simple.Mamba`` (its state_dict loads unchanged),
running on mamba-scan's kernels: training through ``mamba_inner_fn``, decoding through
``causal_conv1d_update`` and ``selective_state_update`` with the same inference cache."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from ._native import ShapeError
from .ops.conv1d import causal_conv1d_fn, causal_conv1d_update
from .ops.mamba_inner import mamba_inner_fn
from .ops.selective_scan import selective_scan_fn, seq_idx_from_cu_seqlens
from .ops.state_update import selective_state_update


def _f32(t):
    """fp32 weights as mamba_ssm passes them (float64 stays float64: CPU checks in fp64)."""
    return t if t.dtype == torch.float64 else t.float()


class Mamba(nn.Module):
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True,
                 bias=False, use_fast_path=True, layer_idx=None, device=None, dtype=None):  # fmt: skip
        fk = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.activation = "silu"
        self.act = nn.SiLU()
        di = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias, **fk)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=conv_bias, **fk)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True, **fk)
        # dt_proj: weights with std dt_rank^-0.5 * dt_scale; bias = softplus^-1 of a log-uniform
        # dt in [dt_min, dt_max] (floored), so that softplus(bias) starts in that range.
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise NotImplementedError(f"dt_init: expected 'random' or 'constant'; got {dt_init!r}")
        lo, hi = math.log(dt_min), math.log(dt_max)
        dt = torch.exp(torch.rand(di, **fk) * (hi - lo) + lo).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True
        # S4D-real A = -(1..d_state) per channel, stored as log in fp32; D = 1 in fp32.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(di, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(di, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(di, d_model, bias=bias, **fk)

    def forward(self, hidden_states, inference_params=None, seq_idx=None, cu_seqlens=None,
                process_group=None):  # fmt: skip
        """hidden_states: (batch, seqlen, d_model) -> same shape.

        Packed sequences (training): ``seq_idx`` (batch, seqlen) int32 marks which sequence each
        step belongs to (the conv and the scan restart where it changes; -1 is padding), or
        ``cu_seqlens`` (num_seqs + 1,) gives the cumulative lengths of sequences packed back to
        back in a batch of one row.

        Context parallelism: with ``process_group`` (a torch.distributed group), hidden_states
        is this rank's slice of a sequence split along its length over the group's ranks in
        rank order; the output is this rank's slice of the whole sequence's output, exact (see
        ``mamba_scan.distributed``)."""
        batch, seqlen, _ = hidden_states.shape
        if process_group is not None and (
            inference_params is not None or seq_idx is not None or cu_seqlens is not None
        ):
            raise ValueError("process_group: context parallelism is for training and prefill "
                             "without inference_params, seq_idx or cu_seqlens")  # fmt: skip
        if cu_seqlens is not None:
            if seq_idx is not None:
                raise ValueError("seq_idx, cu_seqlens: give one of them, not both")
            if batch != 1:
                raise ShapeError(
                    f"cu_seqlens: sequences are packed into one row, so hidden_states must have "
                    f"batch 1; got {batch} (or pass seq_idx (batch, seqlen))"
                )
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, seqlen)
        if seq_idx is not None and inference_params is not None:
            raise ValueError(
                "seq_idx: packed sequences are for training and prefill without a cache; with "
                "inference_params give each sequence its own batch row"
            )
        conv_state = ssm_state = None
        if inference_params is not None:
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(hidden_states, conv_state, ssm_state)
                return out
        xz = (self.in_proj.weight @ hidden_states.reshape(batch * seqlen, self.d_model).t()).view(
            2 * self.d_inner, batch, seqlen
        )
        xz = xz.transpose(0, 1)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype).view(-1, 1)
        A = -torch.exp(_f32(self.A_log))
        if self.use_fast_path and inference_params is None and process_group is None:
            return mamba_inner_fn(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                                  self.dt_proj.weight, self.out_proj.weight, self.out_proj.bias,
                                  A, None, None, _f32(self.D),
                                  delta_bias=_f32(self.dt_proj.bias), delta_softplus=True,
                                  seq_idx=seq_idx)  # fmt: skip
        x, z = xz.chunk(2, dim=1)
        if conv_state is not None:
            conv_state.copy_(F.pad(x, (self.d_conv - x.shape[-1], 0)))
        halo = None
        if process_group is not None:
            halo = distributed.conv_halo(x, self.d_conv, process_group)
        x = causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=seq_idx,
                             initial_states=halo, activation="silu")  # fmt: skip
        x_dbl = self.x_proj(x.transpose(1, 2).reshape(batch * seqlen, self.d_inner))
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (self.dt_proj.weight @ dt.t()).view(self.d_inner, batch, seqlen).transpose(0, 1)
        B = B.view(batch, seqlen, self.d_state).transpose(1, 2).contiguous()
        C = C.view(batch, seqlen, self.d_state).transpose(1, 2).contiguous()
        if process_group is not None:
            y = distributed.context_parallel_scan(
                x, dt.contiguous(), A, B, C, _f32(self.D), z, _f32(self.dt_proj.bias), True,
                group=process_group,
            )  # fmt: skip
            return self.out_proj(y.transpose(1, 2))
        y = selective_scan_fn(x, dt.contiguous(), A, B, C, _f32(self.D), z=z,
                              delta_bias=_f32(self.dt_proj.bias), delta_softplus=True,
                              return_last_state=ssm_state is not None, seq_idx=seq_idx)  # fmt: skip
        if ssm_state is not None:
            y, last = y
            ssm_state.copy_(last)
        return self.out_proj(y.transpose(1, 2))

    def step(self, hidden_states, conv_state, ssm_state):
        """One token: hidden_states (batch, 1, d_model); the states are updated in place."""
        if hidden_states.shape[1] != 1:
            raise ValueError("hidden_states: step decodes one token at a time (seqlen 1)")
        xz = self.in_proj(hidden_states.squeeze(1))
        x, z = xz.chunk(2, dim=-1)
        x = causal_conv1d_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                 self.activation)  # fmt: skip
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)
        A = -torch.exp(_f32(self.A_log))
        y = selective_state_update(ssm_state, x, dt, A, B, C, self.D, z=z,
                                   dt_bias=self.dt_proj.bias, dt_softplus=True)  # fmt: skip
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        device = self.out_proj.weight.device
        conv = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device,
                           dtype=self.conv1d.weight.dtype if dtype is None else dtype)  # fmt: skip
        ssm = torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                          dtype=self.dt_proj.weight.dtype if dtype is None else dtype)  # fmt: skip
        return conv, ssm

    def _get_states_from_cache(self, inference_params, batch_size, initialize_states=False):
        if self.layer_idx is None:
            raise ValueError("layer_idx: must be set to use an inference cache")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = (
                torch.zeros(batch_size, self.d_inner, self.d_conv, device=self.conv1d.weight.device,
                            dtype=self.conv1d.weight.dtype),
                torch.zeros(batch_size, self.d_inner, self.d_state, device=self.dt_proj.weight.device,
                            dtype=self.dt_proj.weight.dtype),
            )  # fmt: skip
        conv, ssm = cache[self.layer_idx]
        if initialize_states:
            conv.zero_()
            ssm.zero_()
        return conv, ssm
