"""Lightning callback: stored telemetry against the module's own losses, gradients and
torch.optim.Adam's state; checkpoint resume continues the run identically."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")

from stablestep.integrations.lightning import StablestepCallback  # noqa: E402
from stablestep.telemetry import names as N  # noqa: E402


def _loader(n=48, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    y = torch.sin(x[:, :2].sum(1, keepdim=True))
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


class Tiny(L.LightningModule):
    def __init__(self, lr=3e-2, amsgrad=False):
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
        self.lr, self.amsgrad, self.losses = lr, amsgrad, []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, amsgrad=self.amsgrad)


class Recorder(L.Callback):
    """Reference values read by Lightning's own hooks, registered after the callback."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = list(pl_module.parameters())
        g = torch.cat([p.grad.reshape(-1) for p in params]).double()
        self.steps.append({"g": g, "w0": torch.cat([p.detach().reshape(-1) for p in params])})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rec = self.steps[-1]
        if "w1" in rec:  # accumulating: no step this batch
            return
        opt = trainer.optimizers[0]
        params = list(pl_module.parameters())
        rec["w1"] = torch.cat([p.detach().reshape(-1) for p in params])
        st = [opt.state[p] for p in params]
        rec["t"] = int(st[0]["step"])
        key = "max_exp_avg_sq" if opt.param_groups[0]["amsgrad"] else "exp_avg_sq"
        rec["v"] = torch.cat([s[key].reshape(-1) for s in st]).double()


def _trainer(cb, max_steps, **kw):
    return L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[cb, *kw.pop("extra", [])],
        **kw,
    )


@pytest.mark.parametrize("amsgrad", [False, True])
def test_records_match_module_gradients_and_torch_adam_state(tmp_path, amsgrad):
    model = Tiny(amsgrad=amsgrad)
    cb = StablestepCallback(store=tmp_path / "l.db", run="lit", state_every=1, top_k=0)
    rec = Recorder()
    _trainer(cb, 7, extra=[rec]).fit(model, _loader())
    run = cb.read()
    assert run.config["optimizer"] == "Adam" and run.config["hyper"]["amsgrad"] == amsgrad
    steps, loss = run.series(N.LOSS)
    assert steps.tolist() == list(range(7))
    np.testing.assert_allclose(loss, model.losses, rtol=1e-6)
    s = {n: dict(zip(*run.series(n), strict=True)) for n in run.names()}
    for i, r in enumerate(rec.steps):
        assert s[N.GRAD_NORM][i] == pytest.approx(float(r["g"].norm()), rel=1e-5)
        bc1, bc2 = 1 - 0.9 ** r["t"], 1 - 0.999 ** r["t"]
        eff = (3e-2 / bc1) / ((r["v"] / bc2).sqrt() + 1e-8)
        assert s[N.EFF_STEP_MAX][i] == pytest.approx(float(eff.max()), rel=1e-5)
        assert s[N.EFF_STEP_P50][i] == pytest.approx(float(eff.quantile(0.5)), rel=1e-5)
        u = (r["w0"] - r["w1"]).double()
        assert s[N.UPDATE_NORM][i] == pytest.approx(float(u.norm()), rel=1e-5)
        cos = float(u @ r["g"]) / (float(u.norm()) * float(r["g"].norm()))
        assert s[N.UPDATE_COS][i] == pytest.approx(cos, rel=1e-4)


def test_accumulated_steps_record_the_mean_loss(tmp_path):
    model = Tiny()
    cb = StablestepCallback(store=tmp_path / "l.db", run="acc", state_every=None)
    _trainer(cb, 3, accumulate_grad_batches=2).fit(model, _loader(n=96))
    steps, loss = cb.read().series(N.LOSS)
    assert steps.tolist() == [0, 1, 2]
    pairs = np.asarray(model.losses[:6]).reshape(3, 2).mean(1)
    np.testing.assert_allclose(loss, pairs, rtol=1e-6)


@pytest.mark.parametrize("guard", [None, True])
def test_checkpoint_resume_continues_identically(tmp_path, guard):
    # one batch per epoch: Lightning's own resume replays batches of a finished epoch in
    # another order, which is not what this test is about
    store = tmp_path / "l.db"
    whole = StablestepCallback(store=store, run="whole", state_every=2, guard=guard)
    _trainer(whole, 9).fit(Tiny(), _loader(n=16))

    first = StablestepCallback(store=store, run="parts", state_every=2, guard=guard)
    trainer = _trainer(first, 5)
    trainer.fit(Tiny(), _loader(n=16))
    ckpt = tmp_path / "five.ckpt"
    trainer.save_checkpoint(ckpt)
    second = StablestepCallback(store=store, run="ignored", state_every=2, guard=guard)
    _trainer(second, 9).fit(Tiny(), _loader(n=16), ckpt_path=ckpt)
    if guard:
        assert second.guard.state_dict()["step"] == 9
        assert second.guard.counts == whole.guard.counts

    a, b = whole.read(), second.read()
    assert b.name == "parts" and a.names() == b.names()
    for name in a.names():
        sa, va = a.series(name)
        sb, vb = b.series(name)
        assert sa.tolist() == sb.tolist(), name
        np.testing.assert_allclose(vb, va, rtol=1e-6, atol=1e-12, err_msg=name)


def test_nonfinite_loss_is_an_event(tmp_path):
    cb = StablestepCallback(store=tmp_path / "l.db", run="nan", state_every=1)
    _trainer(cb, 3).fit(Inf(), _loader())
    run = cb.read()
    ev = [e for e in run.events if e.kind == N.EVENT_NONFINITE]
    assert ev and ev[0].step == 2 and "loss" in ev[0].data["what"]
    assert run.series(N.LOSS)[0].tolist() == [0, 1]


class Inf(Tiny):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.inf if self.global_step == 2 else loss


def test_guard_skips_a_nonfinite_step_so_adam_never_sees_it(tmp_path):
    from stablestep.guard import GuardPolicy

    class Weights(L.Callback):
        def __init__(self):
            self.w, self.t = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.w.append(torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]))
            opt = trainer.optimizers[0]
            self.t.append(int(opt.state[next(iter(pl_module.parameters()))]["step"]))

    cb = StablestepCallback(store=tmp_path / "l.db", run="guarded", guard=GuardPolicy())
    rec = Weights()
    _trainer(cb, 5, extra=[rec]).fit(Inf(), _loader())
    assert rec.t == [1, 2, 2, 3, 4]  # step 2 was not taken: Adam's count stands still
    assert torch.equal(rec.w[1], rec.w[2]) and torch.isfinite(rec.w[-1]).all()
    assert cb.guard.counts["skip"] == 1
    run = cb.read()
    guard_events = [e for e in run.events if e.kind == N.EVENT_GUARD]
    assert [e.step for e in guard_events] == [2]
    # without the guard, the infinite loss reaches Adam and the weights
    unguarded = StablestepCallback(store=tmp_path / "l.db", run="unguarded")
    rec = Weights()
    _trainer(unguarded, 5, extra=[rec]).fit(Inf(), _loader())
    assert not torch.isfinite(rec.w[-1]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "Invalid every: 0 (a positive int)"),
        ({"optimizer": -1}, "Invalid optimizer: -1 (an index into trainer.optimizers)"),
        ({"curvature_every": 5}, "curvature_every and curvature_loss must be given together"),
        ({"guard": "yes"}, "guard must be None, True or a GuardPolicy, got 'yes'"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError)) as err:
        StablestepCallback(**kwargs)
    assert str(err.value) == message
    with pytest.raises(TypeError, match="^unknown setting 'top'; MonitorConfig fields"):
        StablestepCallback(top=1)


def test_store_in_log_dir_guard_actions_in_lightning_logs_and_resume_keeps_the_store(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    def trainer(cb, steps):
        return L.Trainer(max_steps=steps, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", callbacks=[cb], log_every_n_steps=1)

    cb = StablestepCallback(run="lit", guard=True, state_every=None)
    t = trainer(cb, 4)
    t.fit(Inf(), _loader())
    assert cb.store == str(tmp_path / "lightning_logs" / "version_0" / "stablestep.db")
    assert cb.read().series(N.LOSS)[0].tolist() == [0, 1, 3]  # step 2: inf, an event
    # the guard's skip at step 2 went through pl_module.log into the logger's metrics
    assert float(t.callback_metrics["stablestep/guard_skip"]) == 1.0
    import csv

    rows = list(csv.DictReader(open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")))
    skips = [(int(r["step"]), float(r["stablestep/guard_skip"])) for r in rows
             if r.get("stablestep/guard_skip")]
    assert skips[0] == (0, 0.0) and (2, 1.0) in skips and all(v <= 1 for _, v in skips)
    assert float(rows[0]["stablestep/guard_lr_scale"]) == 1.0
    ckpt = tmp_path / "four.ckpt"
    t.save_checkpoint(ckpt)
    # a new Trainer has a new version directory; the resumed run stays in its own store
    again = StablestepCallback(run="ignored", guard=True, state_every=None)
    trainer(again, 6).fit(Inf(), _loader(), ckpt_path=ckpt)
    assert again.store == cb.store and again.run_name == "lit"
    assert again.read().series(N.LOSS)[0].tolist() == [0, 1, 3, 4, 5]
    assert again.guard.counts["skip"] == 1


class RankInf(Tiny):
    """A non-finite loss on rank 1 only, at step 2; rank r trains on rows r, r+2, r+4, ..."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        bad = self.global_step == 2 and self.global_rank == 1
        return loss * math.inf if bad else loss

    def train_dataloader(self):
        ds = _loader(n=128).dataset
        sampler = torch.utils.data.DistributedSampler(
            ds, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False
        )
        return torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler)


def test_ddp_two_processes_store_one_run_with_the_global_numbers(tmp_path):
    # Lightning forks 2 gloo processes on the CPU; rank 0 trains on rows 0,2,4.., rank 1 on
    # 1,3,5.., so each step's global batch is the single process's batch of 32 rows: same
    # loss (the mean over ranks) and gradient (DDP's average)
    from stablestep.telemetry.store import list_runs, open_run

    store = tmp_path / "ddp.db"
    cb = StablestepCallback(store=store, run="ddp", state_every=2, guard=True)
    _trainer(cb, 4, devices=2, strategy="ddp_fork", use_distributed_sampler=False).fit(RankInf())
    one = StablestepCallback(store=store, run="one", state_every=2)
    _trainer(one, 4).fit(Tiny(), _loader(n=128, batch=32))
    assert list_runs(store) == ["ddp", "one"]  # rank 1 wrote nothing
    ddp, ref = open_run(store, "ddp"), one.read()
    assert ddp.config["world_size"] == 2
    # step 2: rank 1's inf, skipped by the guard on both ranks (its decision is all-reduced)
    nonfinite = [e for e in ddp.events if e.kind == N.EVENT_NONFINITE]
    assert [e.step for e in nonfinite] == [2] and nonfinite[0].data["ranks"] == [1]
    assert [(e.step, e.data["action"]) for e in ddp.events if e.kind == N.EVENT_GUARD] == [
        (2, "skip")
    ]
    # steps 0 and 1 are the single process's; after the skip the runs part ways
    for name in (N.LOSS, N.GRAD_NORM, N.EFF_STEP_MAX, N.UPDATE_NORM):
        sd, vd = ddp.series(name)
        sr, vr = ref.series(name)
        assert sd[0] == sr[0] == 0
        np.testing.assert_allclose(vd[sd < 2], vr[sr < 2], rtol=1e-5, err_msg=name)
    assert N.LOSS_SPREAD in ddp.names()


def _writer_can_suffix():
    import inspect

    from stablestep.telemetry.store import RunWriter

    return "overwrite" in inspect.signature(RunWriter).parameters


@pytest.mark.skipif(not _writer_can_suffix(), reason="RunWriter(overwrite=) not merged yet")
def test_fixed_run_name_twice_starts_a_suffixed_run_or_overwrites(tmp_path):
    from stablestep.telemetry.store import list_runs

    store = tmp_path / "l.db"
    names = []
    for overwrite in (False, False, True):
        cb = StablestepCallback(store=store, run="fixed", overwrite=overwrite, state_every=None)
        _trainer(cb, 2).fit(Tiny(), _loader())
        names.append(cb.run_name)
        assert cb.read().name == cb.run_name
        assert cb.state_dict()["monitor"]["run"] == cb.run_name  # what a checkpoint resumes
    assert names[0] == "fixed" and names[1] != "fixed" and names[1].startswith("fixed")
    assert names[2] == "fixed" and sorted(list_runs(store)) == sorted({"fixed", names[1]})


class LogLayer(torch.nn.Module):
    """``log(h + shift)``: NaN once ``shift`` is set negative."""

    def __init__(self):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(5.0))

    def forward(self, h):
        return torch.log(h + self.shift)


class LogOf(Tiny):
    """Tiny with a LogLayer between its two linear layers."""

    def __init__(self):
        super().__init__()
        self.logger_ = LogLayer()

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.logger_(self.net[1](self.net[0](x)))
        return torch.nn.functional.mse_loss(self.net[2](h), y)


@pytest.mark.parametrize("guard", [False, True])
def test_keep_batch_names_the_module_where_the_nan_was_born(tmp_path, guard):
    """``MonitorConfig(keep_batch=True)`` through the callback: the step's batches are kept
    and replayed through ``training_step``; before, the event said "batch not kept"."""
    from stablestep.telemetry.config import MonitorConfig

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                with torch.no_grad():
                    pl_module.logger_.shift.fill_(-2.0)

    cb = StablestepCallback(store=str(tmp_path / "s.db"), run="k", guard=guard or None,
                            config=MonitorConfig(keep_batch=True))
    _trainer(cb, 6, extra=[Poison()]).fit(LogOf(), _loader())
    origins = [e.data for e in cb.read().events if e.kind == "nan-origin"]
    assert origins and origins[0]["origin"] == "found", origins
    assert origins[0]["forward_module"] == "logger_", origins[0]
