"""examples/ddp.py and examples/fsdp.py run as the README says, on 2 CPU processes with
gloo; each leaves exactly one run, written by rank 0, with a step per training step.

``ddp.py`` runs under the real ``torchrun`` (the documented command); ``fsdp.py`` runs in
2 forked processes given the environment torchrun gives its workers (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT): the same script, without starting 3 more
interpreters (each costs seconds of imports on a CI box).
"""

from __future__ import annotations

import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from stablestep.telemetry import list_runs, open_run

ROOT = Path(__file__).resolve().parents[2]


def _check(store: Path, name: str) -> None:
    assert list_runs(store) == [name]
    run = open_run(store, name)
    assert run.config["world_size"] == 2
    assert run.series("loss")[0].tolist() == list(range(6))
    assert len(run.series("loss_spread")[0]) == 6


def _as_torchrun_worker(rank: int, world: int, port: int, script: str, argv: list) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


@pytest.mark.parametrize("name", ["fsdp"])  # ddp.py: under torchrun itself, below
def test_example_runs_on_two_processes(tmp_path, name):
    store = tmp_path / f"{name}.db"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = str(ROOT / "examples" / f"{name}.py")
    mp.start_processes(_as_torchrun_worker, nprocs=2, start_method="fork", join=True,
                       args=(2, port, script, ["--steps", "6", "--store", str(store)]))
    _check(store, name)


def test_ddp_example_under_torchrun(tmp_path):
    store = tmp_path / "ddp.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", str(ROOT / "examples" / "ddp.py"), "--steps", "6",
           "--store", str(store)]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 ranks -> run 'ddp': 6 steps" in out.stdout
    _check(store, "ddp")
