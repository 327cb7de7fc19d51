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
    else:
        raise AssertionError(f"{name}: no algorithm in the name")


def test_every_model_has_every_algorithm():
    names = {p.stem for p in RECIPES}
    algos = ["mixgrpo", "mixgrpo_flash", "flow_grpo", "flow_grpo_fast", "diffusion_nft"]
    assert names == {f"{m}_{a}" for m in BASES for a in algos}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_algorithm_recipe_validates_over_its_base(path):
    cfg = load_config(str(path))
    base = load_config(str(ROOT / "configs" / BASES[path.stem.split("_")[0]]))
    _check(path.stem, cfg)
    assert cfg.model == base.model and cfg.rewards == base.rewards and cfg.data == base.data  # only the algorithm changes
    assert cfg.train.output_dir != base.train.output_dir  # runs do not collide with the base recipe's
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    assert "Assumes 32 GPUs" in header
    p = passes_per_iteration(cfg)
    assert p["forward_rollout"] == cfg.grpo.prompts_per_iteration * cfg.grpo.group_size * cfg.sampling.num_steps
    assert p["backward"] > 0 and p["forward_update"] >= p["backward"]
