"""Each algorithm option (docs/algorithms.md) for 2 iterations through the real FLUX train script on a tiny
random-init FLUX folder: MixGRPO-Flash (sliding window, Euler before it, DPM-Solver++ on a compressed grid after
it), Flow-GRPO (its noise level, fewer training than evaluation steps, the released trainer's advantages,
zero-advantage filtering, update split and KL form, the reference a copy of the weights), Flow-GRPO-Fast (random
1-2 step window), DiffusionNFT (EMA old policy, adaptive weighting, KL; its old policy checkpointed), DGPO (ODE
rollouts, the frozen reference), tree rollouts (branching twice into 2, per-node advantages) and Flow-DPPO (two
epochs over each rollout)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from support.tiny_runs import ROOT, run_overrides, train_script  # noqa: E402

OPTIONS = {
    "mixgrpo_flash": {"sampling.num_steps": 5, "sampling.eval_num_steps": 5, "grpo.tau": 1.0,
                      "grpo.sde_window": "{mode: sliding, size: 2, stride: 1, shift_every: 1}",
                      "sampling.ode_solver": "dpmpp_2m", "sampling.dpm_apply": "post",
                      "sampling.dpm_post_compress_ratio": 0.4},
    "flow_grpo": {"sampling.num_steps": 3, "sampling.eval_num_steps": 5, "sampling.eta_form": "flow_grpo",
                  "sampling.eta": 0.7, "sampling.deterministic_last_step": "false",
                  "grpo.advantage": "group_global_std", "grpo.advantage_std": "population",
                  "grpo.drop_zero_advantage": "true", "grpo.update_split": "samples", "grpo.kl_coef": 0.1,
                  "grpo.kl_form": "flow_grpo"},
    "flow_grpo_fast": {"sampling.num_steps": 5, "sampling.eval_num_steps": 5, "sampling.eta_form": "flow_grpo",
                       "sampling.eta": 0.7, "grpo.tau": 1.0, "grpo.sde_window": "{mode: random, size: 1}"},
    "diffusion_nft": {"sampling.num_steps": 3, "sampling.eval_num_steps": 3, "grpo.objective": "nft",
                      "grpo.tau": 1.0, "sampling.eta": 0.0, "grpo.shared_noise": "false",
                      "sampling.ode_solver": "dpmpp_2m", "grpo.kl_coef": 1e-4},
    "dgpo": {"sampling.num_steps": 3, "sampling.eval_num_steps": 3, "grpo.objective": "dgpo", "grpo.tau": 1.0,
             "sampling.eta": 0.0, "grpo.shared_noise": "false", "grpo.clip_range": 0.01, "grpo.kl_coef": 0.01},
    "tree_grpo": {"sampling.num_steps": 4, "sampling.eval_num_steps": 4, "sampling.rollout": "tree",
                  "sampling.rollout_kwargs": "{branch_steps: [0, 1], branch_factor: 2}", "grpo.group_size": 4,
                  "grpo.tau": 1.0},
    "flow_dppo": {"sampling.num_steps": 3, "sampling.eval_num_steps": 3, "grpo.objective": "flow_dppo",
                  "grpo.num_epochs": 2, "grpo.tau": 1.0},
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_algorithm_option_two_iterations_through_the_flux_script(tiny, tmp_path, monkeypatch, option):
    import fastvideo_grpo.training.evaluate as evaluate  # runner.run imports distributed_evaluate from it when run

    eval_steps = []
    orig = evaluate.distributed_evaluate
    monkeypatch.setattr(evaluate, "distributed_evaluate",
                        lambda ad, held, fns, n, *a, **k: eval_steps.append(n) or orig(ad, held, fns, n, *a, **k))
    folder, kw, manifest = tiny("flux")
    out = tmp_path / "run"
    extra = OPTIONS[option]
    summary = train_script("train_flux_grpo").main(
        ["--config", str(ROOT / "configs/flux_hps.yaml")] + run_overrides(folder, kw, manifest, out, **extra))
    assert summary["iteration"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(r["train/grad_norm"] > 0 for r in train)
    assert eval_steps and set(eval_steps) == {extra["sampling.eval_num_steps"]}  # evaluation's own step count
    if option == "mixgrpo_flash":  # the window moved by one step after the first iteration
        assert [(r["sde_window/start"], r["sde_window/end"]) for r in train] == [(0, 2), (1, 3)]
        # 5 steps, the window ending at step 1 then 2: int((5 - 1) * 0.4) = 1 -> 2 points, int((5 - 2) * 0.4) = 1
        # -> 2: one step after the window instead of 3 and 2 (per sample; 2 samples)
        assert [r["passes/forward_rollout"] for r in train] == [2 * 3, 2 * 4]
    if option == "flow_grpo_fast":
        assert all(r["sde_window/end"] - r["sde_window/start"] == 1 for r in train)
    if option == "diffusion_nft":
        assert all("train/nft_positive" in r and "train/clipfrac" not in r for r in train)
        assert train[-1]["train/nft_old_decay"] == pytest.approx(0.001 * 2 * train[-1]["train/num_updates"])
    elif option == "dgpo":
        assert all(r["train/kl"] > 0 and 0 < r["train/dgpo_group_weight"] < 1 for r in train)
    elif option == "flow_dppo":  # 2 kept steps x 2 samples = 4 transitions, 2 epochs of forward + backward each
        # an epoch is min(num_updates_per_iteration 4, 2 kept steps) = 2 optimiser steps
        assert all(r["train/num_updates"] == 2 * 2 and "train/masked_frac" in r for r in train)
        assert all((r["passes/forward_update"], r["passes/backward"]) == (4 * 2, 4 * 2) for r in train)
    elif option == "tree_grpo":  # 1 + 2 + 4 + 4 forwards per group; edges 2 (step 0) + 4 (step 1) + 4 (step 2)
        assert all((r["passes/forward_rollout"], r["passes/backward"]) == (11, 10) for r in train)
    else:
        assert all("train/clipfrac" in r for r in train)
    if option == "flow_grpo":
        assert all("train/kept_samples" in r for r in train) and train[-1]["train/kl"] >= 0
