"""Curvature under torch.distributed (2 ranks, gloo, CPU): DDP and FSDP2 give the values of
one process on the concatenated batch."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from stablestep.curvature import CurvatureProbe, ProbeConfig
from stablestep.telemetry import names

KEYS = (names.SHARPNESS, names.PRECOND_SHARPNESS, names.GRAD_CURVATURE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (32,), generator=g)


def _measure(model, x, y, backend: str) -> dict[str, float]:
    """Two Adam steps, then a tight estimate (values, not a cheap 1% tracking estimate)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    for _ in range(2):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    cfg = ProbeConfig(backend=backend, tol=1e-7, max_iter=100, grad_curvature=True)
    probe = CurvatureProbe(model.parameters(), opt, config=cfg)
    res = probe(loss_fn)
    assert not res.failed, res.error
    for _ in range(2):  # and training goes on (DDP's reducer, FSDP2's state untouched)
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return {k: res[k] for k in KEYS} | {"backend": res.backend}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel as DDP

        x, y = _data()
        half = slice(16 * rank, 16 * (rank + 1))  # each rank its own half of the batch
        result = {"ddp": _measure(DDP(_model()), x[half], y[half], "auto"),
                  "ddp_fd": _measure(DDP(_model()), x[half], y[half], "fd")}
        model = _model()
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
        fully_shard(model)
        result["fsdp"] = _measure(model, x[half], y[half], "auto")
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_equal_one_process_on_the_whole_batch(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    x, y = _data()
    single = _measure(_model(), x, y, "exact")
    assert r0["ddp"]["backend"] == "exact" and r0["ddp_fd"]["backend"] == "fd"
    assert r0["fsdp"]["backend"] == "fd"  # double backward does not pass FSDP2's all-gather
    for mode in ("ddp", "ddp_fd", "fsdp"):
        for key in KEYS:
            assert r0[mode][key] == pytest.approx(single[key], rel=1e-4), (mode, key)
            assert r1[mode][key] == pytest.approx(r0[mode][key], rel=1e-9), (mode, key)
