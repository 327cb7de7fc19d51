"""configs/algorithms/: every recipe loads and validates over its base and holds its algorithm's settings; the
successors' recipes hold the values of their released code, read here against tables of those values written out
from the released files (Flow-GRPO config/grpo.py, DiffusionNFT config/nft.py + config/base.py, MixGRPO's Flash
script).

Cheap on purpose (config validation and the planner's pass counts, no model is built): the planner's
projections of these recipes are run by bench/algorithm_recipes.py, which writes docs/algorithms.md's table."""

from pathlib import Path

import pytest

from fastvideo_grpo.config import load_config
from fastvideo_grpo.cli.plan import passes_per_iteration

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "configs" / "algorithms").glob("*.yaml") if not p.stem.startswith("sd3_"))
SD3_RECIPES = sorted((ROOT / "configs" / "algorithms").glob("sd3_flow_grpo_*.yaml"))
BASES = {"flux": "flux_hps.yaml", "hunyuan": "hunyuan_t2v_videoalign.yaml"}


def _check(name, cfg):
    g, s = cfg.grpo, cfg.sampling
    if "mixgrpo" in name:  # released: finetune_flux_grpo_MixGRPO(_Flash).sh
        assert g.sde_window.mode == "sliding" and g.tau == 1.0 and g.sde_window.size == 4 and s.eta == 0.7
        assert s.eta_form == "flow_grpo"  # --flow_grpo_sampling
        assert s.ode_solver == ("dpmpp_2m" if "flash" in name else "euler")
        if "flash" in name:  # dpm_apply_strategy post, dpm_post_compress_ratio 0.4, iters_per_group 20
            assert (s.dpm_apply, s.dpm_post_compress_ratio, g.sde_window.shift_every) == ("post", 0.4, 20)
        else:  # iters_per_group 25
            assert (s.dpm_apply, g.sde_window.shift_every) == ("all", 25)
    elif "flow_grpo" in name:
        assert s.eta_form == "flow_grpo" and s.eta > 0 and not g.shared_noise and g.kl_form == "flow_grpo"
        assert g.sde_window.mode == ("random" if "fast" in name else "off")
        if "fast" not in name:
            assert s.num_steps < s.eval_num_steps  # fewer steps for training rollouts than for evaluation
            # the released trainer's options (scripts/train_sd3.py)
            assert (g.advantage, g.advantage_std, g.advantage_eps) == ("group_global_std", "population", 1e-4)
            assert g.drop_zero_advantage and s.deterministic_last_step is False
            assert (g.num_updates_per_iteration, g.update_split) == (2, "samples")
    elif "diffusion_nft" in name:  # released config/nft.py + config/base.py
        assert g.objective == "nft" and s.eta == 0.0 and not g.shared_noise and s.ode_solver == "dpmpp_2m"
        assert (g.nft_beta, g.adv_clip_max, g.kl_coef) == (1.0, 5.0, 1e-4)
        assert g.objective_kwargs == {"weighting": "adaptive", "decay_type": 1}
        assert g.train_last_step and int(g.tau * s.num_steps + 1e-9) == int(s.num_steps * 0.99) == 9
        assert (g.advantage, g.advantage_std, g.advantage_eps) == ("group_global_std", "population", 1e-4)
    elif "grpo_guard" in name:
        assert g.objective == "grpo_guard" and s.eta_form == "flow_grpo" and g.kl_coef == 0.0
    elif "awm" in name:
        assert g.objective == "awm" and s.eta == 0.0 and not g.shared_noise
    elif "cps" in name:
        assert s.eta_form == "cps" and 0 < s.eta <= 1 and g.objective == "ppo_clip"
    elif "pref_grpo" in name:
        assert g.objective == "ppo_clip" and all(rc.name == "win_rate" for rc in cfg.rewards)
    elif "dgpo" in name:
        assert g.objective == "dgpo" and s.eta == 0.0 and not g.shared_noise and s.ode_solver == "dpmpp_2m"
    elif "tree_grpo" in name:
        assert s.rollout == "tree" and g.objective == "ppo_clip" and g.shared_noise and g.tau == 1.0
    elif "flow_dppo" in name:
        assert g.objective == "flow_dppo" and s.eta_form == "flow_grpo" and g.num_epochs >= 2
    else:
        raise AssertionError(f"{name}: no algorithm in the name")


def test_every_model_has_every_algorithm():
    names = {p.stem for p in RECIPES}
    algos = ["mixgrpo", "mixgrpo_flash", "flow_grpo", "flow_grpo_fast", "diffusion_nft", "grpo_guard", "awm", "cps",
             "pref_grpo", "dgpo", "tree_grpo", "flow_dppo"]
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
    full = cfg.grpo.prompts_per_iteration * cfg.grpo.group_size * cfg.sampling.num_steps
    if cfg.sampling.rollout == "tree":  # one forward per node and step: sum over steps of the nodes before it
        kw = cfg.sampling.rollout_kwargs
        factors = kw["branch_factor"] if isinstance(kw["branch_factor"], list) else [kw["branch_factor"]] * len(
            kw["branch_steps"])
        nodes = [1]
        for i in range(cfg.sampling.num_steps - 1):
            nodes.append(nodes[-1] * dict(zip(kw["branch_steps"], factors)).get(i, 1))
        assert p["forward_rollout"] == cfg.grpo.prompts_per_iteration * sum(nodes) < full
    elif "flash" in path.stem:  # the compressed post-window grid: fewer rollout forwards than MixGRPO's
        mix = passes_per_iteration(load_config(str(path).replace("_flash", "")))
        assert p["forward_rollout"] < mix["forward_rollout"] == full
    else:
        assert p["forward_rollout"] == full
    assert p["backward"] > 0 and p["forward_update"] >= p["backward"]


#: released config/grpo.py (yifan123/flow_grpo at ac4c86e; the same values at 54809b5), the SD3 recipes' values
#: written out by hand: base.py defaults overridden by compressibility() and the recipe function
RELEASED_FLOW_GRPO_SD3 = {
    "common": {
        "pretrained.model": "stabilityai/stable-diffusion-3.5-medium", "resolution": 512, "use_lora": True,
        "sample.num_steps": 10, "sample.eval_num_steps": 40, "sample.guidance_scale": 4.5,
        "sample.train_batch_size": 9, "sample.num_image_per_prompt": 24, "sample.noise_level": 0.7,
        "sample.global_std": True, "train.batch_size": 9, "train.timestep_fraction": 0.99, "train.cfg": True,
        "train.learning_rate": 3e-4, "train.adam_beta1": 0.9, "train.adam_beta2": 0.999,
        "train.adam_weight_decay": 1e-4, "train.adam_epsilon": 1e-8, "train.max_grad_norm": 1.0,
        "train.adv_clip_max": 5, "train.clip_range": 1e-4, "train.ema": True, "seed": 42,
        "prompts_per_epoch": 48, "gradient_updates_per_epoch": 2, "lora": (32, 64, "gaussian"),
    },
    "pickscore": {"train.beta": 0.01, "dataset": "dataset/pickscore", "reward_fn": "pickscore",
                  "sample.test_batch_size": 16},
    "geneval": {"train.beta": 0.04, "dataset": "dataset/geneval", "reward_fn": "geneval", "sample.test_batch_size": 14},
    "ocr": {"train.beta": 0.04, "dataset": "dataset/ocr", "reward_fn": "ocr", "sample.test_batch_size": 16},
}


@pytest.mark.parametrize("path", SD3_RECIPES, ids=lambda p: p.stem)
def test_sd3_flow_grpo_recipe_holds_the_released_values(path):
    task = path.stem.replace("sd3_flow_grpo_", "")
    want = dict(RELEASED_FLOW_GRPO_SD3["common"], **RELEASED_FLOW_GRPO_SD3[task])
    cfg = load_config(str(path))
    m, s, g, o = cfg.model.kwargs, cfg.sampling, cfg.grpo, cfg.optim
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    gpus = int(header.split("Assumes ")[1].split(" GPUs")[0])
    assert cfg.model.name == "sd3" and "stable-diffusion-3.5-medium" in m["model_path"]
    assert m["resolution"] == want["resolution"] and m["guidance_scale"] == want["sample.guidance_scale"]
    assert (m["lora_rank"], m["lora_alpha"], m["lora_init"]) == want["lora"] and want["use_lora"]
    assert m["sigma_grid"] == "scheduler"  # the SD3 pipeline's own grid (sd3_pipeline_with_logprob.py 121-127)
    assert (s.num_steps, s.eval_num_steps, s.eta) == (want["sample.num_steps"], want["sample.eval_num_steps"],
                                                     want["sample.noise_level"])
    assert s.eta_form == "flow_grpo" and s.deterministic_last_step is False and not g.shared_noise
    assert s.rollout_batch_size == want["sample.train_batch_size"] and g.micro_batch_size == want["train.batch_size"]
    assert g.group_size == want["sample.num_image_per_prompt"]
    assert g.prompts_per_iteration * gpus == want["prompts_per_epoch"]  # per rank x ranks = the released epoch
    trained = int(want["sample.num_steps"] * want["train.timestep_fraction"])  # the released count: 9
    assert passes_per_iteration(cfg)["trained_steps"] == trained
    assert (g.clip_range, g.adv_clip_max, g.kl_coef, g.kl_form) == (
        want["train.clip_range"], want["train.adv_clip_max"], want["train.beta"], "flow_grpo")
    assert (g.advantage, g.advantage_std, g.advantage_eps) == ("group_global_std", "population", 1e-4)
    assert want["sample.global_std"] and g.drop_zero_advantage
    assert g.train_guidance == ("detach_uncond" if want["train.cfg"] else "none")
    assert (g.num_updates_per_iteration, g.update_split) == (want["gradient_updates_per_epoch"], "samples")
    assert (o.lr, o.betas, o.weight_decay, o.eps, o.max_grad_norm) == (
        want["train.learning_rate"], [want["train.adam_beta1"], want["train.adam_beta2"]],
        want["train.adam_weight_decay"], want["train.adam_epsilon"], want["train.max_grad_norm"])
    assert cfg.train.seed == want["seed"] and (cfg.train.ema_decay > 0) == want["train.ema"]
    assert cfg.eval.batch_size == want["sample.test_batch_size"]
    assert want["dataset"] in header  # data prep reads the released prompt-set folder
    reward = cfg.rewards[0]
    assert len(cfg.rewards) == 1 and want["reward_fn"] in (reward.name, reward.kwargs.get("reward"))
