"""Does the guard do no harm on healthy runs that use a learning-rate schedule?
A held-out corpus of healthy training runs with the schedules people really use.

Why: ``benchmarks/guard.py``'s healthy corpus trains at a constant lr. Users train with
schedules, and a schedule moves the loss by itself: after a warm restart (SGDR,
``CosineAnnealingWarmRestarts``; the Hugging Face Trainer's ``cosine_with_restarts``) the lr
jumps back to its peak and the loss rises for a while, then comes back down as the lr
anneals (run 00, an MLP classifier, Adam peak 3e-2: 0.007 before the restart at step 300,
0.35 within 30 steps after it, 0.007 at the end; run 09, MLP regression, SGD peak 0.2: 0.005
to 0.047 at its first restart); a cyclic lr does the same every cycle; warmup, one-cycle,
step decay and ReduceLROnPlateau change the loss's pace and noise. That is healthy
training, and a guard must not skip, roll back or adapt it.

The corpus (``schedule_corpus()``, 36 runs, seeds 2000-2035, disjoint from guard.py's corpora
A (500-535) and B (900-935), its callback runs (1200+) and every other benchmark's seeds):
guard.py's model kinds and data (``_data``/``_model``/``_loss``: MLP regression, MLP
classification, a small CNN, GPT-2 from a config), torch Adam, AdamW, SGD with momentum 0.9
and stablestep's Adam in both eps conventions, batch 8 to 512, peak lrs from conservative
(Adam 1e-3, SGD 3e-2) to the highest that trains well without any guard (Adam 3e-2, SGD 0.2
and 0.3; probed on unguarded runs: at Adam 1e-1 a warm restart throws the classifier back to
chance level, at SGD 0.4 the regression diverges), 400 to 600 steps (GPT-2 240 to 400),
label noise in 11 runs and image augmentation in 3. Schedules, in ``FAMILIES`` order:

- warm restarts (16): ``CosineAnnealingWarmRestarts`` in 12 plain loops (T_0 50-200, T_mult
  1 or 2, eta_min 0 to 1e-2 x peak; 2 to 4 restarts a run; runs 00, 01, 08 restart a
  classifier whose loss is already 1e-4 to 1e-2 back to its peak lr), 1 through the
  Lightning callback, 3 GPT-2 runs through the Hugging Face Trainer callback with
  ``lr_scheduler_type="cosine_with_restarts"`` (``num_cycles`` 3-5 via
  ``lr_scheduler_kwargs``) and 10-30 warmup steps;
- ``CyclicLR`` (5: triangular, triangular2, exp_range; SGD cycles its momentum too);
- ``OneCycleLR`` (3, with its default momentum / beta1 cycling);
- linear warmup then cosine decay (5: ``LambdaLR`` as Hugging Face's
  ``get_cosine_schedule_with_warmup`` writes it, and ``SequentialLR(LinearLR,
  CosineAnnealingLR)``, one of them through the Lightning callback);
- warmup then constant (1, ``LinearLR``), ``StepLR`` and ``MultiStepLR`` (1 each),
  ``ExponentialLR`` (1);
- ``ReduceLROnPlateau`` (3, each cutting the lr once or twice: stepped once an epoch on the
  epoch's mean training loss, one of them through the Lightning callback with
  ``monitor="train_loss"``).

Runner: ``run_scheduled(spec, method)`` is guard.py's ``run_healthy`` loop with
``sched.step()`` after every optimizer step, also when the method skipped the step (as
users' loops do); the callback runs go through guard.py's ``run_framework`` (only ``none``
and ``stablestep`` apply there; its unguarded run carries the Monitor callback). A method's
run is *ok* when its final whole-data loss is finite and within 3x of the unguarded run's
(guard.py's ``healthy()``, with its floor); its false actions are what it did (for
stablestep: the guard's counts other than spike and hold; a ``GuardError`` is a failed run
with an action).

Kept blind: the corpus was written without reading the guard's or the diagnosis's source
and without running any guard or the diagnosis on it. Only ``--labels-only`` was run while
building it: it trains the unguarded run of every spec and checks that it is healthy by
construction (``label_check``): every step's loss finite; the final whole-data loss under
half the initial one (GPT-2: closing at least half the gap between the initial loss, ln 64,
and the data's bigram entropy, 2.8-3.2 nats, since halving it is out of reach); and the
median loss of the last 10% of steps under that of the first 10%. Result: labels hold
36/36, in 87 s (92 s with start-up) on one thread (``OMP_NUM_THREADS=1``, a shared 2-core
machine).

Run: ``.venv/bin/python benchmarks/guard_schedules.py`` (default methods none, stablestep,
zclip, olmo-skip, lightning-spike; about 4x the labels-only time, the callback runs take
two methods); ``--labels-only``: the label check alone; ``--quick``: 8 runs (SGDR, cyclic,
one-cycle, warmup+cosine, exponential, plateau, one through each callback). The last line
is stablestep's false actions on the corpus.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from stablestep.guard import GuardError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.* importable

from benchmarks.guard import (  # noqa: E402
    METHODS,
    Method,
    Stopped,
    _build_opt,
    _data,
    _loss,
    _model,
    healthy,
    run_framework,
)

DEFAULT_METHODS = ("none", "stablestep", "zclip", "olmo-skip", "lightning-spike")
FAMILIES = ("sgdr", "hf-cosine-restarts", "cyclic", "onecycle", "warmup-cosine",
            "sequential", "warmup-constant", "step", "multistep", "exponential", "plateau")
WARM_RESTARTS = ("sgdr", "hf-cosine-restarts")
BASE_SEED = 2000
QUICK = (0, 13, 17, 21, 27, 29, 30, 33)  # SGDR, cyclic, one-cycle, warmup-cosine,
# exponential, plateau, Lightning (SGDR), HF (cosine_with_restarts)


# ------------------------------------------------------------------------- corpus
def _spec(kind: str, opt: str, batch: int, lr: float, steps: int, sched: str, *,
          noise: bool = False, augment: bool = False, framework: str | None = None,
          **sched_kw) -> dict:
    out = dict(kind=kind, opt=opt, batch=batch, lr=lr, noise=noise, augment=augment,
               steps=steps, sched=sched, sched_kw=sched_kw)
    if framework:
        out["framework"] = framework
    return out


def _hf(batch: int, lr: float, steps: int, cycles: int, warmup: int, noise: bool) -> dict:
    out = _spec("gpt2", "adamw", batch, lr, steps, "hf-cosine-restarts", noise=noise,
                framework="hf", num_cycles=cycles, warmup=warmup)
    out["hf_schedule"] = dict(lr_scheduler_type="cosine_with_restarts",
                              lr_scheduler_kwargs={"num_cycles": cycles},
                              warmup_steps=warmup)
    return out


def schedule_corpus(base_seed: int = BASE_SEED) -> list[dict]:
    """36 healthy run specs with lr schedules (seeds ``base_seed`` + 0..35): guard.py's
    spec keys plus ``sched`` (a family of ``FAMILIES``), ``sched_kw`` (its settings, lrs
    relative to the peak ``lr``), a ``name``, and for the callback runs ``framework``
    (``"lightning"`` or ``"hf"``; HF runs carry their ``TrainingArguments`` schedule in
    ``hf_schedule``)."""
    s = _spec
    specs = [
        # warm restarts (CosineAnnealingWarmRestarts), plain loops
        s("mlp-cls", "adam", 64, 3e-2, 500, "sgdr", T_0=100, T_mult=1, eta_min=0.0),
        s("mlp-cls", "sgd", 128, 3e-1, 450, "sgdr", T_0=150, T_mult=1, eta_min=0.0),
        s("mlp-reg", "adamw", 32, 3e-2, 500, "sgdr", noise=True, T_0=50, T_mult=2,
          eta_min=0.0),
        s("mlp-reg", "ss-adam-torch", 8, 3e-3, 400, "sgdr", T_0=100, T_mult=1,
          eta_min=1e-2),
        s("cnn", "ss-adam-tf", 32, 1e-2, 400, "sgdr", T_0=100, T_mult=1, eta_min=0.0),
        s("cnn", "adam", 256, 1e-2, 450, "sgdr", augment=True, T_0=60, T_mult=2,
          eta_min=1e-3),
        s("gpt2", "adamw", 32, 5e-3, 300, "sgdr", noise=True, T_0=100, T_mult=1,
          eta_min=0.0),
        s("gpt2", "adam", 32, 1e-2, 300, "sgdr", T_0=80, T_mult=1, eta_min=1e-2),
        s("mlp-cls", "ss-adam-tf", 512, 3e-2, 600, "sgdr", T_0=120, T_mult=1, eta_min=0.0),
        s("mlp-reg", "sgd", 64, 2e-1, 500, "sgdr", T_0=100, T_mult=1, eta_min=1e-3),
        s("cnn", "sgd", 16, 3e-2, 450, "sgdr", T_0=150, T_mult=1, eta_min=0.0),
        s("mlp-cls", "adamw", 8, 1e-3, 600, "sgdr", noise=True, T_0=200, T_mult=1,
          eta_min=0.0),
        # cyclic
        s("mlp-reg", "adam", 32, 1e-2, 400, "cyclic", mode="triangular", base=0.1, up=50),
        s("mlp-cls", "sgd", 128, 1e-1, 400, "cyclic", noise=True, mode="triangular",
          base=0.1, up=100),
        s("cnn", "adamw", 64, 1e-2, 450, "cyclic", augment=True, mode="triangular2",
          base=0.05, up=75),
        s("gpt2", "ss-adam-torch", 8, 1e-2, 300, "cyclic", mode="exp_range", base=0.1, up=50,
          gamma=0.995),
        s("mlp-reg", "ss-adam-tf", 512, 3e-2, 400, "cyclic", mode="exp_range", base=0.05,
          up=40, gamma=0.998),
        # one-cycle
        s("mlp-cls", "adamw", 32, 1e-2, 400, "onecycle", pct_start=0.3),
        s("cnn", "sgd", 128, 1e-1, 400, "onecycle", augment=True, pct_start=0.25),
        s("gpt2", "adam", 32, 1e-2, 300, "onecycle", pct_start=0.1),
        # linear warmup then cosine decay
        s("gpt2", "adamw", 64, 3e-3, 300, "warmup-cosine", noise=True, warmup=30),
        s("mlp-reg", "adam", 16, 3e-3, 400, "warmup-cosine", noise=True, warmup=50),
        s("cnn", "ss-adam-tf", 32, 3e-3, 400, "sequential", start=0.01, warmup=40,
          eta_min=0.0),
        s("mlp-cls", "sgd", 8, 3e-2, 500, "sequential", noise=True, start=0.1, warmup=50,
          eta_min=1e-2),
        # warmup then constant, step decay, exponential decay
        s("mlp-reg", "adamw", 256, 1e-2, 400, "warmup-constant", start=0.1, warmup=100),
        s("mlp-reg", "sgd", 128, 1e-1, 450, "step", step_size=150, gamma=0.3),
        s("cnn", "adam", 8, 1e-2, 400, "multistep", milestones=[200, 300], gamma=0.1),
        s("mlp-cls", "ss-adam-torch", 256, 1e-2, 400, "exponential", gamma=0.995),
        # ReduceLROnPlateau, stepped once an epoch on the epoch's mean training loss
        s("mlp-reg", "ss-adam-tf", 64, 1e-2, 500, "plateau", noise=True, factor=0.5,
          patience=1, threshold=0.01),
        s("cnn", "ss-adam-torch", 128, 3e-3, 500, "plateau", noise=True, factor=0.1,
          patience=3),
        # through the Lightning callback, the scheduler in configure_optimizers
        s("mlp-cls", "adam", 32, 1e-2, 400, "sgdr", framework="lightning", T_0=100, T_mult=1,
          eta_min=0.0),
        s("cnn", "sgd", 64, 1e-1, 400, "sequential", framework="lightning", start=0.1,
          warmup=30, eta_min=0.0),
        s("mlp-reg", "ss-adam-torch", 64, 1e-2, 400, "plateau", framework="lightning",
          noise=True, factor=0.5, patience=1),
        # GPT-2 through the Hugging Face Trainer callback, cosine_with_restarts + warmup
        _hf(8, 5e-3, 400, cycles=3, warmup=20, noise=False),
        _hf(16, 3e-3, 400, cycles=4, warmup=30, noise=False),
        _hf(32, 5e-3, 240, cycles=5, warmup=10, noise=True),
    ]
    for i, spec in enumerate(specs):
        spec["seed"] = base_seed + i
        via = f" via {spec['framework']}" if "framework" in spec else ""
        spec["name"] = (f"{i:02d} {spec['sched']} {spec['kind']} {spec['opt']} "
                        f"b{spec['batch']} lr {spec['lr']:g}{via}")
    return specs


def warm_restarts(spec: dict) -> int:
    """How many times the schedule jumps the lr back to its peak within the run."""
    kw, steps = spec["sched_kw"], spec["steps"]
    if spec["sched"] == "hf-cosine-restarts":
        return kw["num_cycles"] - 1
    if spec["sched"] != "sgdr":
        return 0
    n, t, period = 0, kw["T_0"], kw["T_0"]
    while t < steps:
        n, period = n + 1, period * kw["T_mult"]
        t += period
    return n


def epoch_steps(spec: dict) -> int:
    """Steps in one pass over the data (guard.py's sets: 2048 points, GPT-2 1024)."""
    return (1024 if spec["kind"] == "gpt2" else 2048) // spec["batch"]


def make_scheduler(spec: dict, opt: torch.optim.Optimizer):
    """The spec's torch lr scheduler on ``opt``; its lrs are relative to the optimizer's lr
    when built, so a method that scales the lr (``lr/10``) scales the whole schedule."""
    sch = torch.optim.lr_scheduler
    kw, steps, fam = spec["sched_kw"], spec["steps"], spec["sched"]
    lr = opt.param_groups[0]["lr"]
    if fam == "sgdr":
        return sch.CosineAnnealingWarmRestarts(opt, T_0=kw["T_0"], T_mult=kw["T_mult"],
                                               eta_min=kw["eta_min"] * lr)
    if fam == "cyclic":
        return sch.CyclicLR(opt, base_lr=kw["base"] * lr, max_lr=lr, step_size_up=kw["up"],
                            mode=kw["mode"], gamma=kw.get("gamma", 1.0),
                            cycle_momentum=spec["opt"] == "sgd")
    if fam == "onecycle":
        return sch.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=kw["pct_start"])
    if fam == "warmup-cosine":  # Hugging Face's get_cosine_schedule_with_warmup
        w = kw["warmup"]
        return sch.LambdaLR(opt, lambda t: t / w if t < w else
                            0.5 * (1 + math.cos(math.pi * min(1.0, (t - w) / (steps - w)))))
    if fam == "sequential":
        w = kw["warmup"]
        return sch.SequentialLR(opt, [
            sch.LinearLR(opt, start_factor=kw["start"], total_iters=w),
            sch.CosineAnnealingLR(opt, T_max=steps - w, eta_min=kw["eta_min"] * lr)],
            milestones=[w])
    if fam == "warmup-constant":
        return sch.LinearLR(opt, start_factor=kw["start"], total_iters=kw["warmup"])
    if fam == "step":
        return sch.StepLR(opt, step_size=kw["step_size"], gamma=kw["gamma"])
    if fam == "multistep":
        return sch.MultiStepLR(opt, milestones=kw["milestones"], gamma=kw["gamma"])
    if fam == "exponential":
        return sch.ExponentialLR(opt, gamma=kw["gamma"])
    if fam == "plateau":
        return sch.ReduceLROnPlateau(opt, factor=kw["factor"], patience=kw["patience"],
                                     threshold=kw.get("threshold", 1e-4))
    raise ValueError(f"unknown schedule family {fam!r}; known: {', '.join(FAMILIES)}")


# ------------------------------------------------------------------------- runner
def _whole_loss(kind: str, model: torch.nn.Module, x, y) -> float:
    ev = torch.arange(min(512, len(x)))  # guard.py's evaluation set
    was = model.training
    model.eval()
    with torch.no_grad():
        out = float(_loss(kind, model, x[ev], y[ev]))
    model.train(was)
    return out


def _failed(error: GuardError, first: float, losses: list[float], guard=None) -> dict:
    return {"final": math.nan, "first": first, "actions": 1, "stopped": False,
            "guard": guard, "losses": losses, "lrs": [], "error": str(error)}


def _run_callback(spec: dict, method: str) -> dict | None:
    if method not in ("none", "stablestep"):
        return None  # only stablestep has a callback

    def entry(opt):
        plateau = spec["sched"] == "plateau"
        out = {"scheduler": make_scheduler(spec, opt),
               "interval": "epoch" if plateau else "step"}
        if plateau:
            out["monitor"] = "train_loss"
        return out

    try:
        r = run_framework(spec, method == "stablestep",
                          scheduler=entry if spec["framework"] == "lightning" else None)
    except GuardError as e:
        return _failed(e, math.nan, [])
    return {**r, "stopped": False, "lrs": [], "error": None}


def run_scheduled(spec: dict, method: str) -> dict | None:
    """Train one corpus run under ``method``: guard.py's healthy loop with the spec's lr
    schedule stepped after every optimizer step (also a skipped one; ReduceLROnPlateau once
    an epoch, on the epoch's mean minibatch loss). Returns the final and initial whole-data
    loss, the method's actions, every step's minibatch loss and lr, the guard (stablestep)
    and a ``GuardError``'s message; ``None`` for a callback run under a method other than
    ``none`` or ``stablestep``."""
    if "framework" in spec:
        return _run_callback(spec, method)
    kind = spec["kind"]
    x, y = _data(kind, spec["seed"], spec["noise"])
    model = _model(kind, spec["seed"] + 1)
    m = Method(method)
    params = list(model.parameters())
    opt = m.optimizer(spec["opt"], params, spec["lr"],
                      lambda lr, **c: _build_opt(spec["opt"], params, lr, **c))
    m.attach(model, opt)
    sched = make_scheduler(spec, opt)
    plateau = spec["sched"] == "plateau"
    epoch = epoch_steps(spec)
    gen = torch.Generator().manual_seed(spec["seed"] + 2)
    first = _whole_loss(kind, model, x, y)
    losses: list[float] = []
    lrs: list[float] = []
    stopped = False
    for t in range(spec["steps"]):
        idx = torch.randint(len(x), (spec["batch"],), generator=gen)
        xb, yb = x[idx], y[idx]
        if spec["augment"]:  # random flips and shifts of the images
            if torch.rand((), generator=gen) < 0.5:
                xb = xb.flip(-1)
            xb = torch.roll(xb, int(torch.randint(-1, 2, (), generator=gen)), dims=-2)
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        loss = _loss(kind, model, xb, yb)
        loss.backward()
        losses.append(float(loss.detach()))
        try:
            ok = m.take(loss, model)
        except Stopped:
            stopped = True
            break
        except GuardError as e:
            return _failed(e, first, losses, m._guard)
        if ok:
            opt.step()
        if not plateau:
            sched.step()
        elif (t + 1) % epoch == 0:
            sched.step(statistics.fmean(losses[-epoch:]))
    return {"final": _whole_loss(kind, model, x, y), "first": first, "actions": m.actions,
            "stopped": stopped, "guard": m._guard, "losses": losses, "lrs": lrs,
            "error": None}


# ------------------------------------------------------------------------- labels
def bigram_entropy(spec: dict) -> float:
    """A GPT-2 spec's data: the empirical entropy of the next token given the previous one
    (nats), about the lowest loss a model can reach on these Markov sequences."""
    x, _ = _data("gpt2", spec["seed"], spec["noise"])
    prev, nxt = x[:, :-1].reshape(-1), x[:, 1:].reshape(-1)
    counts = torch.zeros(64, 64).index_put_((prev, nxt), torch.ones(len(prev)),
                                            accumulate=True)
    p = counts / counts.sum(1, keepdim=True).clamp_min(1)
    return float(-(counts * torch.log(p.clamp_min(1e-30))).sum() / counts.sum())


def label_check(spec: dict, res: dict) -> list[str]:
    """Why an unguarded run is not healthy training by construction (empty: it is): a
    non-finite step loss; a final whole-data loss not under half the initial one (GPT-2:
    not closing half the gap between the initial loss, ln 64, and the data's
    :func:`bigram_entropy`, 2.8-3.2 nats, since halving the loss is out of reach); or the
    median of the last 10% of step losses not under the median of the first 10%."""
    why = []
    losses, first, final = res["losses"], res["first"], res["final"]
    if not losses or not all(math.isfinite(v) for v in losses):
        why.append("non-finite step loss")
    floor = bigram_entropy(spec) if spec["kind"] == "gpt2" else 0.0
    bar = floor + 0.5 * (first - floor)
    if not (math.isfinite(final) and final < bar):
        why.append(f"final {final:.3g} not under {bar:.3g} (initial {first:.3g}, "
                   f"floor {floor:.3g})")
    k = max(1, len(losses) // 10)
    head, tail = statistics.median(losses[:k]), statistics.median(losses[-k:])
    if not tail < head:
        why.append(f"last-10% median {tail:.3g} not under first-10% median {head:.3g}")
    return why


def _records(guard) -> str:
    if guard is None:
        return ""
    recs = [f"{r.action}({r.reason})@{r.step}" for r in guard.records]
    return ", ".join(recs[:8]) + (" ..." if len(recs) > 8 else "")


def labels_only(specs: list[dict]) -> int:
    """Train the unguarded run of every spec; print each one's label check."""
    t0 = time.perf_counter()
    bad = []
    for spec in specs:
        t = time.perf_counter()
        r = run_scheduled(spec, "none")
        why = label_check(spec, r)
        losses = r["losses"]
        k = max(1, len(losses) // 10)
        print(f"  {spec['name']:52s} restarts {warm_restarts(spec)}  loss {r['first']:.3g} -> "
              f"{r['final']:.3g} ({r['final'] / r['first']:.3f}x)  first/last 10% median "
              f"{statistics.median(losses[:k]):.3g}/{statistics.median(losses[-k:]):.3g}  "
              f"highest after the first 10% {max(losses[k:]):.3g}  "
              f"{time.perf_counter() - t:.1f}s{'  FAILS: ' + '; '.join(why) if why else ''}",
              flush=True)
        if why:
            bad.append(spec["name"])
    print(f"elapsed {time.perf_counter() - t0:.0f}s")
    for name in bad:
        print(f"  label fails: {name}")
    print(f"labels hold {len(specs) - len(bad)}/{len(specs)}")
    return 0 if not bad else 1


def main(argv: list[str] | None = None) -> int:
    """Run the methods on the scheduled corpus (or only its label check); print a table."""
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    ap.add_argument("--labels-only", action="store_true",
                    help="train only the unguarded runs and check they are healthy training")
    ap.add_argument("--quick", action="store_true",
                    help=f"{len(QUICK)} runs: SGDR, cyclic, one-cycle, warmup+cosine, "
                         "exponential, plateau, one through each callback")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
    specs = schedule_corpus()
    if args.quick:
        specs = [specs[i] for i in QUICK]
    if args.labels_only:
        return labels_only(specs)
    t0 = time.perf_counter()
    methods = tuple(dict.fromkeys(("none", *args.methods)))
    col = {m: {"n": 0, "ok": 0, "actions": 0, "acted": 0} for m in methods}
    acted: list[str] = []
    print(f"scheduled healthy corpus: {len(specs)} runs; methods {', '.join(methods)}")
    for spec in specs:
        ref = run_scheduled(spec, "none")
        why = label_check(spec, ref)
        cells, failed = [], []
        for m in methods:
            r = ref if m == "none" else run_scheduled(spec, m)
            if r is None:  # a callback run: only stablestep has a callback
                continue
            c = col[m]
            c["n"] += 1
            ok = healthy(r, ref)
            c["ok"] += ok
            c["actions"] += r["actions"]
            c["acted"] += r["actions"] > 0
            if r["actions"]:
                cells.append(f"{m}={r['actions']}")
            if not ok:
                failed.append(f"{m} ({r['final']:.3g})")
            if m == "stablestep" and (r["actions"] or r["error"]):
                acted.append(f"  {spec['name']}: {_records(r['guard'])}"
                             + (f" GuardError: {r['error']}" if r["error"] else ""))
        print(f"  {spec['name']:52s} ref final {ref['final']:.3g}"
              f"{' (label fails: ' + '; '.join(why) + ')' if why else ''}  actions: "
              f"{', '.join(cells) or 'none'}"
              f"{'  not ok: ' + ', '.join(failed) if failed else ''}", flush=True)
    print(f"\n{'method':16s} {'runs ok':>9s} {'false actions':>16s}   (callback runs: none "
          "and stablestep only)")
    for m in methods:
        c = col[m]
        print(f"{m:16s} {c['ok']:>5d}/{c['n']:<3d} {c['actions']:>7d} ({c['acted']} runs)")
    if "stablestep" in methods:
        print("runs where stablestep acted:")
        print("\n".join(acted) if acted else "  none")
    print(f"elapsed {time.perf_counter() - t0:.0f}s")
    if "stablestep" in methods:
        s = col["stablestep"]
        print(f"stablestep false actions on scheduled healthy runs: {s['actions']} "
              f"({s['acted']} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
