"""torch.distributed DDP over 2 GPUs (NCCL) of a small model of mamba_scan.Mamba blocks: the
all-reduced gradients equal a single-GPU run on the whole batch. Needs 2 GPUs (device kind
nvidia-h200-x2); skipped otherwise. Rank 1 runs every kernel on cuda:1."""

import os
import socket

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)


def make_model():
    import mamba_scan

    torch.manual_seed(0)
    return torch.nn.Sequential(
        mamba_scan.Mamba(d_model=64, d_state=16, layer_idx=0),
        torch.nn.LayerNorm(64),
        mamba_scan.Mamba(d_model=64, d_state=16, layer_idx=1),
        torch.nn.Linear(64, 8),
    )


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 129, 64, generator=g), torch.randn(8, 129, 8, generator=g)


def _worker(rank, world, port, path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    model = DDP(make_model().cuda(rank), device_ids=[rank])
    x, y = batch()
    per = x.shape[0] // world
    xs, ys = (t[rank * per : (rank + 1) * per].cuda(rank) for t in (x, y))
    torch.nn.functional.mse_loss(model(xs), ys).backward()
    if rank == 0:
        torch.save({n: p.grad.cpu() for n, p in model.module.named_parameters()}, path)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_gpus_matches_single_gpu(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "ddp_grads.pt")
    mp.spawn(_worker, args=(2, port, path), nprocs=2, join=True)
    ddp = torch.load(path)
    model = make_model().cuda(0)
    x, y = batch()
    torch.nn.functional.mse_loss(model(x.cuda()), y.cuda()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ddp[n], p.grad.cpu(), rtol=1e-4, atol=1e-6, msg=n)
