"""Every rank takes the same decision: 2 processes, gloo backend, CPU."""

from __future__ import annotations

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from stablestep.guard import Guard, GuardPolicy
        from tests.guard.conftest import mlp, regression_data

        x, y = regression_data(seed=rank, n=64)  # each rank has its own data
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        guard = Guard(model, opt, policy=GuardPolicy(snapshot_every=10))
        taken = []
        for t in range(80):
            opt.zero_grad()
            xb, yb = x.clone(), y
            if t == 10 and rank == 1:
                xb[0, 0] = float("nan")  # only rank 1 sees the NaN
            if t == 40 and rank == 0:
                yb = y * 1e4  # only rank 0 gets the outlier batch
            if t == 55 and rank == 0:
                opt.param_groups[0]["lr"] = 10.0  # only rank 0 starts to diverge
            loss = ((model(xb) - yb) ** 2).mean()
            loss.backward()
            ok = guard.check(loss)
            taken.append(ok)
            if ok:
                opt.step()
            if rank == 0 and any(r.action == "rollback" for r in guard.records):
                opt.param_groups[0]["lr"] = 1e-2  # the user's error is gone after the rollback
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"taken": taken, "records": [[r.step, r.action, r.reason]
                                                   for r in guard.records],
                       "lr_scale": guard.lr_scale}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_take_the_same_decisions(tmp_path):
    # fork: the children inherit the imported torch (spawn would re-import it, ~10 s)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert r0 == r1
    recs = {(s, a, why) for s, a, why in r0["records"]}
    assert (10, "skip", "non-finite") in recs
    assert (40, "skip", "gradient-outlier") in recs
    assert any(a == "rollback" for _, a, _ in recs)
    assert not r0["taken"][10] and not r0["taken"][40]
