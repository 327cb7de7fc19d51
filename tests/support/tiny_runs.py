"""Tiny real-model training runs for tests: each family's diffusers classes at toy sizes, saved as a
diffusers folder, plus a manifest of synthetic prompt embeddings written by data_prep's ``PrepJob``.

``build_tiny_run(root, family)`` -> (model folder, model.kwargs, manifest); ``run_overrides`` gives the
command-line overrides that point a recipe at them with small shapes; ``train_script(name)`` imports a
``train_scripts/<name>.py`` as a module. The ``test_brightness`` reward (mean pixel value; NaN for
prompts starting with "NaN") is registered on import.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastvideo_grpo.data.prep import PrepJob
from fastvideo_grpo.data.prompts import PromptRecord
from fastvideo_grpo.models import ADAPTERS
from fastvideo_grpo.rewards.base import REWARDS
from support import tiny_models
from support.scripts import load_script

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


RUN_KWARGS = {  # smaller shapes than the adapter tests': a few training iterations per test
    "flux": dict(resolution=16),
    "sd": dict(resolution=16, max_sequence_length=SEQ),
    "hunyuan_t2v": dict(resolution=16, num_frames=5),
    "hunyuan_t2i": dict(resolution=16, num_frames=1),
    "hunyuan_i2v": dict(resolution=16, num_frames=5),
    "wan": dict(resolution=16, num_frames=5),
    # 2 steps at shift 12: t = 1000 (high-noise expert, trained) | 923 (low-noise, frozen) with the boundary at 950
    "wan22_a14b": dict(resolution=16, num_frames=5, boundary_ratio=0.95),
    "wan22_5b": dict(resolution=32, num_frames=5),
    "hunyuan15_t2v": dict(resolution=32, num_frames=5),  # 16x VAE: 2 x 2 latents
    "ltx2": dict(resolution=32, num_frames=5),  # 3 x 4 x 4 video tokens + 5 audio tokens
    "flux2_klein": dict(resolution=16),
    "flux2_klein_cfg": dict(resolution=16, true_cfg_scale=4.0),  # the undistilled base: negatives in the manifest
    "flux2_dev": dict(resolution=16),
    "z_image": dict(resolution=16),
    "z_image_cfg": dict(resolution=16, guidance_scale=4.0),
}
#: tiny runs of a family with other model.kwargs (run name -> the adapter / family name)
RUN_FAMILY = {"flux2_klein_cfg": "flux2_klein", "z_image_cfg": "z_image"}


def run_family(name):
    """The adapter (model.name) of tiny run ``name``."""
    return RUN_FAMILY.get(name, name)


def tiny_components(name):
    """subfolder -> tiny model (tests/support/tiny_models.py), and the model.kwargs of a tiny run."""
    if name not in RUN_KWARGS:
        raise KeyError(f"no tiny run for {name!r}; families: {sorted(RUN_KWARGS)}")
    comps, _ = tiny_models.tiny_components(run_family(name))
    return comps, dict(RUN_KWARGS[name])


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
    adapter = ADAPTERS.build(run_family(name), model_path=str(root / "model"), **kw)
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
    return load_script("train_scripts", name)


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
