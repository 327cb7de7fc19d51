"""Runs a train script (first argument; the rest are its own) with test hooks set by environment variables, for
test_preemption.py. The hooks send real signals at chosen points, so that the stop is deterministic:

* ``PREEMPT_KILL_AT=<iteration>:<rank>``: that rank sends itself SIGTERM right after training that iteration (the
  loop then finishes the iteration's components and stops after it);
* ``PREEMPT_AGAIN_IN_SAVE=1``: during the stop's checkpoint save (after the DCP write, before the folder is renamed)
  the rank sends itself SIGTERM and SIGINT again, which must not disturb the save;
* ``PREEMPT_WAIT_AT=<iteration>``: rank 0 prints ``READY <pid>`` after training that iteration and waits (at most
  120 s) until a signal has arrived from outside: the test sends it on reading the line.

A rerun of the same command does not trigger them again: it resumes after the stopped iteration.
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

from fastvideo_grpo.distributed.init import get_rank  # noqa: E402
from fastvideo_grpo.training import preemption  # noqa: E402
from fastvideo_grpo.training.trainer import Trainer  # noqa: E402

torch.set_num_threads(1)
original_iteration, original_save = Trainer.train_iteration, dcp.save


def train_iteration(self):
    metrics = original_iteration(self)
    kill_at = os.environ.get("PREEMPT_KILL_AT")
    if kill_at:
        it, rank = map(int, kill_at.split(":"))
        if self.iteration == it and get_rank() == rank:
            os.kill(os.getpid(), signal.SIGTERM)
    wait_at = os.environ.get("PREEMPT_WAIT_AT")
    if wait_at and self.iteration == int(wait_at) and get_rank() == 0:
        print(f"READY {os.getpid()}", flush=True)
        deadline = time.monotonic() + 120
        while preemption.active().signal_name is None and time.monotonic() < deadline:
            time.sleep(0.01)
    return metrics


def save(*args, **kwargs):
    result = original_save(*args, **kwargs)
    stopping = preemption.active() is not None and preemption.active().signal_name is not None
    if os.environ.get("PREEMPT_AGAIN_IN_SAVE") and stopping:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    return result


Trainer.train_iteration = train_iteration
dcp.save = save

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
