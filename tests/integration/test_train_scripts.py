"""The real-model train scripts end to end on CPU: tiny random-init diffusers folders + synthetic embeddings.

Each ``train_scripts/train_*_grpo.py`` runs 2 GRPO iterations through its own recipe YAML, with
command-line overrides pointing at a tiny model folder (the family's real diffusers classes at toy
sizes, loaded through the adapter's ``from_pretrained`` path), a manifest written by data_prep's
``PrepJob`` (random conditioning of the adapter's ``cond_spec()`` shapes), and a cheap registered test
reward. Checked: metrics / resolved config / checkpoint / export / sample grid written; resume;
missing weights, embeddings and reward weights fail fast with the message; NaN rewards stop the run
without a new checkpoint; the evaluation CLI (single checkpoint and --compare).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")

from fastvideo_grpo.rewards.base import REWARDS  # noqa: E402
from fastvideo_grpo.training.metrics import wall_clock_metric  # noqa: E402
from support.tiny_runs import ROOT, brightness, run_family, run_overrides, train_script  # noqa: E402

CASES = [  # (script, recipe, adapter family)
    ("train_sd_grpo", "configs/sd_hps.yaml", "sd"),
    ("train_flux_grpo", "configs/flux_hps_clip.yaml", "flux"),
    ("train_hunyuan_grpo", "configs/hunyuan_t2v_videoalign.yaml", "hunyuan_t2v"),
    ("train", "configs/hunyuan_t2i_hps.yaml", "hunyuan_t2i"),  # the one entry (the named ones set a default)
    ("train_i2v_grpo", "configs/hunyuan_i2v_mq.yaml", "hunyuan_i2v"),
    ("train_wan_grpo", "configs/wan_t2v.yaml", "wan"),
    ("train_wan_grpo", "configs/wan_t2i_hps.yaml", "wan"),  # the released Wan recipe: one frame
    ("train", "configs/wan22_a14b_t2v.yaml", "wan22_a14b"),
    ("train", "configs/wan22_5b_t2v.yaml", "wan22_5b"),
    ("train", "configs/hunyuan15_t2v_videoalign.yaml", "hunyuan15_t2v"),
    ("train", "configs/ltx2_t2v_pickscore.yaml", "ltx2"),
    # the 2026 image families (issue 31), through the one entry: LoRA, SDE windows, CFG with negatives
    ("train", "configs/flux2_klein_pickscore.yaml", "flux2_klein"),
    ("train", "configs/flux2_klein_base_pickscore.yaml", "flux2_klein_cfg"),
    ("train", "configs/flux2_dev_pickscore.yaml", "flux2_dev"),
    ("train", "configs/z_image_turbo_pickscore.yaml", "z_image"),
    ("train", "configs/z_image_pickscore.yaml", "z_image_cfg"),
]
# the recipes' step windows and sizes brought to the tiny runs' 2 steps and 32 px
EXTRA = {"configs/wan_t2i_hps.yaml": {"model.kwargs.num_frames": 1},
         "configs/wan22_a14b_t2v.yaml": {"grpo.timestep_window": "[0, 1]", "grpo.sde_window.size": 1},
         "configs/wan22_5b_t2v.yaml": {"grpo.timestep_window": "[0, 1]", "grpo.sde_window.size": 1,
                                       "model.kwargs.height": 32, "model.kwargs.width": 32},
         "configs/ltx2_t2v_pickscore.yaml": {"grpo.timestep_window": "[0, 1]", "grpo.sde_window.size": 1,
                                             "model.kwargs.height": 32, "model.kwargs.width": 32},
         # enough steps for the recipes' SDE windows (steps 1-2 / 1-3, never the last)
         "configs/flux2_klein_pickscore.yaml": {"sampling.num_steps": 4},
         **{f"configs/{r}.yaml": {"sampling.num_steps": 5} for r in (
             "flux2_klein_base_pickscore", "flux2_dev_pickscore", "z_image_turbo_pickscore", "z_image_pickscore")}}


@pytest.mark.parametrize("script,recipe,family", CASES, ids=[Path(c[1]).stem for c in CASES])
def test_train_script_two_iterations(tiny, tmp_path, script, recipe, family):
    folder, kw, manifest = tiny(family)
    out = tmp_path / "run"
    mod = train_script(script)
    extra = {"parallel.sp": 1, **EXTRA.get(recipe, {})}
    summary = mod.main(["--config", str(ROOT / recipe)] + run_overrides(folder, kw, manifest, out, **extra))
    assert summary["iteration"] == 2 and summary["iterations_run"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for key in ("reward/bright/mean", "reward/bright/std", "adv/mean", "adv/std", "train/clipfrac", "train/approx_kl",
                "train/grad_norm", "lr", "samples_per_s", "time/rollout", "time/reward", "time/train",
                "throughput/frames_per_gpu_s", "throughput/mfu", "train/logp_gap/mean", "train/logp_gap/before_update"):
        assert key in train_rows[-1], key
    assert any("eval/bright" in r for r in rows)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["name"] == run_family(family) and saved["train"]["num_iterations"] == 2
    assert saved["model"]["kwargs"]["model_path"] == str(folder)
    for k, v in EXTRA.get(recipe, {}).items():  # each override reached the resolved config
        node = saved
        for part in k.split("."):
            node = node[part]
        assert node == (yaml.safe_load(v) if isinstance(v, str) else v), k
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert (out / "reward_curve.png").is_file() and (out / "samples" / "iter_000002.png").is_file()
    # the export: LoRA recipes the adapter weights alone; a full fine-tune the trained denoiser in the pipeline
    # layout (unet/ or transformer/) beside the base's VAE
    if saved["model"]["kwargs"].get("lora_rank"):
        assert (out / "export" / "pytorch_lora_weights.safetensors").is_file()
    else:
        sub = "unet" if family == "sd" else "transformer"
        assert (out / "export" / sub / "config.json").is_file() and (out / "export" / "vae" / "config.json").is_file()


def test_resume_continues_and_latest_missing_fails(tiny, tmp_path):
    folder, kw, manifest = tiny("sd")
    mod = train_script("train_sd_grpo")
    out = tmp_path / "run"
    base = ["--config", str(ROOT / "configs/sd_hps.yaml")] + run_overrides(folder, kw, manifest, out)
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        mod.main(base + ["--resume", "latest"])
    mod.main(base + ["--train.num_iterations=1"])
    s = mod.main(base + ["--resume", "latest"])
    assert s["iteration"] == 2 and s["iterations_run"] == 1
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(x)]
    assert steps == [1, 2]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mod.main(base + ["--resume", str(tmp_path / "nope")])


def test_missing_files_fail_fast_with_message(tmp_path, monkeypatch):
    """The recipes' default paths are absent here: one message lists model, embeddings and reward weights."""
    monkeypatch.chdir(tmp_path)
    mod = train_script("train_hunyuan_grpo")
    with pytest.raises(FileNotFoundError) as e:
        mod.main([])
    msg = str(e.value)
    assert "ckpts/HunyuanVideo" in msg and "data/hunyuan_embeddings/manifest.json" in msg
    assert "ckpts/VideoReward" in msg and "data_prep" in msg
    # the same through the launcher as documented (`bash train_scripts/run_i2v.sh`, one process here): the worker
    # exits with status 2 and prints the message (torchrun then exits non-zero)
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(NGPU="1", OMP_NUM_THREADS="1", PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    r = subprocess.run(["bash", str(ROOT / "train_scripts/run_i2v.sh")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=180, env=env)
    assert r.returncode != 0
    assert "error: cannot start training" in r.stderr and "ckpts/SkyReels-V1-Hunyuan-I2V" in r.stderr, r.stderr[-3000:]
    assert "exitcode  : 2" in r.stderr


def test_missing_model_subfolder_fails_fast(tiny, tmp_path):
    _, kw, manifest = tiny("sd")
    empty = tmp_path / "empty_model"
    (empty / "vae").mkdir(parents=True)
    mod = train_script("train_sd_grpo")
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        mod.main(["--config", str(ROOT / "configs/sd_hps.yaml")] + run_overrides(empty, kw, manifest, tmp_path / "r"))


def test_embeddings_for_another_model_are_rejected(tiny, tmp_path):
    folder, kw, _ = tiny("sd")
    _, _, flux_manifest = tiny("flux")
    mod = train_script("train_sd_grpo")
    with pytest.raises(ValueError, match="prompt_embeds"):
        mod.main(["--config", str(ROOT / "configs/sd_hps.yaml")]
                 + run_overrides(folder, kw, flux_manifest, tmp_path / "r"))


def test_nan_reward_stops_without_new_checkpoint(tiny, tmp_path):
    from fastvideo_grpo.cli.train import EXIT_DIVERGED, TrainingStopped

    folder, kw, manifest = tiny("sd")
    mod = train_script("train_sd_grpo")
    out = tmp_path / "run"
    base = ["--config", str(ROOT / "configs/sd_hps.yaml")] + run_overrides(folder, kw, manifest, out)
    mod.main(base + ["--train.num_iterations=1"])

    calls = {"n": 0}

    def nan_on_second(images, prompts, **meta):
        calls["n"] += 1
        s, info = brightness(images, prompts)
        return (s * float("nan") if calls["n"] >= 1 else s), info

    if "test_nan_reward" not in REWARDS.names():
        REWARDS.register("test_nan_reward")(lambda **kw: nan_on_second)
    with pytest.raises(TrainingStopped) as e:
        mod.main(base + ["--resume", "latest", "--rewards=[{name: test_nan_reward}]", "--train.eval_every=0"])
    assert e.value.exit_code == EXIT_DIVERGED
    assert "non-finite" in str(e.value) and "step_00000001" in str(e.value)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (out / "checkpoints" / "step_00000002").exists()


def test_evaluate_cli_single_and_compare(tiny, tmp_path):
    from fastvideo_grpo.cli import evaluate as evaluate

    folder, kw, manifest = tiny("sd")
    mod = train_script("train_sd_grpo")
    out = tmp_path / "run"
    mod.main(["--config", str(ROOT / "configs/sd_hps.yaml")] + run_overrides(folder, kw, manifest, out))
    ev_out = tmp_path / "ev"
    res = evaluate.main(["--compare", "base", str(out / "export"), "--config", str(out / "config.yaml"),
                         "--out", str(ev_out), "--num-prompts", "3", "--split", "all",
                         "--rewards=[{name: test_brightness, key: bright}]"])
    assert [r["name"] for r in res["rows"]] == ["base", "export"]
    table = (ev_out / "eval.md").read_text()
    assert "| model | bright |" in table and table.count("\n") >= 4
    data = json.loads((ev_out / "eval.json").read_text())
    assert data["rows"][0]["num_samples"] == 3 and (ev_out / "eval_grid.png").is_file()
    res2 = evaluate.main([str(out / "checkpoints" / "step_00000002"), "--out", str(tmp_path / "ev2"),
                          "--num-prompts", "3", "--split", "all", "--rewards=[{name: test_brightness, key: bright}]"])
    # the DCP checkpoint and the exported weights of the same iteration score the same
    assert res2["rows"][0]["mean"]["bright"] == pytest.approx(res["rows"][1]["mean"]["bright"], abs=1e-6)
    assert res["rows"][0]["mean"]["bright"] != res["rows"][1]["mean"]["bright"]


def test_lora_training_exports_adapter_weights_that_evaluate_loads(tiny, tmp_path):
    pytest.importorskip("peft")
    from fastvideo_grpo.cli import evaluate as evaluate

    folder, kw, manifest = tiny("flux")
    mod = train_script("train_flux_grpo")
    out = tmp_path / "run"
    mod.main(["--config", str(ROOT / "configs/flux_hps.yaml")] + run_overrides(folder, kw, manifest, out)
             + ["--model.kwargs.lora_rank=4", "--optim.lr=0.05", "--train.eval_every=0"])
    assert (out / "export" / "pytorch_lora_weights.safetensors").is_file()
    res = evaluate.main(["--compare", "base", str(out / "export"), "--out", str(tmp_path / "ev"), "--num-prompts", "2",
                         "--split", "all", "--grid-prompts", "0"])
    dcp = evaluate.main([str(out / "checkpoints"), "--out", str(tmp_path / "ev2"), "--num-prompts", "2",
                         "--split", "all", "--grid-prompts", "0"])
    a, b = res["rows"][0]["mean"]["bright"], res["rows"][1]["mean"]["bright"]
    assert a != b and dcp["rows"][0]["mean"]["bright"] == pytest.approx(b, abs=1e-6)


@pytest.mark.parametrize("family,extra", [("flux", [])], ids=["fsdp"])
def test_two_processes_under_torchrun(tiny, tmp_path, family, extra):
    """The same entry point under torchrun (gloo, 2 CPU processes): FSDP2 over 2 ranks.

    (Ulysses sp = 2 is not exercised: no real-model adapter supplies an SPPlan for its rotary tables yet.)"""
    import os

    folder, kw, manifest = tiny(family)
    recipe = dict(CASES_BY_FAMILY)[family]
    out = tmp_path / "run"
    # --standalone: the rendezvous store binds port 0 itself (no free-port-then-bind race)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "_train_worker.py"), "--config", str(ROOT / recipe)
           ] + run_overrides(folder, kw, manifest, out, **{"parallel.sp": 1}) + extra
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-6000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if "train/loss" in x]
    assert [x["step"] for x in train_rows] == [1, 2] and train_rows[-1]["world_size"] == 2
    assert (out / "export" / "transformer" / "config.json").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"


CASES_BY_FAMILY = [(c[2], c[1]) for c in CASES]


def test_cuda_oom_is_reported_with_the_memory_knobs(tiny, tmp_path, monkeypatch):
    from fastvideo_grpo.cli.train import EXIT_OOM, TrainingStopped
    from fastvideo_grpo.training.trainer import GRPOTrainer

    def oom(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(GRPOTrainer, "train_iteration", oom)
    folder, kw, manifest = tiny("sd")
    with pytest.raises(TrainingStopped) as e:
        train_script("train_sd_grpo").main(["--config", str(ROOT / "configs/sd_hps.yaml")]
                                      + run_overrides(folder, kw, manifest, tmp_path / "r", **{"train.eval_every": 0}))
    assert e.value.exit_code == EXIT_OOM
    for knob in ("parallel.sp", "parallel.activation_checkpointing", "parallel.cpu_offload", "num_frames",
                 "grpo.micro_batch_size", "lora_rank", "Tried to allocate"):
        assert knob in str(e.value), knob


def test_kill_and_resume_through_a_real_model_script_is_bit_exact(tiny, tmp_path):
    """FLUX (tiny) through train_flux_grpo.py: a run "killed" after its iteration-2 checkpoint and resumed in a
    fresh call reproduces the uninterrupted run's iterations 3-4 and its exported weights bit for bit."""
    import shutil

    from safetensors.torch import load_file

    folder, kw, manifest = tiny("flux")
    mod = train_script("train_flux_grpo")

    def args(out):
        return (["--config", str(ROOT / "configs/flux_hps.yaml")] + run_overrides(folder, kw, manifest, out)
                + ["--train.num_iterations=4", "--train.save_every=2", "--train.eval_every=0",
                   "--train.sample_every=0"])

    a, b = tmp_path / "A", tmp_path / "B"
    mod.main(args(a))
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step_00000002", b / "checkpoints" / "step_00000002")
    (b / "checkpoints" / "latest").write_text("step_00000002\n")
    s = mod.main(args(b) + ["--resume", "latest"])
    assert s["iterations_run"] == 2

    def rows(out):
        keep = lambda k: not wall_clock_metric(k)  # noqa: E731
        return [{k: v for k, v in json.loads(x).items() if keep(k)} for x in (out / "metrics.jsonl").read_text()
                .splitlines() if json.loads(x).get("step", 0) > 2]

    # every logged float equal, the final eval row included: both runs are calls in this process with the same
    # shapes and thread count, so the same kernels round the same way (resume restores every RNG state)
    assert rows(b) == rows(a) and len(rows(a)) >= 2
    wa, wb = (load_file(str(o / "export" / "transformer" / "diffusion_pytorch_model.safetensors")) for o in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_another_model_is_a_clear_error(tiny, tmp_path):
    """A checkpoint written with LoRA resumed without it (another state dict): a message, not a DCP traceback."""
    pytest.importorskip("peft")
    folder, kw, manifest = tiny("flux")
    mod = train_script("train_flux_grpo")
    out = tmp_path / "run"
    base = ["--config", str(ROOT / "configs/flux_hps.yaml")] + run_overrides(folder, kw, manifest, out) + [
        "--train.num_iterations=1", "--train.eval_every=0", "--train.sample_every=0"]
    mod.main(base + ["--model.kwargs.lora_rank=4"])
    with pytest.raises(ValueError, match=r"does not match the model of this config .*LoRA on/off"):
        mod.main(base + ["--resume", "latest", "--train.num_iterations=2"])
