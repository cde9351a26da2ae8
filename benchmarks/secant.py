"""Cost and noise of the free secant curvature (stablestep.telemetry.secant).

Cost: the same training loop (a 4-256-256-1 tanh MLP, batch 64, torch Adam) with the default
Monitor and ``secant_every`` = None (anchor), 10 and 1; the secant's share of the step is the
ratio of the loop times, measured in the same run, interleaved, median of ``--reps``.

Noise: on healthy runs (minibatch MLP/CNN with Adam and SGD, full-batch MLP) the
distribution of :math:`q/\\text{bound}` on every step, and the share of steps the diagnosis'
gate would *trust* (``diagnosis.infer.secant``: :math:`q \\ge 0.5\\,\\text{bound}` and above
median + 8 robust sigmas of the 50 records before) - false trust, since nothing happens.

``python benchmarks/secant.py``; the last line prints the cost ratio of ``secant_every=1``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _loop(secant_every, steps: int, store: str, run: str) -> float:
    from stablestep import Monitor

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    model = torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                                torch.nn.Tanh(), torch.nn.Linear(256, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = Monitor(model, opt, store=store, run=run, secant_every=secant_every)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(2048, (64,), generator=g)
        opt.zero_grad()
        loss = ((model(x[idx]) - y[idx]) ** 2).mean()
        loss.backward()
        mon.observe(loss)
        opt.step()
    dt = time.perf_counter() - t0
    mon.close()
    return dt


def noise() -> None:
    """q/bound on healthy runs and the gate's false-trust share."""
    from benchmarks import wild

    from stablestep.diagnosis import infer
    from stablestep.diagnosis.sources import load
    from stablestep.telemetry import names

    specs = [wild.Spec(kind="healthy", model="mlp", opt="adam", lr=1e-3, batch=16, seed=900),
             wild.Spec(kind="healthy", model="mlp", opt="adam", lr=3e-3, batch=64, seed=901),
             wild.Spec(kind="healthy", model="cnn", opt="adamw", lr=1e-3, batch=16, seed=902),
             wild.Spec(kind="healthy", model="cnn", opt="sgd", lr=3e-2, momentum=0.9, batch=32,
                       seed=903),
             wild.Spec(kind="healthy", model="mlp", opt="sgd", lr=5e-2, batch=8, seed=904),
             wild.Spec(kind="healthy", model="mlp", opt="adam", lr=1e-3, batch=None, seed=905)]
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "n.db")
        print("healthy run                                 q/bound p50    p99    max  "
              "false-trust")
        for s in specs:
            wild.record(s, store)
            tr = load(store, run=s.name)[0]
            q = tr.metric(names.SECANT)
            b = infer.bound(tr)
            r = q[np.isfinite(q)] / b
            trusted = 0
            n = 0
            for k in range(60, len(tr)):
                st = int(tr.steps[k])
                sec = infer.secant(tr, st, st, lead=0)
                if sec is not None:
                    n += 1
                    trusted += sec["trusted"]
            print(f"{s.name:44s} {np.median(r):8.3f} {np.percentile(r, 99):6.3f} "
                  f"{r.max():6.3f}  {trusted}/{n}")


def main() -> None:
    """Measure (module docstring)."""
    torch.set_num_threads(1)
    reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 3
    steps = 300
    times: dict[str, list[float]] = {"off": [], "every10": [], "every1": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "c.db")
        for i in range(reps):
            for key, every in (("off", None), ("every10", 10), ("every1", 1)):
                times[key].append(_loop(every, steps, store, f"{key}-{i}"))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"secant {k:8s}: {1e3 * v / steps:.3f} ms/step")
    noise()
    print(f"ratio secant_every=1 / off {med['every1'] / med['off']:.3f}; "
          f"secant_every=10 / off {med['every10'] / med['off']:.3f}")


if __name__ == "__main__":
    main()
