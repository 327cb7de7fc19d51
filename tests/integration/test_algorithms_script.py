"""bench/algorithms.py end to end on a tiny budget: calibration, equal-pass planning, runs, JSON, table, plots.

Tiny demo config: 2 prompts x G=4 = B 8 samples, 10 steps, steps 0-4 trained. Per iteration, by hand:
DanceGRPO (the demo) rolls out 8 x 10 = 80 forwards and trains 8 x 5 = 40 forward + backward passes, 160
in all; MixGRPO's 2-step window trains 8 x 2 = 16: 112. A budget of 2 DanceGRPO iterations (320 passes)
gives MixGRPO round(320 / 112) = 3 iterations."""

import json

from fastvideo_grpo.config import load_config, save_config
from fastvideo_grpo.training.metrics import read_jsonl
from support.scripts import ROOT, TINY_TOY_PRETRAIN, load_script


def test_algorithm_comparison_on_a_tiny_budget(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo caches its pretrained model under ./outputs
    cfg = load_config(str(ROOT / "configs" / "toy_cpu.yaml"), [
        "--train.num_eval_prompts=2", "--eval.samples_per_prompt=2", "--grpo.prompts_per_iteration=2",
        "--grpo.group_size=4", *TINY_TOY_PRETRAIN,
    ])
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    out = tmp_path / "alg"
    report = load_script("bench", "algorithms").main(["--config", str(config), "--out", str(out), "--iterations", "2",
                                         "--evals", "1", "--seeds", "0", "--only", "dance_grpo,mixgrpo"])
    assert json.loads((out / "algorithms.json").read_text()) == json.loads(json.dumps(report))
    assert report["budget_passes"] == 320
    dance, mix = report["algorithms"]["dance_grpo"], report["algorithms"]["mixgrpo"]
    assert dance["passes_per_iteration"] == {**dance["passes_per_iteration"], "forward": 120, "backward": 40,
                                             "forward_rollout": 80}
    assert (mix["passes_per_iteration"]["forward"], mix["passes_per_iteration"]["backward"]) == (96, 16)
    assert (dance["iterations"], mix["iterations"]) == (2, 3)
    for name, a in report["algorithms"].items():
        run = a["runs"]["0"]
        c = run["curve"]
        per = a["passes_per_iteration"]
        assert run["iterations"] == a["iterations"] == c[-1]["iteration"]
        assert c[0]["iteration"] == 0 and c[0]["forward"] == 0 == c[0]["train_s"]
        # cumulative counts at each evaluation = iterations so far x the calibrated per-iteration counts
        assert all(p["forward"] == p["iteration"] * per["forward"] and p["backward"] == p["iteration"] * per["backward"]
                   for p in c)
        rows = [r for r in read_jsonl(out / name / "seed0" / "metrics.jsonl") if "passes/forward" in r]
        assert len(rows) == a["iterations"] and sum(r["passes/backward"] for r in rows) == c[-1]["backward"]
        assert 0 <= c[-1]["success_rate"] <= 1 and c[-1]["background"] >= 0
    table = (out / "algorithms.md").read_text()
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| dance") or
            line.startswith("| mix")] == ["| dance_grpo", "| mixgrpo"]
    assert f"{mix['final_mean']['reward']:.3f}" in table
    for png in ("reward_vs_passes.png", "reward_vs_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
