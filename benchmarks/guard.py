"""Does the guard keep failing runs alive, leave healthy ones alone, and what does it cost?

Part 1, survival: generated runs, each trained twice from the same seed, without and with
``stablestep.Guard`` (default ``GuardPolicy``, no curvature closure):

- ``nan-injection``: minibatch MLP regression; three batches carry a NaN input.
- ``outlier-batches``: the same; three batches have labels scaled by 1000.
- ``late-eps-explosion``: seed 000 (lab ``late-explosion``: eps 1e-8 memorising random
  targets until v collapses and the loss explodes).
- ``periodic-spikes``: seed 001 (lab ``periodic-spikes``: full-batch Adam, eps 1e-8).
- ``lr-too-high``: seed 003 (lab ``lr-divergence``: gradient descent at 2.5x the stable lr).
- ``stable-minibatch``, ``stable-amsgrad``: healthy runs (the guard should do nothing).

A run *ends healthy* when its final whole-data loss is finite and at most 3x that of the
run's healthy reference (same data without the fault; for the lab stories their fix:
eps 1e-3, AMSGrad, lr 1e-4) plus a floor of 1e-6 x the initial loss. The table gives the
final losses, the spikes (lab counter, factor 3) and the guard's actions.

Part 2, overhead: a 4-layer MLP (width 512, batch 128, 0.56M parameters) trained with
``torch.optim.Adam``; segments of 25 steps alternate unguarded / guarded (A, B, A, B...);
each segment's mean step time is taken (so the snapshot every 100 steps is paid for), and
the last line is the median over adjacent pairs of guarded/unguarded.

Run: ``.venv/bin/python benchmarks/guard.py`` (about a minute on one CPU thread).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from stablestep.guard import Guard
from stablestep.lab import problems, scenarios
from stablestep.lab.spikes import count_spikes
from stablestep.lab.train import make_optimizer

torch.set_num_threads(1)


def _mlp_data(seed: int, n: int = 1024, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.sin(3 * x[:, :1])
    return x, y


def run_minibatch(fault: str | None, guard: bool, *, steps: int = 600, seed: int = 0) -> dict:
    """MLP regression with batches of 32 and Adam lr 3e-3; ``fault`` corrupts 3 batches."""
    x, y = _mlp_data(seed)
    torch.manual_seed(seed + 1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gd = Guard(model, opt) if guard else None
    gen = torch.Generator().manual_seed(seed + 2)
    bad_steps = {150, 300, 450}
    losses = []
    with torch.no_grad():
        first = float(((model(x) - y) ** 2).mean())
    for t in range(steps):
        idx = torch.randint(len(x), (32,), generator=gen)
        xb, yb = x[idx].clone(), y[idx].clone()
        if fault == "nan" and t in bad_steps:
            xb[0, 0] = float("nan")
        if fault == "outlier" and t in bad_steps:
            yb *= 1000.0
        opt.zero_grad()
        loss = ((model(xb) - yb) ** 2).mean()
        loss.backward()
        losses.append(float(loss.detach()))
        if gd is None or gd.check(loss):
            opt.step()
    with torch.no_grad():
        final = float(((model(x) - y) ** 2).mean())
    return {"final": final, "first": first, "losses": np.array(losses), "guard": gd}


def run_lab(config, guard: bool) -> dict:
    """A lab story's config, trained like :func:`stablestep.lab.train.train` (full batch),
    but going on after a non-finite loss (the guard may skip it; without one it stays NaN)."""
    pr = problems.build(config)
    opt = make_optimizer(config, pr.model.parameters())
    gd = Guard(pr.model, opt) if guard else None
    first = pr.full_loss()
    losses = []
    for _ in range(config.steps):
        opt.zero_grad()
        loss = pr.loss()
        loss.backward()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]) and gd is None:
            break  # diverged for good: parameters are NaN/Inf from here on
        if gd is None or gd.check(loss):
            opt.step()
    return {"final": pr.full_loss(), "first": first, "losses": np.array(losses), "guard": gd}


def cases():
    """(name, failing run(guard), reference run) for every generated run."""
    late = scenarios.get("late-explosion")
    per = scenarios.get("periodic-spikes")
    div = scenarios.get("lr-divergence")
    short_late = replace(late.base(), steps=2500)
    return [
        ("nan-injection", lambda g: run_minibatch("nan", g), lambda: run_minibatch(None, False)),
        ("outlier-batches", lambda g: run_minibatch("outlier", g),
         lambda: run_minibatch(None, False)),
        ("late-eps-explosion", lambda g: run_lab(short_late, g),
         lambda: run_lab(replace(short_late, eps=1e-3), False)),
        ("periodic-spikes", lambda g: run_lab(per.base(), g),
         lambda: run_lab(replace(per.base(), amsgrad=True), False)),
        ("lr-too-high", lambda g: run_lab(div.base(), g),
         lambda: run_lab(replace(div.base(), lr=1e-4), False)),
        ("stable-minibatch", lambda g: run_minibatch(None, g), lambda: run_minibatch(None, False)),
        ("stable-amsgrad", lambda g: run_lab(replace(per.base(), amsgrad=True), g),
         lambda: run_lab(replace(per.base(), amsgrad=True), False)),
    ]


def healthy(res: dict, ref: dict) -> bool:
    """Finite and within 3x of the reference's final loss (plus a floor)."""
    f = res["final"]
    return math.isfinite(f) and f <= 3 * ref["final"] + 1e-6 * res["first"]


def survival() -> tuple[int, int, int]:
    """Print one row per run; return (runs, healthy without guard, healthy with guard)."""
    print(f"{'run':20s} {'ref':>9s} {'no guard':>9s} {'guard':>9s} {'spikes':>9s}  actions")
    ok0 = ok1 = n = 0
    for name, failing, reference in cases():
        ref = reference()
        r0, r1 = failing(False), failing(True)
        h0, h1 = healthy(r0, ref), healthy(r1, ref)
        ok0, ok1, n = ok0 + h0, ok1 + h1, n + 1
        c = r1["guard"].counts
        acts = ", ".join(f"{k} {v}" for k, v in c.items() if v and k != "spike") or "none"
        s0, s1 = count_spikes(r0["losses"]), count_spikes(r1["losses"])
        print(f"{name:20s} {ref['final']:9.2e} {r0['final']:9.2e}{'*' if h0 else ' '}"
              f"{r1['final']:9.2e}{'*' if h1 else ' '} {s0:4d}->{s1:<4d} {acts}")
    print("(* = ended healthy)")
    return n, ok0, ok1


def overhead(segments: int = 24, seg_steps: int = 25) -> tuple[float, float, float]:
    """Median over segments of the mean step time (unguarded, guarded), segments interleaved
    A, B, A, B..., and
    the median over adjacent (A, B) pairs of their ratio (robust to load drifting)."""
    torch.manual_seed(0)
    x, y = torch.randn(4096, 64), torch.randn(4096, 1)
    times: dict[bool, list[float]] = {False: [], True: []}
    runs = {}
    for guarded in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 512), torch.nn.GELU(), torch.nn.Linear(512, 512), torch.nn.GELU(),
            torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        runs[guarded] = (model, opt, Guard(model, opt) if guarded else None)
    gen = torch.Generator().manual_seed(2)
    for i in range(2 * segments + 2):
        guarded = i % 2 == 1
        model, opt, gd = runs[guarded]
        per_step = []
        for _ in range(seg_steps):
            idx = torch.randint(len(x), (128,), generator=gen)
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = ((model(x[idx]) - y[idx]) ** 2).mean()
            loss.backward()
            if gd is None or gd.check(loss):
                opt.step()
            per_step.append(time.perf_counter() - t0)
        if i >= 2:  # the first pair warms up
            times[guarded].append(statistics.fmean(per_step))  # snapshots amortised
    n_params = sum(p.numel() for p in runs[True][0].parameters())
    print(f"overhead model: {n_params / 1e6:.2f}M parameters, batch 128, "
          f"snapshot every {runs[True][2].policy.snapshot_every} steps")
    ratios = [b / a for a, b in zip(times[False], times[True], strict=True)]
    return statistics.median(times[False]), statistics.median(times[True]), \
        statistics.median(ratios)


def main() -> None:
    n, ok0, ok1 = survival()
    print(f"ended healthy: without guard {ok0}/{n}, with guard {ok1}/{n}")
    base, guarded, ratio = overhead()
    print(f"step time: unguarded {base * 1e3:.3f} ms, guarded {guarded * 1e3:.3f} ms "
          f"(ratio of medians {guarded / base:.3f})")
    print(f"guarded/unguarded step time ratio (median of interleaved pairs): {ratio:.3f}")


if __name__ == "__main__":
    main()
