"""Run a function on 2 CPU processes with the gloo backend (fork: the children inherit the
imported torch, so a launch costs well under a second)."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# imported here, in the parent, so the forked children do not each import them again
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel


def _entry(rank: int, world: int, init: str, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    # a collective issued on some ranks only fails within a minute instead of hanging
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def launch(fn, *args, world: int = 2) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` processes joined by gloo; re-raises a
    child's failure."""
    fd, path = tempfile.mkstemp(prefix="stablestep-gloo-")
    os.close(fd)
    os.unlink(path)  # the file store creates it
    try:
        mp.start_processes(_entry, args=(world, f"file://{path}", fn, args), nprocs=world,
                           join=True, start_method="fork")
    finally:
        if os.path.exists(path):
            os.unlink(path)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer tanh MLP (its last bias has 1 entry: one FSDP2 rank holds an empty shard)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed regression batch of ``n`` rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def wrap(model: torch.nn.Module, mode: str, world: int) -> torch.nn.Module:
    """``model`` under DDP (``"ddp"``), FSDP2 ``fully_shard`` (``"fsdp"``) or as is."""
    if mode == "ddp":
        return DistributedDataParallel(model)
    if mode == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model
