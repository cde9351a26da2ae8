"""Step time of stablestep's Adam family against torch.optim.Adam(fused=True) and (foreach=True).

~25M float32 parameters in ~100 tensors. Every round runs every variant once, in the same
order (A, B, C, ... interleaved) so that load from other processes hits them alike; the
report is the median over rounds and the ratio to torch's fused Adam measured in the same
run (AMSGrad variants against torch's fused AMSGrad). The LAST line is the worst ratio
ours/fused over plain Adam in both epsilon modes (goal <= 1.05); the line before it lists
the variants (update clipping, AdamAtan2; eager and ``impl="compiled"``, goal <= 1.3).
Compiled variants build their kernel in the untimed warm-up step (its time is printed).

    python benchmarks/optim_step.py [--params 25e6] [--tensors 100] [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stablestep.optim import Adam, AdamAtan2, AdamW


def build(n_params: int, n_tensors: int) -> list[torch.Tensor]:
    """Parameters with gradients: ``n_tensors`` tensors of (nearly) equal size."""
    gen = torch.Generator().manual_seed(0)
    size = n_params // n_tensors
    params = []
    for i in range(n_tensors):
        p = torch.randn(size + (i % 3), generator=gen).requires_grad_()
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        params.append(p)
    return params


VARIANTS = {
    # name: (factory, anchor name)
    "torch fused": (lambda ps: torch.optim.Adam(ps, fused=True), None),
    "torch foreach": (lambda ps: torch.optim.Adam(ps, foreach=True), "torch fused"),
    "torch fused amsgrad": (lambda ps: torch.optim.Adam(ps, fused=True, amsgrad=True), None),
    "ours Adam torch-eps": (lambda ps: Adam(ps), "torch fused"),
    "ours Adam tf-eps": (lambda ps: Adam(ps, eps=1e-7, eps_mode="tf"), "torch fused"),
    "ours Adam torch-eps amsgrad": (lambda ps: Adam(ps, amsgrad=True), "torch fused amsgrad"),
    "ours Adam tf-eps amsgrad": (
        lambda ps: Adam(ps, eps=1e-7, eps_mode="tf", amsgrad=True), "torch fused amsgrad"),
    "ours AdamW update_clipping": (
        lambda ps: AdamW(ps, update_clipping=True), "torch fused"),
    "ours AdamW update_clipping compiled": (
        lambda ps: AdamW(ps, update_clipping=True, impl="compiled"), "torch fused"),
    "ours AdamW update_clipping amsgrad compiled": (
        lambda ps: AdamW(ps, update_clipping=True, amsgrad=True, impl="compiled"),
        "torch fused amsgrad"),
    "ours AdamAtan2": (lambda ps: AdamAtan2(ps), "torch fused"),
    "ours AdamAtan2 compiled": (lambda ps: AdamAtan2(ps, impl="compiled"), "torch fused"),
}
HEADLINE = ("ours Adam torch-eps", "ours Adam tf-eps", "ours Adam torch-eps amsgrad",
            "ours Adam tf-eps amsgrad")


def main() -> None:
    """Run the interleaved benchmark and print medians and ratios (worst Adam ratio last)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="subset of variant names")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    # Parameters and gradients are shared (every step reads the same gradients; the values
    # the parameters drift to do not change the work); each optimizer has its own state.
    params = build(int(args.params), args.tensors)
    names = [n for n in VARIANTS if args.only is None or n in args.only or VARIANTS[n][1] is None]
    opts = {n: VARIANTS[n][0](params) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, float] = {}
    with torch.no_grad():
        for n, opt in opts.items():  # warm-up: state, first-call overheads, kernel builds
            t0 = time.perf_counter()
            opt.step()
            first[n] = time.perf_counter() - t0
        for _ in range(args.rounds):
            for n, opt in opts.items():
                t0 = time.perf_counter()
                opt.step()
                times[n].append(time.perf_counter() - t0)

    n_total = sum(p.numel() for p in params)
    print(f"{n_total / 1e6:.1f}M params in {len(params)} tensors, float32, "
          f"{args.threads} thread(s), median of {args.rounds} interleaved rounds")
    med = {n: statistics.median(ts) for n, ts in times.items()}
    for n in names:
        anchor = VARIANTS[n][1]
        ratio = f"{med[n] / med[anchor]:6.2f}x vs {anchor}" if anchor else "(anchor)"
        note = f"   (first step {first[n]:.1f} s)" if n.endswith("compiled") else ""
        print(f"  {n:44s} {med[n] * 1e3:8.2f} ms   {ratio}{note}")
    variants = [n for n in med if VARIANTS[n][1] and n.startswith("ours") and n not in HEADLINE]
    if variants:
        print("variants ours/anchor: " + ", ".join(
            f"{n[5:]} {med[n] / med[VARIANTS[n][1]]:.2f}" for n in variants))
    headline = [n for n in HEADLINE if n in med]
    if headline:
        worst = max(headline, key=lambda n: med[n] / med[VARIANTS[n][1]])
        print(f"ratio ours/fused (worst Adam, both eps modes: {worst}): "
              f"{med[worst] / med[VARIANTS[worst][1]]:.3f}")


if __name__ == "__main__":
    main()
