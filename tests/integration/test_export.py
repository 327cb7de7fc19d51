"""Exports load into plain diffusers and give the trained model: tiny FLUX runs trained straight from a prompt
file (no prep step), exported at the end and by ``python -m fastvideo_grpo.cli.export``, then loaded with
``FluxPipeline.load_lora_weights`` / ``DiffusionPipeline.from_pretrained``.

References: the trained LoRA delta is computed here from the DCP checkpoint's A and B and the config's alpha /
rank (alpha != rank: the scale diffusers would get wrong without the adapter metadata); the trained full
weights are the checkpoint's; images come from the project's own evaluator (``evaluate_policy`` over the
weights ``cli.evaluate.load_policy`` reads from the export), against diffusers' ``FluxPipeline.__call__`` with
the same conditioning and initial noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fastvideo_grpo.config import load_config  # noqa: E402
from support.tiny_pipelines import PROMPTS, build_tiny_flux_pipeline  # noqa: E402
from support.tiny_runs import ROOT, train_script  # noqa: E402

STEPS = 2  # sampling steps of the tiny runs and of the image comparison
# Image tolerance: both sides run the same fp32 transformer and VAE on the same inputs; they differ only in how
# the sigma grid is computed (numpy float64 in the scheduler, torch float32 in the project's schedule: a few
# float32 ulps, ~1e-7 relative) and in the order of the Euler update's operations. Through STEPS = 2 steps of a
# network whose outputs are O(1), that is O(10 * eps32) per latent element; the VAE decode maps it to pixels in
# [0, 1] with a gain of O(1-10) for these tiny random weights: 1e-5 bounds it with margin (the measured gap is
# below 1e-6), while a wrong LoRA scale or missing weights change the images by > 1e-3 (checked below).
IMAGE_ATOL = 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A whole tiny FLUX pipeline folder and a prompt file (no embeddings: the runs encode them)."""
    root = tmp_path_factory.mktemp("flux_export")
    folder = build_tiny_flux_pipeline(root / "FLUX-tiny")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return folder, prompts


def _train(base, out, *extra):
    folder, prompts = base
    args = ["--config", str(ROOT / "configs/flux_hps.yaml"), f"--model.kwargs.model_path={folder}",
            "--model.kwargs.resolution=16", f"--data.prompts={prompts}", "--data.encoding={dtype: float32}",
            f"--train.output_dir={out}", "--data.eval_fraction=0.25", f"--sampling.num_steps={STEPS}",
            f"--sampling.eval_num_steps={STEPS}", "--grpo.group_size=2", "--grpo.prompts_per_iteration=1",
            "--grpo.micro_batch_size=0", "--train.num_iterations=2", "--train.save_every=1", "--train.eval_every=0",
            "--train.sample_every=0", "--train.num_eval_prompts=2", "--train.device=cpu", "--eval.batch_size=2",
            "--rewards=[{name: test_brightness, key: bright}]", "--parallel.activation_checkpointing=0.0",
            "--log.progress=false", "--log.tensorboard=false", "--optim.lr=0.05"] + list(extra)
    return train_script("train_flux_grpo").main(args)


def _policy_images(cfg, export, prompts):
    """The project's evaluator on the export: ``cli.evaluate.load_policy`` + ``evaluate_policy``; also returns the
    conditioning it used and the initial noise (seed 7)."""
    from fastvideo_grpo.cli.evaluate import load_policy
    from fastvideo_grpo.data.dataset import PromptEmbeddingDataset
    from fastvideo_grpo.data.embedding_lookup import EmbeddingLookup
    from fastvideo_grpo.training.evaluate import evaluate_policy

    adapter = load_policy(cfg, "export", Path(export), torch.device("cpu"))
    encode = EmbeddingLookup([PromptEmbeddingDataset(cfg.data.manifest, split="all")], "cpu")
    ev = evaluate_policy(adapter, prompts, {}, STEPS, encode=encode, seed=7, batch_size=len(prompts),
                         return_images=True)
    noise = adapter.initial_noise(len(prompts), torch.Generator().manual_seed(7), device=torch.device("cpu"))
    return ev["images"], encode(prompts), noise


def _pipeline_images(pipe, cond, noise):
    """diffusers' FluxPipeline from the same conditioning and initial noise, on the adapter's sigma grid."""
    B, C, h, w = noise.shape
    latents = pipe._pack_latents(noise, B, C, h, w)
    sigmas = list(np.linspace(1.0, 0.0, STEPS + 1)[:-1])  # the scheduler applies the static shift 3 itself
    with torch.no_grad():
        return pipe(prompt_embeds=cond["prompt_embeds"].float(), pooled_prompt_embeds=cond["pooled_prompt_embeds"].float(),
                    latents=latents, num_inference_steps=STEPS, sigmas=sigmas, guidance_scale=3.5, height=16,
                    width=16, output_type="pt").images


def _checkpoint_state(cfg, ckpt):
    from fastvideo_grpo.models import build_policy
    from fastvideo_grpo.training.checkpoint import load_checkpoint

    adapter = build_policy(cfg, torch.device("cpu"))
    load_checkpoint(ckpt, adapter.trainable_module())
    return adapter


def test_lora_export_loads_into_diffusers_at_its_alpha(base, tmp_path):
    """LoRA rank 4, alpha 8, trained straight from a prompt file: the export holds the adapter metadata, so
    FluxPipeline.load_lora_weights + fuse_lora changes every targeted weight by exactly the trained
    (alpha / r) B A (not half of it), and the pipeline's images are the evaluator's."""
    from safetensors import safe_open

    out = tmp_path / "lora"
    summary = _train(base, out, "--model.kwargs.lora_rank=4", "--model.kwargs.lora_alpha=8")
    assert summary["iteration"] == 2
    cfg = load_config(str(out / "config.yaml"))
    # prompts straight in: embedded once into the run's cache, recorded as the run's manifest
    cached = list((out / "embeddings").glob("flux-*/manifest.json"))
    assert len(cached) == 1 and cfg.data.manifest == str(cached[0])
    assert json.loads(cached[0].read_text())["header"]["num_prompts"] == len(PROMPTS)
    export = out / "export"
    with safe_open(str(export / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8
    card = (export / "README.md").read_text()
    assert card.startswith("---\n") and "load_lora_weights" in card and "## Held-out evaluation" in card
    assert yaml.safe_load(card.split("---")[1])["base_model"] == str(base[0])
    held = json.loads((out / "eval" / "iter_000002.json").read_text())["mean"]["bright"]
    assert "| reward | iteration 0 | iteration 2 | change |" in card and "| bright | " in card
    assert f"{held:.4f}" in card  # the held-out table holds the run's own evaluation
    # the project's evaluator refuses the export under another alpha than it was trained with
    from fastvideo_grpo.cli.evaluate import load_policy

    with pytest.raises(ValueError, match="lora_alpha = 8.*model.kwargs.lora_alpha"):
        load_policy(load_config(str(out / "config.yaml"), ["--model.kwargs.lora_alpha=4"]), "export", export,
                    torch.device("cpu"))

    # the trained delta, from the checkpoint and the config's alpha / rank (independent of the export code)
    trained = _checkpoint_state(cfg, out / "checkpoints" / "step_00000002").trainable_module()
    scale = 8 / 4
    delta = {}
    for name, p in trained.named_parameters():
        if name.endswith("lora_A.default.weight"):
            stem = name[: -len(".lora_A.default.weight")]
            b = dict(trained.named_parameters())[f"{stem}.lora_B.default.weight"]
            delta[stem + ".weight"] = scale * (b.detach().double() @ p.detach().double())
    assert delta and max(float(d.abs().max()) for d in delta.values()) > 1e-4  # the LoRA trained

    pipe = diffusers.FluxPipeline.from_pretrained(str(base[0]))
    before = {k: v.detach().clone().double() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(export))
    images_policy, cond, noise = _policy_images(cfg, export, PROMPTS[:2])
    images_pipe = _pipeline_images(pipe, cond, noise)  # the unfused adapter at its scale
    torch.testing.assert_close(images_pipe, images_policy, rtol=0, atol=IMAGE_ATOL)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    after = {k: v.detach().double() for k, v in pipe.transformer.state_dict().items()}
    for k, d in delta.items():
        got = after[k] - before[k]
        assert float((got - d).norm() / d.norm()) < 1e-5, k
    untouched = [k for k in after if k not in delta]
    assert untouched and all(torch.equal(after[k], before[k]) for k in untouched)
    base_images = _pipeline_images(diffusers.FluxPipeline.from_pretrained(str(base[0])), cond, noise)
    assert float((base_images - images_pipe).abs().max()) > 100 * IMAGE_ATOL  # the comparison can tell LoRA apart

    # the export CLI: the step-1 checkpoint, the LoRA merged, as a whole pipeline folder
    from fastvideo_grpo.cli import export as export_cli
    from fastvideo_grpo.models.lora import merged_state_dict

    res = export_cli.main(["--run", str(out), "--step", "1", "--lora-fused"])
    fused = Path(res["out"])
    assert fused == out / "exports" / "step_00000001_fused" and res["weights"] == "raw"
    merged = merged_state_dict(_checkpoint_state(cfg, out / "checkpoints" / "step_00000001").trainable_module())
    full = diffusers.DiffusionPipeline.from_pretrained(str(fused))
    assert type(full).__name__ == "FluxPipeline"
    got = full.transformer.state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)  # peft's own merge vs the export's
    with pytest.raises(ValueError, match="--overwrite"):
        export_cli.main(["--run", str(out), "--step", "1", "--lora-fused"])


def test_full_export_is_a_pipeline_folder_diffusers_opens(base, tmp_path):
    """A full fine-tune exports a pipeline folder: DiffusionPipeline.from_pretrained gives FluxPipeline with the
    checkpoint's transformer and the base's other components (hard-linked), images equal to the evaluator's;
    the export CLI writes any checkpoint the same way."""
    out = tmp_path / "full"
    _train(base, out)
    cfg = load_config(str(out / "config.yaml"))
    export = out / "export"
    assert (export / "model_index.json").is_file() and (export / "transformer" / "config.json").is_file()
    assert (export / "README.md").is_file() and (export / "reward_curve.png").is_file()
    t5 = next((base[0] / "text_encoder_2").glob("*.safetensors"))
    assert (export / "text_encoder_2" / t5.name).stat().st_ino == t5.stat().st_ino  # linked, not copied
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(export))
    assert type(pipe).__name__ == "FluxPipeline"
    ckpt = _checkpoint_state(cfg, out / "checkpoints" / "step_00000002").trainable_module().state_dict()
    got = pipe.transformer.state_dict()
    assert set(got) == set(ckpt) and all(torch.equal(got[k], ckpt[k]) for k in ckpt)
    images_policy, cond, noise = _policy_images(cfg, export, PROMPTS[:2])
    torch.testing.assert_close(_pipeline_images(pipe, cond, noise), images_policy, rtol=0, atol=IMAGE_ATOL)

    from fastvideo_grpo.cli import export as export_cli

    res = export_cli.main(["--run", str(out), "--step", "1", "--components", "copy",
                           "--output-dir", str(tmp_path / "step1")])
    step1 = diffusers.DiffusionPipeline.from_pretrained(res["out"]).transformer.state_dict()
    ck1 = _checkpoint_state(cfg, out / "checkpoints" / "step_00000001").trainable_module().state_dict()
    assert all(torch.equal(step1[k], ck1[k]) for k in ck1)
    assert not all(torch.equal(step1[k], got[k]) for k in ck1)
    assert (tmp_path / "step1" / "text_encoder_2" / t5.name).stat().st_ino != t5.stat().st_ino  # copied
    with pytest.raises(ValueError, match="--weights raw"):
        export_cli.main(["--run", str(out), "--weights", "ema", "--output-dir", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="step_00000001"):
        export_cli.main(["--run", str(out), "--step", "7"])
