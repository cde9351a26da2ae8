"""What a new user met trying the merged product on their own runs (the README's loop run
twice, a Guard next to the Monitor, a report of a torch AdamW run), one test each."""

import re

import torch

import stablestep
from stablestep.cli import main
from stablestep.diagnosis.wording import guard_note, headline
from stablestep.guard import Guard


def _mlp_run(store, run, *, nan_at=None, opt_cls=torch.optim.Adam, steps=60, guard=False):
    """A small minibatch MLP regression recorded by the real Monitor (and Guard)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    x_all = torch.randn(256, 6)
    y_all = x_all[:, :1] * 2
    opt = opt_cls(model.parameters(), lr=1e-3)
    with stablestep.Monitor(model, opt, store=str(store), run=run) as mon:
        g = Guard(model, opt, monitor=mon) if guard else None
        for step in range(steps):
            i = (step * 16) % 256
            x, y = x_all[i:i + 16].clone(), y_all[i:i + 16]
            if step == nan_at:
                x[0, 0] = float("nan")  # a corrupt sample
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.observe(loss)
            if g is None or g.check(loss):
                opt.step()
        if g is not None:
            g.close()
    return g


def test_the_guards_action_is_said_in_the_finding_not_only_in_verbose_evidence(tmp_path, capsys):
    store = tmp_path / "g.db"
    g = _mlp_run(store, "nanbatch", nan_at=40, guard=True, steps=80)
    assert any(r.action == "skip" and r.step == 40 for r in g.records)
    found = [f.to_dict() for f in stablestep.diagnose(str(store))]
    nonfinite = [f for f in found if f["kind"] == "non-finite"]
    assert nonfinite and "The guard acted: skip at step 40 (non-finite)" in headline(nonfinite[0])
    capsys.readouterr()
    assert main(["diagnose", str(store), "-q"]) == 0
    out = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "The guard acted: skip at step 40 (non-finite)" in out


def test_guard_note_counts_several_actions_and_is_empty_without_a_guard():
    acts = [{"step": s, "action": "skip", "reason": "gradient-outlier"} for s in (40, 41)]
    acts.append({"step": 61, "action": "rollback", "reason": "divergence"})
    note = guard_note({"guard_actions": acts})
    assert note.startswith("The guard acted 3 times, steps 40..61: ")
    assert "2 skip (gradient-outlier)" in note and "1 rollback (divergence)" in note
    assert guard_note({}) == "" and "guard" not in headline({"step": 3, "kind": "spike",
                                                             "mechanism": "unknown"})


def test_export_says_which_run_it_took_when_the_store_holds_several(tmp_path, capsys):
    store = tmp_path / "runs.db"
    for _ in range(2):  # the same script run twice: "baseline", then "baseline-2"
        _mlp_run(store, "baseline", steps=12)
    capsys.readouterr()
    assert main(["export", str(store)]) == 0
    cap = capsys.readouterr()
    assert "'baseline-2', the latest of 2" in cap.err and "--run NAME" in cap.err
    assert cap.out.startswith("step,")  # the CSV on stdout stays clean
    assert main(["export", str(store), "--run", "baseline"]) == 0
    assert "latest" not in capsys.readouterr().err
    assert main(["export", str(store), "-q"]) == 0
    assert "latest" not in capsys.readouterr().err


def test_report_names_the_optimizer_class_and_its_weight_decay(tmp_path):
    store = tmp_path / "w.db"
    _mlp_run(store, "adamw", opt_cls=torch.optim.AdamW, steps=12)
    out = tmp_path / "r.html"
    assert main(["report", str(store), "-o", str(out), "-q"]) == 0
    text = out.read_text()
    assert "AdamW: lr=0.001" in text and "weight_decay=0.01" in text


def _curve(n=300, at=200):
    import numpy as np

    loss = 3 * np.exp(-np.arange(n) / 80) + 0.5
    loss[at] *= 8
    return loss


def test_in_memory_logs_say_once_what_they_read(caplog):
    import logging

    import numpy as np
    import pandas as pd

    loss = _curve()
    for obj, where in [(loss, "row numbers as steps"),
                       (pd.Series(loss, index=np.arange(0, 3000, 10)), "step column 'index'")]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="stablestep"):
            found = stablestep.diagnose(obj)
        said = [r.getMessage() for r in caplog.records if "read 'loss'" in r.getMessage()]
        assert len(said) == 1 and where in said[0], said  # not twice, not contradicting
        assert any(f.kind == "spike" for f in found)


def test_losses_kept_as_tensors_or_numpy_scalars_are_read():
    import numpy as np

    w = torch.ones(1, requires_grad=True)
    kept = [(w * float(v)).sum() for v in _curve()]  # losses.append(loss), no .item()
    steps = list(np.arange(len(kept)))  # numpy integers
    for obj in (kept, {"step": steps, "loss": kept}, dict(enumerate(kept)),
                {"step": steps, "loss": [t.item() for t in kept]}):
        found = stablestep.diagnose(obj)
        assert any(f.kind == "spike" and 195 <= f.step <= 201 for f in found), found


def test_a_noisy_first_minibatch_is_not_a_blow_up(tmp_path):
    """Minibatch losses of an MLP that barely learns swing 2.5 -> 8.8 -> 4.2 in the first
    steps: batch noise, not a blow-up from step 0 (the loss does not stay at the jump)."""
    store = tmp_path / "noisy.db"
    _mlp_run(store, "noisy", steps=80)
    early = [f for f in stablestep.diagnose(str(store)) if f.step < 20]
    assert not early, [(f.step, f.kind, f.mechanism) for f in early]


def test_a_step_whose_gradients_were_cleared_does_not_crash_the_secant_tracker(tmp_path):
    """The Lightning/HF callbacks skip a step the guard refuses by setting every ``p.grad =
    None`` and letting ``optimizer.step()`` run; at a secant step (every 10) the Monitor's
    post-step hook then saw no parameters against its snapshot and raised out of the
    user's training loop (``Tensor list must have same number of elements``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    with stablestep.Monitor(model, opt, store=str(tmp_path / "s.db"), run="r") as mon:
        for step in range(25):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            mon.observe(loss)
            if step in (10, 20):  # secant steps: a skipped step, as the callbacks skip it
                for p in model.parameters():
                    p.grad = None
            opt.step()
    steps, _ = stablestep.open_run(str(tmp_path / "s.db"), "r").series("secant_curvature")
    assert len(steps) >= 1, "the secant curvature is still measured on the steps that ran"
    assert not {11, 21} & set(steps.tolist()), "no measurement along a step that did not run"


def test_guard_summary_counts_the_steps_it_decided_whatever_the_first_steps_number(tmp_path):
    """With ``start_step=1`` (the HF callback's numbering) 200 checks were reported as
    "guard summary after 201 steps": ``steps`` was the next step's number. It counts the
    checks, and keeps counting across a save -> load."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def train(guard, n):
        for _ in range(n):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            if guard.check(loss):
                opt.step()

    g = Guard(model, opt, start_step=1)
    train(g, 20)
    assert g.summary()["steps"] == 20 and g.step == 21
    state = g.state_dict()
    g.close()
    again = Guard(model, opt, start_step=21)
    again.load_state_dict(state)
    train(again, 5)
    assert again.summary()["steps"] == 25 and again.step == 26
    again.close()


def test_replaying_a_model_that_returns_a_dict_says_nothing_to_the_user():
    """Hugging Face models return a ModelOutput: torch warned "For backward hooks to be
    called, module output should be a Tensor or a tuple of Tensors" into the user's
    console on every NaN replay (an internal detail; the origin is still found)."""
    import warnings

    from stablestep.diagnosis.nan_origin import nan_origin

    class Body(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return {"h": torch.log(self.fc(x))}  # NaN where fc(x) < 0

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Body()
            self.head = torch.nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.body(x)["h"]).mean()

    torch.manual_seed(0)
    model, x = Model(), torch.randn(8, 4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        origin = nan_origin(model, lambda: model(x))
    assert origin.forward_module == "body"
    said = [str(w.message) for w in seen]
    assert not [m for m in said if "backward hooks" in m], said
