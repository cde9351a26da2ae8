"""Overhead of stablestep.Monitor on a ~5M-parameter transformer language model (CPU).

Three copies of the same model and Adam optimizer train side by side on the same
batches: unmonitored (the anchor), monitored at the default cadence (cheap statistics
every step, Adam-state and update statistics every 10 steps) and monitored with every
statistic at every step. The variants take turns step by step on the same batch
(A, B, C, B, C, A, ...), so all of them see the same load on the machine. Step times
are averaged over periods of ``--period`` steps (one full cadence period, so the
every-10-steps work is included), and each ratio is the median over periods of the
paired ratio variant/unmonitored. The last line is the ratio monitored/unmonitored at
the default cadence (goal <= 1.03).

    python benchmarks/monitor_overhead.py             # ~1.5 minutes on one CPU thread
    python benchmarks/monitor_overhead.py --periods 3 # quick look
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--periods", type=int, default=8, help="timed periods per variant")
    ap.add_argument("--period", type=int, default=10, help="steps per period (= state_every)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    T = 64
    corpus = make_corpus(20_000)
    gen = torch.Generator().manual_seed(1)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(0, len(corpus) - T - 1, (args.batch,), generator=gen)
        x = torch.stack([corpus[j : j + T] for j in i.tolist()])
        y = torch.stack([corpus[j + 1 : j + T + 1] for j in i.tolist()])
        return x, y

    tmp = tempfile.TemporaryDirectory()
    store = Path(tmp.name) / "bench.db"
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

    def one_step(name: str, x: torch.Tensor, y: torch.Tensor) -> float:
        model, opt, mon = variants[name]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if mon is not None:
            mon.observe(loss)
        opt.step()
        return time.perf_counter() - t0

    # periods[name][k]: mean step time over period k (one full cadence period);
    # variants take turns step by step, in rotating order, on the same batch
    periods: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for k in range(args.periods + 1):  # period 0 is warm-up
        acc = dict.fromkeys(names, 0.0)
        for i in range(args.period):
            x, y = batch()
            r = (k * args.period + i) % len(names)
            for name in names[r:] + names[:r]:
                acc[name] += one_step(name, x, y)
        if k > 0:
            for name in names:
                periods[name].append(acc[name] / args.period)
    for _, _, mon in variants.values():
        if mon is not None:
            mon.close()
    tmp.cleanup()

    base = periods["unmonitored"]
    print(
        f"model: {n_params / 1e6:.2f}M parameters, batch {args.batch}x{T} tokens, "
        f"{args.threads} thread(s), {args.periods} periods of {args.period} steps per variant"
    )
    for name in names:
        print(f"{name:>24}: {statistics.median(periods[name]) * 1e3:8.1f} ms/step (median period)")

    def ratio(name: str) -> float:  # median over periods of the paired ratio
        return statistics.median(a / b for a, b in zip(periods[name], base, strict=True))

    print(f"ratio every-stat-every-step/unmonitored: {ratio('every-stat-every-step'):.3f}")
    print(f"ratio monitored/unmonitored (default cadence): {ratio('default'):.3f}")


if __name__ == "__main__":
    main()
