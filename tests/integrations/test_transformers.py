"""Hugging Face Trainer callback: stored loss, gradients and effective step against the
Trainer's own logs and torch AdamW's state; resuming from a checkpoint continues the run."""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from stablestep.integrations.transformers import StablestepCallback  # noqa: E402
from stablestep.telemetry import names as N  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    """Sequences counting up modulo the vocabulary from a random start (learnable)."""

    def __init__(self, n=32, length=12, vocab=31):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=31, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


class Recorder(transformers.TrainerCallback):
    """Reference: gradients and AdamW state read by the Trainer's own hooks."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        self.steps.append({"g": g.double()})

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        ps = [p for p in model.parameters() if p.grad is not None]
        st = [opt.state[p] for p in ps]
        self.steps[-1].update(t=int(st[0]["step"]), lr=opt.param_groups[0]["lr"],
                              v=torch.cat([s["exp_avg_sq"].reshape(-1) for s in st]).double())


def _args(tmp_path, max_steps, **kw):
    opts = dict(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=8,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
        disable_tqdm=True, use_cpu=True, seed=0, data_seed=0, lr_scheduler_type="linear",
        max_grad_norm=0.0,
    )
    return transformers.TrainingArguments(**{**opts, **kw})


def test_records_match_trainer_logs_and_adamw_state(tmp_path):
    cb = StablestepCallback(store=tmp_path / "hf.db", run="hf", state_every=1, top_k=0)
    rec = Recorder()
    trainer = transformers.Trainer(model=_model(), args=_args(tmp_path, 6),
                                   train_dataset=Tokens(), callbacks=[cb, rec])
    trainer.train()
    run = cb.read()
    assert run.config["optimizer"] == "AdamW"
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    steps, loss = run.series(N.LOSS)
    # stored steps are the Trainer's global_step, as in its own log history
    assert steps.tolist() == [h["step"] for h in logs] == list(range(1, 7))
    np.testing.assert_allclose(loss, [h["loss"] for h in logs], rtol=1e-3, atol=1e-4)
    gn = [h["grad_norm"] for h in logs]
    s = {n: dict(zip(*run.series(n), strict=True)) for n in run.names()}
    for i, r in enumerate(rec.steps, start=1):
        assert s[N.GRAD_NORM][i] == pytest.approx(float(r["g"].norm()), rel=1e-5)
        assert s[N.GRAD_NORM][i] == pytest.approx(gn[i - 1], rel=1e-4)
        assert s[N.LR][i] == pytest.approx(r["lr"])
        bc1, bc2 = 1 - 0.9 ** r["t"], 1 - 0.999 ** r["t"]
        eff = (r["lr"] / bc1) / ((r["v"] / bc2).sqrt() + 1e-8)
        assert s[N.EFF_STEP_MAX][i] == pytest.approx(float(eff.max()), rel=1e-5)


def test_accumulated_step_loss_is_the_loss_the_trainer_logs(tmp_path):
    # GPT-2 takes num_items_in_batch: each micro-batch loss is a share of the step's mean
    cb = StablestepCallback(store=tmp_path / "hf.db", run="ga", state_every=None)
    trainer = transformers.Trainer(
        model=_model(), args=_args(tmp_path, 3, per_device_train_batch_size=4,
                                   gradient_accumulation_steps=2),
        train_dataset=Tokens(), callbacks=[cb])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    steps, loss = cb.read().series(N.LOSS)
    assert steps.tolist() == [h["step"] for h in logs] == [1, 2, 3]
    np.testing.assert_allclose(loss, [h["loss"] for h in logs], rtol=1e-3, atol=1e-4)


def test_resume_from_checkpoint_continues_the_run(tmp_path):
    store = tmp_path / "hf.db"

    def train(run, max_steps, resume=None, **kw):
        cb = StablestepCallback(store=store, run=run, state_every=2, guard=True)
        trainer = transformers.Trainer(model=_model(), args=_args(tmp_path, max_steps, **kw),
                                       train_dataset=Tokens(), callbacks=[cb])
        trainer.train(resume_from_checkpoint=resume)
        return cb

    whole = train("whole", 8)
    train("parts", 8, save_strategy="steps", save_steps=4)  # steps 4..7 are abandoned
    # the checkpoint holds the callback's state: the run it recorded, the guard's state
    ckpt = tmp_path / "out" / "checkpoint-4"
    assert (ckpt / "stablestep_callback.pt").exists()
    parts = train("another name", 8, resume=str(ckpt))
    a, b = whole.read(), parts.read()
    assert b.name == parts.run_name == "parts"
    assert parts.guard.step == whole.guard.step == 9 and parts.guard.counts == whole.guard.counts
    assert a.names() == b.names()
    for name in (N.LOSS, N.GRAD_NORM, N.LR, N.EFF_STEP_MAX, N.UPDATE_NORM):
        sa, va = a.series(name)
        sb, vb = b.series(name)
        assert sa.tolist() == sb.tolist(), name
        np.testing.assert_allclose(vb, va, rtol=1e-5, err_msg=name)


def test_guard_skips_a_nonfinite_step(tmp_path, caplog):
    class Poisoned(Tokens):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "bad": torch.tensor(float(i == 16))}  # one row: one bad batch

    class InfOnBad(transformers.GPT2LMHeadModel):
        def forward(self, bad=None, **kw):
            out = super().forward(**kw)
            if bad is not None and bool(bad.any()):
                out.loss = out.loss * float("inf")
            return out

    torch.manual_seed(0)
    model = InfOnBad(_model().config)
    seen = []

    class Count(transformers.TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
            opt = optimizer.optimizer
            seen.append(int(opt.state[next(iter(model.parameters()))]["step"]))

    cb = StablestepCallback(run="g", guard=True)  # store: the Trainer's output_dir
    args = _args(tmp_path, 4, remove_unused_columns=False, logging_steps=10,
                 save_strategy="steps", save_steps=4)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Poisoned(),
                                   callbacks=[cb, Count()])
    with caplog.at_level(logging.INFO, logger="stablestep"):
        trainer.train()
    assert cb.store == str(tmp_path / "out" / "stablestep.db")
    skipped = [e.step for e in cb.read().events if e.kind == N.EVENT_GUARD]
    assert len(skipped) == 1 and cb.guard.counts["skip"] == 1
    # Adam's step count stands still at the skipped step: it never saw the inf
    assert seen == [s - (s >= skipped[0]) for s in range(1, 5)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # visible: a log line, and (logging_steps=10 would log nothing in 4 steps) a Trainer log
    # entry at the skipped step carrying the guard's totals
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("stablestep.")]
    assert any(f"step {skipped[0]}" in m and "skip (non-finite)" in m for m in lines), lines
    entries = [h for h in trainer.state.log_history if "stablestep/guard_skip" in h]
    assert entries and entries[0]["step"] == skipped[0]
    assert entries[0]["stablestep/guard_skip"] == 1.0 and "loss" in entries[0]
    # the guard's state (its record of the skip) is in the checkpoint and comes back on resume
    again = StablestepCallback(run="other", guard=True)
    transformers.Trainer(model=model, args=_args(tmp_path, 5, remove_unused_columns=False),
                         train_dataset=Poisoned(), callbacks=[again]).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert again.run_name == "g" and again.guard.step == 6
    assert [(r.step, r.action) for r in again.guard.records] == [(skipped[0], "skip")]


def test_invalid_arguments():
    with pytest.raises(ValueError) as err:
        StablestepCallback(state_every=0)
    assert str(err.value) == "Invalid state_every: 0 (a positive int)"
    with pytest.raises(TypeError, match="guard must be None, True or a GuardPolicy"):
        StablestepCallback(guard=1)
    with pytest.raises(TypeError, match="^unknown setting 'stat_every'; MonitorConfig fields"):
        StablestepCallback(stat_every=1)


def _writer_can_suffix():
    import inspect

    from stablestep.telemetry.store import RunWriter

    return "overwrite" in inspect.signature(RunWriter).parameters


@pytest.mark.skipif(not _writer_can_suffix(), reason="RunWriter(overwrite=) not merged yet")
def test_fixed_run_name_twice_starts_a_suffixed_run_then_resume_continues_it(tmp_path):
    from stablestep.telemetry.store import list_runs, open_run

    store = tmp_path / "hf.db"

    def train(max_steps, resume=None, **kw):
        cb = StablestepCallback(store=store, run="fixed", state_every=None, **kw)
        args = _args(tmp_path, max_steps, save_strategy="steps", save_steps=2)
        transformers.Trainer(model=_model(), args=args, train_dataset=Tokens(),
                             callbacks=[cb]).train(resume_from_checkpoint=resume)
        return cb

    first = train(2)
    second = train(4)  # same name: a new run, its checkpoints in the same output_dir
    assert first.run_name == "fixed" and second.run_name.startswith("fixed")
    assert second.run_name != "fixed"
    # resuming the second run's checkpoint continues *it*, even with overwrite=True
    third = train(4, resume=str(tmp_path / "out" / "checkpoint-2"), overwrite=True)
    assert third.run_name == second.run_name
    assert sorted(list_runs(store)) == sorted(["fixed", second.run_name])
    assert open_run(store, second.run_name).series(N.LOSS)[0].tolist() == [1, 2, 3, 4]
    assert open_run(store, "fixed").series(N.LOSS)[0].tolist() == [1, 2]


def _ddp_worker(rank, world, init, tmp):
    import json
    import os

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    try:
        cb = StablestepCallback(run="ddp", state_every=2, guard=True)  # store: output_dir
        args = _args(tmp, 4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     save_strategy="steps", save_steps=2)
        trainer = transformers.Trainer(model=_model(), args=args, train_dataset=Tokens(),
                                       callbacks=[cb])
        trainer.train()
        assert args.world_size == world
        if rank == 0:
            (tmp / "log.json").write_text(json.dumps(trainer.state.log_history))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_store_one_run_with_the_trainers_global_loss(tmp_path):
    # 2 gloo processes, each a Trainer on its shard. Spawned, not forked: a fork taken late
    # in the suite inherited a lock another test's thread held and hung once in ~10 runs
    import json

    from stablestep.telemetry.store import list_runs, open_run

    torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, f"file://{tmp_path / 'pg'}", tmp_path), nprocs=2, join=True,
        start_method="spawn")
    store = tmp_path / "out" / "stablestep.db"
    assert list_runs(store) == ["ddp"]  # one run, written by rank 0 alone
    run = open_run(store, "ddp")
    assert run.config["world_size"] == 2
    logs = [h for h in json.loads((tmp_path / "log.json").read_text()) if "loss" in h]
    steps, loss = run.series(N.LOSS)
    assert steps.tolist() == [h["step"] for h in logs] == [1, 2, 3, 4]
    # the Trainer's logged loss is the global one (token mean over both processes)
    np.testing.assert_allclose(loss, [h["loss"] for h in logs], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(run.series(N.GRAD_NORM)[1], [h["grad_norm"] for h in logs],
                               rtol=1e-4)
    assert N.LOSS_SPREAD in run.names()
    assert (tmp_path / "out" / "checkpoint-2" / "stablestep_callback.pt").exists()


def test_keep_batch_names_the_module_where_the_nan_was_born(tmp_path):
    """``MonitorConfig(keep_batch=True)`` through the callback: the step's micro-batch calls
    are kept (the user has no ``observe`` to pass ``batch=`` to), so a NaN born in the
    attention is named; before, the event said "batch not kept; pass keep_batch=True"."""
    from stablestep.telemetry.config import MonitorConfig

    class Overflow(transformers.TrainerCallback):  # q.k ~ 1e40: inf in the softmax
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                with torch.no_grad():
                    model.transformer.h[0].attn.c_attn.weight[:, :32] *= 1e20

    cb = StablestepCallback(run="k", guard=True, config=MonitorConfig(keep_batch=True))
    transformers.Trainer(model=_model(), args=_args(tmp_path, 5), train_dataset=Tokens(),
                         callbacks=[cb, Overflow()]).train()
    run = cb.read()
    origins = [e.data for e in run.events if e.kind == "nan-origin"]
    assert origins and origins[0]["origin"] == "found", origins
    assert origins[0]["forward_module"] == "transformer.h.0.attn"
    assert origins[0]["forward_module"] != "unknown" and len(origins) == 1  # replayed once
