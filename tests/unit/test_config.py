"""RunConfig: YAML + --section.field overrides, rejection of bad configs, the recipes' paper settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fastvideo_grpo.config import RunConfig, load_config, save_config, to_dict
from fastvideo_grpo.cli.train import parse_args

ROOT = Path(__file__).resolve().parents[2]

# recipe -> what it must hold, and where each value comes from (docs/fidelity.md). "paper": docs/method.md section 5;
# "released": the authors' scripts (scripts/finetune/*.sh, fastvideo/config_sd/*.py). K = trained steps per sample.
PAPER = dict(lr=1e-5, max_grad_norm=1.0, clip_range=1e-4, group_size=12, prompts_global=32)
FF = dict(gpus=8, tau=1.0, K=1, updates=2, group_size=16, prompts_global=48, reward="pickscore", paper_updates=False)
RECIPES = {
    # SD: DDIM eta 1.0 and tau 1.0 as released (the paper's tau 0.6 is for runs without CFG); G 12, 1 update: paper
    "sd_hps.yaml": dict(gpus=8, steps=50, cfg=True, eta=1.0, tau=1.0, K=49, updates=1),
    "sd_hps_clip.yaml": dict(gpus=8, steps=50, cfg=True, eta=1.0, tau=1.0, K=49, updates=1),
    # FLUX: 16 steps as released (paper 25: stated in the header)
    "flux_hps.yaml": dict(gpus=32, steps=16, cfg=False, eta=0.3, tau=0.6, K=9, updates=4),
    "flux_hps_clip.yaml": dict(gpus=32, steps=16, cfg=False, eta=0.3, tau=0.6, K=9, updates=4),
    "hunyuan_t2i_hps.yaml": dict(gpus=32, steps=25, cfg=False, eta=0.3, tau=0.6, K=14, updates=4),
    "hunyuan_t2v_videoalign.yaml": dict(gpus=32, steps=25, cfg=False, eta=0.3, tau=0.6, K=14, updates=4,
                                        size=(480, 480), frames=53),
    # SkyReels I2V: the released script's shift 7, CFG 5.0, 16 steps, 400 x 640
    "hunyuan_i2v_mq.yaml": dict(gpus=32, steps=16, cfg=True, eta=0.3, tau=0.6, K=9, updates=1, size=(400, 640),
                                frames=53, shift=7.0, cfg_scale=("true_cfg_scale", 5.0)),
    "wan_t2v.yaml": dict(gpus=8, steps=25, cfg=True, eta=0.3, tau=0.6, K=14, updates=1),
    # the released Wan recipe: 512 x 512, one frame, HPS, 20 steps, CFG 5.0, shift 3, 16 prompts per iteration
    "wan_t2i_hps.yaml": dict(gpus=8, steps=20, cfg=True, eta=0.3, tau=0.6, K=11, updates=1, size=(512, 512),
                             frames=1, shift=3.0, cfg_scale=("guidance_scale", 5.0), prompts_global=16, reward="hps"),
    "sd3_hps.yaml": dict(gpus=8, steps=25, cfg=True, eta=0.3, tau=0.6, K=14, updates=1),
    # the released Qwen-Image recipe: 720 x 720, 20 steps, shift 3, no CFG, 16 prompts per iteration, 2 updates
    "qwen_image_hps.yaml": dict(gpus=8, steps=20, cfg=False, eta=0.3, tau=0.6, K=11, updates=2, shift=3.0,
                                cfg_scale=("true_cfg_scale", 1.0), prompts_global=16, reward="hps"),
    # the released Qwen-Image-Edit recipe: 512 x 512 edits, G 8, selective checkpointing 1.0, otherwise as Qwen-Image
    "qwen_image_edit_hps.yaml": dict(gpus=8, steps=20, cfg=False, eta=0.3, tau=0.6, K=11, updates=2, shift=3.0,
                                     cfg_scale=("true_cfg_scale", 1.0), prompts_global=16, reward="hps", group_size=8),
    # Wan 2.2 A14B: the paper's video setting with Wan's shift and CFG; K = the high-noise expert's 16 steps x 0.6
    "wan22_a14b_t2v.yaml": dict(gpus=32, steps=25, cfg=True, eta=0.3, tau=0.6, K=9, updates=1, size=(480, 480),
                                frames=53, shift=12.0, cfg_scale=("guidance_scale", 4.0)),
    # Wan 2.2 TI2V-5B: verl-omni's DanceGRPO recipe (G 8, 64 prompts, 10 steps, a 2-step SDE window, HPSv3)
    "wan22_5b_t2v.yaml": dict(gpus=8, steps=10, cfg=True, eta=0.3, tau=1.0, K=2, updates=1, shift=5.0,
                              cfg_scale=("guidance_scale", 5.0), group_size=8, prompts_global=64, reward="hpsv3"),
    "hunyuan15_t2v_videoalign.yaml": dict(gpus=32, steps=25, cfg=True, eta=0.3, tau=0.6, K=14, updates=1,
                                          size=(480, 480), frames=53, shift=5.0, cfg_scale=("guidance_scale", 6.0)),
    # LTX-2: Flow-Factory's LoRA recipe (lr 3e-4, G 16, 48 prompts, 24 steps, 3-step SDE window, no CFG, 2 updates)
    "ltx2_t2v_pickscore.yaml": dict(gpus=8, steps=24, cfg=False, eta=0.3, tau=1.0, K=3, updates=2, lr=3e-4,
                                    group_size=16, prompts_global=48, reward="pickscore",
                                    cfg_scale=("guidance_scale", 1.0)),
    # Flow-Factory's examples (issue 31): G 16, 48 prompts, 2 updates (with CFG too: not the paper's rule), Flow-GRPO's
    # noise level at one random step of a window (K = 1)
    "flux2_klein_pickscore.yaml": dict(FF, steps=4, cfg=False, eta=0.5, size=(384, 384), shift="dynamic",
                                       cfg_scale=("true_cfg_scale", 1.0), lr=3e-4),
    "flux2_klein_base_pickscore.yaml": dict(FF, steps=8, cfg=True, eta=0.7, size=(384, 384), shift="dynamic",
                                            cfg_scale=("true_cfg_scale", 4.0)),
    "flux2_dev_pickscore.yaml": dict(FF, steps=8, cfg=False, eta=1.0, size=(512, 512), shift="dynamic",
                                     cfg_scale=("guidance_scale", 4.0), lr=3e-4, reward=None),
    "z_image_turbo_pickscore.yaml": dict(FF, steps=6, cfg=False, eta=0.7, size=(512, 512), shift=3.0,
                                         cfg_scale=("guidance_scale", 0.0)),
    "z_image_pickscore.yaml": dict(FF, steps=10, cfg=True, eta=0.7, size=(512, 512), shift=6.0,
                                   cfg_scale=("guidance_scale", 4.0)),
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
    ({"grpo": {"group_size": "12"}}, r"'grpo.group_size' expects an integer >= 2, got '12'"),
    ({"optim": {"lr": "fast"}}, r"'optim.lr' expects"),
    ({"train": {"save_every": 2.5}}, r"'train.save_every' expects an integer >= 1, or 0 \(only at the end\), got 2.5"),
    ({"grpo": {"tau": 0.0}}, r"grpo.tau must be a finite number in \(0, 1\]"),
    ({"grpo": {"tau": 1.5}}, r"grpo.tau must be a finite number in \(0, 1\]"),
    ({"grpo": {"group_size": 12, "prompts_per_iteration": 1, "micro_batch_size": 5}},
     r"micro_batch_size=5 must divide the rank batch group_size \* prompts_per_iteration = 12"),
    ({"grpo": {"group_size": 1}}, r"grpo.group_size must be an integer >= 2, got 1 \(group-relative"),
    ({"grpo": {"best_of_n_k": 7, "group_size": 12}}, r"best_of_n_k must be in \[1, group_size // 2\]"),
    ({"data": {"eval_fraction": 1.0}}, r"data.eval_fraction must be a finite number in \[0, 1\)"),
    ({"rewards": []}, r"at least one reward"),
    ({"rewards": [{"name": "hps", "wieght": 1}]}, r"unknown config key\(s\) \['wieght'\] in section 'rewards\[0\]'"),
    ({"train": {"save_every": -1}}, r"train.save_every must be an integer >= 1, or 0 \(only at the end\), got -1"),
    ({"train": {"autocast": "fp16"}}, r"train.autocast must be 'bf16' or 'none'.*gradient scaler"),
    ({"train": {"num_threads": -2}}, r"train.num_threads must be an integer >= 1, or 0 \(torch's default\)"),
    ({"grpo": {"advantage_std": "unbiased"}}, r"grpo.advantage_std must be 'bessel' or 'population'"),
    ({"grpo": {"best_of_n_advantages": "top"}}, r"grpo.best_of_n_advantages must be 'group' or 'selected'"),
])
def test_bad_configs_are_rejected(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        load_config(_write(tmp_path, data))


@pytest.mark.parametrize("data,match", [
    ({"sampling": {"num_steps": 10}, "grpo": {"timestep_window": [9, 10]}}, r"only the last step.*train_last_step"),
    ({"sampling": {"num_steps": 1}}, r"num_steps must be >= 2 while the last step is not trained"),
    ({"sampling": {"deterministic_last_step": True}, "grpo": {"train_last_step": True}},
     r"deterministic_last_step.*train_last_step"),
    ({"sampling": {"num_steps": 4, "eta_schedule": [0.3, 0.0, 0.3, 0.0]}}, r"steps \[1\] have eta = 0"),
])
def test_settings_across_sections_are_rejected_by_the_builder_that_combines_them(tmp_path, data, match):
    from fastvideo_grpo.algorithms.objectives import build_objective

    with pytest.raises(ValueError, match=match):
        build_objective(load_config(_write(tmp_path, data)))


def test_thread_count_rule_is_per_calling_thread_and_restored():
    import threading

    import torch

    from fastvideo_grpo.utils.threads import resolve_num_threads, set_num_threads, thread_count

    caller = torch.get_num_threads()
    assert resolve_num_threads(0) == caller and resolve_num_threads(3) == 3
    assert set_num_threads(0) == caller == torch.get_num_threads()  # 0 keeps torch's default
    seen = {}

    def worker():
        with thread_count(2) as n:
            seen["inside"] = (n, torch.get_num_threads())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["inside"] == (2, 2) and torch.get_num_threads() == caller
    with thread_count(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == caller
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError, match="--threads must be an integer >= 0"):
            resolve_num_threads(bad, "--threads")


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


def test_every_recipe_is_checked():
    # the toy recipes (toy_cpu.yaml, toy_watchdog.yaml) run on the CPU and are checked by their own tests
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("toy_")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_hold_their_stated_settings(name):
    from fastvideo_grpo.algorithms import grpo

    want = dict(PAPER, **RECIPES[name])
    text = (ROOT / "configs" / name).read_text()
    cfg: RunConfig = load_config(str(ROOT / "configs" / name))
    header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
    assert f"Assumes {want['gpus']} GPUs" in header or f"assumes {want['gpus']} GPUs" in header
    assert "Differences from the paper" in header  # every recipe names them
    dp = want["gpus"] // cfg.parallel.sp
    assert cfg.grpo.prompts_per_iteration * dp == want["prompts_global"]
    assert cfg.optim.lr == want["lr"] and cfg.optim.max_grad_norm == want["max_grad_norm"]
    g, s = cfg.grpo, cfg.sampling
    assert g.group_size == want["group_size"] and g.clip_range == want["clip_range"]
    assert (s.num_steps, s.eta, g.tau) == (want["steps"], want["eta"], want["tau"])
    assert g.num_updates_per_iteration == want["updates"]
    if want.get("paper_updates", True):
        assert (g.num_updates_per_iteration == 1) == want["cfg"]  # the paper: 1 update per iteration with CFG
    lo, hi = grpo.trainable_window(s.num_steps, g.timestep_window, g.train_last_step)
    candidates = g.sde_window.size if g.sde_window.mode != "off" else hi - lo  # a window's steps, else the trainable
    assert grpo.num_train_steps(candidates, g.tau) == want["K"] and f"= {want['K']} trained steps" in text
    assert s.deterministic_last_step is None and not g.train_last_step  # the released behaviour, per family
    bs = g.group_size * g.prompts_per_iteration
    assert not g.micro_batch_size or bs % g.micro_batch_size == 0
    assert cfg.data.manifest and cfg.model.kwargs.get("model_path")
    kw = cfg.model.kwargs
    if "size" in want:
        res = kw["resolution"]
        assert (tuple(res) if isinstance(res, list) else (res, res)) == want["size"]
        assert kw.get("num_frames") == want.get("frames")
    if "shift" in want:
        assert kw["shift"] == want["shift"]
    if "cfg_scale" in want:
        key, value = want["cfg_scale"]
        assert kw[key] == value
    if want.get("reward"):
        assert [r.name for r in cfg.rewards] == [want["reward"]]
    for r in cfg.rewards:  # VideoAlign: the frames the released code shows it (an 8 fps file read at 2 fps)
        if r.name == "video_align":
            assert r.kwargs["video_fps"] == 8.0 and r.kwargs["sample_fps"] == 2.0 and "max_frames" not in r.kwargs


def test_sd_recipe_ddim_schedule_is_the_released_one():
    """The released SD config: DDIM eta 1.0 on every step including the last (it is sampled, not trained)."""
    from fastvideo_grpo.sde import DDIMSchedule

    cfg = load_config(str(ROOT / "configs/sd_hps.yaml"))
    sched = DDIMSchedule.create(cfg.sampling.num_steps, eta=cfg.eta)
    assert type(sched).deterministic_last_step_default is False
    assert sched.eta.tolist() == [1.0] * 50


@pytest.mark.parametrize("override,match", [
    ("--optim.max_grad_norm=-1", r"optim.max_grad_norm must be a finite number > 0.*reverses every update"),
    ("--optim.max_grad_norm=0", r"optim.max_grad_norm must be a finite number > 0.*0 freezes the weights"),
    ("--grpo.kl_coef=-0.1", r"grpo.kl_coef must be a finite number >= 0"),
    ("--train.keep_last_checkpoints=-2", r"train.keep_last_checkpoints must be an integer >= 1, or 0 \(keep all\)"),
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
    from fastvideo_grpo.cli.evaluate import main

    with pytest.raises(ValueError, match="--samples-per-prompt must be >= 1"):
        main(["base", "--samples-per-prompt", "-1"])


def test_a_recipe_merges_over_its_base_and_bad_bases_are_named(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("sampling: {num_steps: 7, eta: 0.5}\ngrpo: {group_size: 6}\n"
                                        "model: {name: toy, kwargs: {shift: 2.0}}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../base.yaml\nsampling: {eta: 0.9}\n")
    (tmp_path / "sub" / "top.yaml").write_text("base: mid.yaml\ngrpo: {tau: 1.0}\n")
    cfg = load_config(str(tmp_path / "sub" / "top.yaml"), ["--grpo.group_size=4"])
    # a derived file changes only what it names; bases chain, relative to the file naming them
    assert (cfg.sampling.num_steps, cfg.sampling.eta, cfg.grpo.group_size, cfg.grpo.tau) == (7, 0.9, 4, 1.0)
    assert cfg.model.kwargs == {"shift": 2.0} and "base" not in to_dict(cfg)
    (tmp_path / "loop.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(str(tmp_path / "loop.yaml"))
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere.yaml not found \(the base of .*orphan.yaml\)"):
        load_config(str(tmp_path / "orphan.yaml"))
