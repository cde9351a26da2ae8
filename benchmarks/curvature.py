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

Run:  .venv/bin/python benchmarks/curvature.py [--reps 5] [--quick]
The LAST line is the cold-start HVP ratio PyHessian / ours (oracle counts, medians).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from stablestep.curvature import CurvatureProbe, LanczosConfig, ProbeConfig, lanczos_top
from stablestep.curvature.hvp import HessianOperator
from stablestep.curvature.stability import PreconditionedOperator, preconditioner_diag

REL = 1e-3  # the target accuracy of the cold-start comparison


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
    op = HessianOperator(lambda: F.cross_entropy(model(x), y), list(model.parameters()))
    res = lanczos_top(op.matvec_flat, op.n, config=LanczosConfig(tol=1e-10, max_iter=200))
    return res.top


def ours_cold(model, x, y, seed: int, lam: float) -> dict:
    params = list(model.parameters())
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    # own stopping rule, timed end to end (gradient graph included)
    t0 = time.perf_counter()
    op = HessianOperator(loss_fn, params)
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
    model, x, y = make_model(kind)
    n = sum(p.numel() for p in model.parameters())
    lam = reference(model, x, y)
    check = pyhessian_cold(model, x, y, seed=123, lam=lam)
    print(f"[{kind}] {n} params, batch {x.shape[0]}: lam_max(H) = {lam:.6g} "
          f"(PyHessian at tol {check.get('tol')}: within {check.get('own_err', float('nan')):.1e})")
    rows = {"ours": [], "pyhessian": []}
    for rep in range(reps):  # interleaved, order alternating
        order = ("ours", "pyhessian") if rep % 2 == 0 else ("pyhessian", "ours")
        for name in order:
            fn = ours_cold if name == "ours" else pyhessian_cold
            rows[name].append(fn(model, x, y, seed=rep, lam=lam))
    med = lambda name, key: statistics.median(r[key] for r in rows[name])  # noqa: E731
    for name in ("ours", "pyhessian"):
        extra = ""
        if name == "pyhessian":
            n3 = statistics.median(r["tol1e-3"][0] for r in rows[name])
            e3 = statistics.median(r["tol1e-3"][1] for r in rows[name])
            tols = sorted({r["tol"] for r in rows[name]})
            extra = (f"; its default tol=1e-3 stops after {n3:g} HVPs at {e3:.1e} error;"
                     f" needed tol {tols}")
        print(f"  {name:9s} to 0.1%: oracle {med(name, 'oracle'):g} HVPs, own rule "
              f"{med(name, 'own'):g} HVPs (err {med(name, 'own_err'):.1e}), "
              f"{1e3 * med(name, 'wall'):.1f} ms{extra}")
    hvp_ratio = med("pyhessian", "oracle") / med("ours", "oracle")
    own_ratio = med("pyhessian", "own") / med("ours", "own")
    wall_ratio = med("pyhessian", "wall") / med("ours", "wall")
    print(f"  ratio PyHessian/ours: HVPs oracle {hvp_ratio:.2f}x, own rule {own_ratio:.2f}x, "
          f"wall (own rule) {wall_ratio:.2f}x")
    return hvp_ratio, own_ratio


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
        print(f"  {name:16s} HVPs per warm estimate median {statistics.median(warm):g}, "
              f"90% {q(warm, .9)}, max {max(warm)}; mean over all incl. restarts "
              f"{statistics.mean(hv):.2f}; rel. error median {statistics.median(err):.1e}, "
              f"max {max(err):.1e}")
    print(f"  wall per estimate of lam_max(H): warm {1e3 * statistics.median(t_warm):.2f} ms, "
          f"cold {1e3 * statistics.median(t_cold):.2f} ms, one training step "
          f"{1e3 * statistics.median(t_step):.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer reps and training steps")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    reps = 3 if args.quick else args.reps
    warm_benchmark(steps=1500 if args.quick else 4000, every=50)
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        print("cold-start comparison skipped: PyHessian is not installed "
              "(.venv/bin/pip install pyhessian)")
        raise SystemExit(1) from None
    ratios = [cold_benchmark(kind, reps) for kind in ("mlp", "cnn")]
    hvp = statistics.median(r[0] for r in ratios)
    print(f"cold-start HVP ratio PyHessian/ours to 0.1% (median over models): {hvp:.2f}x")


if __name__ == "__main__":
    main()
