"""Overhead of stablestep.Monitor on a ~5M-parameter transformer language model (CPU).

Three copies of the same model and Adam optimizer train side by side on the same
batches: unmonitored (the anchor), monitored at the default cadence (cheap statistics
every step, Adam-state and update statistics every 10 steps) and monitored with every
statistic at every step. The variants take turns step by step on the same batch
(A, B, C, B, C, A, ...), so all of them see the same load on the machine. Step times
are averaged over periods of ``--period`` steps (one full cadence period, so the
every-10-steps work is included), and each ratio is the median over periods of the
paired ratio variant/unmonitored.

The 2-rank DDP case (``--case ddp``; run after the single-process case by default) does
the same on 2 CPU processes joined by gloo, each with one thread and its own batches:
DDP-wrapped unmonitored and monitored (default cadence) copies take turns step by step,
in rotating order, on every rank, for ``--ddp-periods`` periods (more than the single
process: two processes on two shared cores are noisier). The ratio is the median over
periods of rank 0's paired period ratios (DDP keeps the ranks in step); the quartiles of
those ratios and the machine's load average are printed with it, so a noisy run shows.
Under DDP each rank computes the statistics of about half of the (replicated) tensors
(``stablestep.telemetry.recorder.owners``), a recorded step adds one small asynchronous
all-gather of the packed statistics, and rank 0 alone writes the store.

The last line is the ratio monitored/unmonitored at the default cadence (goal <= 1.03):
for the DDP case when it runs, else for the single process.

    python benchmarks/monitor_overhead.py             # 12-13 minutes on 2 busy CPU cores
    python benchmarks/monitor_overhead.py --periods 3 --ddp-periods 3  # quick look
    python benchmarks/monitor_overhead.py --case ddp  # the 2-rank DDP case only
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from stablestep.telemetry import Monitor


class Block(nn.Module):
    """Pre-norm transformer block (causal self-attention + MLP)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Byte-level GPT-style LM: 6 layers, d=256, 4 heads: about 4.9M parameters."""

    def __init__(
        self, vocab: int = 256, d: int = 256, layers: int = 6, heads: int = 4, T: int = 64
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(T, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos[:T]
        for blk in self.blocks:
            x = blk(x, self.mask[:T, :T])
        return self.head(self.ln(x))


def make_corpus(n: int, seed: int = 0) -> torch.Tensor:
    """Synthetic bytes from a random sparse Markov chain (something learnable)."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, 256, (256, 4), generator=g)
    out = torch.empty(n, dtype=torch.long)
    c = 0
    choice = torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        c = int(nxt[c, choice[i]])
        out[i] = c
    return out


def batches(corpus: torch.Tensor, batch: int, T: int, seed: int):
    """An endless stream of (input, target) byte windows from ``corpus``."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        i = torch.randint(0, len(corpus) - T - 1, (batch,), generator=gen)
        x = torch.stack([corpus[j : j + T] for j in i.tolist()])
        y = torch.stack([corpus[j + 1 : j + T + 1] for j in i.tolist()])
        yield x, y


def timed_periods(
    variants: dict[str, tuple[nn.Module, torch.optim.Optimizer, Monitor | None]],
    stream,
    periods: int,
    period: int,
) -> dict[str, list[float]]:
    """Mean step time per period for each variant (and, under ``"<variant> cpu"``, the
    process's CPU time per step: less sensitive to other processes than the wall clock);
    the variants take turns step by step, in rotating order, on the same batch; period 0
    is warm-up and not returned."""
    names = list(variants)
    out: dict[str, list[float]] = {k: [] for n in names for k in (n, f"{n} cpu")}

    def one_step(name: str, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        model, opt, mon = variants[name]
        c0 = time.process_time()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if mon is not None:
            mon.observe(loss)
        opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    for k in range(periods + 1):
        acc = dict.fromkeys(out, 0.0)
        for i in range(period):
            x, y = next(stream)
            r = (k * period + i) % len(names)
            for name in names[r:] + names[:r]:
                wall, cpu = one_step(name, x, y)
                acc[name] += wall
                acc[f"{name} cpu"] += cpu
        if k > 0:
            for key in out:
                out[key].append(acc[key] / period)
    for _, _, mon in variants.values():
        if mon is not None:
            mon.close()
    return out


def period_ratios(periods: dict[str, list[float]], name: str, base: str = "unmonitored"
                  ) -> list[float]:
    """The paired ratio variant/unmonitored (``name``/``base``) of each period."""
    return [a / b for a, b in zip(periods[name], periods[base], strict=True)]


def paired_ratio(periods: dict[str, list[float]], name: str, base: str = "unmonitored"
                 ) -> float:
    """Median over periods of the paired ratio variant/unmonitored."""
    return statistics.median(period_ratios(periods, name, base))


def report(periods: dict[str, list[float]]) -> float:
    """Print the spread of the default cadence's period ratios and its CPU-time ratio;
    returns its wall-clock ratio (the figure the goal is about)."""
    if len(periods["default"]) > 1:
        q1, _, q3 = statistics.quantiles(period_ratios(periods, "default"), n=4)
        print(f"period ratios monitored/unmonitored: quartiles {q1:.3f} .. {q3:.3f}")
    cpu = paired_ratio(periods, "default cpu", "unmonitored cpu")
    print(f"ratio of process CPU time per step, monitored/unmonitored: {cpu:.3f}")
    return paired_ratio(periods, "default")


def load() -> str:
    """The machine's 1-minute load average (other processes make timings noisy)."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def single(args: argparse.Namespace, store: Path) -> float:
    """The single-process case; returns the default-cadence ratio."""
    torch.set_num_threads(args.threads)
    T = 64
    variants: dict[str, tuple[nn.Module, torch.optim.Optimizer, Monitor | None]] = {}
    for name in ("unmonitored", "default", "every-stat-every-step"):
        torch.manual_seed(0)
        model = TinyLM(T=T)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        mon = None
        if name == "default":
            mon = Monitor(model, opt, store=store, run=name)
        elif name == "every-stat-every-step":
            mon = Monitor(model, opt, store=store, run=name, every=1, state_every=1)
        variants[name] = (model, opt, mon)
    n_params = sum(p.numel() for p in variants["unmonitored"][0].parameters())
    stream = batches(make_corpus(20_000), args.batch, T, seed=1)
    before = load()
    periods = timed_periods(variants, stream, args.periods, args.period)
    print(
        f"model: {n_params / 1e6:.2f}M parameters, batch {args.batch}x{T} tokens, "
        f"{args.threads} thread(s), {args.periods} periods of {args.period} steps per variant; "
        f"load average {before} before, {load()} after"
    )
    for name in variants:
        print(f"{name:>24}: {statistics.median(periods[name]) * 1e3:8.1f} ms/step (median period)")
    print(f"ratio every-stat-every-step/unmonitored: "
          f"{paired_ratio(periods, 'every-stat-every-step'):.3f}")
    ratio = report(periods)
    print(f"ratio monitored/unmonitored (default cadence): {ratio:.3f}")
    return ratio


def _ddp_rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        T = 64
        variants = {}
        for name in ("unmonitored", "default"):
            torch.manual_seed(0)
            model = nn.parallel.DistributedDataParallel(TinyLM(T=T))
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            mon = Monitor(model, opt, store=out + ".db", run=name) if name == "default" else None
            variants[name] = (model, opt, mon)
        stream = batches(make_corpus(20_000), args.batch, T, seed=1 + rank)
        periods = timed_periods(variants, stream, args.ddp_periods, args.period)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(periods, f)
    finally:
        dist.destroy_process_group()


def ddp(args: argparse.Namespace, tmp: Path) -> float:
    """The 2-rank DDP case (gloo, CPU); returns rank 0's default-cadence ratio."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp / "ddp.json")
    before = load()
    mp.start_processes(_ddp_rank, args=(2, port, args, out), nprocs=2, join=True,
                       start_method="fork")
    with open(out) as f:
        periods = json.load(f)
    print(f"2-rank DDP (gloo, 1 thread per rank, batch {args.batch} per rank), "
          f"{args.ddp_periods} periods of {args.period} steps per variant; "
          f"load average {before} before, {load()} after (2 ranks add ~2)")
    for name in ("unmonitored", "default"):
        print(f"{name:>24}: {statistics.median(periods[name]) * 1e3:8.1f} ms/step (rank 0)")
    ratio = report(periods)
    print(f"ratio monitored/unmonitored, 2-rank DDP (default cadence): {ratio:.3f}")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--periods", type=int, default=8, help="timed periods per variant")
    ap.add_argument("--ddp-periods", type=int, default=16,
                    help="timed periods per variant in the 2-rank DDP case")
    ap.add_argument("--period", type=int, default=10, help="steps per period (= state_every)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--case", choices=("single", "ddp", "both"), default="both")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.case in ("single", "both"):
            single(args, Path(tmp) / "bench.db")
        if args.case in ("ddp", "both"):
            ddp(args, Path(tmp))


if __name__ == "__main__":
    main()
