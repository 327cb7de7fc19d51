"""bench/gpu_check.py --dry-run (what CI runs of the GPU acceptance check): every check runs at tiny size
on the CPU and reports real measurements -- kernel within its error bound, ratio exactly 1 before the first
update under FSDP2, the learning check's reward rising, a bit-exact DCP round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_runs_every_cpu_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out),
                        "--iterations", "12"], capture_output=True, text=True, cwd=str(ROOT), timeout=900)
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert p.returncode == 0, (p.stdout[-3000:], {k: v.get("error") for k, v in checks.items()})
    listed = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--list"], capture_output=True,
                            text=True, cwd=str(ROOT), timeout=120).stdout.split()
    assert list(checks) == listed
    assert {k for k, v in checks.items() if v["status"] == "skipped"} == {"cpu_offload", "cuda_tests"}
    assert all(v["status"] == "ok" for k, v in checks.items() if k not in ("cpu_offload", "cuda_tests"))
    assert checks["kernel_correctness"]["worst_error_over_bound"] <= 1.0
    for case in ("grpo_flux", "grpo_hunyuan"):
        c = checks[case]
        assert c["config"]["fsdp"] is True and c["backend"] == "gloo"
        assert c["first_iteration"]["train/first_ratio_dev"] == 0.0 and c["ratio_within_1e-6"]
        assert c["first_ratio_dev_microbatch_eq_rollout_batch"] == 0.0
        assert c["first_ratio_dev_rollout_chunk_eq_microbatch"] == 0.0
        assert set(c["phase_peak_mem_mib"]) == {"rollout_forward", "decode", "reward", "train"}
        assert set(c["phase_peak_mem_mib_chunked"]) >= {"rollout_forward", "decode", "reward", "train"}
    learn = checks["learning"]
    assert learn["rising"] and learn["held_out_after"] > learn["held_out_before"] and len(learn["rewards"]) == 12
    assert checks["checkpoint_dcp"]["weights_identical_after_load"]
    assert checks["checkpoint_dcp"]["next_iteration_identical"]


def test_unknown_check_is_refused():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--only", "nope"],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert p.returncode != 0 and "unknown checks ['nope']" in p.stderr
