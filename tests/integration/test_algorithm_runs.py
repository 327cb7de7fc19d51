"""Each algorithm option (docs/algorithms.md) for 2 iterations through the real FLUX train script on a tiny
random-init FLUX folder: MixGRPO (sliding window + DPM-Solver++ outside it), Flow-GRPO (its noise level,
fewer training than evaluation steps), Flow-GRPO-Fast (random 1-2 step window) and DiffusionNFT."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from support.tiny_runs import ROOT, run_overrides, train_script  # noqa: E402

OPTIONS = {
    "mixgrpo_flash": {"sampling.num_steps": 5, "sampling.eval_num_steps": 5, "grpo.tau": 1.0,
                      "grpo.sde_window": "{mode: sliding, size: 2, stride: 1, shift_every: 1}",
                      "sampling.ode_solver": "dpmpp_2m"},
    "flow_grpo": {"sampling.num_steps": 3, "sampling.eval_num_steps": 5, "sampling.eta_form": "flow_grpo",
                  "sampling.eta": 0.7},
    "flow_grpo_fast": {"sampling.num_steps": 5, "sampling.eval_num_steps": 5, "sampling.eta_form": "flow_grpo",
                       "sampling.eta": 0.7, "grpo.tau": 1.0, "grpo.sde_window": "{mode: random, size: 1}"},
    "diffusion_nft": {"sampling.num_steps": 3, "sampling.eval_num_steps": 3, "grpo.objective": "nft",
                      "grpo.tau": 1.0, "sampling.eta": 0.0, "grpo.shared_noise": "false"},
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
    if option == "flow_grpo_fast":
        assert all(r["sde_window/end"] - r["sde_window/start"] == 1 for r in train)
    if option == "diffusion_nft":
        assert all("train/nft_positive_mse" in r and "train/clipfrac" not in r for r in train)
    else:
        assert all("train/clipfrac" in r for r in train)
