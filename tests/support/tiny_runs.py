"""Tiny real-model training runs for tests: each family's diffusers classes at toy sizes, saved as a
diffusers folder, plus a manifest of synthetic prompt embeddings written by data_prep's ``PrepJob``.

``build_tiny_run(root, family)`` -> (model folder, model.kwargs, manifest); ``run_overrides`` gives the
command-line overrides that point a recipe at them with small shapes; ``train_script(name)`` imports a
``train_scripts/<name>.py`` as a module. The ``test_brightness`` reward (mean pixel value; NaN for
prompts starting with "NaN") is registered on import.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import diffusers
import torch

from fastvideo_grpo.data.prep import PrepJob
from fastvideo_grpo.data.prompts import PromptRecord
from fastvideo_grpo.models import ADAPTERS
from fastvideo_grpo.rewards.base import REWARDS

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [f"a {c} {s} photo" for c in ("red", "blue", "green", "white") for s in ("cat", "dog", "city")]
SEQ = 5  # text length of variable-length embeddings


# ----------------------------------------------------------------------------- a cheap test reward


def brightness(images, prompts, **meta):
    x = images.float()
    dims = tuple(range(1, x.ndim))
    score = x.mean(dims)
    if any(p.startswith("NaN") for p in prompts):
        score = score * float("nan")
    return score, {}


if "test_brightness" not in REWARDS.names():
    REWARDS.register("test_brightness")(lambda **kw: brightness)


# ----------------------------------------------------------------------------- tiny model folders


def _vae2d(**kw):
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                   layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, **kw)


def _hunyuan(in_channels):
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=in_channels, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 2))


def _hunyuan_vae():
    from support.tiny_encoders import tiny_hunyuan_vae

    return tiny_hunyuan_vae()


def tiny_components(name):
    """subfolder -> tiny model, and the model.kwargs overrides for it."""
    torch.manual_seed(0)
    if name == "sd":
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
        return {"unet": unet, "vae": _vae2d(scaling_factor=0.18215)}, dict(resolution=16, max_sequence_length=SEQ)
    if name == "flux":
        tr = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        return {"transformer": tr, "vae": _vae2d(scaling_factor=0.5, shift_factor=0.1)}, dict(resolution=16)
    if name == "hunyuan_t2v":
        return {"transformer": _hunyuan(4), "vae": _hunyuan_vae()}, dict(resolution=16, num_frames=5)
    if name == "hunyuan_t2i":
        return {"transformer": _hunyuan(4), "vae": _hunyuan_vae()}, dict(resolution=16, num_frames=1)
    if name == "hunyuan_i2v":
        return {"transformer": _hunyuan(8), "vae": _hunyuan_vae()}, dict(resolution=16, num_frames=5)
    if name == "wan":
        from support.tiny_encoders import tiny_wan_vae

        tr = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32)
        return {"transformer": tr, "vae": tiny_wan_vae()}, dict(resolution=16, num_frames=5)
    raise KeyError(name)


class SyntheticEncoder:
    """Duck-typed FamilyEncoder for PrepJob: deterministic random tensors of the adapter's cond_spec shapes."""

    def __init__(self, spec):
        self.family = "synthetic"
        self.spec = {k: v for k, v in spec.items() if not k.startswith("negative_")}
        self.ids = {"synthetic": {"class": "random"}}

    def tensor_sources(self):
        return {k: "synthetic" for k in self.spec}

    def settings(self):
        return {"seq": SEQ}

    def encode_text(self, prompts):
        out = {}
        for k, trailing in self.spec.items():
            shape = tuple(SEQ if d is None else d for d in trailing)
            rows = []
            for p in prompts:
                g = torch.Generator().manual_seed(sum(map(ord, p + k)))
                if k.endswith("attention_mask"):
                    rows.append(torch.ones(shape, dtype=torch.int64))
                else:
                    rows.append(torch.randn(shape, generator=g))
            out[k] = torch.stack(rows)
        return out


def build_tiny_run(root: Path, name: str):
    """Write family ``name``'s tiny model folder and a data_prep manifest of synthetic embeddings under
    ``root``; returns (model folder, model.kwargs overrides, manifest path)."""
    comps, kw = tiny_components(name)
    for sub, m in comps.items():
        m.save_pretrained(str(root / "model" / sub))
    adapter = ADAPTERS.build(name, model_path=str(root / "model"), **kw)
    spec = adapter.cond_spec()
    neg = "" if any(k.startswith("negative_") for k in spec) else None
    job = PrepJob(SyntheticEncoder(spec), [PromptRecord(p) for p in PROMPTS], root / "emb",
                  shard_size=8, batch_size=4, negative_prompt=neg, progress=False)
    job.write_negative()
    job.run_shards()
    job.merge_manifest()
    return root / "model", kw, root / "emb" / "manifest.json"


# ----------------------------------------------------------------------------- running the scripts


def train_script(name):
    spec = importlib.util.spec_from_file_location(f"_ts_{name}", ROOT / "train_scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_overrides(folder, kw, manifest, out, **extra):
    args = [f"--model.kwargs.model_path={folder}", f"--data.manifest={manifest}", f"--train.output_dir={out}",
            "--data.eval_fraction=0.25", "--sampling.num_steps=2", "--sampling.eval_num_steps=2",
            "--grpo.group_size=2", "--grpo.prompts_per_iteration=1", "--grpo.micro_batch_size=0",
            "--train.num_iterations=2", "--train.save_every=1", "--train.eval_every=1", "--train.sample_every=2",
            "--train.num_eval_prompts=2", "--train.device=cpu", "--eval.batch_size=2", "--eval.num_sample_prompts=2",
            "--rewards=[{name: test_brightness, key: bright}]", "--parallel.activation_checkpointing=0.0",
            "--log.progress=false", "--optim.lr=1e-3"]
    for k, v in kw.items():
        args.append(f"--model.kwargs.{k}={json.dumps(v)}")
    args += [f"--{k}={v}" for k, v in extra.items()]
    return args
