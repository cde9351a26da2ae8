"""Readers at length: time and peak memory of ``load()`` on 1M- and 10M-row CSVs and on a
1M-step run store, and a size-doubling check that long lines and wide headers are read
in linear time.

Each measurement runs in a fresh process; its peak memory is the growth of the peak
resident set over the process's size after its imports (``ru_maxrss`` minus the RSS
before reading). Times are given against an anchor measured in the same run: pandas'
``read_csv`` of the same file (the C parser alone, no diagnosis semantics).

    python benchmarks/readers.py            # 1M and 10M rows (a few minutes)
    python benchmarks/readers.py --quick    # 1M rows only
    python benchmarks/readers.py --store    # only `diagnose` and `report` of a 1M-step store

The store case also runs the two commands a user runs, ``stablestep diagnose STORE`` and
``stablestep report STORE -o OUT.html``, each in a fresh process, and gives their wall time
(interpreter start and imports included) and the process's peak resident set (goal: under
10 s and 1 GB each).

The last line is the peak-memory / file-size ratio of the 10M-row CSV (goal <= 3); with
``--store``, the two commands' times and peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time, warnings
    import pandas  # imported before the baseline: both sides pay it
    import stablestep.diagnosis.sources as sources
    from stablestep.diagnosis.core import diagnose_trace

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6

    what, path = sys.argv[1], sys.argv[2]
    base = rss_mb()
    t = time.perf_counter()
    warnings.simplefilter("ignore")
    if what == "pandas":
        n = len(pandas.read_csv(path))
    else:
        traces = sources.load(path)
        n = sum(len(tr) for tr in traces)
    t_read = time.perf_counter() - t
    t_diag = None
    if what == "diagnose":
        t = time.perf_counter()
        for tr in traces:
            diagnose_trace(tr)
        t_diag = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(json.dumps({"n": n, "read_s": t_read, "diag_s": t_diag, "peak_mb": peak - base}))
    """
)


CLI_CHILD = textwrap.dedent(
    """
    import json, resource, runpy, sys
    sys.argv = ["stablestep", *sys.argv[1:]]
    try:
        runpy.run_module("stablestep", run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(json.dumps({"rc": code, "peak_mb": peak}), file=sys.stderr)
    """
)


def command(*args: str) -> dict:
    """Run ``stablestep ARGS`` in a fresh process: ``{"s": wall seconds (start-up
    included), "peak_mb": peak resident set (MB), "rc": exit status}``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CLI_CHILD, *args], capture_output=True,
                         text=True, env=env, check=False)
    wall = time.perf_counter() - t
    res = json.loads(out.stderr.strip().splitlines()[-1])
    if res["rc"]:
        raise RuntimeError(f"stablestep {' '.join(args)} failed: {out.stderr[-2000:]}")
    return {"s": wall, "peak_mb": res["peak_mb"], "rc": res["rc"]}


def store_commands(store: str, tmp: str) -> str:
    """``diagnose`` and ``report`` of the store as a user runs them; returns the line."""
    d = command("diagnose", store)
    r = command("report", store, "-o", os.path.join(tmp, "report.html"))
    return (f"1M-step store: stablestep diagnose {d['s']:.2f} s, peak {d['peak_mb']:.0f} MB; "
            f"stablestep report {r['s']:.2f} s, peak {r['peak_mb']:.0f} MB "
            "(goal < 10 s and < 1000 MB each)")


def measure(what: str, path: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, what, path], capture_output=True,
                         text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_csv(path: str, n: int) -> float:
    """``step,loss`` rows with a spike in the middle; returns the size in MB."""
    rng = np.random.default_rng(0)
    block = 500_000
    with open(path, "w") as f:
        f.write("step,loss\n")
        for s in range(0, n, block):
            m = min(block, n - s)
            loss = 2.0 + 0.01 * rng.standard_normal(m)
            if s <= n // 2 < s + m:
                loss[n // 2 - s] = 40.0
            steps = np.arange(s, s + m)
            f.write("\n".join(f"{a},{b:.6g}" for a, b in zip(steps.tolist(), loss.tolist(),
                                                             strict=True)))
            f.write("\n")
    return os.path.getsize(path) / 1e6


def write_store(path: str, n: int) -> float:
    """A 1M-step run the way the Monitor records one: loss, lr, grad and update norms every
    step, the Adam statistics every 10 steps. Returns the size in MB."""
    from stablestep.telemetry.store import RunWriter

    rng = np.random.default_rng(0)
    loss = 2.0 + 0.01 * rng.standard_normal(n)
    loss[n // 2] = 40.0
    gn = (1.0 + 0.1 * rng.random(n)).tolist()
    loss = loss.tolist()
    w = RunWriter(path, "long", config={"hyper": {"kind": "adam", "lr": 1e-3, "beta1": 0.9,
                                                  "beta2": 0.999, "eps": 1e-8}})
    for s in range(n):
        m = {"loss": loss[s], "lr": 1e-3, "grad_norm": gn[s], "update_norm": 1e-3}
        if s % 10 == 0:
            m.update(eps_share=0.01, g2v_rms=1.0, g2v_max=3.0, eff_step_max=1e-3)
        w.add(s, m)
        if s % 200_000 == 199_999:
            w.flush()
    w.close()
    return os.path.getsize(path) / 1e6


def doubling(kind: str, sizes: list[int], tmp: str) -> list[tuple[int, float]]:
    """Read time of one very long line (``line``) or one very wide header (``header``) at
    each size; linear time doubles with the size (quadratic would quadruple)."""
    import warnings

    from stablestep.diagnosis.sources import SourceError, load

    out = []
    for n in sizes:
        path = os.path.join(tmp, f"{kind}-{n}")
        if kind == "line":
            path += ".log"
            with open(path, "w") as f:  # a long word, then a run of 'x:' fields, then a record
                f.write("s:0 trl:1.0\n" + "a" * n + " " + "x:" * (n // 2) + "\ns:1 trl:2.0\n")
        else:
            path += ".csv"
            with open(path, "w") as f:
                f.write(",".join(f"c{i}" for i in range(n)) + ",step,loss\n")
                f.write("," * n + "0,1.0\n")
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    load(path)
                except SourceError:
                    pass
            best = min(best, time.perf_counter() - t)
        out.append((n, best))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1M rows only")
    ap.add_argument("--store", action="store_true",
                    help="only diagnose and report of a 1M-step store")
    args = ap.parse_args()
    rows = [] if args.store else [1_000_000] if args.quick else [1_000_000, 10_000_000]
    ratio = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in rows:
            path = os.path.join(tmp, f"log-{n}.csv")
            t = time.perf_counter()
            mb = write_csv(path, n)
            print(f"wrote {n:,} rows ({mb:.0f} MB) in {time.perf_counter() - t:.0f} s",
                  flush=True)
            anchor = measure("pandas", path)
            ours = measure("load", path)
            ratio = ours["peak_mb"] / mb
            print(f"csv {n:>10,} rows: load {ours['read_s']:6.2f} s, "
                  f"peak +{ours['peak_mb']:6.0f} MB = {ratio:.2f} x file; "
                  f"pandas.read_csv {anchor['read_s']:.2f} s, +{anchor['peak_mb']:.0f} MB; "
                  f"time ratio {ours['read_s'] / anchor['read_s']:.2f}", flush=True)
            os.unlink(path)
        store = os.path.join(tmp, "long.db")
        t = time.perf_counter()
        mb = write_store(store, 1_000_000)
        print(f"wrote a 1M-step store ({mb:.0f} MB) in {time.perf_counter() - t:.0f} s",
              flush=True)
        st = measure("diagnose", store)
        print(f"store 1M steps: load {st['read_s']:.2f} s, diagnose_trace {st['diag_s']:.2f} s,"
              f" total {st['read_s'] + st['diag_s']:.2f} s, peak +{st['peak_mb']:.0f} MB",
              flush=True)
        line = store_commands(store, tmp)
        print(line, flush=True)
        if args.store:
            return
        for kind, sizes in (("line", [20_000, 40_000, 80_000, 160_000]),
                            ("header", [25_000, 50_000, 100_000, 200_000])):
            res = doubling(kind, sizes, tmp)
            steps = [b / a for (_, a), (_, b) in zip(res, res[1:], strict=False)]
            print(f"{kind:>6} doubling: " + ", ".join(f"{n:,}: {s * 1e3:.0f} ms" for n, s in res)
                  + f"; time x{max(steps):.2f} at most per doubling (linear: 2, quadratic: 4)",
                  flush=True)
    print(f"peak memory / file size at {rows[-1]:,} CSV rows: {ratio:.2f} (goal <= 3)")


if __name__ == "__main__":
    main()
