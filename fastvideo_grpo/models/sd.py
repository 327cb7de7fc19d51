"""Stable Diffusion v1.x: ``UNet2DConditionModel`` (unet/) + ``AutoencoderKL`` (vae/), eps-prediction, DDIM.

The schedule's ``alphas_cumprod`` come from the folder's scheduler/scheduler_config.json (beta
schedule, steps_offset, set_alpha_to_one) when present, else SD's scaled_linear default. CFG
(default scale 5, as DanceGRPO's SD recipe) is used in rollout AND training: the policy output is
``uncond + s * (cond - uncond)`` from one batched forward, both branches trained (docs/method.md 4).
cond: ``prompt_embeds`` (B, 77, cross_attention_dim) and ``negative_prompt_embeds`` (same shape).

Prompt encoding (data_prep family ``sd``), as StableDiffusionPipeline: CLIPTextModel's last hidden state
over the prompt padded to 77 tokens -> ``prompt_embeds`` (77, D); a negative (empty-prompt) embedding is
saved for CFG.
"""

from __future__ import annotations

import json

import torch

from ..sde import DDIMSchedule, scaled_linear_alphas_cumprod
from .base import ADAPTERS
from .diffusers_base import DiffusersAdapter, build_adapter, resolve_size, to_unit
from .encoding import PromptEncoding


class StableDiffusionAdapter(DiffusersAdapter):
    prediction_type = "eps"
    model_class = "UNet2DConditionModel"
    model_subfolder = "unet"
    default_num_steps = 50

    def __init__(self, model_path, *, guidance_scale: float = 5.0, resolution=None, height=None, width=None,
                 max_sequence_length: int = 77, **kwargs):
        super().__init__(model_path, cfg_scale=guidance_scale, **kwargs)
        self.height, self.width = resolve_size(resolution, height, width, (512, 512))
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.height % self.vae_scale or self.width % self.vae_scale:
            raise ValueError(f"height and width must be multiples of {self.vae_scale}, got {self.height}x{self.width}")
        self.max_sequence_length = int(max_sequence_length)
        self._sched_cfg = self._read_scheduler_config()

    def _read_scheduler_config(self) -> dict:
        """The folder's scheduler config; SD v1.x's defaults when there is none (or no folder: built
        from modules, as the planner does)."""
        path = self.root / "scheduler" / "scheduler_config.json" if self.root is not None else None
        cfg = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        pred = cfg.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise ValueError(f"{path}: prediction_type {pred!r} is not supported (only eps-prediction SD v1.x)")
        return cfg

    def alphas_cumprod(self) -> torch.Tensor:
        c = self._sched_cfg
        if c.get("trained_betas") is not None:
            betas = torch.tensor(c["trained_betas"], dtype=torch.float64)
            return torch.cumprod(1.0 - betas, 0)
        n = int(c.get("num_train_timesteps", 1000))
        b0, b1 = float(c.get("beta_start", 0.00085)), float(c.get("beta_end", 0.012))
        kind = c.get("beta_schedule", "scaled_linear")
        if kind == "scaled_linear":
            return scaled_linear_alphas_cumprod(n, b0, b1)
        if kind == "linear":
            return torch.cumprod(1.0 - torch.linspace(b0, b1, n, dtype=torch.float64), 0)
        raise ValueError(f"beta_schedule {kind!r} in the scheduler config is not supported (scaled_linear, linear)")

    def _make_schedule(self, num_steps, eta):
        c = self._sched_cfg
        return DDIMSchedule.create(num_steps, eta=eta, alphas_cumprod=self.alphas_cumprod(),
                                   steps_offset=int(c.get("steps_offset", 1)),
                                   set_alpha_to_one=bool(c.get("set_alpha_to_one", False)))

    def latent_shape(self, cond=None):
        return (self.model.config.in_channels, self.height // self.vae_scale, self.width // self.vae_scale)

    def _branch_spec(self):
        return {"prompt_embeds": (self.max_sequence_length, self.model.config.cross_attention_dim)}

    def _forward(self, latents, timestep_B, c):
        return self.model(self._to_model(latents), timestep_B, encoder_hidden_states=self._to_model(c["prompt_embeds"]),
                          return_dict=False)[0]

    def decode(self, latents):
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return to_unit(self.vae.decode(z, return_dict=False)[0])


class StableDiffusionEncoding(PromptEncoding):
    family = "sd"
    text_encoders = (("text_encoder", "CLIPTextModel"),)
    cfg_by_default = True
    plan_text_len = 77

    def tensor_sources(self):
        return {"prompt_embeds": "text_encoder"}

    def text_conditioning(self, prompts):
        return {"prompt_embeds": self.clip_last(prompts)}


@ADAPTERS.register("sd", paths=("model_path",), signature_of=StableDiffusionAdapter, encoding=StableDiffusionEncoding)
def build_sd(**kwargs) -> StableDiffusionAdapter:
    return build_adapter(StableDiffusionAdapter, kwargs)
