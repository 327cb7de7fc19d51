"""The objectives and samplers of issue 31 for 2 iterations through the real FLUX train script on a tiny random-init
FLUX folder: GRPO-Guard (over Flow-GRPO's noise level), AWM (ODE rollouts), CPS sampling (with PPO-clip) and
Pref-GRPO's group-level win-rate reward."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from support.tiny_runs import ROOT, run_overrides, train_script  # noqa: E402

OPTIONS = {
    "grpo_guard": {"sampling.num_steps": 3, "sampling.eta_form": "flow_grpo", "sampling.eta": 0.7,
                   "grpo.objective": "grpo_guard", "grpo.clip_range": 1e-3},
    "awm": {"sampling.num_steps": 3, "grpo.objective": "awm", "grpo.tau": 1.0, "sampling.eta": 0.0,
            "grpo.shared_noise": "false", "grpo.objective_kwargs": "{weighting: ghuber, advantage_max: 1.0}"},
    "cps": {"sampling.num_steps": 3, "sampling.eta_form": "cps", "sampling.eta": 0.8},
    "win_rate": {"sampling.num_steps": 3, "sampling.eta": 0.7,
                 "rewards": "[{name: win_rate, key: win, kwargs: {judge: test_brightness}}]",
                 "eval.rewards": "[{name: test_brightness, key: bright}]"},
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_objective_or_sampler_two_iterations_through_the_flux_script(tiny, tmp_path, monkeypatch, option):
    from fastvideo_grpo import sde

    forms = set()
    step = sde.FlowSchedule.step
    monkeypatch.setattr(sde.FlowSchedule, "step", lambda self, *a, **k: forms.add(self.form) or step(self, *a, **k))
    folder, kw, manifest = tiny("flux")
    out = tmp_path / "run"
    summary = train_script("train_flux_grpo").main(
        ["--config", str(ROOT / "configs/flux_hps.yaml")] + run_overrides(folder, kw, manifest, out, **OPTIONS[option]))
    assert summary["iteration"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(r["train/grad_norm"] > 0 for r in train)
    evals = [json.loads(p.read_text()) for p in sorted((out / "eval").glob("iter_*.json"))]
    assert evals and all(set(e["mean"]) == {"bright"} for e in evals)  # held-out scores: the pointwise reward
    if option == "grpo_guard":  # the normalised ratio is exactly 1 before the first optimiser step
        assert all("train/mean_shift" in r and r["train/first_ratio_dev"] == 0.0 for r in train)
    if option == "awm":
        assert all(r["train/awm_matching_loss"] > 0 and "train/approx_kl" not in r for r in train)
        assert all(r["passes/forward_update"] == r["passes/backward"] for r in train)  # no extra forward
    assert forms == ({"sde", "cps"} if option == "cps" else {"sde"})  # evaluation samples with its own ODE schedule
    if option == "win_rate":  # the win rates of a group of 2 are {0, 1} or {1/2, 1/2}: mean 1/2
        assert all(r["reward/win/mean"] == pytest.approx(0.5) for r in train)
