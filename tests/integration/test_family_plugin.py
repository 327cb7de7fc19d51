"""A new model family is one file (plus its recipe): the family below -- an adapter and its prompt encoding in
one registration, as a user would write ``fastvideo_grpo/models/<name>.py`` -- lives in this test only, and
goes through the unchanged data_prep CLI (``--family``), the training entry point and the planner.

The family: SD3's transformer conditioned on one CLIP text encoder (its penultimate hidden states and its
projected pooled output), tiny random-init components saved as a diffusers folder. Independent references:
the stored embeddings equal the text encoder's own outputs computed here with transformers directly (same
tokenizer call, same layer), and the planner's text length is the one the family declares."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastvideo_grpo.models.base import ADAPTERS  # noqa: E402
from fastvideo_grpo.models.diffusers_base import DiffusersAdapter, build_adapter, resolve_size, to_unit  # noqa: E402
from fastvideo_grpo.models.encoding import PromptEncoding  # noqa: E402
from fastvideo_grpo.sde import FlowSchedule  # noqa: E402

# ----------------------------------------------------------------------------- the family file


class OneClipAdapter(DiffusersAdapter):
    model_class = "SD3Transformer2DModel"
    branch_keys = ("prompt_embeds", "pooled_prompt_embeds")
    default_num_steps = 4

    def __init__(self, model_path, *, shift: float = 3.0, resolution=None, height=None, width=None, **kwargs):
        super().__init__(model_path, **kwargs)
        self.shift = float(shift)
        self.height, self.width = resolve_size(resolution, height, width, (16, 16))
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _make_schedule(self, num_steps, eta):
        return FlowSchedule.create(num_steps, eta=eta, shift=self.shift)

    def latent_shape(self, cond=None):
        return (self.model.config.in_channels, self.height // self.vae_scale, self.width // self.vae_scale)

    def _branch_spec(self):
        c = self.model.config
        return {"prompt_embeds": (None, c.joint_attention_dim), "pooled_prompt_embeds": (c.pooled_projection_dim,)}

    def _forward(self, latents, timestep_B, c):
        return self.model(hidden_states=self._to_model(latents), timestep=timestep_B.to(latents.dtype),
                          encoder_hidden_states=self._to_model(c["prompt_embeds"]),
                          pooled_projections=self._to_model(c["pooled_prompt_embeds"]), return_dict=False)[0]

    def decode(self, latents):
        return to_unit(self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor,
                                       return_dict=False)[0])


class OneClipEncoding(PromptEncoding):
    family = "test_one_clip"
    text_encoders = (("text_encoder", "CLIPTextModelWithProjection"),)
    plan_text_len = 77

    def tensor_sources(self):
        return {"prompt_embeds": "text_encoder", "pooled_prompt_embeds": "text_encoder"}

    def text_conditioning(self, prompts):
        hidden, pooled = self.clip_penultimate_and_proj(prompts, "text_encoder", "tokenizer")
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}


@ADAPTERS.register("test_one_clip", paths=("model_path",), signature_of=OneClipAdapter, encoding=OneClipEncoding)
def build_one_clip(**kwargs) -> OneClipAdapter:
    return build_adapter(OneClipAdapter, kwargs)


# ----------------------------------------------------------------------------- the test

PROMPTS = [f"a {c} {s}" for c in ("red", "blue", "green", "white") for s in ("cat", "dog", "circle")]


def _folder(root):
    """The family's diffusers folder: tokenizer/ + text_encoder/ (CLIP-L, hidden 16, projection 8), transformer/
    (SD3, joint_attention_dim 16, pooled_projection_dim 8), vae/."""
    import diffusers
    from support.tiny_encoders import build_tiny_components
    from support.tiny_models import tiny_vae_2d

    comps = build_tiny_components("sd3", root)  # writes the sd3 encoders; this family reads the first CLIP
    torch.manual_seed(0)
    diffusers.SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                    num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                    pooled_projection_dim=8, out_channels=4).save_pretrained(str(root / "transformer"))
    tiny_vae_2d().save_pretrained(str(root / "vae"))
    return comps


def test_a_family_defined_in_one_file_preps_trains_and_plans(tmp_path):
    from support.tiny_runs import brightness  # noqa: F401  (registers the test_brightness reward)

    from fastvideo_grpo.config import load_config
    from fastvideo_grpo.data import validate_manifest
    from fastvideo_grpo.data.prep import main as prep_main
    from fastvideo_grpo.cli.plan import _text_len
    from fastvideo_grpo.cli.train import main as train_main

    comps = _folder(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    prep_main(["--family", "test_one_clip", "--model-path", str(tmp_path / "model"), "--prompts",
               str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "emb"), "--dtype", "float32", "--no-progress"])
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["header"]["family"] == "test_one_clip" and manifest["header"]["negative"] is None
    # the stored embeddings are the text encoder's own outputs (transformers directly, same tokenisation)
    from fastvideo_grpo.data import PromptEmbeddingDataset

    ds = PromptEmbeddingDataset(tmp_path / "emb", split="all")
    ids = comps["tokenizer"](PROMPTS[:2], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        out = comps["text_encoder"](ids, output_hidden_states=True)
    for i in range(2):
        item = ds[ds.prompts.index(PROMPTS[i])]["cond"]
        assert torch.equal(item["prompt_embeds"], out.hidden_states[-2][i])
        assert torch.equal(item["pooled_prompt_embeds"], out.text_embeds[i])
    # the recipe: the family by name, its folder and embeddings; trained through the real entry point
    recipe = tmp_path / "one_clip.yaml"
    recipe.write_text(f"""
model: {{name: test_one_clip, kwargs: {{model_path: {tmp_path / 'model'}, resolution: 16}}}}
sampling: {{num_steps: 3, eta: 0.7}}
grpo: {{group_size: 2, prompts_per_iteration: 2, tau: 1.0, num_updates_per_iteration: 1}}
rewards: [{{name: test_brightness}}]
data: {{manifest: {tmp_path / 'emb' / 'manifest.json'}, eval_fraction: 0.25}}
train: {{num_iterations: 2, output_dir: {tmp_path / 'run'}, device: cpu, num_eval_prompts: 2, export: false}}
eval: {{batch_size: 2}}
log: {{progress: false, tensorboard: false}}
""")
    summary = train_main(["--config", str(recipe)])
    assert summary["iteration"] == 2
    assert math.isfinite(summary["last_metrics"]["train/loss"]) and summary["last_metrics"]["train/grad_norm"] > 0
    cfg = load_config(str(recipe))
    adapter = ADAPTERS.build("test_one_clip", model_path=str(tmp_path / "model"), resolution=16)
    validate_manifest(tmp_path / "emb", adapter.cond_spec(), family="test_one_clip")
    # the planner takes the text length from the family's declaration; a model that declares none is an error
    assert _text_len(cfg) == 77
    with pytest.raises(ValueError, match="no prompt encoding is declared for 'toy'.*--text-len"):
        _text_len(load_config(None, ["--model.name=toy"]))
