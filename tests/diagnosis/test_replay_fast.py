"""``replay``'s fast path (the detectors' ``advance_quiet``) leaves the stack exactly where
feeding every record to ``DetectorStack.update`` does: same incidents, same state, bit for
bit, on streams that visit every mode (spikes, ringing, periodic spikes, jumps that stay,
slow divergence, NaN/Inf, gradient outliers, precursors, non-positive losses)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stablestep.diagnosis.stack import G2V_RMS, DetectorStack, JumpConfig, StackConfig, replay
from stablestep.diagnosis.trace import Trace


def _slow(trace: Trace, config: StackConfig | None = None) -> DetectorStack:
    """The reference: every record through ``DetectorStack.update``."""
    stack = DetectorStack(config)
    gn, gnf, g2v = (trace.metric(k) for k in ("grad_norm", "grad_nonfinite", G2V_RMS))
    last_gnf = 0.0  # recorded every state_every steps: the last record holds until the next
    for i, (st, loss) in enumerate(zip(trace.steps.tolist(), trace.loss.tolist(), strict=True)):
        if gnf is not None and math.isfinite(gnf[i]):
            last_gnf = float(gnf[i])
        bad = st in trace.nonfinite_steps or last_gnf > 0
        m = {G2V_RMS: float(g2v[i])} if g2v is not None and math.isfinite(g2v[i]) else None
        stack.update(st, loss, grad_norm=None if gn is None else float(gn[i]),
                     nonfinite=bool(bad), metrics=m)
    return stack


def _state(stack: DetectorStack) -> str:
    return json.dumps(stack.state_dict(), sort_keys=True, default=str)


def _stream(seed: int, n: int) -> Trace:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    loss = (3.0 * np.exp(-t / 300) + 1.0) * np.exp(0.03 * rng.standard_normal(n))
    gn = np.exp(0.1 * rng.standard_normal(n))
    g2v = np.full(n, np.nan)
    g2v[::10] = np.exp(0.05 * rng.standard_normal(g2v[::10].size))
    where = np.arange(n // 10, max(n // 10 + 1, n - 300))
    for s in rng.choice(where, min(6, where.size), replace=False):  # spikes that recover
        loss[s:s + 8] *= np.exp(np.linspace(1.5, 0.0, 8))
    for s in range(400, min(n, 1200), 150):  # periodic spikes
        loss[s:s + 3] *= 4.0
    gn[rng.choice(n, 5, replace=False)] *= 50.0  # outlier batches
    gn[n // 3] = np.nan  # a step without a gradient norm
    g2v[rng.choice(np.arange(0, n, 10), 3, replace=False)] *= 100.0  # precursors
    nf = set()
    if n > 2000:
        loss[1500] = np.nan
        loss[1501] = np.inf
        gn[1600] = np.inf
        loss[1700] = 0.0
        loss[1701] = -1.0
        nf.add(1800)
        loss[n - 600:n - 300] *= 20.0  # a jump that stays, then a rollback
        loss[n - 200:] *= np.exp(np.linspace(0.0, 8.0, 200))  # slow divergence
    metrics = {"grad_norm": gn, G2V_RMS: g2v,
               "grad_nonfinite": np.where(t == 1900, 3.0, 0.0)}
    return Trace(steps=t * 2 + 5, loss=loss, metrics=metrics, nonfinite_steps=frozenset(nf))


@pytest.mark.parametrize("seed,n", [(0, 5000), (1, 4000), (2, 300), (3, 25), (4, 3000)])
def test_fast_replay_is_the_record_by_record_replay(seed: int, n: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    tr = _stream(seed, n)
    slow = _slow(tr)
    calls = []
    update = DetectorStack.update
    monkeypatch.setattr(DetectorStack, "update",
                        lambda self, *a, **k: calls.append(1) or update(self, *a, **k))
    fast = replay(tr)
    if n >= 3000:  # the fast path did most of the work: the comparison is not vacuous
        assert len(calls) < n / 2
    assert [i.kind for i in slow.incidents].count("spike") >= (1 if n > 1000 else 0)
    assert repr(fast.incidents) == repr(slow.incidents)
    assert _state(fast) == _state(slow)


def test_fast_replay_other_configs_and_missing_metrics() -> None:
    tr = _stream(5, 3000)
    bare = Trace(steps=tr.steps, loss=tr.loss)  # loss only
    for cfg in (None, StackConfig(jump=JumpConfig(enabled=False)),
                StackConfig(jump=JumpConfig(smooth=4, hold=6))):
        for t in (tr, bare):
            fast, slow = replay(t, config=cfg), _slow(t, cfg)
            assert repr(fast.incidents) == repr(slow.incidents)
            assert _state(fast) == _state(slow)


def test_fast_replay_continues_identically_after_a_state_round_trip() -> None:
    tr = _stream(6, 3000)
    half = Trace(steps=tr.steps[:1400], loss=tr.loss[:1400],
                 metrics={k: v[:1400] for k, v in tr.metrics.items()})
    a = replay(half)
    b = DetectorStack()
    b.load_state_dict(a.state_dict())
    assert _state(a) == _state(b)
    assert _state(replay(half)) == _state(_slow(half))


def _feed(det, steps, losses, fast: bool) -> str:
    """Feed a detector by ``update`` only, or by ``advance_quiet`` with ``update`` taking
    the records it leaves; returns the state."""
    i = 0
    while i < len(losses):
        if fast and det.quiet:
            i += det.advance_quiet(steps[i:], [math.log(v) for v in losses[i:]],
                                   len(losses) - i)
            if i >= len(losses):
                break
        det.update(steps[i], losses[i])
        i += 1
    return json.dumps(det.state_dict(), sort_keys=True, default=str)


@pytest.mark.parametrize("smooth", [1, 4, 5])
def test_divergence_fast_path_long_chains(smooth: int) -> None:
    """A 33x step up leaves the running minimum climbing for ~76 records (longer than
    the vectorised passes settle at once): the chain is finished record by record."""
    from stablestep.diagnosis.detectors import DivergenceConfig, DivergenceDetector

    rng = np.random.default_rng(smooth)
    loss = np.exp(0.02 * rng.standard_normal(1500))
    loss[300:700] *= 33.0  # under the alarm (x100), the minimum climbs ~76 records
    loss[1400:] *= np.exp(np.linspace(0, 30, 100))  # a blow-up: the alarm fires
    steps, losses = list(range(1500)), loss.tolist()
    cfg = DivergenceConfig(factor=100.0, min_steps=3, smooth=smooth)
    a, b = DivergenceDetector(cfg), DivergenceDetector(cfg)
    assert _feed(a, steps, losses, fast=True) == _feed(b, steps, losses, fast=False)
    assert a._s["fired"]


def test_fast_replay_on_noisy_minibatch_losses_and_sparse_nonfinite_records() -> None:
    """Minibatch noise (the spike detector's robust noise gate holds back many would-be
    alarms, each of which leaves the fast path) and ``grad_nonfinite`` recorded every 10th
    step (NaN between: the last record holds) give the same stack both ways."""
    rng = np.random.default_rng(7)
    n = 4000
    t = np.arange(n)
    loss = (2.0 * np.exp(-t / 500) + 0.3) * np.exp(0.6 * rng.standard_normal(n))
    loss[rng.choice(np.arange(200, n), 4, replace=False)] *= 30.0  # corrupted batches
    gnf = np.full(n, np.nan)
    gnf[::10] = 0.0
    gnf[2500:2560:10] = 2.0  # a run of non-finite gradients, seen at its recorded steps
    tr = Trace(steps=t, loss=loss, metrics={"grad_nonfinite": gnf,
                                            "grad_norm": np.exp(0.3 * rng.standard_normal(n))})
    fast, slow = replay(tr), _slow(tr)
    assert any(i.kind == "non-finite" for i in slow.incidents)
    assert repr(fast.incidents) == repr(slow.incidents)
    assert _state(fast) == _state(slow)
