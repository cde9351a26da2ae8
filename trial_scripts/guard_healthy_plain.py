"""Trial: the Guard on healthy minibatch training (plain loop) must take no action.

MLP classifier (synthetic 10-class data) and a tiny MultiheadAttention GPT on random-walk
tokens; Adam at lr 1e-3, 3e-3, 1e-2; batch 16 and 64; 300 steps each.
Then a blow-up: lr x100 at step 150 must make the Guard act (optionally).
Usage: python trial_scripts/guard_healthy_plain.py [blowup]
"""
import logging
import sys

import torch
import torch.nn as nn

import stablestep

logging.basicConfig(level=logging.WARNING)


class TinyGPT(nn.Module):
    def __init__(self, V=32, d=32, T=16):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Parameter(torch.zeros(T, d))
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, V)
        self.register_buffer("mask", torch.triu(torch.ones(T, T, dtype=torch.bool), 1))

    def forward(self, ids):
        h = self.emb(ids) + self.pos[: ids.shape[1]]
        a = self.ln1(h)
        h = h + self.attn(a, a, a, attn_mask=self.mask[: ids.shape[1], : ids.shape[1]],
                          need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(h)


def make(kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        X = torch.randn(4096, 20, generator=g)
        W = torch.randn(20, 10, generator=g)
        Y = (X @ W + 0.5 * torch.randn(4096, 10, generator=g)).argmax(1)
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                              nn.Linear(64, 10))
        def batch(bs):
            i = torch.randint(0, 4096, (bs,), generator=g)
            return X[i], Y[i]
        def lossf(m, b):
            return nn.functional.cross_entropy(m(b[0]), b[1])
    else:
        steps = torch.randint(-2, 3, (2048, 17), generator=g)
        seq = steps.cumsum(1) % 32
        model = TinyGPT()
        def batch(bs):
            i = torch.randint(0, 2048, (bs,), generator=g)
            return seq[i]
        def lossf(m, b):
            return nn.functional.cross_entropy(m(b[:, :-1]).reshape(-1, 32), b[:, 1:].reshape(-1))
    return model, batch, lossf


def run(kind, lr, bs, blowup=False, steps=300):
    torch.manual_seed(1)
    model, batch, lossf = make(kind, 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    store = f"/tmp/trial/healthy_{kind}_{lr}_{bs}{'_blow' if blowup else ''}.db"
    with stablestep.Monitor(model, opt, store=store, run="r", overwrite=True) as mon:
        guard = stablestep.Guard(model, opt, monitor=mon)
        for step in range(steps):
            if blowup and step == 150:
                for gr in opt.param_groups:
                    gr["lr"] *= 100
            b = batch(bs)
            opt.zero_grad()
            loss = lossf(model, b)
            loss.backward()
            mon.observe(loss)
            if guard.check(loss):
                opt.step()
    s = guard.summary()
    print(f"{kind:4s} lr={lr:g} bs={bs}: final loss {loss.item():.3f} skipped={s['skipped']} "
          f"clipped={s['clipped']} rollbacks={s['rollbacks']} adapt={s['adaptations']} "
          f"holds={s['holds']} lr_scale={s['lr_scale']} store={store}", flush=True)
    return s


blow = len(sys.argv) > 1 and sys.argv[1] == "blowup"
for kind in ("mlp", "gpt"):
    for lr in ((1e-3, 3e-3, 1e-2) if not blow else (1e-3,)):
        for bs in ((16, 64) if not blow else (32,)):
            run(kind, lr, bs, blowup=blow)
