"""Does the guard do no harm on healthy runs, keep failing runs alive, and what does it cost?
stablestep's Guard side by side with the published guards, each at its published defaults.

Methods (each from its own package where one exists):

- ``none``: the run as the user wrote it.
- ``stablestep``: ``stablestep.Guard`` with the default ``GuardPolicy`` (no curvature closure).
- ``zclip``: ``zclip.ZClip()`` (z-score clipping of the gradient norm, EMA statistics).
- ``spam``, ``adagc``: ``pytorch_optimizer.SPAM`` / ``AdaGC`` in place of the user's Adam.
- ``stableadamw``: ``optimi.StableAdamW`` (torch-optimi) in place of the user's Adam.
- ``olmo-skip``: OLMo-core's ``SkipStepOptimizer`` rule, re-implemented from its published
  description: skip the step when the loss or the gradient norm is more than 6 standard
  deviations above the mean of the last 128 steps (once 64 are known) or non-finite.
- ``lightning-spike``: Lightning's ``SpikeDetection`` (fabric utility, defaults: window 10,
  warmup 1, rtol 2, mode min); it raises at a spike, so the run stops there.
- ``eps1e-3``, ``amsgrad``, ``lr/10``: the plain fixes, applied from the start.
  Optimizer replacements and the eps/AMSGrad fixes apply to Adam-family runs only; an SGD
  run keeps its optimizer under them.

Healthy corpus (``healthy_corpus()``, 36 runs, built after the guard's defaults were set;
corpus A (seeds 500-535) was run once and led to one rule change, corpus B (seeds 900-935,
the default) is fresh): MLP regression, MLP classification, a small CNN and GPT-2
(``transformers``, n_layer 2, n_embd 32, sdpa) on synthetic data; batch 8 to 512; torch
Adam, AdamW, SGD with momentum 0.9 and stablestep's Adam in both eps conventions; three lr
levels up to the high end of what the run trains at; label noise and (CNN) augmentation;
a seed each. Goal: no action at all (skips only on non-finite steps, and there are none).

Healthy runs through the callbacks (``framework_corpus()``, seeds 1200+, disjoint from
both): 6 MLP/CNN runs through the Lightning callback and 4 HF GPT-2 runs through the Trainer
callback, each without and with ``guard=True``; only stablestep is run there.

Failure corpus: 9 stories: ``nan-injection`` and ``outlier-batches`` (minibatch MLP, 3 corrupted
batches), ``late-eps-explosion`` (seed 000, lab ``late-explosion``), ``periodic-spikes`` (seed 001),
``lr-too-high`` (seed 003, gradient descent at 2.5x the stable lr), ``lr-x100-stays-high`` (a
minibatch MLP classifier whose Adam lr the schedule raises x100 at step 40: the loss goes to chance
level, about 2x, and stays; reference: no lr jump; found by a new-user trial); the transformer
stories ``attention-logits`` and ``output-logits`` (the lab's byte-level GPT,
``stablestep.lab.text``, at lr 1e-1 without qk-layernorm and at lr 3e-1 with it; references:
qk-layernorm, lr 1e-1) and ``gpt2-lr1-blowup`` (HF GPT-2 from a config, sdpa, AdamW at lr 1.0;
reference lr 1e-3). A run *ends healthy* when its final whole-data loss is finite and at most 3x
that of its healthy reference (healthy corpus: the ``none`` run; stories: the same data without the
fault, or the story's fix) plus a floor of 1e-6 x the initial loss.

Columns: runs ending healthy (stories, healthy corpus), final loss against the reference
(geometric mean of the ratio over finite runs), false actions on the healthy corpus (total,
and runs with any), step-time overhead (median over interleaved segments of a 0.56M-parameter
MLP, batch 128, against plain torch Adam; ``-`` where a method's actions are internal to the
optimizer and cannot be counted).

Run: ``.venv/bin/python benchmarks/guard.py`` (about 15 minutes on one CPU thread;
``--quick``: 3 stories, 8 healthy runs, 2 through the callbacks, about 3 minutes;
``--overhead``: only the step time, about a minute, also Monitor + Guard against the
Monitor alone). The last line is the stablestep guard's step-time ratio against the
unguarded step.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections import deque
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch

import stablestep
from stablestep.guard import Guard
from stablestep.lab import problems, scenarios
from stablestep.lab.train import make_optimizer

METHODS = ("none", "stablestep", "zclip", "spam", "adagc", "stableadamw", "olmo-skip",
           "lightning-spike", "eps1e-3", "amsgrad", "lr/10")
REPLACES_ADAM = ("spam", "adagc", "stableadamw")
UNCOUNTED = ("spam", "adagc", "stableadamw")  # their clipping is inside the optimizer


# ------------------------------------------------------------------------ methods
class Stopped(Exception):
    """Lightning's SpikeDetection raised: the run ends here."""


class Method:
    """One guard under test, wrapped around a run: ``optimizer(...)`` builds the optimizer
    (the replacements swap the user's Adam), ``take(loss, model, opt)`` says whether to step
    (and may clip), ``actions`` counts what it did."""

    def __init__(self, name: str) -> None:
        self.name, self.actions = name, 0
        self._guard = self._z = self._spike = None
        self._bufs = (deque(maxlen=128), deque(maxlen=128))
        self.t = 0

    def optimizer(self, kind: str, params, lr: float, build) -> torch.optim.Optimizer:
        """The run's optimizer under this method (``build(lr, **changes)`` the user's own)."""
        adam = kind != "sgd"
        if adam and self.name == "spam":
            from pytorch_optimizer import SPAM
            return SPAM(params, lr=lr)
        if adam and self.name == "adagc":
            from pytorch_optimizer import AdaGC
            return AdaGC(params, lr=lr)
        if adam and self.name == "stableadamw":
            from optimi import StableAdamW
            return StableAdamW(params, lr=lr)
        if adam and self.name == "eps1e-3":
            return build(lr, eps=1e-3)
        if adam and self.name == "amsgrad":
            return build(lr, amsgrad=True)
        if self.name == "lr/10":
            return build(lr / 10)
        return build(lr)

    def attach(self, model: torch.nn.Module, opt: torch.optim.Optimizer,
               monitor=None) -> None:
        """Set up the per-step part for this run (``monitor``: a Monitor the guard uses)."""
        if self.name == "stablestep":
            self._guard = Guard(model, opt, monitor=monitor)
        elif self.name == "zclip":
            from zclip import ZClip
            self._z = ZClip()
        elif self.name == "lightning-spike":
            from lightning.fabric.utilities.spike import SpikeDetection
            self._spike = SpikeDetection(exclude_batches_path="/dev/null/skip.json")

    def take(self, loss: torch.Tensor, model: torch.nn.Module, count: bool = True) -> bool:
        """Decide this step (after backward, before ``optimizer.step()``)."""
        t, self.t = self.t, self.t + 1
        if self._guard is not None:
            ok = self._guard.check(loss)
            if count:  # a hold records that the guard declined to act: not an action
                self.actions = sum(v for k, v in self._guard.counts.items()
                                   if k not in ("spike", "hold"))
            return ok
        if self._z is not None:
            before = self._z.step(model)
            if count and self._z.initialized:
                after = _grad_norm(model)
                self.actions += bool(after < 0.999 * before)
            return True
        if self._spike is not None:
            try:
                self._spike.on_train_batch_end(_FABRIC, loss.detach(), None, t)
            except Exception as e:  # TrainingSpikeException
                if type(e).__name__ != "TrainingSpikeException":
                    raise
                self.actions += 1
                raise Stopped from e
            return True
        if self.name == "olmo-skip":
            return self._olmo(float(loss.detach()), _grad_norm(model))
        return True

    def _olmo(self, v: float, g: float) -> bool:
        lbuf, gbuf = self._bufs
        skip = not (math.isfinite(v) and math.isfinite(g))
        if not skip and len(lbuf) >= 64:
            la, ga = np.asarray(lbuf), np.asarray(gbuf)
            skip = v - la.mean() > 6 * la.std(ddof=1) or g - ga.mean() > 6 * ga.std(ddof=1)
        if math.isfinite(v) and math.isfinite(g):
            lbuf.append(v)
            gbuf.append(g)
        self.actions += skip
        return not skip


_FABRIC = SimpleNamespace(
    strategy=SimpleNamespace(root_device=torch.device("cpu"), barrier=lambda: None,
                             reduce_boolean_decision=lambda x, all=True: x),  # noqa: A006
    global_rank=1)  # rank != 0: Lightning writes its skip-list file only on rank 0


def _grad_norm(model: torch.nn.Module) -> float:
    gs = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs])))


# ------------------------------------------------------------------ healthy corpus
def _data(kind: str, seed: int, noise: bool):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp-reg":
        x = torch.randn(2048, 16, generator=g)
        w = torch.randn(16, 1, generator=g)
        y = torch.tanh(x @ w / 2) + 0.1 * torch.sin(3 * x[:, :1])
        if noise:
            y = y + 0.3 * torch.randn(y.shape, generator=g)
        return x, y
    if kind == "mlp-cls":
        protos = torch.randn(10, 32, generator=g)
        y = torch.randint(10, (2048,), generator=g)
        x = protos[y] + 1.5 * torch.randn(2048, 32, generator=g)
    elif kind == "cnn":
        pats = (torch.rand(4, 1, 8, 8, generator=g) > 0.6).float()
        y = torch.randint(4, (2048,), generator=g)
        x = pats[y] + 0.5 * torch.randn(2048, 1, 8, 8, generator=g)
    else:  # gpt2: sequences from a sparse random Markov chain over 64 tokens
        trans = torch.rand(64, 64, generator=g) ** 8
        trans /= trans.sum(1, keepdim=True)
        seq = torch.zeros(1024, 16, dtype=torch.long)
        seq[:, 0] = torch.randint(64, (1024,), generator=g)
        for t in range(1, 16):
            seq[:, t] = torch.multinomial(trans[seq[:, t - 1]], 1, generator=g).squeeze(1)
        if noise:
            flip = torch.rand(seq.shape, generator=g) < 0.1
            seq = torch.where(flip, torch.randint(64, seq.shape, generator=g), seq)
        return seq, seq
    if noise:  # 15% of the labels flipped
        flip = torch.rand(len(y), generator=g) < 0.15
        y = torch.where(flip, torch.randint(int(y.max()) + 1, y.shape, generator=g), y)
    return x, y


def _model(kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    nn = torch.nn
    if kind == "mlp-reg":
        return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    if kind == "mlp-cls":
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg)


def _loss(kind: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "mlp-reg":
        return torch.nn.functional.mse_loss(model(x), y)
    if kind == "gpt2":
        return model(input_ids=x, labels=x).loss
    return torch.nn.functional.cross_entropy(model(x), y)


OPTIMIZERS = ("adam", "adamw", "sgd", "ss-adam-torch", "ss-adam-tf")
LRS = {"adam": (1e-3, 3e-3, 1e-2), "sgd": (1e-2, 3e-2, 1e-1)}
KINDS = ("mlp-reg", "mlp-cls", "cnn", "mlp-reg", "mlp-cls", "gpt2")  # one run in 6: GPT-2
BATCHES = (8, 32, 128, 512)


def healthy_corpus(base_seed: int = 900) -> list[dict]:
    """36 healthy run specs covering kinds x batches x optimizers x lr levels; ``base_seed``
    picks the corpus (500: corpus A, run once, whose two false adaptations, early-training
    spikes, led to the rule that no spike in the first ``spike.window`` steps counts toward
    adaptation; 900, the default: corpus B, fresh, measured after that change)."""
    out = []
    for i in range(36):
        kind, opt = KINDS[i % 6], OPTIMIZERS[i % 5]
        batch = BATCHES[(i // 6) % 4] if kind != "gpt2" else (8, 32, 64)[(i // 6) % 3]
        lr = LRS["sgd" if opt == "sgd" else "adam"][(i // 2) % 3]
        out.append(dict(kind=kind, opt=opt, batch=batch, lr=lr, seed=base_seed + i,
                        noise=i % 2 == 0, augment=kind == "cnn" and i % 3 != 0,
                        steps=80 if kind == "gpt2" else 150))
    return out


def _build_opt(kind: str, params: list, lr: float, **changes) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, **changes)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, **changes)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if kind == "ss-adam-torch":
        return stablestep.Adam(params, lr=lr, eps_mode="torch", **changes)
    eps = changes.pop("eps", 1e-7)
    return stablestep.Adam(params, lr=lr, eps=eps, eps_mode="tf", **changes)


def run_healthy(spec: dict, method: str) -> dict:
    """Train one healthy-corpus run under ``method``; final whole-data loss and actions."""
    kind = spec["kind"]
    x, y = _data(kind, spec["seed"], spec["noise"])
    model = _model(kind, spec["seed"] + 1)
    m = Method(method)
    params = list(model.parameters())
    opt = m.optimizer(spec["opt"], params, spec["lr"],
                      lambda lr, **c: _build_opt(spec["opt"], params, lr, **c))
    m.attach(model, opt)
    gen = torch.Generator().manual_seed(spec["seed"] + 2)
    ev = torch.arange(min(512, len(x)))
    with torch.no_grad():
        first = float(_loss(kind, model, x[ev], y[ev]))
    stopped = False
    for _ in range(spec["steps"]):
        idx = torch.randint(len(x), (spec["batch"],), generator=gen)
        xb, yb = x[idx], y[idx]
        if spec["augment"]:  # random flips and shifts of the images
            if torch.rand((), generator=gen) < 0.5:
                xb = xb.flip(-1)
            xb = torch.roll(xb, int(torch.randint(-1, 2, (), generator=gen)), dims=-2)
        opt.zero_grad()
        loss = _loss(kind, model, xb, yb)
        loss.backward()
        try:
            ok = m.take(loss, model)
        except Stopped:
            stopped = True
            break
        if ok:
            opt.step()
    with torch.no_grad():
        final = float(_loss(kind, model, x[ev], y[ev]))
    return {"final": final, "first": first, "actions": m.actions, "stopped": stopped,
            "guard": m._guard}


# ------------------------------------------------------------------ failure corpus
def _mlp_data(seed: int, n: int = 1024, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.sin(3 * x[:, :1])
    return x, y


def run_minibatch(fault: str | None, method: str, *, steps: int = 600, seed: int = 0) -> dict:
    """MLP regression with batches of 32 and Adam lr 3e-3; ``fault`` corrupts 3 batches."""
    x, y = _mlp_data(seed)
    torch.manual_seed(seed + 1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    m = Method(method)
    params = list(model.parameters())
    opt = m.optimizer("adam", params, 3e-3, lambda lr, **c: torch.optim.Adam(params, lr=lr, **c))
    m.attach(model, opt)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        first = float(((model(x) - y) ** 2).mean())
    for t in range(steps):
        idx = torch.randint(len(x), (32,), generator=gen)
        xb, yb = x[idx].clone(), y[idx].clone()
        if fault == "nan" and t in (150, 300, 450):
            xb[0, 0] = float("nan")
        if fault == "outlier" and t in (150, 300, 450):
            yb *= 1000.0
        opt.zero_grad()
        loss = ((model(xb) - yb) ** 2).mean()
        loss.backward()
        try:
            if m.take(loss, model):
                opt.step()
        except Stopped:
            break
    with torch.no_grad():
        final = float(((model(x) - y) ** 2).mean())
    return {"final": final, "first": first, "actions": m.actions, "guard": m._guard}


def run_lab(config, method: str) -> dict:
    """A lab story's config, full batch, going on after a non-finite loss (a guard may skip
    it; without one the parameters stay NaN and the run is over)."""
    pr = problems.build(replace(config, curvature_every=0))
    m = Method(method)
    params = list(pr.model.parameters())
    kind = "sgd" if str(config.optimizer).lower().startswith("sgd") else "adam"

    def build(lr, **c):
        return make_optimizer(replace(config, lr=lr, **c), params)

    opt = m.optimizer(kind, params, config.lr, build)
    m.attach(pr.model, opt)
    first = pr.full_loss()
    for _ in range(config.steps):
        opt.zero_grad()
        loss = pr.loss()
        loss.backward()
        if not math.isfinite(float(loss.detach())) and m.name in ("none", "eps1e-3", "amsgrad",
                                                                  "lr/10") + REPLACES_ADAM:
            break  # diverged for good
        try:
            if m.take(loss, pr.model):
                opt.step()
        except Stopped:
            break
    return {"final": pr.full_loss(), "first": first, "actions": m.actions, "guard": m._guard}


def classifier_problem(seed: int = 0):
    """The lr x100 story's problem (also ``tests/guard/test_stays_high.py``): 10 classes of
    non-negative 64-pixel images (integer intensities up to ~20, digits-like), 2048 of
    them, and an MLP with two ReLU layers. Returns ``(x, y, model, g)``, ``g`` the
    generator that drew the data, to draw the batches from."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 64, generator=g) * 2
    y = torch.randint(10, (2048,), generator=g)
    x = ((protos[y] + torch.randn(2048, 64, generator=g)).clamp(min=0) * 4.0).round()
    torch.manual_seed(seed + 1)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    return x, y, model, g


def run_lr_x100(method: str, *, factor: float = 100.0, steps: int = 200, seed: int = 0,
                jump_at: int = 40) -> dict:
    """A classifier the lr of whose Adam the user's schedule raises ``factor`` x at step
    ``jump_at`` (a new-user trial): 10 classes of non-negative 64-pixel images (integer
    intensities, digits-like), an MLP with two ReLU layers, lr 1e-3, batch 32. At x100 the
    loss goes from ~1.3 to chance level (ln 10) and stays: under the jump rule's 3x. The
    final loss is on 512 training images."""
    x, y, model, g = classifier_problem(seed)
    m = Method(method)
    params = list(model.parameters())
    opt = m.optimizer("adam", params, 1e-3, lambda lr, **c: torch.optim.Adam(params, lr=lr, **c))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: factor if t >= jump_at else 1.0)
    m.attach(model, opt)
    ev = torch.arange(512)

    def full() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x[ev]), y[ev]))

    first = full()
    for _ in range(steps):
        i = torch.randint(len(x), (32,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
        loss.backward()
        try:
            if m.take(loss, model):
                opt.step()
        except Stopped:
            break
        sched.step()
    return {"final": full(), "first": first, "actions": m.actions, "guard": m._guard}


def stories() -> list[tuple[str, object, object]]:
    """(name, run(method), healthy reference run) for the 6 failure stories."""
    late = replace(scenarios.get("late-explosion").base(), steps=2000)
    per = replace(scenarios.get("periodic-spikes").base(), steps=1200)
    div = scenarios.get("lr-divergence").base()
    return [
        ("nan-injection", lambda m: run_minibatch("nan", m), lambda: run_minibatch(None, "none")),
        ("outlier-batches", lambda m: run_minibatch("outlier", m),
         lambda: run_minibatch(None, "none")),
        ("late-eps-explosion", lambda m: run_lab(late, m),
         lambda: run_lab(replace(late, eps=1e-3), "none")),
        ("periodic-spikes", lambda m: run_lab(per, m),
         lambda: run_lab(replace(per, amsgrad=True), "none")),
        ("lr-too-high", lambda m: run_lab(div, m),
         lambda: run_lab(replace(div, lr=1e-4), "none")),
        ("lr-x100-stays-high", lambda m: run_lr_x100(m),
         lambda: run_lr_x100("none", factor=1.0)),
    ]


# ------------------------------------------------------- transformer failure stories
_TEXT_DATA: dict[int, torch.Tensor] = {}


def run_text(cfg, method: str, *, steps: int | None = None) -> dict:
    """A lab text story (``stablestep.lab.text``: the byte-level GPT on the standard
    library's sources, AdamW b2 0.95) in a plain loop under ``method``; the final loss is
    the cross-entropy on 8 fixed held-out batches."""
    from stablestep.lab import text

    if cfg.n_bytes not in _TEXT_DATA:
        _TEXT_DATA[cfg.n_bytes] = torch.frombuffer(
            bytearray(text.stdlib_bytes(cfg.n_bytes)), dtype=torch.uint8)
    data = _TEXT_DATA[cfg.n_bytes]
    torch.manual_seed(cfg.seed)
    model = text.TinyGPT(cfg)
    m = Method(method)
    params = list(model.parameters())

    def build(lr, **c):
        return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, eps=c.get("eps", cfg.eps),
                                 weight_decay=cfg.weight_decay,
                                 amsgrad=c.get("amsgrad", False))

    opt = m.optimizer("adam", params, cfg.lr, build)
    m.attach(model, opt)
    ev_it = text.batches(cfg, data, torch.Generator().manual_seed(10_000 + cfg.seed))
    held = [next(ev_it) for _ in range(8)]

    def eval_loss() -> float:
        with torch.no_grad():
            return statistics.fmean(float(text.text_loss(model(x), y)[0]) for x, y in held)

    first = eval_loss()
    it = text.batches(cfg, data, torch.Generator().manual_seed(cfg.seed + 1))
    for _ in range(steps or cfg.steps):
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        ce, loss = text.text_loss(model(x), y, cfg.z_loss)
        loss.backward()
        if not math.isfinite(float(ce.detach())) and m.name in _NO_SKIP:
            break
        try:
            if m.take(ce, model):
                opt.step()
        except Stopped:
            break
    return {"final": eval_loss(), "first": first, "actions": m.actions, "guard": m._guard}


def _gpt2_motifs(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                     attn_implementation="sdpa", bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    motifs = torch.randint(1, 64, (8, 4), generator=g)
    return model, motifs, g


def run_gpt2_blowup(lr: float, method: str, *, steps: int = 150, seed: int = 0) -> dict:
    """HF GPT-2 (from a config, sdpa, 2 layers, d 32) with AdamW at ``lr`` on sequences
    that repeat one of 8 random 4-token motifs: at lr 1.0 the loss jumps x15 within the
    first steps; the final loss is the mean over all 8 motifs."""
    model, motifs, g = _gpt2_motifs(seed)
    m = Method(method)
    params = list(model.parameters())
    opt = m.optimizer("adam", params, lr, lambda lr, **c: torch.optim.AdamW(params, lr=lr, **c))
    m.attach(model, opt)
    ev = motifs.repeat(1, 4)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(model(input_ids=ev, labels=ev).loss)

    first = eval_loss()
    for _ in range(steps):
        x = motifs[torch.randint(8, (8,), generator=g)].repeat(1, 4)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        if not math.isfinite(float(loss.detach())) and m.name in _NO_SKIP:
            break
        try:
            if m.take(loss, model):
                opt.step()
        except Stopped:
            break
    return {"final": eval_loss(), "first": first, "actions": m.actions, "guard": m._guard}


_NO_SKIP = ("none", "eps1e-3", "amsgrad", "lr/10") + REPLACES_ADAM


def text_stories() -> list[tuple[str, object, object]]:
    """The transformer failure stories: the lab's attention-logit growth (lr 1e-1, no
    qk-layernorm; reference: qk-layernorm) and output-logit divergence (lr 3e-1 with
    qk-layernorm; reference: lr 1e-1), and the HF GPT-2 blow-up at lr 1.0 (reference:
    lr 1e-3)."""
    from stablestep.lab import text

    attn = text.scenario("attention-logit-growth").variants
    logz = text.scenario("output-logit-divergence").variants
    a_fail, a_fix = attn[0].config, attn[1].config
    z_fail, z_fix = logz[0].config, logz[2].config
    return [
        ("attention-logits", lambda m: run_text(a_fail, m), lambda: run_text(a_fix, "none")),
        ("output-logits", lambda m: run_text(z_fail, m), lambda: run_text(z_fix, "none")),
        ("gpt2-lr1-blowup", lambda m: run_gpt2_blowup(1.0, m),
         lambda: run_gpt2_blowup(1e-3, "none")),
    ]


# ------------------------------------------------- healthy runs through the callbacks
def framework_corpus(base_seed: int = 1200) -> list[dict]:
    """Healthy runs through the framework callbacks (seeds from 1200: disjoint from corpus
    A, 500-535, and B, 900-935): the MLP and CNN kinds through the Lightning callback,
    GPT-2 (from a config, sdpa) through the Hugging Face Trainer callback."""
    out = []
    lit_kinds = ("mlp-reg", "mlp-cls", "cnn")
    for i in range(6):
        opt = ("adam", "adamw", "sgd", "ss-adam-tf", "ss-adam-torch", "adam")[i]
        lr = LRS["sgd" if opt == "sgd" else "adam"][i % 3]
        out.append(dict(framework="lightning", kind=lit_kinds[i % 3], opt=opt,
                        batch=(16, 64, 256)[i % 3], lr=lr, seed=base_seed + i,
                        noise=i % 2 == 0, augment=False, steps=150))
    for i in range(4):
        out.append(dict(framework="hf", kind="gpt2", opt="adamw", batch=(8, 16)[i % 2],
                        lr=(1e-3, 3e-3, 1e-2, 5e-4)[i], seed=base_seed + 10 + i,
                        noise=i % 2 == 0, augment=False, steps=80))
    return out


def run_framework(spec: dict, guarded: bool, scheduler=None) -> dict:
    """One framework-corpus run, with the stablestep callback (``guard=True`` when
    ``guarded``, else no guard); final whole-data loss, the guard's actions and the
    training loss of every step (``losses``).

    An lr schedule, as users set one: for a Lightning run ``scheduler(optimizer)`` gives the
    ``lr_scheduler`` entry that ``configure_optimizers`` returns (a dict with ``scheduler``
    and ``interval``; with ``monitor`` the module logs the epoch's mean training loss as
    ``train_loss``); for a Hugging Face run the spec's ``hf_schedule`` (``TrainingArguments``
    fields: ``lr_scheduler_type``, ``lr_scheduler_kwargs``, ``warmup_steps``) replaces the
    Trainer's default linear decay."""
    import logging
    import tempfile

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    kind = spec["kind"]
    x, y = _data(kind, spec["seed"], spec["noise"])
    model = _model(kind, spec["seed"] + 1)
    ev = torch.arange(min(512, len(x)))
    with torch.no_grad():
        first = float(_loss(kind, model, x[ev], y[ev]))
    tmp = tempfile.mkdtemp(prefix="guard-bench-")
    losses: list[float] = []
    if spec["framework"] == "lightning":
        import lightning as L

        from stablestep.integrations.lightning import StablestepCallback

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = model
                self.log_loss = False

            def training_step(self, batch, batch_idx):
                loss = _loss(kind, self.net, *batch)
                losses.append(float(loss.detach()))
                if self.log_loss:  # the metric a ReduceLROnPlateau entry monitors
                    self.log("train_loss", loss, on_step=False, on_epoch=True)
                return loss

            def configure_optimizers(self):
                opt = _build_opt(spec["opt"], list(self.net.parameters()), spec["lr"])
                if scheduler is None:
                    return opt
                entry = scheduler(opt)
                self.log_loss = isinstance(entry, dict) and "monitor" in entry
                return {"optimizer": opt, "lr_scheduler": entry}

        cb = StablestepCallback(store=f"{tmp}/s.db", run="r", guard=True if guarded else None)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=spec["batch"], shuffle=True,
            drop_last=True, generator=torch.Generator().manual_seed(spec["seed"] + 2))
        trainer = L.Trainer(max_steps=spec["steps"], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu", callbacks=[cb], default_root_dir=tmp)
        trainer.fit(Module(), loader)
    else:
        import transformers

        from stablestep.integrations.transformers import StablestepCallback

        class Seqs(torch.utils.data.Dataset):
            def __len__(self):
                return len(x)

            def __getitem__(self, i):
                return {"input_ids": x[i], "labels": x[i]}

        transformers.logging.set_verbosity_error()
        model.register_forward_hook(
            lambda mod, args, out: losses.append(float(out.loss.detach())) if mod.training
            else None)
        cb = StablestepCallback(store=f"{tmp}/s.db", run="r", guard=True if guarded else None)
        args = transformers.TrainingArguments(
            output_dir=f"{tmp}/out", max_steps=spec["steps"],
            per_device_train_batch_size=spec["batch"], learning_rate=spec["lr"],
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            use_cpu=True, seed=spec["seed"], data_seed=spec["seed"],
            **spec.get("hf_schedule", {}))
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Seqs(),
                                       callbacks=[cb])
        trainer.remove_callback(transformers.PrinterCallback)  # its end-of-train dict
        trainer.train()
    model.eval()
    with torch.no_grad():
        final = float(_loss(kind, model, x[ev], y[ev]))
    g = cb.guard
    acts = sum(v for k, v in g.counts.items() if k not in ("spike", "hold")) if g else 0
    return {"final": final, "first": first, "actions": acts, "guard": g, "losses": losses}


def healthy(res: dict, ref: dict) -> bool:
    """Finite and within 3x of the reference's final loss (plus a floor)."""
    f = res["final"]
    return math.isfinite(f) and f <= 3 * ref["final"] + 1e-6 * res["first"]


# ------------------------------------------------------------------------ overhead
TAKES = ("stablestep", "zclip", "olmo-skip", "lightning-spike")  # a check, Adam unchanged


def overhead(methods: tuple[str, ...], cycles: int = 6, seg_steps: int = 20,
             with_monitor: bool = False) -> dict[str, dict[str, float]]:
    """Step-time cost per method on a 0.56M-parameter MLP, batch 128, torch Adam lr 1e-4:
    ``{"ratio", "q1", "q3", "null"}``.

    Timing design: segments of ``seg_steps`` steps, plain (P) and with the method (M), in
    cycles P M M P (the order cancels a drift within a cycle); a cycle's ratio is its M
    time over its P time, and ``ratio`` is the median over ``cycles`` cycles (``q1``,
    ``q3``: quartiles). A method that only checks between backward and step (``TAKES``:
    the user's optimizer unchanged) is timed on *one* run, its check made on M segments and
    left out on P segments, so both sides have the same tensors at the same addresses; a
    method that replaces or changes the optimizer needs a run of its own beside a plain
    run. ``null`` is the same design with M made plain (the one run: P segments only;
    two runs: a second plain run): what the measurement gives for no cost at all. Two
    separately built runs of the same model differ by up to about 2% in step time on this
    CPU, so a method timed on runs of its own carries that bias; ``null`` shows it.
    ``with_monitor``: every run carries a :class:`stablestep.Monitor` (default settings),
    so the ratio is what the method adds to a monitored step (the guard reuses the
    Monitor's norms)."""
    import tempfile

    torch.manual_seed(0)
    x, y = torch.randn(4096, 64), torch.randn(4096, 1)
    tmp = tempfile.mkdtemp(prefix="guard-overhead-")
    made = [0]

    def make(method):
        torch.manual_seed(1)
        nn = torch.nn
        model = nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(),
                              nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 1))
        m = Method(method)
        params = list(model.parameters())
        opt = m.optimizer("adam", params, 1e-4, lambda lr, **c: torch.optim.Adam(params, lr=lr,
                                                                                  **c))
        mon = None
        if with_monitor:
            made[0] += 1
            mon = stablestep.Monitor(model, opt, store=f"{tmp}/s.db", run=f"r{made[0]}")
        m.attach(model, opt, monitor=mon)
        return model, opt, m, mon

    gen = torch.Generator().manual_seed(2)

    def segment(run, check: bool) -> float:
        model, opt, m, mon = run
        per = []
        for _ in range(seg_steps):
            idx = torch.randint(len(x), (128,), generator=gen)
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = ((model(x[idx]) - y[idx]) ** 2).mean()
            loss.backward()
            if mon is not None:
                mon.observe(loss)
            ok = True
            if check:
                try:
                    ok = m.take(loss, model, count=False)
                except Stopped:
                    ok = False
            if ok:
                opt.step()
            per.append(time.perf_counter() - t0)
        return statistics.fmean(per)

    def design(plain, other, check: bool) -> list[float]:
        for _ in range(2):  # warm-up cycle
            segment(plain, False)
            segment(other, check)
        ratios = []
        for _ in range(cycles):
            p1 = segment(plain, False)
            m1, m2 = segment(other, check), segment(other, check)
            p2 = segment(plain, False)
            ratios.append((m1 + m2) / (p1 + p2))
        return ratios

    out = {}
    null_one = null_two = None
    for method in methods:
        runs = []
        if method in TAKES:
            run = make(method)
            runs.append(run)
            ratios = design(run, run, True)
            if null_one is None:
                null_one = statistics.median(design(run, run, False))
            null = null_one
        else:
            plain, run = make("none"), make(method)
            runs += [plain, run]
            ratios = design(plain, run, True)
            if null_two is None:
                other = make("none")
                runs.append(other)
                null_two = statistics.median(design(plain, other, True))
            null = null_two
        for *_, mon in runs:
            if mon is not None:
                mon.close()
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        out[method] = {"ratio": statistics.median(ratios), "q1": q[0], "q3": q[2],
                       "null": null}
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every method on both corpora, print the table; the overhead ratio last."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--healthy-runs", type=int, default=36)
    ap.add_argument("--overhead", "--overhead-only", action="store_true",
                    dest="overhead_only",
                    help="only the step-time overhead (more segments, about a minute): the "
                         "guard alone against the plain step, and a monitored step with "
                         "and without the guard")
    ap.add_argument("--cycles", type=int, default=24,
                    help="P M M P cycles per ratio with --overhead (the quartiles of the "
                         "cycle ratios span about +-5%% on a shared CPU: more cycles, a "
                         "tighter median)")
    ap.add_argument("--corpus-seed", type=int, default=900,
                    help="first seed of the healthy corpus (500: corpus A, 900: corpus B)")
    ap.add_argument("--quick", action="store_true",
                    help="a subset for iteration (3 stories, 8 healthy runs, 2 through the "
                         "callbacks; a few minutes)")
    ap.add_argument("--no-frameworks", action="store_true",
                    help="leave out the healthy runs through the Lightning and HF callbacks")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    methods = tuple(args.methods)
    if args.overhead_only:
        methods = tuple(m for m in methods if m != "none") or ("stablestep",)
        ov = overhead(methods, cycles=args.cycles)
        for m in methods:
            o = ov[m]
            print(f"{m:16s} step-time ratio against plain torch Adam {o['ratio']:.3f} "
                  f"(quartiles {o['q1']:.3f}..{o['q3']:.3f}; no-cost control {o['null']:.3f}"
                  f"{', same run' if m in TAKES else ', runs of its own'})")
        if "stablestep" in methods:
            o = overhead(("stablestep",), cycles=args.cycles, with_monitor=True)["stablestep"]
            print(f"Monitor + Guard against the Monitor alone (norms reused) {o['ratio']:.3f} "
                  f"(quartiles {o['q1']:.3f}..{o['q3']:.3f}; no-cost control {o['null']:.3f})")
        print(f"guarded/unguarded step time ratio (median of interleaved cycles): "
              f"{ov['stablestep']['ratio'] if 'stablestep' in ov else math.nan:.3f}")
        return 0
    col = {m: {"story_ok": 0, "healthy_ok": 0, "ratios": [], "actions": 0, "acted_runs": 0,
               "guard_kinds": {}} for m in methods}
    all_stories = stories() + text_stories()
    if args.quick:
        all_stories = [s for s in all_stories
                       if s[0] in ("nan-injection", "outlier-batches", "gpt2-lr1-blowup")]
    print("failure corpus (final loss; * = ended healthy)")
    print(f"{'story':20s} {'ref':>9s} " + " ".join(f"{m[:11]:>12s}" for m in methods))
    guard_notes = []
    for name, run, reference in all_stories:
        ref = reference()
        cells = []
        for m in methods:
            r = run(m)
            ok = healthy(r, ref)
            col[m]["story_ok"] += ok
            if math.isfinite(r["final"]) and ref["final"] > 0:
                col[m]["ratios"].append(r["final"] / ref["final"])
            cells.append(f"{r['final']:11.2e}{'*' if ok else ' '}")
            if r.get("guard") is not None:
                g = r["guard"]
                guard_notes.append(f"  {name}: " + ", ".join(
                    f"{rec.action}({rec.reason})@{rec.step}" for rec in g.records[:6])
                    + (" ..." if len(g.records) > 6 else "") + f"; lr scale {g.lr_scale:g}")
        print(f"{name:20s} {ref['final']:9.2e} " + " ".join(cells), flush=True)
    if guard_notes:
        print("stablestep's actions in the stories:")
        print("\n".join(guard_notes))
    n_stories = len(all_stories)
    specs = healthy_corpus(args.corpus_seed)[: 8 if args.quick else args.healthy_runs]
    print(f"\nhealthy corpus: {len(specs)} runs (kinds {', '.join(sorted(set(KINDS)))}; "
          f"batch 8-512; "
          f"optimizers {', '.join(OPTIMIZERS)})")
    for spec in specs:
        ref = run_healthy(spec, "none")
        if not healthy(ref, ref):
            print(f"  excluded (diverges without any guard): {spec}")
            continue
        acts = []
        for m in methods:
            r = ref if m == "none" else run_healthy(spec, m)
            ok = healthy(r, ref)
            col[m]["healthy_ok"] += ok
            if math.isfinite(r["final"]) and ref["final"] > 0:
                col[m]["ratios"].append(r["final"] / ref["final"])
            col[m]["actions"] += r["actions"]
            col[m]["acted_runs"] += r["actions"] > 0
            if r["guard"] is not None:
                for rec in r["guard"].records:
                    k = f"{rec.action}:{rec.reason}"
                    col[m]["guard_kinds"][k] = col[m]["guard_kinds"].get(k, 0) + 1
            if r["actions"]:
                acts.append(f"{m}={r['actions']}")
        print(f"  {spec['kind']:8s} {spec['opt']:13s} b{spec['batch']:<4d} lr {spec['lr']:<6g} "
              f"final {ref['final']:.3g}  actions: {', '.join(acts) or 'none'}", flush=True)
    n_h = sum(1 for _ in specs)
    fw = {"n": 0, "ok": 0, "actions": 0, "acted": 0, "kinds": {}}
    if not args.no_frameworks and "stablestep" in methods:
        fspecs = framework_corpus()
        if args.quick:
            fspecs = [fspecs[0], fspecs[6]]
        print(f"\nhealthy runs through the callbacks: {len(fspecs)} (Lightning: MLP, CNN; "
              "Hugging Face Trainer: GPT-2); unguarded vs guard=True")
        for spec in fspecs:
            ref = run_framework(spec, False)
            if not healthy(ref, ref):
                print(f"  excluded (diverges without any guard): {spec}")
                continue
            r = run_framework(spec, True)
            fw["n"] += 1
            fw["ok"] += healthy(r, ref)
            fw["actions"] += r["actions"]
            fw["acted"] += r["actions"] > 0
            for rec in r["guard"].records:
                k = f"{rec.action}:{rec.reason}"
                fw["kinds"][k] = fw["kinds"].get(k, 0) + 1
            print(f"  {spec['framework']:9s} {spec['kind']:8s} {spec['opt']:13s} "
                  f"b{spec['batch']:<4d} lr {spec['lr']:<6g} final {ref['final']:.3g} -> "
                  f"{r['final']:.3g}  actions: {r['actions'] or 'none'}", flush=True)
    n_cycles = 6
    ov = overhead(methods, cycles=n_cycles)
    print(f"\n{'method':16s} {'stories ok':>10s} {'healthy ok':>10s} {'loss/ref':>9s} "
          f"{'false actions':>14s} {'overhead':>9s}")
    for m in methods:
        c = col[m]
        gm = math.exp(statistics.fmean(math.log(max(r, 1e-300)) for r in c["ratios"])) \
            if c["ratios"] else math.nan
        fa = "-" if m in UNCOUNTED else f"{c['actions']} ({c['acted_runs']} runs)"
        print(f"{m:16s} {c['story_ok']:>7d}/{n_stories} {c['healthy_ok']:>7d}/{n_h} "
              f"{gm:9.3f} {fa:>14s} {ov[m]['ratio']:9.3f}")
    if "stablestep" in col and col["stablestep"]["guard_kinds"]:
        print(f"stablestep records on the healthy corpus: {col['stablestep']['guard_kinds']}")
    if fw["n"]:
        print(f"stablestep through the callbacks: {fw['ok']}/{fw['n']} healthy, false actions "
              f"{fw['actions']} ({fw['acted']} runs); records {fw['kinds'] or 'none'}")
    print(f"elapsed {time.perf_counter() - t0:.0f}s")
    nulls = sorted({round(o["null"], 3) for o in ov.values()})
    print(f"overhead: median of {n_cycles} interleaved P M M P cycles; a no-cost control gives "
          f"{', '.join(f'{v:.3f}' for v in nulls)} (methods checking between backward and "
          f"step: {', '.join(m for m in methods if m in TAKES)}, timed on one run)")
    ratio = ov["stablestep"]["ratio"] if "stablestep" in ov else math.nan
    print(f"guarded/unguarded step time ratio (median of interleaved cycles): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
