"""A stopped rank is named within the train timeout (issue 39): 2 gloo processes, rank 1 stops itself (SIGSTOP)
in the reward of iteration 2; rank 0 names it, its phase and iteration, and exits with status 6 long before
the old 30-minute collective timeout; the same command with --resume latest finishes the run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _launch import ROOT, WORKERS, _env  # noqa: E402

TIMEOUT_S = 15  # parallel.train_timeout_s of the test run
# what may pass between the stop and the end of torchrun: the timeout, the watch's polling (3 s), and torchrun's
# ending of the stopped rank (SIGTERM, which a stopped process does not act on, then SIGKILL 30 s later: torch
# 2.13's agent uses its default there, whatever --shutdown-timeout says); the rest is room for a loaded machine.
# Measured on the 2-core development machine at load 10: stop -> rank 0's line 15 s, -> torchrun's end 51 s
BOUND_S = TIMEOUT_S + 3 + 30 + 60


def _torchrun(*args, timeout):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKERS / "w_stall.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_a_stopped_rank_is_named_with_its_phase_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    try:
        proc = _torchrun(out, TIMEOUT_S, "stop", timeout=BOUND_S + 240)
        ended = time.time()
        stopped = json.loads((out / "stopped.json").read_text())
    finally:
        info = out / "stopped.json"
        if info.is_file():  # never leave a stopped process behind
            try:
                os.kill(json.loads(info.read_text())["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    err = proc.stderr
    assert proc.returncode != 0, err[-3000:]
    assert ended - stopped["time"] < BOUND_S, (ended - stopped["time"], err[-3000:])
    line = next((ln for ln in err.splitlines() if ln.startswith("error: stalled rank 1: rank 1 (")), None)
    assert line is not None, err[-5000:]
    assert f"pid {stopped['pid']}) was" in line and "phase 'reward' of iteration 2" in line, line
    assert "rerun the same command with --resume latest to continue from" in line and "step_00000001" in line, line
    assert "exitcode  : 6" in err, err[-3000:]  # torchrun's summary: rank 0 ended with the documented status
    # the same command, resumed: iterations 2 and 3 from the checkpoint of iteration 1
    again = _torchrun(out, TIMEOUT_S, "none", "--resume", "latest", timeout=300)
    assert again.returncode == 0, again.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iteration"] == 3 and summary["iterations_run"] == 2
