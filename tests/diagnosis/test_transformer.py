"""Each transformer mechanism is named on a small held-out version of its lab story and
not on the healthy variant; its remedies are computed from the run's own numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stablestep.diagnosis.trace import from_series
from stablestep.diagnosis.transformer import remedies, scale_collapse, warnings
from tests.diagnosis._text_runs import mechanisms, run


def test_attention_logit_growth_named_without_qk_norm_not_with_it(tmp_path):
    bad, found = run(tmp_path, "lr1e-1", lr=1e-1)
    assert "attention-logit-growth" in mechanisms(found)
    f = next(f for f in found if f.mechanism == "attention-logit-growth")
    assert f.evidence["attn_logit_max"] >= 100
    assert f.evidence["attn_entropy_min"] < 0.5  # attention collapsed to one key
    acts = {r.action: r.value for r in f.remedies}
    assert acts["qk-layernorm"] is True
    assert 0 < acts["set-lr-layers"]["lr"] < 1e-1
    assert acts["set-lr-layers"]["layers"] == ["blocks.0.attn"]
    good, found = run(tmp_path, "qknorm", lr=1e-1, qk_norm=True)
    assert "attention-logit-growth" not in mechanisms(found)
    assert good.max_attn_logit < 100 < bad.max_attn_logit


def test_attention_logit_growth_not_named_at_a_modest_lr(tmp_path):
    _, found = run(tmp_path, "lr3e-3", lr=3e-3, steps=40)
    assert not mechanisms(found) & {"attention-logit-growth", "output-logit-divergence",
                                    "epsilon-scale", "loss-scale-collapse"}


def test_output_logit_divergence_named_without_z_loss_not_with_the_computed_one(tmp_path):
    from stablestep.diagnosis.transformer import z_loss_coefficient

    setting = dict(lr=1e-2, qk_norm=True, logit_scale=20.0)  # held out: the lab uses 10
    _, found = run(tmp_path, "no-z", **setting)
    (f,) = [f for f in found if f.mechanism == "output-logit-divergence"]
    assert abs(f.evidence["lm_logz"]) - abs(f.evidence["lm_logz_early"]) >= 10
    (z,) = [r for r in f.remedies if r.action == "z-loss"]
    assert z.value == z_loss_coefficient(f.evidence["lm_logz"]) > 1e-4
    _, found = run(tmp_path, "z", z_loss=z.value, **setting)  # the proposed remedy
    assert "output-logit-divergence" not in mechanisms(found)
    _, found = run(tmp_path, "z-palm", z_loss=1e-4, **setting)  # 1e-4: too weak in 60 steps
    assert "output-logit-divergence" in mechanisms(found)
    (w,) = [r for r in f.remedies if r.action == "lr-warmup"]  # it began in unwarmed steps
    assert w.value == 40  # 2/(1-b2), b2 0.95
    _, found = run(tmp_path, "warm", warmup=w.value, **setting)
    assert "output-logit-divergence" not in mechanisms(found)


def test_no_warmup_remedy_when_the_run_warmed_up_or_the_drift_came_late():
    from stablestep.diagnosis.transformer import warmup_steps

    steps = np.arange(0, 200, 10)
    flat = from_series(steps, np.full(steps.size, 2.0), metrics={"lr": (steps, np.full(
        steps.size, 1e-2))}, hyper={"beta2": 0.95})
    assert warmup_steps(flat, 10) == 40 and warmup_steps(flat, 100) is None
    ramp = from_series(steps, np.full(steps.size, 2.0), metrics={"lr": (steps, np.minimum(
        1.0, (steps + 1) / 100) * 1e-2)}, hyper={"beta2": 0.95})
    assert warmup_steps(ramp, 30) is None


def test_z_loss_coefficient_is_a_quarter_over_log_z_at_least_palms():
    from stablestep.diagnosis.transformer import z_loss_coefficient

    assert z_loss_coefficient(25.0) == pytest.approx(0.01)
    assert z_loss_coefficient(-25.0) == pytest.approx(0.01)  # a drift below 0 too
    assert 2 * z_loss_coefficient(37.0) * 37.0 <= 0.5  # rounded down: pull at most 1/2
    assert z_loss_coefficient(1e6) == 1e-4 and z_loss_coefficient(math.nan) == 1e-4


def test_loss_scale_collapse_named_in_fp16_not_in_bf16(tmp_path):
    bad, found = run(tmp_path, "fp16", lr=3e-1, precision="fp16", steps=40)
    assert bad.skipped >= 10
    named = [f for f in found if f.mechanism == "loss-scale-collapse"]
    assert named and named[0].kind == "non-finite"
    ev = named[0].evidence
    assert ev["halvings"] >= 10 and ev["skipped_share_since_peak"] >= 0.5
    assert any(r.action == "bf16" for r in named[0].remedies)
    good, found = run(tmp_path, "bf16", lr=3e-1, precision="bf16", steps=40)
    assert "loss-scale-collapse" not in mechanisms(found)
    assert good.skipped == 0
    _, found = run(tmp_path, "fp16ok", lr=3e-3, precision="fp16", steps=40)
    assert "loss-scale-collapse" not in mechanisms(found)


def test_epsilon_scale_named_when_eps_dwarfs_the_gradients(tmp_path):
    _, found = run(tmp_path, "eps", lr=3e-3, eps=1e-1, steps=20)
    (f,) = [f for f in found if f.mechanism == "epsilon-scale"]
    assert f.kind == "warning" and f.evidence["eps_grad_ratio_median"] >= 1
    (r,) = [r for r in f.remedies if r.action == "set-eps"]
    assert r.value <= 0.1 * f.evidence["median_tensor_grad_rms_min"]
    _, found = run(tmp_path, "eps-ok", lr=3e-3, eps=1e-8, steps=20)
    assert "epsilon-scale" not in mechanisms(found)


def _trace(**metrics):
    steps = np.arange(0, 100, 10)
    return from_series(steps, np.full(steps.size, 2.0),
                       metrics={k: (steps, np.asarray(v, float)) for k, v in metrics.items()},
                       hyper={"lr": 1e-2, "eps": 1e-8})


def test_attention_lr_remedy_scales_as_lr_squared():
    t = _trace(attn_logit_max=[0.5, 1, 2, 50, 200, 800, 3200, 3200, 3200, 3200])
    (f,) = [f for f in warnings(t) if f.mechanism == "attention-logit-growth"]
    assert f.step == 40  # first record over the bar of 100
    lr = {r.action: r.value for r in f.remedies}["set-lr-layers"]["lr"]
    assert lr == pytest.approx(1e-2 * math.sqrt(50 / 3200), rel=0.05)


def test_a_scaler_that_recovers_is_not_a_collapse():
    t = _trace(loss_scale=[2.0**16] * 3 + [2.0**15, 2.0**15, 2.0**16] + [2.0**16] * 4,
               skipped_steps=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    assert scale_collapse(t) is None
    t = _trace(loss_scale=[2.0**16] * 3 + [2.0 ** (16 - 10 * k) for k in range(1, 8)],
               skipped_steps=[0, 0, 0, 10, 20, 30, 40, 50, 60, 70])
    ev = scale_collapse(t)
    assert ev is not None and ev["halvings"] >= 10 and ev["onset"] == 30
    assert remedies(t, "loss-scale-collapse", ev)[0].action == "bf16"


def test_the_json_contract_lists_every_kind_and_mechanism_including_warning():
    """docs/architecture.md's contract section lists exactly the code's kinds and
    mechanisms, and a "warning" finding serialises to that contract."""
    import json
    import pathlib
    import re

    from stablestep.diagnosis.findings import KINDS, MECHANISMS, Finding

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "architecture.md").read_text()
    section = doc.split("### JSON contract of a finding", 1)[1].split("\n## ", 1)[0]

    def listed(field: str) -> set[str]:
        item = re.search(rf"^- `{field}` .*?(?=^- |\Z)", section, re.S | re.M).group(0)
        return set(re.findall(r"`([a-z-]+)`", item.split(":", 1)[1].split(".", 1)[0]))

    assert "warning" in KINDS
    assert listed("kind") == set(KINDS)
    assert listed("mechanism") == set(MECHANISMS)
    found = warnings(_trace(attn_logit_max=[0.5, 1, 2, 50, 200, 800, 3200, 3200, 3200, 3200]))
    d = json.loads(json.dumps(found[0].to_dict()))
    assert d["kind"] == "warning" and d["mechanism"] == "attention-logit-growth"
    assert set(d) == {"step", "kind", "mechanism", "confidence", "evidence", "remedies"}
    assert all(set(r) == {"action", "value", "why"} for r in d["remedies"])
    with pytest.raises(ValueError, match="Invalid kind"):
        Finding(step=0, kind="caution", mechanism="unknown", confidence=0.5)
