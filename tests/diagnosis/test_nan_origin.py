"""The NaN origin names the module (forward) and the gradient (backward) where a
non-finite value was born, by replaying one step under hooks."""

from __future__ import annotations

import torch
from torch import nn

from stablestep.diagnosis.nan_origin import nan_origin
from stablestep.lab.text import TextConfig, TinyGPT


def test_names_the_attention_layer_made_to_overflow():
    torch.manual_seed(0)
    model = TinyGPT(TextConfig(n_layer=3, d=32, n_head=2, ctx=16))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.mul_(1e22)  # q.k beyond 3e38: the logits overflow
    idx = torch.randint(256, (2, 16))

    def step():
        return model(idx).logsumexp(-1).mean()

    assert not torch.isfinite(step())
    o = nan_origin(model, step)
    # the softmax inside blocks.1.attn's forward (not a submodule) made the NaN that its
    # output projection then received
    assert o.forward_module == "blocks.1.attn" and o.forward_how == "between-modules"
    assert not o.loss_finite
    assert o.backward_parameter is not None
    assert "blocks.1.attn" in o.summary()
    # replayed from the snapshot before the overflow: finite, and the model is put back
    o2 = nan_origin(model, step, state=good)
    assert o2.forward_module is None and o2.loss_finite and o2.backward_parameter is None
    from stablestep.guard.snapshot import capture

    snap = capture(0, model, torch.optim.SGD(model.parameters(), lr=0.1), {})  # as the Guard
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.div_(1e22)
    o3 = nan_origin(model, step, state=snap)  # replay from the Guard's (broken) snapshot
    assert o3.forward_module == "blocks.1.attn"
    assert torch.isfinite(step())  # the live model was put back


def test_a_non_finite_parameter_and_functional_code_between_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(3, 4)
    with torch.no_grad():
        model[2].weight[0, 1] = float("nan")
    o = nan_origin(model, lambda: model(x).sum())
    assert (o.forward_module, o.forward_how, o.parameter) == ("2", "parameter", "2.weight")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.b(torch.log(self.a(x) - 1e3))  # log of negatives: NaN between a and b

    net = Net()
    o = nan_origin(net, lambda: net(x).sum())
    assert (o.forward_module, o.forward_how) == ("", "between-modules")


def test_backward_origin_when_the_forward_is_finite():
    class Sqrt(nn.Module):
        def forward(self, x):
            return torch.sqrt(x)  # finite at 0, infinite derivative there

    model = nn.Sequential(nn.Linear(4, 4), Sqrt(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    x = torch.ones(2, 4)
    o = nan_origin(model, lambda: model(x).sum())
    assert o.forward_module is None and o.loss_finite
    assert o.backward_module == "1"  # d sqrt(x)/dx at x = 0
    assert o.backward_parameter in ("0.weight", "0.bias")
    assert model[0].weight.grad is None  # gradients put back as they were


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    import json
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TinyGPT(TextConfig(n_layer=3, d=32, n_head=2, ctx=16))
        with torch.no_grad():
            model.blocks[1].attn.qkv.weight.mul_(1e22)
        for blk in model.blocks:
            fully_shard(blk)
        fully_shard(model)
        idx = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(rank))
        o = nan_origin(model, lambda: model(idx).logsumexp(-1).mean())
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(o.to_dict(), f)
    finally:
        dist.destroy_process_group()


def test_forward_origin_under_fsdp2_on_every_rank(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported torch (spawn would re-import it)
    mp.start_processes(_fsdp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    for rank in (0, 1):
        o = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert o["forward_module"] == "blocks.1.attn", o


# ------------------------------------------------ automatically: the Monitor and the Guard
def _gpt_run(tmp_path, *, steps=10, blow=4, heal=None, keep_batch=True, pass_batch=True,
             guard=False, state_at=None, name="r"):
    """A tiny GPT under a Monitor; before step ``blow`` the q/k weights of ``blocks.1``
    are scaled by 1e22, so its attention logits overflow (the chosen layer); at ``heal``
    the good weights come back. ``state_at``: save the Monitor at that step and continue
    in a fresh Monitor loaded from it (returns the events either way)."""
    import stablestep
    from stablestep.lab.text import text_loss

    torch.manual_seed(0)
    model = TinyGPT(TextConfig(n_layer=2, d=32, n_head=2, ctx=16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    good = None
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(256, (2, 17), generator=g) for _ in range(steps)]
    store = str(tmp_path / "runs.db")
    cfg = stablestep.MonitorConfig(keep_batch=keep_batch, secant_every=None)
    mon = stablestep.Monitor(model, opt, store=store, run=name, config=cfg)
    gd = stablestep.Guard(model, opt, monitor=mon) if guard else None
    for t in range(steps):
        if state_at is not None and t == state_at:
            sd = mon.state_dict()
            mon.close()
            mon = stablestep.Monitor(model, opt, store=store, run=name, config=cfg)
            mon.load_state_dict(sd)
            if gd is not None:
                gd.monitor = mon
        if t == blow:
            good = {k: v.clone() for k, v in model.state_dict().items()}
            with torch.no_grad():
                model.blocks[1].attn.qkv.weight.mul_(1e22)
        if heal is not None and t == heal:
            model.load_state_dict(good)
            opt.state.clear()
        x, y = data[t][:, :-1], data[t][:, 1:]
        opt.zero_grad()
        loss = text_loss(model(x), y)[1]
        loss.backward()

        def again(x=x, y=y):
            return text_loss(model(x), y)[1]

        mon.observe(loss, batch=again if pass_batch else None)
        if gd is None or gd.check(loss):
            opt.step()
    mon.close()
    run = stablestep.open_run(store, name)
    return store, [e for e in run.events if e.kind == "nan-origin"]


def test_the_monitor_names_the_layer_made_to_overflow_and_diagnose_says_it(tmp_path):
    from stablestep.diagnosis import diagnose
    from stablestep.diagnosis.wording import headline

    store, evs = _gpt_run(tmp_path)
    assert len(evs) == 1, evs  # once per incident, though every later step is NaN too
    e = evs[0]
    assert e.step == 4 and e.data["origin"] == "found" and e.data["by"] == "monitor"
    assert e.data["forward_module"] == "blocks.1.attn"
    assert e.data["backward_parameter"] is not None
    fs = [f for f in diagnose(store) if f.evidence.get("nan_origin")]
    assert len(fs) == 1 and fs[0].step <= 4
    text = headline(fs[0].to_dict())
    assert "came out of `blocks.1.attn` in the forward pass" in text, text
    assert "inspect-module" in [r.action for r in fs[0].remedies]  # no anomaly-mode advice
    from stablestep.report.build import write_report

    html = write_report(store, tmp_path / "report.html").read_text()
    assert "came out of <code>blocks.1.attn</code>" in html or \
        "came out of `blocks.1.attn` in the forward pass" in html


def test_one_replay_per_incident_and_none_while_finite(tmp_path, monkeypatch):
    from stablestep.telemetry import nan_origin as mod

    calls = []
    real = mod.nan_origin
    monkeypatch.setattr(mod, "nan_origin", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, evs = _gpt_run(tmp_path, steps=6, blow=10)  # never blows up
    assert evs == [] and calls == []
    _, evs = _gpt_run(tmp_path, steps=12, blow=3, heal=6, name="two")
    # NaN from step 3, healed at 6 (finite), no second incident: one replay
    assert [e.step for e in evs] == [3] and len(calls) == 1


def test_without_a_kept_batch_the_event_says_so_and_nothing_breaks(tmp_path):
    _, evs = _gpt_run(tmp_path, pass_batch=False)
    assert len(evs) == 1 and evs[0].data["origin"] == "unknown"
    assert evs[0].data["text"].startswith("origin unknown: batch not kept; pass keep_batch=True")
    _, evs = _gpt_run(tmp_path, keep_batch=False, name="plain")  # nothing asked, no cost
    assert evs == []
    _, evs = _gpt_run(tmp_path, keep_batch=False, guard=True, name="guarded")
    assert len(evs) == 1 and evs[0].data["by"] == "guard"
    assert "batch not kept; pass keep_batch=True" in evs[0].data["text"]


def test_the_guard_replays_its_skipped_step(tmp_path, monkeypatch):
    import stablestep.telemetry.monitor as mon_mod

    # the Monitor's own check turned off: the Guard is the one that replays
    monkeypatch.setattr(mon_mod.Monitor, "_nan_check", lambda self, step, part: None)
    _, evs = _gpt_run(tmp_path, guard=True)
    assert len(evs) == 1 and evs[0].data["by"] == "guard", evs
    assert evs[0].data["forward_module"] == "blocks.1.attn"
    monkeypatch.undo()
    _, evs = _gpt_run(tmp_path, guard=True, name="both")  # Monitor first: not twice
    assert len(evs) == 1 and evs[0].data["by"] == "monitor"


def test_save_load_continue_keeps_the_incident(tmp_path):
    _, whole = _gpt_run(tmp_path, steps=12, blow=3, heal=7, name="whole")
    _, split = _gpt_run(tmp_path, steps=12, blow=3, heal=7, state_at=5, name="split")
    # saved inside the incident: the loaded Monitor does not replay it again
    assert [(e.step, e.data["forward_module"]) for e in split] == \
        [(e.step, e.data["forward_module"]) for e in whole] == [(3, "blocks.1.attn")]
