"""Small training runs with a known cause, for testing and benchmarking detectors
(a benchmark and test fixture: not part of the installed package).

Each :func:`make_run` trains a tiny model on CPU in a few seconds, records it with the real
:class:`stablestep.Monitor` (its default settings: loss, lr, gradient norm every step,
optimizer-state statistics such as ``eff_step_max`` and ``g2v_rms`` every 10 steps, and
curvature every ``curvature_every`` steps) into a real run store, reads the store back
the way ``diagnose`` reads a user's, and returns that trace with the labelled incidents.
So the detectors are tuned and scored on the numbers users record:

- ``adaptive-edge-of-stability``: full-batch MSE, small MLP, Adam lr 1e-2 / eps 1e-8;
  the loss flattens, ``v`` decays and the loss spikes again and again (DESIGN.md).
  Labels come from the loss curve after the fact (:func:`label_spikes`).
- ``lr-too-high``: full-batch GD (or heavy ball) at a stable lr, then the lr is set to
  ``factor`` times the bound ``(2+2mu)/lam_max(H)`` measured at that step. Labels:
  the first rise after the switch, then each later episode of :func:`label_spikes`.
- ``gradient-outlier``: mini-batch Adam with a few batches whose targets are scaled.
- ``non-finite``: mini-batch Adam with a few steps whose loss overflows to ``inf``
  (the step is skipped, as a GradScaler does).
- ``stable``: full-batch Adam with the fixes (lr 3e-3, AMSGrad, eps 1e-3); labelled
  like the first kind, so a spike it still has is an event, not a false alarm.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from stablestep.diagnosis.trace import Trace
from stablestep.telemetry import names

MECHANISM_RUNS = ("adaptive-edge-of-stability", "lr-too-high", "gradient-outlier",
                  "non-finite", "stable")


@dataclass(frozen=True)
class LabeledRun:
    """A trace with its true incidents: ``events`` = [(onset step, mechanism)]."""

    trace: Trace
    cause: str
    events: list[tuple[int, str]]
    name: str


def _data(seed: int, n: int = 256, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    y = torch.tanh(x @ w) + 0.3 * torch.sin(3 * x[:, :1])
    return x, y


def _model(seed: int, width: int, act: str, d: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = torch.nn.Tanh() if act == "tanh" else torch.nn.GELU()
    return torch.nn.Sequential(torch.nn.Linear(d, width), layer, torch.nn.Linear(width, 1))


def make_run(cause: str, *, seed: int = 0, width: int = 32, act: str = "tanh",
             steps: int | None = None, curvature_every: int = 10, n: int = 256,
             store: str | os.PathLike | None = None) -> LabeledRun:
    """Train one small labelled run, recorded by ``stablestep.Monitor`` into a run store
    (``store``, a temporary file by default) with its default settings plus curvature every
    ``curvature_every`` steps, and read back as a user's ``diagnose`` reads it (see the
    module docstring); ``cause`` in ``MECHANISM_RUNS``."""
    if cause not in MECHANISM_RUNS:
        raise ValueError(f"Invalid cause: {cause!r} (one of {', '.join(MECHANISM_RUNS)})")
    if steps is not None and steps < 400 and cause in ("gradient-outlier", "non-finite"):
        raise ValueError(f"Invalid steps: {steps} (need >= 400 for {cause!r} injections)")
    from stablestep import Monitor
    from stablestep.curvature import CurvatureProbe, ProbeConfig
    from stablestep.diagnosis.sources import load

    x, y = _data(seed, n=n)
    model = _model(seed, width, act)
    params = list(model.parameters())
    rng = np.random.default_rng(seed)
    full_batch = cause in ("adaptive-edge-of-stability", "lr-too-high", "stable")
    n_steps = steps or {"adaptive-edge-of-stability": 2000, "lr-too-high": 400}.get(cause, 600)
    momentum = 0.9 if (cause == "lr-too-high" and seed % 2) else 0.0
    if cause == "lr-too-high":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.05, momentum=momentum)
    elif cause == "stable":
        opt = torch.optim.Adam(params, lr=3e-3, amsgrad=True, eps=1e-3)
    else:
        opt = torch.optim.Adam(params, lr=1e-2 if full_batch else 3e-3)
    inject: list[int] = []
    if cause in ("gradient-outlier", "non-finite"):
        inject = sorted(int(s) for s in rng.choice(np.arange(150, n_steps - 30, 60), 3,
                                                   replace=False))
    switch = 150 if cause == "lr-too-high" else None
    factor = 1.3 + 0.5 * (seed % 3)
    mse = torch.nn.functional.mse_loss
    name = f"{cause}-{act}{width}-s{seed}"
    tmp = None
    if store is None:
        tmp = tempfile.TemporaryDirectory()
        store = os.path.join(tmp.name, "labeled.db")
    curv = dict(curvature_every=curvature_every, curvature_loss=lambda: mse(model(x), y)) \
        if curvature_every else {}
    try:
        with Monitor(model, opt, store=store, run=name, **curv) as monitor:
            for t in range(n_steps):
                if full_batch:
                    xb, yb = x, y
                else:
                    idx = torch.as_tensor(rng.choice(x.shape[0], 32, replace=False))
                    xb, yb = x[idx], y[idx]
                    if cause == "gradient-outlier" and t in inject:
                        yb = yb * 30.0
                if switch is not None and t == switch:
                    probe = CurvatureProbe(params, opt,
                                           config=ProbeConfig(tol=2e-2, max_iter=30, seed=seed))
                    m = probe(lambda: mse(model(x), y))
                    new_lr = factor * (2 + 2 * momentum) / m[names.SHARPNESS]
                    for g in opt.param_groups:
                        g["lr"] = new_lr
                opt.zero_grad()
                loss = mse(model(xb), yb)
                if cause == "non-finite" and t in inject:
                    loss = loss * torch.tensor(float("inf"))  # an overflow in the forward pass
                loss.backward()
                monitor.observe(loss)
                bad = not math.isfinite(float(loss.detach())) or not all(
                    bool(torch.isfinite(p.grad).all()) for p in params)
                if bad:
                    if cause == "lr-too-high":
                        break
                    continue  # skip the update, as torch.amp.GradScaler does
                opt.step()
        (trace,) = load(os.fspath(store), run=name)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if cause in ("adaptive-edge-of-stability", "stable"):  # a spike in a 'stable' run counts
        events = [(s, "adaptive-edge-of-stability") for s in label_spikes(trace)]
    elif cause == "lr-too-high":
        # the first rise after the switch, then every later spike episode: the lr stays
        # above the bound, and a run that survives the first blow-up spikes again
        later = label_spikes(trace, start=switch)[1:]
        events = [(s, cause) for s in [_first_rise(trace, switch), *later]]
    elif cause in ("gradient-outlier", "non-finite"):
        events = [(s, cause) for s in inject]
    else:
        events = []
    return LabeledRun(trace=trace, cause=cause, events=events, name=name)


def _first_rise(trace: Trace, start: int, *, rise: float = 0.05) -> int:
    """First step at or after ``start`` where the loss is ``exp(rise)`` above its minimum
    since ``start - 1`` (or goes non-finite)."""
    i0 = max(0, int(np.searchsorted(trace.steps, start)) - 1)
    low = math.inf
    for i in range(i0, len(trace)):
        v = trace.loss[i]
        if not math.isfinite(v):
            return int(trace.steps[i])
        if v > low * math.exp(rise) and i > i0:
            return int(trace.steps[i])
        low = min(low, v)
    return int(trace.steps[-1])


def label_spikes(trace: Trace, *, peak: float = 1.1, rise: float = 0.05,
                 lookback: int = 50, quiet: int = 25, start: int | None = None,
                 settle: int = 20, settle_rise: float = 0.4, climb: int = 8) -> list[int]:
    """Offline ground truth for spike episodes, using the whole curve (not causal).

    An episode starts when the loss reaches ``peak`` times the lowest loss of the
    ``lookback`` steps before; its onset is the first step of the rise leading there at
    which the loss stands ``exp(rise)`` above the rise's starting point. It lasts until
    ``quiet`` consecutive steps pass with the loss under ``peak`` times its level at the
    start of the rise (Adam rings for a while after a spike; rises above the pre-spike
    level in that time belong to the same episode), unless the loss climbs ``climb``
    steps in a row by ``peak`` or more: ringing rises last 1-4 steps, a new spike's
    geometric rise 10-25, so that climb is a new episode (otherwise a run that rings
    between spikes merges 20-200x spikes into one episode). ``start``: first step
    searched (the ``lookback`` may reach before it). An episode whose onset is before
    step ``settle`` and whose peak stays under ``exp(settle_rise)`` (1.5x) times the
    rise's starting point is the early transient of training (Adam's or heavy ball's
    first steps overshoot the first minimum by 10-25%), not an incident: not returned.
    """
    y = np.log(np.where(trace.loss > 0, trace.loss, np.nan))
    i = 1 if start is None else max(1, int(np.searchsorted(trace.steps, start)))
    out, n = [], len(y)
    step = math.log(peak)
    while i < n:
        lo = np.nanmin(y[max(0, i - lookback): i])
        if not (y[i] >= lo + step):
            i += 1
            continue
        j = i  # walk back along the rise to its start
        while j > 0 and y[j - 1] < y[j]:
            j -= 1
        onset = next((k for k in range(j, i + 1) if y[k] >= y[j] + rise), i)
        k, calm, base, run, nxt = i, 0, y[j], 0, None
        while k + 1 < n and calm < quiet:
            k += 1
            run = run + 1 if y[k] > y[k - 1] else 0
            if run >= climb and k - run > i and y[k] >= y[k - run] + step:
                nxt = k - run  # a new spike's climb: the next episode starts there
                break
            calm = 0 if y[k] >= base + step else calm + 1  # still above the pre-spike level
        if trace.steps[onset] >= settle or np.nanmax(y[j: k + 1]) >= base + settle_rise:
            out.append(int(trace.steps[onset]))
        i = k + 1 if nxt is None else nxt + 1
    return out
