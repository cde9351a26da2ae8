"""A monitored training process killed with SIGKILL mid-run, then resumed from its last
checkpoint: the store stays readable throughout, and the resumed run has every step
exactly once, with the losses of a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from stablestep.telemetry import list_runs, open_run

CHILD = textwrap.dedent(
    """
    import os, sys, time, torch
    from stablestep.telemetry import Monitor
    store, ckpt, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    mon = Monitor(model, opt, store=store, run="job", flush_every=3)
    start = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        mon.load_state_dict(state["monitor"])
        start = state["step"]
    for step in range(start, total):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.observe(loss)
        opt.step()
        if (step + 1) % 10 == 0:  # checkpoint: written aside, then renamed (atomic)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "monitor": mon.state_dict(), "step": step + 1}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
        print(step, flush=True)
        if len(sys.argv) > 4:
            time.sleep(0.02)
    mon.close()
    """
)
TOTAL = 60


def _env():
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_mid_run_then_resume(tmp_path):
    store, ckpt = str(tmp_path / "runs.db"), str(tmp_path / "ckpt.pt")
    child = subprocess.Popen([sys.executable, "-c", CHILD, store, ckpt, str(TOTAL), "slow"],
                             stdout=subprocess.PIPE, text=True, env=_env())
    try:
        for line in child.stdout:
            if int(line) >= 34:  # after the checkpoint at 30, between flushes
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL
    steps, _ = open_run(store, "job").series("loss")  # readable after the kill
    assert steps.tolist() == list(range(len(steps))) and len(steps) >= 30
    done = subprocess.run([sys.executable, "-c", CHILD, store, ckpt, str(TOTAL)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list_runs(store) == ["job"]  # resumed in place, not "job-2"
    steps, loss = open_run(store, "job").series("loss")
    assert steps.tolist() == list(range(TOTAL))  # no step missing, none twice
    ref = str(tmp_path / "ref.db")
    whole = subprocess.run([sys.executable, "-c", CHILD, ref, str(tmp_path / "ref.pt"),
                            str(TOTAL)], capture_output=True, text=True, env=_env(), timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    ref_steps, ref_loss = open_run(ref, "job").series("loss")
    assert ref_steps.tolist() == steps.tolist()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
