"""Overhead of the model probes on the lab's GPT (CPU), at the default cadence.

Two copies of the same model (stablestep.lab.text.TinyGPT: 2 layers, d 128, 4 heads,
context 64, batch 16, AdamW) train side by side on the same byte batches of the
standard library's sources, both under a stablestep.Monitor at its default cadence
(detail every 10 steps): one without model probes (the anchor), one with
``ModelProbes(model, optimizer=opt)`` attached (attention logits and entropy per layer,
log Z, activation RMS, eps vs gradient RMS, all every 10 steps). They take turns step by
step (A, B, B, A, ...) so both see the same load; step times are summed over periods of
``--period`` steps (one cadence period), and the ratio is the median over periods of
with/without. The last line is that ratio (goal <= 1.03).

    python benchmarks/model_probes.py               # ~1.5 minutes on one CPU thread
    python benchmarks/model_probes.py --periods 3   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stablestep.lab.text import TextConfig, TinyGPT, batches, stdlib_bytes, text_loss
from stablestep.telemetry import Monitor
from stablestep.telemetry.model_probes import ModelProbes


def _setup(cfg: TextConfig, store: Path, run: str, probes: bool):
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    mp = ModelProbes(model, optimizer=opt) if probes else None
    mon = Monitor(model, opt, store=store, run=run, model_probes=mp)
    return model, opt, mon


def _step(model, opt, mon, x, y) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    _, loss = text_loss(model(x), y)
    loss.backward()
    mon.observe(loss)
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    """Measure and print per-period ratios, then the median ratio on the last line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--periods", type=int, default=30)
    ap.add_argument("--period", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TextConfig()
    data = torch.frombuffer(bytearray(stdlib_bytes(cfg.n_bytes)), dtype=torch.uint8)
    it = batches(cfg, data, torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        a = _setup(cfg, Path(tmp) / "s.db", "plain", probes=False)
        b = _setup(cfg, Path(tmp) / "s.db", "probes", probes=True)
        for _ in range(args.period):  # warm up both (allocations, first store writes)
            x, y = next(it)
            _step(*a, x, y)
            _step(*b, x, y)
        ratios = []
        for k in range(args.periods):
            ta = tb = 0.0
            for i in range(args.period):
                x, y = next(it)
                if (k + i) % 2:
                    ta += _step(*a, x, y)
                    tb += _step(*b, x, y)
                else:
                    tb += _step(*b, x, y)
                    ta += _step(*a, x, y)
            ratios.append(tb / ta)
            print(f"period {k}: without {ta / args.period * 1e3:.1f} ms/step, "
                  f"with probes {tb / args.period * 1e3:.1f} ms/step, ratio {tb / ta:.3f}")
        a[2].close()
        b[2].close()
    print(f"model probes / no probes, default cadence: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
