"""configs/algorithms/: every recipe loads and validates over its base and holds its algorithm's settings.

Cheap on purpose (config validation and the planner's pass counts, no model is built): the planner's
projections of these recipes are run by bench/algorithm_recipes.py, which writes docs/algorithms.md's table."""

from pathlib import Path

import pytest

from fastvideo_grpo.config import load_config
from fastvideo_grpo.cli.plan import passes_per_iteration

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs" / "algorithms").glob("*.yaml"))
BASES = {"flux": "flux_hps.yaml", "hunyuan": "hunyuan_t2v_videoalign.yaml"}


def _check(name, cfg):
    g, s = cfg.grpo, cfg.sampling
    if "mixgrpo" in name:
        assert g.sde_window.mode == "sliding" and g.tau == 1.0
        assert s.ode_solver == ("dpmpp_2m" if "flash" in name else "euler")
    elif "flow_grpo" in name:
        assert s.eta_form == "flow_grpo" and s.eta > 0 and not g.shared_noise
        assert g.sde_window.mode == ("random" if "fast" in name else "off")
        if "fast" not in name:
            assert s.num_steps < s.eval_num_steps  # fewer steps for training rollouts than for evaluation
    elif "diffusion_nft" in name:
        assert g.objective == "nft" and s.eta == 0.0 and not g.shared_noise and g.kl_coef == 0.0
    elif "grpo_guard" in name:
        assert g.objective == "grpo_guard" and s.eta_form == "flow_grpo" and g.kl_coef == 0.0
    elif "awm" in name:
        assert g.objective == "awm" and s.eta == 0.0 and not g.shared_noise
    elif "cps" in name:
        assert s.eta_form == "cps" and 0 < s.eta <= 1 and g.objective == "ppo_clip"
    elif "pref_grpo" in name:
        assert g.objective == "ppo_clip" and all(rc.name == "win_rate" for rc in cfg.rewards)
    else:
        raise AssertionError(f"{name}: no algorithm in the name")


def test_every_model_has_every_algorithm():
    names = {p.stem for p in RECIPES}
    algos = ["mixgrpo", "mixgrpo_flash", "flow_grpo", "flow_grpo_fast", "diffusion_nft", "grpo_guard", "awm", "cps",
             "pref_grpo"]
    assert names == {f"{m}_{a}" for m in BASES for a in algos}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_algorithm_recipe_validates_over_its_base(path):
    cfg = load_config(str(path))
    base = load_config(str(ROOT / "configs" / BASES[path.stem.split("_")[0]]))
    _check(path.stem, cfg)
    assert cfg.model == base.model and cfg.data == base.data  # only the algorithm changes
    if "pref_grpo" in path.stem:  # the reward becomes each base reward's win rate; evaluation scores the base rewards
        assert [(rc.kwargs["judge"], {k: v for k, v in rc.kwargs.items() if k not in ("judge", "judge_batch_size")})
                for rc in cfg.rewards] == [(rc.name, rc.kwargs) for rc in base.rewards]
        assert [(rc.key, rc.name, rc.kwargs) for rc in cfg.eval.rewards] == [(rc.key, rc.name, rc.kwargs)
                                                                            for rc in base.rewards]
    else:
        assert cfg.rewards == base.rewards
    assert cfg.train.output_dir != base.train.output_dir  # runs do not collide with the base recipe's
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    assert "Assumes 32 GPUs" in header
    p = passes_per_iteration(cfg)
    assert p["forward_rollout"] == cfg.grpo.prompts_per_iteration * cfg.grpo.group_size * cfg.sampling.num_steps
    assert p["backward"] > 0 and p["forward_update"] >= p["backward"]
