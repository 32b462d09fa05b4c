"""Seeded generators of the two synthetic tasks of the Mamba paper (Gu and Dao, 2023, section
4.1.1), as batches of (inputs, targets, mask) int64 / bool tensors.

Selective Copying: a sequence of ``seqlen`` tokens, mostly noise (token 0), with ``n_memorize``
data tokens (1 .. vocab - 3) at random positions; then ``n_memorize`` marker tokens (vocab - 1)
after which the model must reproduce the data tokens in order. Scored on those positions.

Induction Heads: uniform random tokens (1 .. vocab - 2) of ``seqlen``; a trigger token (vocab -
1) is placed once at a random position followed by the token to recall, and again as the last
input; the target at the last position is the token that followed the first trigger. Scored on
the last position only.
"""

from __future__ import annotations

import torch


def selective_copying(batch, seqlen, n_memorize=16, vocab=16, generator=None, device="cpu"):
    noise, marker = 0, vocab - 1
    total = seqlen + n_memorize
    inputs = torch.full((batch, total), noise, dtype=torch.long)
    data = torch.randint(1, vocab - 2, (batch, n_memorize), generator=generator)
    # n_memorize distinct positions in [0, seqlen), sorted: the order to reproduce.
    pos = torch.argsort(torch.rand(batch, seqlen, generator=generator), dim=1)[:, :n_memorize]
    pos, _ = torch.sort(pos, dim=1)
    inputs.scatter_(1, pos, data)
    inputs[:, seqlen:] = marker
    targets = torch.zeros_like(inputs)
    targets[:, seqlen:] = data
    mask = torch.zeros_like(inputs, dtype=torch.bool)
    mask[:, seqlen:] = True
    return inputs.to(device), targets.to(device), mask.to(device)


def induction_heads(batch, seqlen, vocab=16, generator=None, device="cpu"):
    trigger = vocab - 1
    inputs = torch.randint(1, vocab - 1, (batch, seqlen), generator=generator)
    # The first trigger somewhere before the end, leaving room for its follower.
    at = torch.randint(0, seqlen - 2, (batch,), generator=generator)
    rows = torch.arange(batch)
    inputs[rows, at] = trigger
    answer = inputs[rows, at + 1]
    inputs[:, -1] = trigger
    targets = torch.zeros_like(inputs)
    targets[:, -1] = answer
    mask = torch.zeros_like(inputs, dtype=torch.bool)
    mask[:, -1] = True
    return inputs.to(device), targets.to(device), mask.to(device)


TASKS = {"selective_copying": selective_copying, "induction_heads": induction_heads}
