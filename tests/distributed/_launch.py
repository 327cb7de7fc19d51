"""Helpers for the distributed tests: a torchrun launcher that surfaces failures, and a one-process runner.

torchrun runs ``--standalone``: its rendezvous store binds port 0, so the OS picks a port that is
free at bind time. (Picking a free port first and passing it as --master-port is a race: the port
is released before torchrun binds it, and any other process may take it in between.)

The timeouts only guard against a hang: the slowest worker took ~35 s on a 2-core machine with two
other busy processes, so 120 s left too little room for a busier machine; 300 s is the default.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.threads import TEST_THREADS

ROOT = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "workers"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS=str(TEST_THREADS), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun(script: str, *args, nproc: int = 2, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run tests/distributed/workers/<script> under torchrun on CPU (gloo); assert it exits 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKERS / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    _check(script, proc)
    return proc


def python(script: str, *args, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run a worker as one plain process (no torchrun variables)."""
    proc = subprocess.run([sys.executable, str(WORKERS / script), *map(str, args)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    _check(script, proc)
    return proc


def _check(script: str, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"{script} failed (rc {proc.returncode})\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                                  f"STDERR:\n{proc.stderr[-8000:]}")
