"""RunConfig: YAML + --section.field overrides, rejection of bad configs, the recipes' paper settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fastvideo_grpo.config import RunConfig, load_config, save_config, to_dict
from fastvideo_grpo.train import parse_args

ROOT = Path(__file__).resolve().parents[2]

# recipe -> (GPUs the file assumes, sampling steps, CFG model)
RECIPES = {
    "sd_hps.yaml": (8, 50, True),
    "sd_hps_clip.yaml": (8, 50, True),
    "flux_hps.yaml": (32, 16, False),
    "flux_hps_clip.yaml": (32, 16, False),
    "hunyuan_t2i_hps.yaml": (32, 25, False),
    "hunyuan_t2v_videoalign.yaml": (32, 25, False),
    "hunyuan_i2v_mq.yaml": (32, 25, True),
    "wan_t2v.yaml": (8, 25, True),
    "sd3_hps.yaml": (8, 25, True),
}


def _write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_overrides_are_typed_and_reach_nested_and_list_fields(tmp_path):
    cfg = load_config(str(ROOT / "configs/sd_hps.yaml"), [
        "--grpo.tau=0.5", "--train.seed", "3", "--model.kwargs.resolution=256", "--rewards.0.weight=0.5",
        "--data.eval_fraction=0.1", "--eval.rewards=[{name: clip_score, kwargs: {model_path: x}}]",
        "--parallel.sp=2", "--log.tensorboard=false"])
    assert cfg.grpo.tau == 0.5 and cfg.train.seed == 3 and cfg.model.kwargs["resolution"] == 256
    assert cfg.model.kwargs["model_path"] == "ckpts/stable-diffusion-v1-4"  # merged, not replaced
    assert cfg.rewards[0].weight == 0.5 and cfg.rewards[0].name == "hps"
    assert cfg.eval.rewards[0].name == "clip_score" and cfg.parallel.sp == 2 and cfg.log.tensorboard is False
    assert cfg.data.eval_fraction == 0.1


def test_script_flags_map_to_config_fields():
    _, cfg = parse_args(["--resume", "latest", "--output-dir", "outputs/x", "--no-progress", "--grpo.group_size=4"],
                        default_config=str(ROOT / "configs/flux_hps.yaml"))
    assert cfg.train.resume == "latest" and cfg.train.output_dir == "outputs/x" and cfg.log.progress is False
    assert cfg.grpo.group_size == 4 and cfg.model.name == "flux"


@pytest.mark.parametrize("data,match", [
    ({"grpo": {"group_sise": 4}}, r"unknown config key\(s\) \['group_sise'\] in section 'grpo'"),
    ({"trian": {}}, r"unknown config key\(s\) \['trian'\]"),
    ({"data": {"manifets": "x"}}, r"unknown config key\(s\) \['manifets'\] in section 'data'"),
    ({"grpo": {"group_size": "12"}}, r"'grpo.group_size' expects <class 'int'>"),
    ({"optim": {"lr": "fast"}}, r"'optim.lr' expects"),
    ({"train": {"save_every": 2.5}}, r"'train.save_every' expects"),
    ({"grpo": {"tau": 0.0}}, r"grpo.tau must be in \(0, 1\]"),
    ({"grpo": {"tau": 1.5}}, r"grpo.tau must be in \(0, 1\]"),
    ({"grpo": {"group_size": 12, "prompts_per_iteration": 1, "micro_batch_size": 5}},
     r"micro_batch_size=5 must divide the rank batch group_size \* prompts_per_iteration = 12"),
    ({"grpo": {"group_size": 1}}, r"group_size must be >= 2"),
    ({"grpo": {"best_of_n_k": 7, "group_size": 12}}, r"best_of_n_k must be in \[1, group_size // 2\]"),
    ({"data": {"eval_fraction": 1.0}}, r"data.eval_fraction must be in \[0, 1\)"),
    ({"rewards": []}, r"at least one reward"),
    ({"rewards": [{"name": "hps", "wieght": 1}]}, r"unknown config key\(s\) \['wieght'\] in section 'rewards\[0\]'"),
    ({"train": {"save_every": -1}}, r"train.save_every must be >= 0"),
    ({"train": {"autocast": "fp16"}}, r"train.autocast must be 'bf16' or 'none'.*gradient scaler"),
    ({"grpo": {"advantage_std": "unbiased"}}, r"grpo.advantage_std must be 'bessel' or 'population'"),
    ({"grpo": {"best_of_n_advantages": "top"}}, r"grpo.best_of_n_advantages must be 'group' or 'selected'"),
    ({"sampling": {"num_steps": 10}, "grpo": {"timestep_window": [9, 10]}}, r"only the last step.*train_last_step"),
    ({"sampling": {"num_steps": 1}}, r"num_steps must be >= 2 while the last step is not trained"),
    ({"sampling": {"deterministic_last_step": True}, "grpo": {"train_last_step": True}},
     r"deterministic_last_step.*train_last_step"),
    ({"sampling": {"num_steps": 4, "eta_schedule": [0.3, 0.0, 0.3, 0.0]}}, r"eta_schedule is 0 at steps \[1\]"),
])
def test_bad_configs_are_rejected(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        load_config(_write(tmp_path, data))


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["--grpo.nope=1"])
    with pytest.raises(ValueError, match=r"expected --section.field=value"):
        load_config(None, ["grpo.tau=0.5"])
    with pytest.raises(FileNotFoundError, match="config file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(str(ROOT / "configs/hunyuan_t2v_videoalign.yaml"), ["--grpo.group_size=6"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_hold_the_paper_settings(name):
    gpus, steps, cfg_model = RECIPES[name]
    text = (ROOT / "configs" / name).read_text()
    cfg: RunConfig = load_config(str(ROOT / "configs" / name))
    assert f"Assumes {gpus} GPUs" in text or f"assumes {gpus} GPUs" in text
    dp = gpus // cfg.parallel.sp
    assert cfg.grpo.prompts_per_iteration * dp == 32  # paper: 32 prompts per iteration, global
    assert cfg.optim.lr == 1e-5 and cfg.optim.max_grad_norm == 1.0
    g = cfg.grpo
    assert g.group_size == 12 and g.clip_range == 1e-4 and g.tau == 0.6 and cfg.sampling.eta == 0.3
    assert cfg.sampling.num_steps == steps
    assert g.num_updates_per_iteration == (1 if cfg_model else 4)
    bs = g.group_size * g.prompts_per_iteration
    assert not g.micro_batch_size or bs % g.micro_batch_size == 0
    assert cfg.data.manifest and cfg.model.kwargs.get("model_path")
    if "hunyuan_t2v" in name or "i2v" in name:
        assert cfg.model.kwargs["resolution"] == 480 and cfg.model.kwargs["num_frames"] == 53


@pytest.mark.parametrize("override,match", [
    ("--optim.max_grad_norm=-1", r"optim.max_grad_norm must be a finite number > 0.*reverses every update"),
    ("--optim.max_grad_norm=0", r"optim.max_grad_norm must be a finite number > 0.*0 freezes the weights"),
    ("--grpo.kl_coef=-0.1", r"grpo.kl_coef must be >= 0"),
    ("--train.keep_last_checkpoints=-2", r"train.keep_last_checkpoints must be >= 0"),
    ("--sampling.eta=.nan", r"sampling.eta must be a finite number >= 0"),
    ("--sampling.eta=.inf", r"sampling.eta must be a finite number >= 0"),
    ("--rewards.3.weight=0.5", r"override '--rewards.3.weight': rewards has 1 entry \(indices 0..0\)"),
])
def test_harmful_settings_are_refused(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_empty_and_broken_yaml_name_the_file_and_line(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ValueError, match=r"empty.yaml is empty"):
        load_config(str(empty))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  name: toy\ngrpo: {group_size: 4\n")
    with pytest.raises(ValueError, match=r"broken.yaml is not valid YAML at line \d+, column \d+"):
        load_config(str(broken))


def test_evaluate_cli_refuses_bad_counts():
    from fastvideo_grpo.evaluate_cli import main

    with pytest.raises(ValueError, match="--samples-per-prompt must be >= 1"):
        main(["base", "--samples-per-prompt", "-1"])
