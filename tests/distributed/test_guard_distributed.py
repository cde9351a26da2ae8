"""The Guard under DDP and FSDP2 (2 gloo processes): every rank decides the same, and a
rollback restores each rank's sharded model and optimizer state bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import torch

from stablestep.guard import Guard, GuardPolicy
from stablestep.guard import snapshot as S

from ._launch import data, launch, tiny_model, wrap


def _locals(model, opt):
    """This rank's parameters and optimizer state as plain (local-shard) tensors."""
    out = {}
    for k, v in model.state_dict().items():
        out[f"model/{k}"] = S._tensor_of(S._cpu(v)).clone()
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"opt/{i}/{k}"] = S._tensor_of(S._cpu(v)).clone()
    return out


def _snap_locals(snap):
    out = {f"model/{k}": S._tensor_of(v) for k, v in snap.model.items()}
    for i, st in enumerate(snap.optim):
        for k, v in st.items():
            if S._tensor_of(v) is not None:
                out[f"opt/{i}/{k}"] = S._tensor_of(v)
    return out


def _worker(rank, world, mode, out):
    model = wrap(tiny_model(), mode, world)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data(n=64, seed=rank)  # each rank its own batch
    guard = Guard(model, opt, policy=GuardPolicy(snapshot_every=5))
    taken, exact = [], []
    for t in range(32):
        opt.zero_grad()
        xb = x.clone()
        if t == 8 and rank == 1:
            xb[0, 0] = float("nan")  # only rank 1 sees the NaN
        if t == 18:
            opt.param_groups[0]["lr"] = 30.0  # the run starts to diverge
        loss = torch.nn.functional.mse_loss(model(xb), y)
        loss.backward()
        n_rb = guard.counts["rollback"]
        ok = guard.check(loss)
        taken.append(ok)
        if guard.counts["rollback"] > n_rb:
            opt.param_groups[0]["lr"] = 1e-2  # the user's error is gone after the rollback
            now = _locals(model, opt)
            # the snapshot's entries, bit for bit (the adaptation that follows a rollback
            # may add state, e.g. AMSGrad's max_exp_avg_sq)
            to = [r for r in guard.records if r.action == "rollback"][-1].data["to_step"]
            exact.append(any(
                (ref := _snap_locals(s)).keys() <= now.keys()
                and all(torch.equal(now[k], ref[k]) for k in ref)
                for s in guard._snaps if s.step == to
            ))
        if ok:
            opt.step()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"taken": taken, "exact": exact,
                   "records": [[r.step, r.action, r.reason] for r in guard.records]}, f)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_same_decisions_on_every_rank_and_bit_exact_rollback(tmp_path, mode):
    launch(_worker, mode, str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["taken"] == r1["taken"] and r0["records"] == r1["records"]
    recs = {(s, a, why) for s, a, why in r0["records"]}
    assert (8, "skip", "non-finite") in recs
    assert r0["exact"] and all(r0["exact"]) and all(r1["exact"]), (r0["exact"], r1["exact"])


def test_snapshot_of_sharded_state_round_trips_through_torch_save(tmp_path):
    launch(_roundtrip, str(tmp_path))


def _roundtrip(rank, world, out):
    model = wrap(tiny_model(), "fsdp", world)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data()
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    snap = S.capture(2, model, opt, {})
    before = _locals(model, opt)
    path = os.path.join(out, f"snap{rank}.pt")
    torch.save(S.to_state(snap), path)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    opt.state.clear()  # state entries rebuilt as DTensors from the saved local shards
    S.restore(S.from_state(torch.load(path, weights_only=True)), model, opt)
    after = _locals(model, opt)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    p = next(model.parameters())
    assert type(opt.state[p]["exp_avg"]).__name__ == "DTensor"
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()  # training goes on from the restored state


class _LogOf(torch.nn.Module):
    """``log(x + 10)``: NaN for an input below -10."""

    def forward(self, x):
        return torch.log(x + 10.0)


def _origin_worker(rank, world, mode, store):
    import stablestep
    from stablestep import MonitorConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("logof", _LogOf())
    model.add_module("fc", torch.nn.Linear(6, 1))
    model = wrap(model, mode, world)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data(n=16, seed=rank)
    with stablestep.Monitor(model, opt, store=store, run="o",
                            config=MonitorConfig(keep_batch=True)) as mon:
        guard = Guard(model, opt, monitor=mon)
        for t in range(6):
            xb = x.clone()
            if t == 3 and rank == 1:
                xb[0, 0] = -100.0  # only rank 1's batch makes the NaN
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), y)
            loss.backward()
            mon.observe(loss, batch=lambda xb=xb: torch.nn.functional.mse_loss(model(xb), y))
            if guard.check(loss):
                opt.step()
        guard.close()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_the_nan_origin_is_the_replay_of_the_rank_whose_batch_made_it(tmp_path, mode):
    """Under DDP the NaN of rank 1's batch reaches rank 0 through the gradient all-reduce;
    rank 0 (the one that writes) replayed its own finite batch and recorded "the value did
    not reproduce". The ranks' replays are gathered: the event names `module.logof`."""
    import stablestep

    store = str(tmp_path / "o.db")
    launch(_origin_worker, mode, store)
    origins = [e.data for e in stablestep.open_run(store, "o").events if e.kind == "nan-origin"]
    assert len(origins) == 1 and origins[0]["origin"] == "found", origins
    name = "module.logof" if mode == "ddp" else "logof"
    assert origins[0]["forward_module"] == name and origins[0]["rank"] == 1
    assert "rank 1" in origins[0]["text"]
