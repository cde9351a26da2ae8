"""`stablestep report` from the logs people have, not only run stores: a CSV, a Keras
History JSON, a TensorBoard directory and a Hugging Face trainer_state.json, each written
here from its documented layout. A loss-only log gets a note naming the panels it cannot
fill and how to record them."""

from __future__ import annotations

import json

import pytest

from stablestep.cli import main

N = 80
SPIKE = 50


def _loss(i: int) -> float:
    return (25.0 if i == SPIKE else 1.0) / (1 + 0.05 * i)


def _csv(d):
    p = d / "train.csv"
    p.write_text("step,loss\n" + "".join(f"{i},{_loss(i)}\n" for i in range(N)))
    return p


def _keras(d):  # keras.callbacks.History.history, dumped with json
    p = d / "history.json"
    p.write_text(json.dumps({"loss": [_loss(i) for i in range(N)],
                             "val_loss": [_loss(i) * 1.1 for i in range(N)]}))
    return p


def _tensorboard(d):
    from torch.utils.tensorboard import SummaryWriter

    out = d / "tb"
    with SummaryWriter(str(out)) as w:
        for i in range(N):
            w.add_scalar("train/loss", _loss(i), i)
    return out


def _trainer_state(d):  # transformers.TrainerState.save_to_json
    p = d / "trainer_state.json"
    p.write_text(json.dumps({
        "global_step": N, "max_steps": N, "epoch": 1.0, "logging_steps": 1,
        "log_history": [{"loss": _loss(i), "grad_norm": 1.0, "learning_rate": 1e-3,
                         "epoch": i / N, "step": i + 1} for i in range(N)]}))
    return p


@pytest.mark.parametrize("make", [_csv, _keras, _tensorboard, _trainer_state],
                         ids=["csv", "keras-history", "tensorboard", "hf-trainer-state"])
def test_report_from_any_readable_log(make, tmp_path, capsys):
    src = make(tmp_path)
    out = tmp_path / "report.html"
    assert main(["report", str(src), "-o", str(out), "-q"]) == 0, capsys.readouterr().err
    html = out.read_text(encoding="utf-8")
    assert html.count("<img ") >= 1  # at least the loss panel
    assert 'class="incident"' in html  # the spike is found and explained
    assert "Not in this log:" in html and "stablestep.Monitor(" in html
    assert "effective per-coordinate step" in html

