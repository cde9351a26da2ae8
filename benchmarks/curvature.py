"""Benchmark: Hessian-vector products (HVPs) and wall time to the top Hessian eigenvalue.

1. Cold start, ours (Lanczos) vs PyHessian's power iteration (``pip install pyhessian``),
   same model, same batch, same float32 HVP: how many HVPs and how much time until the
   estimate is within 0.1% of the reference (a 1e-10 Lanczos run, cross-checked against
   PyHessian at tol 1e-9). Two counts each: "oracle" (first HVP at which the running
   estimate is within 0.1%) and "own rule" (the method's own stopping rule: ours at
   tol=1e-3; PyHessian at the loosest tol in 1e-3..1e-7 whose answer is within 0.1%).
   Start vectors are drawn per repetition; the variants are interleaved (A, B, A, B, ...)
   and medians are reported.
2. Warm-started tracking along an Adam training run: HVPs per estimate of lam_max(H) and
   lam_max(P^-1 H) at tol 1%, and the error against a cold 1e-8 reference.
3. A transformer (Hugging Face GPT-2 from a config, sdpa attention, CPU): HVPs and wall time
   per cold estimate of lam_max(H) to 0.1% for each backend -- double backward under the
   math attention kernel, finite differences on the flash kernel, and the forward-only
   critical sharpness (forward passes, no HVP) -- against PyHessian (which needs double
   backward, so it runs under the math kernel too); then the curvature overhead of the
   Monitor at curvature_every=10 (the cadence of issue #12), with and without adapt=True.

Run:  .venv/bin/python benchmarks/curvature.py [--reps 5] [--quick]
The LAST line is the cold-start HVP ratio PyHessian / ours (oracle counts, medians over the
MLP, the CNN and the transformer).
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from stablestep.curvature import CurvatureProbe, LanczosConfig, ProbeConfig, lanczos_top
from stablestep.curvature.backends import build_operator
from stablestep.curvature.directional import critical_sharpness
from stablestep.curvature.fd import Evaluator
from stablestep.curvature.hvp import HessianOperator, math_attention
from stablestep.curvature.stability import PreconditionedOperator, preconditioner_diag

REL = 1e-3  # the target accuracy of the cold-start comparison


class _Logits(nn.Module):
    """GPT-2 as PyHessian wants it: model(x) -> logits (N*T, V) for a criterion(out, y)."""

    def __init__(self, gpt) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, x):
        logits = self.gpt(x).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


def make_gpt2(seed: int = 0, steps: int = 30):
    """A 2-layer GPT-2 (n_embd 48, 4 heads, vocab 96) on 8 sequences of 32 tokens, sdpa
    attention, dropout 0 (the flash kernel on the CPU), trained ``steps`` Adam steps."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=96, n_positions=64,
                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0,
                     eos_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = _Logits(GPT2LMHeadModel(cfg))
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, 96, (8, 32), generator=g)
    x, y = tokens, tokens[:, 1:].reshape(-1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model, x, y, opt


def make_model(kind: str, seed: int = 0):
    """(model, x, y) with a classification task; trained 300 Adam steps so the Hessian has
    its usual outliers (random init has a flat, uninformative spectrum)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                              nn.Linear(64, 10))
        x = torch.randn(512, 20, generator=g)
    else:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))
        x = torch.randn(256, 3, 12, 12, generator=g)
    with torch.no_grad():
        teacher = torch.randn(x[0].numel(), 10, generator=g)
        y = (x.flatten(1) @ teacher).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model, x, y


def reference(model, x, y) -> float:
    with math_attention():  # no effect on models without SDPA
        op = HessianOperator(lambda: F.cross_entropy(model(x), y), list(model.parameters()))
    res = lanczos_top(op.matvec_flat, op.n, config=LanczosConfig(tol=1e-10, max_iter=200))
    return res.top


def ours_cold(model, x, y, seed: int, lam: float, backend: str = "exact") -> dict:
    params = list(model.parameters())
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    # own stopping rule, timed end to end (gradient graph or base gradient included)
    t0 = time.perf_counter()
    op = build_operator(backend, loss_fn, params)
    res = lanczos_top(op.matvec_flat, op.n, config=LanczosConfig(tol=REL, seed=seed))
    wall = time.perf_counter() - t0
    own_err = abs(res.top - lam) / lam
    # oracle: smallest Krylov size whose top Ritz value is within REL
    oracle = None
    for j in range(1, 80):
        r = lanczos_top(op.matvec_flat, op.n,
                        config=LanczosConfig(tol=1e-12, max_iter=j, seed=seed))
        if abs(r.top - lam) <= REL * lam:
            oracle = j
            break
    return dict(own=res.n_matvec, own_err=own_err, oracle=oracle, wall=wall)


def pyhessian_cold(model, x, y, seed: int, lam: float) -> dict:
    import importlib

    ph = importlib.import_module("pyhessian.hessian")

    counter = {"n": 0, "rq": []}
    orig = ph.hessian_vector_product

    def counted(gradsH, params, v):
        counter["n"] += 1
        hv = orig(gradsH, params, v)
        counter["rq"].append(float(sum((a * b).sum() for a, b in zip(hv, v, strict=True))))
        return hv

    ph.hessian_vector_product = counted
    was_training = model.training
    try:
        out = {}
        for tol in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
            counter["n"], counter["rq"] = 0, []
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            with math_attention():  # PyHessian needs double backward too
                h = ph.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            eig, _ = h.eigenvalues(maxIter=1000, tol=tol)
            wall = time.perf_counter() - t0
            for p in model.parameters():  # PyHessian's backward(create_graph=True) cycle
                p.grad = None
            err = abs(eig[0] - lam) / lam
            if "tol1e-3" not in out:
                out["tol1e-3"] = (counter["n"], err)
            if err <= REL:
                hit = [i + 1 for i, r in enumerate(counter["rq"]) if abs(r - lam) <= REL * lam]
                out.update(oracle=hit[0], own=counter["n"], own_err=err, tol=tol, wall=wall)
                break
        return out
    finally:
        ph.hessian_vector_product = orig
        model.train(was_training)  # PyHessian switches the model to eval mode


def cold_benchmark(kind: str, reps: int) -> tuple[float, float]:
    if kind == "gpt2":
        model, x, y, opt = make_gpt2()
        ours = {"ours-math": "math", "ours-fd": "fd"}  # double backward / flash kernel
    else:
        (model, x, y), opt = make_model(kind), None
        ours = {"ours": "exact"}
    n = sum(p.numel() for p in model.parameters())
    lam = reference(model, x, y)
    check = pyhessian_cold(model, x, y, seed=123, lam=lam)
    print(f"[{kind}] {n} params, batch {x.shape[0]}: lam_max(H) = {lam:.6g} "
          f"(PyHessian at tol {check.get('tol')}: within {check.get('own_err', float('nan')):.1e})")
    rows = {name: [] for name in (*ours, "pyhessian")}
    for rep in range(reps):  # interleaved, order alternating
        order = list(rows) if rep % 2 == 0 else list(rows)[::-1]
        for name in order:
            if name == "pyhessian":
                rows[name].append(pyhessian_cold(model, x, y, seed=rep, lam=lam))
            else:
                rows[name].append(ours_cold(model, x, y, seed=rep, lam=lam, backend=ours[name]))
    med = lambda name, key: statistics.median(r[key] for r in rows[name])  # noqa: E731
    for name in rows:
        extra = ""
        if name == "pyhessian":
            n3 = statistics.median(r["tol1e-3"][0] for r in rows[name])
            e3 = statistics.median(r["tol1e-3"][1] for r in rows[name])
            tols = sorted({r["tol"] for r in rows[name]})
            extra = (f"; its default tol=1e-3 stops after {n3:g} HVPs at {e3:.1e} error;"
                     f" needed tol {tols}")
        print(f"  {name:10s} to 0.1%: oracle {med(name, 'oracle'):g} HVPs, own rule "
              f"{med(name, 'own'):g} HVPs (err {med(name, 'own_err'):.1e}), "
              f"{1e3 * med(name, 'wall'):.1f} ms per estimate{extra}")
    if opt is not None:
        forward_row(model, x, y, opt, reps)
    first = next(iter(ours))
    hvp_ratio = med("pyhessian", "oracle") / med(first, "oracle")
    own_ratio = med("pyhessian", "own") / med(first, "own")
    wall_ratio = med("pyhessian", "wall") / med(first, "wall")
    print(f"  ratio PyHessian/{first}: HVPs oracle {hvp_ratio:.2f}x, own rule {own_ratio:.2f}x, "
          f"wall (own rule) {wall_ratio:.2f}x")
    return hvp_ratio, own_ratio


def forward_row(model, x, y, opt, reps: int) -> None:
    """The forward-only backend: critical sharpness (no HVP, no eigenvalue)."""
    params = list(model.parameters())
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    lr = opt.param_groups[0]["lr"]
    walls, passes = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        ev = Evaluator(loss_fn, params)
        loss0, grad = ev.gradient()
        direction = [d / lr * g for d, g in zip(preconditioner_diag(opt, params), grad,
                                                strict=True)]
        cs = critical_sharpness(ev, loss0, direction, eta0=lr)
        walls.append(time.perf_counter() - t0)
        passes.append(cs.n_forward)
    print(f"  forward    critical sharpness (Adam direction) {cs.value:.4g} = 2/eta_c vs "
          f"2/lr = {2 / lr:.4g}: 0 HVPs, 1 gradient + {statistics.median(passes):g} forward "
          f"passes, {1e3 * statistics.median(walls):.1f} ms per estimate")


def _ce(model, x, y):
    return F.cross_entropy(model(x), y)


def overhead_benchmark(steps: int, every: int = 10) -> None:
    """Wall time of GPT-2 training with the Monitor, with and without curvature."""
    import tempfile

    from stablestep.telemetry import Monitor

    walls = {}
    for name, kw in (("no curvature", None), ("curvature", ProbeConfig()),
                     ("curvature adapt", ProbeConfig(adapt=True))):
        model, x, y, opt = make_gpt2(steps=0)
        loss_fn = functools.partial(_ce, model, x, y)
        with tempfile.TemporaryDirectory() as tmp:
            extra = {} if kw is None else dict(curvature_every=every, curvature_loss=loss_fn)
            mon = Monitor(model, opt, store=f"{tmp}/s.db", run=name, **extra)
            if kw is not None:
                mon._probe = CurvatureProbe(model.parameters(), opt, config=kw)
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad()
                loss = loss_fn()
                loss.backward()
                mon.observe(loss)
                opt.step()
            walls[name] = time.perf_counter() - t0
            probe = mon._probe
            mon.close()
        if probe is not None:
            print(f"  {name:16s} {walls[name]:.2f} s for {steps} steps "
                  f"(+{100 * (walls[name] / walls['no curvature'] - 1):.0f}% over no curvature;"
                  f" probe share {100 * probe.share():.0f}%, {probe.n_calls} estimates, "
                  f"{1e3 * probe.total_seconds / max(probe.n_calls, 1):.0f} ms each)")
        else:
            print(f"[overhead] GPT-2 with the Monitor, curvature_every={every}, "
                  f"backend auto (math attention):\n  {name:16s} {walls[name]:.2f} s "
                  f"for {steps} steps")


def warm_benchmark(steps: int, every: int) -> None:
    """Adam on DESIGN.md's full-batch tanh MLP; estimates every ``every`` steps at tol 1%."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = lambda: F.mse_loss(model(x), y)  # noqa: E731
    cfg = dict(tol=1e-2)
    probe_h = CurvatureProbe(model.parameters(), opt,
                             config=ProbeConfig(preconditioned=False, **cfg))
    probe_p = CurvatureProbe(model.parameters(), opt, config=ProbeConfig(sharpness=False, **cfg))
    hv_h, hv_p, err_h, err_p, t_warm, t_cold, t_step = [], [], [], [], [], [], []
    params = list(model.parameters())
    for t in range(1, steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        t_step.append(time.perf_counter() - t0)
        if t % every:
            continue
        t0 = time.perf_counter()
        lam_h = probe_h(loss_fn)["sharpness"]
        t_warm.append(time.perf_counter() - t0)
        hv_h.append(probe_h.last_hvps)
        lam_p = probe_p(loss_fn)["precond_sharpness"]
        hv_p.append(probe_p.last_hvps)
        # cold estimate at the same tolerance (timed) and the 1e-8 references (not timed)
        t0 = time.perf_counter()
        CurvatureProbe(model.parameters(), opt,
                       config=ProbeConfig(preconditioned=False, **cfg))(loss_fn)
        t_cold.append(time.perf_counter() - t0)
        op = HessianOperator(loss_fn, params)
        ref = LanczosConfig(tol=1e-8, max_iter=200)
        ref_h = lanczos_top(op.matvec_flat, op.n, config=ref).top
        pre = PreconditionedOperator(op, preconditioner_diag(opt, params))
        ref_p = lanczos_top(pre.matvec_flat, pre.n, config=ref).top
        err_h.append(abs(lam_h - ref_h) / ref_h)
        err_p.append(abs(lam_p - ref_p) / ref_p)
    q = lambda xs, f: sorted(xs)[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    every_cold = ProbeConfig().restart_every
    print(f"[warm tracking] Adam lr 1e-3, {steps} steps, an estimate every {every} "
          f"({len(hv_h)} estimates, every {every_cold}th a cold restart), tol 1%:")
    for name, hv, err in (("lam_max(H)", hv_h, err_h), ("lam_max(P^-1 H)", hv_p, err_p)):
        warm = [h for i, h in enumerate(hv) if i % every_cold]
        warm_err = [e for i, e in enumerate(err) if i % every_cold]
        print(f"  {name:16s} HVPs per warm estimate median {statistics.median(warm):g}, "
              f"90% {q(warm, .9)}, max {max(warm)} (cap warm_max_iter="
              f"{ProbeConfig().warm_max_iter}); mean over all incl. restarts "
              f"{statistics.mean(hv):.2f}; rel. error median {statistics.median(err):.1e}, "
              f"max {max(err):.1e} (warm estimates: max {max(warm_err):.1e})")
    print(f"  wall per estimate of lam_max(H): warm {1e3 * statistics.median(t_warm):.2f} ms, "
          f"cold {1e3 * statistics.median(t_cold):.2f} ms, one training step "
          f"{1e3 * statistics.median(t_step):.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer reps and training steps")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("stablestep").setLevel(logging.ERROR)  # the probe's cost notices
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    reps = 3 if args.quick else args.reps
    warm_benchmark(steps=1500 if args.quick else 4000, every=50)
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        print("cold-start comparison skipped: PyHessian is not installed "
              "(.venv/bin/pip install pyhessian)")
        raise SystemExit(1) from None
    ratios = [cold_benchmark(kind, reps) for kind in ("mlp", "cnn", "gpt2")]
    overhead_benchmark(steps=60 if args.quick else 200)
    hvp = statistics.median(r[0] for r in ratios)
    print(f"cold-start HVP ratio PyHessian/ours to 0.1% (median over models): {hvp:.2f}x")


if __name__ == "__main__":
    main()
