"""bench/iteration.py in --quick mode prints one JSON line with finite numbers (timings are not asserted),
and the training-window option keeps trained steps inside the window where eta > 0; its memory sweep and
bench/vae_tiling.py run and report what they measure; bench/reward_server_load.py answers every request."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvideo_grpo.algorithms import grpo
from fastvideo_grpo.config import load_config

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[2]


def _finite_numbers(d, where=""):
    for k, v in d.items():
        if isinstance(v, dict):
            _finite_numbers(v, f"{where}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            assert math.isfinite(v), f"{where}{k} = {v}"


def test_quick_bench_prints_json_with_finite_fields():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "iteration.py"), "--json", "--quick"],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, p.stdout[-2000:]
    out = json.loads(lines[0])
    assert {c["case"] for c in out["cases"]} == {"flux_tiny", "hunyuan_tiny"}
    for case in out["cases"]:
        assert "error" not in case, case.get("error")
        it, bare = case["iteration_s"], case["bare_s"]
        # the phases partition the iteration; decode and optimiser time are parts of their phases
        assert it["rollout"] + it["reward"] + it["train"] == pytest.approx(it["total"], rel=1e-9)
        assert bare["rollout"] + bare["train"] == pytest.approx(bare["total"], rel=1e-9)
        assert 0 < bare["decode"] < bare["rollout"] and 0 < bare["optim"] < bare["train"]
        assert case["overhead_ratio"]["overall"] == pytest.approx(it["total"] / bare["total"], rel=1e-9)
        assert set(case["overhead_ratio"]) >= {"rollout", "train", "overall", "overall_wall"}
        assert case["samples_per_s"] > 0 and case["peak_mem_mib"] > 0
        assert case["config"]["params_M"] > 0 and case["config"]["batch"] > 0
        _finite_numbers(case)


def _one_json_line(cmd):
    p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, p.stdout[-2000:]
    return json.loads(lines[0])


def test_memory_sweep_reports_time_and_peak_per_phase():
    out = _one_json_line([str(ROOT / "bench" / "iteration.py"), "--memory", "--quick",
                          "--cases", "whole_batch,video_recipe"])
    assert set(out["memory"]) == {"whole_batch", "video_recipe"}
    for name, r in out["memory"].items():
        assert "error" not in r, r.get("error")
        assert set(r["phase_peak_mem_mib"]) == {"rollout_forward", "decode", "reward", "train"}
        assert all(v > 0 for v in r["phase_peak_mem_mib"].values())
        assert r["iteration_s"]["decode"] > 0 and r["iteration_s"]["total"] >= r["iteration_s"]["decode"]
        _finite_numbers(r)
    # rollout in chunks of the training micro-batch (1): re-scoring sees the rollout's kernel shapes
    assert out["memory"]["video_recipe"]["first_ratio_dev_max"] == 0.0


def test_vae_tiling_bench_measures_pixel_differences():
    out = _one_json_line([str(ROOT / "bench" / "vae_tiling.py"), "--quick"])
    kinds = {c["kind"] for c in out["cases"]}
    assert kinds == {"autoencoder_kl", "hunyuan_video"}
    for c in out["cases"]:
        assert c["sliced"]["max_abs_diff"] < 1e-3  # same per-sample decode, up to batch-size rounding
        assert c["tiled"]["max_abs_diff"] > 1e-3  # the frame is larger than a tile: tiling ran
        assert 0 <= c["tiled"]["share_over_1_of_255"] <= 1
        _finite_numbers(c)


def test_window_with_eta_schedule_keeps_only_stochastic_steps():
    from fastvideo_grpo.algorithms.objectives import build_objective

    cfg = load_config(None, ["--sampling.num_steps=6", "--grpo.timestep_window=[1, 4]",
                             "--sampling.eta_schedule=[0.0, 0.3, 0.3, 0.3, 0.0, 0.0]", "--grpo.tau=1.0"])
    keep = grpo.subsample_timesteps(6, cfg.grpo.tau, 8, torch.Generator().manual_seed(0),
                                    tuple(cfg.grpo.timestep_window))
    assert keep.shape == (8, 3) and keep.min() >= 1 and keep.max() <= 3
    eta = torch.tensor(cfg.eta)
    assert (eta[keep] > 0).all()
    with pytest.raises(ValueError, match="have eta = 0"):
        build_objective(load_config(None, ["--sampling.num_steps=6",
                                           "--sampling.eta_schedule=[0.3, 0.3, 0.3, 0.0, 0.0, 0.0]"]))
    with pytest.raises(ValueError, match="timestep_window"):
        build_objective(load_config(None, ["--sampling.num_steps=6", "--grpo.timestep_window=[2, 9]"]))


def test_reward_server_load_bench_answers_every_request():
    out = _one_json_line([str(ROOT / "bench" / "reward_server_load.py"), "--clients", "2", "--requests", "2",
                          "--batch", "2", "--size", "8"])
    assert (out["requests"], out["answered"], out["mismatches"], out["errors"]) == (4, 4, 0, 0)
    assert out["images_per_s"] > 0 and out["p50_ms"] <= out["p99_ms"] <= out["max_ms"]
    _finite_numbers({k: v for k, v in out.items() if k != "first_error"})
