"""The runs the schedule-restart rule was looked at on (its *tuning* runs; the held-out
corpus, written blind to the rule, is ``benchmarks/guard_schedules.py``).

A 10-class classifier (Gaussian class prototypes in 32 dimensions, no label noise, 1024
samples; an MLP 32-128-128-10), minibatches of 32, 600 steps, seeds 1 and 2, under the
schedules of ``torch.optim.lr_scheduler``: SGDR (``CosineAnnealingWarmRestarts``, T_0=100)
with Adam at lr 3e-3 and 1e-2, AdamW under SGDR with T_mult=2, SGD momentum at 0.1 under
SGDR, ``OneCycleLR``, linear warmup then cosine, ``CyclicLR``. Each run is recorded by a
``stablestep.Monitor`` and decided by a default ``stablestep.Guard``; the benchmark prints
the Guard's actions (holds apart) and ``diagnose``'s findings per run. By the later
restarts the loss is near 1e-3 and each restart lifts it 10-60x: before the rule, the
Guard rolled back at the restarts of the lr 1e-2 runs and raised ``GuardError`` in one,
and ``diagnose`` called three of them "divergence, lr-too-high". The share of progress
the restarts gave back here: 0.001-0.2 (the rule's tolerance: 0.5). Seed 3 of the SGDR runs
was looked at too while the rule was written.

``python benchmarks/guard_schedules_tuning.py`` (about 2 min); the last line counts the
Guard's actions and the findings over all runs (goal: 0 and 0).
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile

import torch

import stablestep
from stablestep.guard import Guard, GuardError

RUNS = [("sgdr", 3e-3, "adam"), ("sgdr", 1e-2, "adam"), ("sgdr-mult", 3e-3, "adamw"),
        ("sgdr", 0.1, "sgd"), ("onecycle", 1e-2, "adam"), ("warmup-cosine", 3e-3, "adam"),
        ("cyclic", 3e-3, "adam")]


def _data(seed: int, n: int = 1024, dim: int = 32, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, dim, generator=g)
    y = torch.randint(classes, (n,), generator=g)
    return protos[y] + 1.5 * torch.randn(n, dim, generator=g), y


def run(sched: str, lr: float, opt_kind: str, seed: int, steps: int = 600) -> dict:
    """Train one run; its Guard records (holds apart), findings and final loss."""
    x, y = _data(seed)
    torch.manual_seed(seed)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    params = model.parameters()
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=0.01) if opt_kind == "adamw"
           else torch.optim.SGD(params, lr=lr, momentum=0.9) if opt_kind == "sgd"
           else torch.optim.Adam(params, lr=lr))
    S = torch.optim.lr_scheduler
    sch = {
        "sgdr": lambda: S.CosineAnnealingWarmRestarts(opt, T_0=100, eta_min=lr * 1e-3),
        "sgdr-mult": lambda: S.CosineAnnealingWarmRestarts(opt, T_0=50, T_mult=2),
        "onecycle": lambda: S.OneCycleLR(opt, max_lr=lr, total_steps=steps),
        "warmup-cosine": lambda: S.LambdaLR(opt, lambda t: min(1, (t + 1) / 50) * 0.5 * (
            1 + math.cos(math.pi * min(t, steps) / steps))),
        "cyclic": lambda: S.CyclicLR(opt, base_lr=lr / 10, max_lr=lr, step_size_up=60),
    }[sched]()
    store = f"{tempfile.mkdtemp(prefix='sched-tuning-')}/s.db"
    mon = stablestep.Monitor(model, opt, store=store, run="r")
    guard = Guard(model, opt, monitor=mon)
    g = torch.Generator().manual_seed(seed + 1)
    error = None
    try:
        for _ in range(steps):
            i = torch.randint(len(x), (32,), generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
            loss.backward()
            mon.observe(loss)
            if guard.check(loss):
                opt.step()
            sch.step()
    except GuardError as e:
        error = str(e)
    mon.close()
    with torch.no_grad():
        final = float(torch.nn.functional.cross_entropy(model(x), y))
    acts = [(r.step, r.action, r.reason) for r in guard.records
            if r.action not in ("spike", "hold")]
    holds = sum(r.action == "hold" for r in guard.records)
    finds = [(f.step, f.kind, f.mechanism) for f in stablestep.diagnose(store)]
    return {"actions": acts, "holds": holds, "findings": finds, "final": final, "error": error}


def main() -> int:
    """Run every tuning run; print actions and findings; the totals last."""
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    n_act = n_find = 0
    for sched, lr, opt_kind in RUNS:
        for seed in (1, 2):
            r = run(sched, lr, opt_kind, seed)
            n_act += len(r["actions"]) + (r["error"] is not None)
            n_find += len(r["findings"])
            print(f"{sched:14s} {opt_kind:5s} lr {lr:<6g} seed {seed}: final {r['final']:.3g}  "
                  f"guard actions {r['actions'] or 'none'}{' ' + r['error'] if r['error'] else ''}"
                  f" (holds {r['holds']})  findings {r['findings'] or 'none'}", flush=True)
    print(f"schedule tuning runs: guard actions {n_act}, findings {n_find}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
