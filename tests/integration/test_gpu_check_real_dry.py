"""``bench/gpu_check.py --dry-run --only real_*`` (issue 32 item 2) runs on the CPU: the real-size cases' code
at tiny size, each case reporting seconds, peak memory, the first micro-step's ratio and the overhead ratio
next to the planner's prediction for the same config and architecture."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REAL = ["real_flux_lora", "real_hunyuan_lora", "real_wan_full", "real_flux_offload"]


def test_real_size_cases_dry_run(tmp_path):
    out = tmp_path / "real.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--only", ",".join(REAL),
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["checks"]) == REAL
    for name, c in report["checks"].items():
        assert c["status"] == "ok", (name, c)
        # rollout chunk = training micro-batch in every recipe: same shapes, same kernels, the ratio exactly 1
        assert c["first_ratio_dev"] == 0.0, name
        assert c["seconds_per_iteration"] > 0 and c["bare_model_s"] > 0 and c["overhead_ratio"] > 0
        assert c["peak_mem_gib"] > 0 and c["planner"]["peak_gib"] > 0 and set(c["planner"]["seconds"]) >= {"H100"}
        # the planner counted the model the bench trained: the same parameters (built from the same config)
        assert round(c["planner"]["params"]["total"] / 1e6, 2) == c["config"]["params_M"], name
    checks = report["checks"]
    assert checks["real_wan_full"]["config"]["fsdp"] and checks["real_flux_offload"]["config"]["fsdp"]
    assert not checks["real_flux_lora"]["config"]["fsdp"]
    # LoRA: the planner sees few trainable parameters; full fine-tuning: all of them
    lora, full = checks["real_flux_lora"]["planner"]["params"], checks["real_wan_full"]["planner"]["params"]
    assert 0 < lora["trainable"] < lora["total"] / 5 and full["trainable"] == full["total"]
