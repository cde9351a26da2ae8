"""The text lab: real bytes from the interpreter's own library, the GPT, and the three
transformer stories registered as scenarios."""

from __future__ import annotations

import sysconfig

import numpy as np
import pytest
import torch

from stablestep.lab import scenarios
from stablestep.lab.text import TextConfig, TinyGPT, stdlib_bytes, text_loss, train_as_lab


def test_stdlib_bytes_are_the_interpreters_own_sources(tmp_path):
    data = stdlib_bytes(50_000)
    assert len(data) == 50_000 and data == stdlib_bytes(50_000)
    assert b"def " in data and b"import " in data
    some = sorted(p for p in __import__("pathlib").Path(sysconfig.get_paths()["stdlib"])
                  .glob("*.py"))[0].read_bytes()[:200]
    assert some in stdlib_bytes(2_000_000)  # the interpreter's files, read at run time
    (tmp_path / "x.py").write_text("x = 1\n")
    assert stdlib_bytes(100, str(tmp_path)) == b"x = 1\n"
    with pytest.raises(FileNotFoundError, match="no Python sources under"):
        stdlib_bytes(100, str(tmp_path / "empty"))


@pytest.mark.parametrize("kwargs, message", [
    ({"d": 30, "n_head": 4}, "d=30 is not a multiple of n_head=4"),
    ({"lr": 0.0}, "Invalid learning rate: 0.0"),
    ({"precision": "fp8"}, "precision must be one of fp32, fp16, bf16; got 'fp8'"),
    ({"steps": 0}, "steps must be >= 1; got 0"),
])
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextConfig(**kwargs)


def test_z_loss_adds_c_logz_squared():
    logits, y = torch.randn(2, 5, 256) * 3, torch.randint(256, (2, 5))
    ce, total = text_loss(logits, y, z_loss=1e-2)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    assert ce.item() == pytest.approx(ref.item(), rel=1e-6)
    logz = torch.logsumexp(logits, -1)
    assert (total - ce).item() == pytest.approx(1e-2 * logz.pow(2).mean().item(), rel=1e-5)


def test_qk_layernorm_bounds_the_logits_of_a_large_model():
    cfg = TextConfig(n_layer=1, d=32, n_head=2, ctx=8, init_scale=2.0)
    x = torch.randn(1, 8, 32)
    logits = []
    for qk_norm in (False, True):
        attn = TinyGPT(TextConfig(**{**cfg.to_dict(), "betas": (0.9, 0.95),
                                     "qk_norm": qk_norm})).blocks[0].attn
        q, k = attn.qk(x)
        logits.append((q @ k.transpose(-1, -2)).abs().max().item() / 4)
    assert logits[1] <= 16 ** 0.5 * 16 ** 0.5 / 4 + 1e-4 < logits[0]  # |q.k| <= |q||k| = d


def test_text_scenarios_resolve_and_train_through_the_lab():
    for name in scenarios.TEXT:
        sc = scenarios.get(name)
        assert sc.variants[0].role == "failing" and any(v.role == "fix" for v in sc.variants)
        assert all(v.config.problem == "stdlib-text" for v in sc.variants)
    from stablestep.lab.train import train

    cfg = TextConfig(n_layer=1, d=16, n_head=2, ctx=8, batch=2, steps=3, n_bytes=10_000)
    r = train(cfg)
    assert r.losses.shape == (3,) and np.isfinite(r.losses).all() and r.diverged_at is None
    assert abs(r.losses[0] - np.log(256)) < 0.5  # starts near uniform over 256 bytes
    assert train_as_lab(cfg).losses.tolist() == r.losses.tolist()  # deterministic


def test_the_output_logit_story_is_fixed_by_the_coefficient_the_diagnosis_computes(tmp_path):
    """The lab's own failing variant is named and its remedy's coefficient is the one the
    story's fix uses; with it the mechanism is gone (the held-out check is in
    tests/diagnosis/test_transformer.py)."""
    from stablestep.diagnosis import diagnose
    from stablestep.lab import text
    from stablestep.telemetry import Monitor

    torch.set_num_threads(1)
    sc = scenarios.get("output-logit-divergence")
    named = {}
    for v in sc.variants[:2]:
        assert v.role == ("failing", "fix")[len(named)]
        store = str(tmp_path / f"{v.name}.db")
        text.train_text(v.config, monitor=lambda m, o, _, s=store, k=v.name: Monitor(
            m, o, store=s, run=k))
        named[v.role] = [f for f in diagnose(store) if f.mechanism == "output-logit-divergence"]
    (f,) = named["failing"]
    assert [r.value for r in f.remedies if r.action == "z-loss"] == [text.LOGZ_FIX]
    assert [r.value for r in f.remedies if r.action == "lr-warmup"] == \
        [sc.variants[2].config.warmup] == [40]
    assert sc.variants[1].config.z_loss == text.LOGZ_FIX and named["fix"] == []
