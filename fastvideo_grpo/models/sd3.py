"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` + ``AutoencoderKL``, rectified flow with shift, CFG.

Not a model of the DanceGRPO paper; added as the common flow-matching T2I baseline. CFG (default
4.5) is applied in rollout and training with both branches trained, as for SD v1.4 (docs/method.md 4).
Sigmas: linspace(1, 0, T + 1) with the static shift 3.0 of SD3.5's scheduler config (diffusers'
own schedule is linspace over timesteps 1000..1 with the same shift: equal up to the spacing).
cond: ``prompt_embeds`` (B, L, joint_attention_dim) (CLIP-L/G + T5, L = 77 + 256 by default),
``pooled_prompt_embeds`` (B, pooled_projection_dim), and negative_* of both.

Prompt encoding (data_prep family ``sd3``), as StableDiffusion3Pipeline: CLIP-L and CLIP-G penultimate
states concatenated, zero-padded to the T5 width and joined with T5 (padded to 256) along the sequence ->
``prompt_embeds``; CLIP-L and CLIP-G projected pooled outputs concatenated -> ``pooled_prompt_embeds``.
"""

from __future__ import annotations

import torch

from ..sde import FlowSchedule
from .base import ADAPTERS
from .diffusers_base import DiffusersAdapter, build_adapter, resolve_size, to_unit
from .encoding import PromptEncoding


class SD3Adapter(DiffusersAdapter):
    model_class = "SD3Transformer2DModel"
    branch_keys = ("prompt_embeds", "pooled_prompt_embeds")
    default_num_steps = 28

    def __init__(self, model_path, *, guidance_scale: float = 4.5, shift: float = 3.0, resolution=None, height=None,
                 width=None, **kwargs):
        super().__init__(model_path, cfg_scale=guidance_scale, **kwargs)
        self.shift = float(shift)
        self.height, self.width = resolve_size(resolution, height, width, (512, 512))
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        mult = self.vae_scale * self.model.config.patch_size
        if self.height % mult or self.width % mult:
            raise ValueError(f"height and width must be multiples of {mult}, got {self.height}x{self.width}")

    def _make_schedule(self, num_steps, eta):
        return FlowSchedule.create(num_steps, eta=eta, shift=self.shift)

    def latent_shape(self, cond=None):
        return (self.model.config.in_channels, self.height // self.vae_scale, self.width // self.vae_scale)

    def _branch_spec(self):
        c = self.model.config
        return {"prompt_embeds": (None, c.joint_attention_dim), "pooled_prompt_embeds": (c.pooled_projection_dim,)}

    def _forward(self, latents, timestep_B, c):
        return self.model(
            hidden_states=self._to_model(latents),
            timestep=timestep_B.to(latents.dtype),
            encoder_hidden_states=self._to_model(c["prompt_embeds"]),
            pooled_projections=self._to_model(c["pooled_prompt_embeds"]),
            return_dict=False,
        )[0]

    def decode(self, latents):
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return to_unit(self.vae.decode(z, return_dict=False)[0])


class SD3Encoding(PromptEncoding):
    family = "sd3"
    text_encoders = (("text_encoder", "CLIPTextModelWithProjection"), ("text_encoder_2", "CLIPTextModelWithProjection"),
                     ("text_encoder_3", "T5EncoderModel"))
    t5_max_length_default = 256
    cfg_by_default = True
    plan_text_len = 77 + 256

    def tensor_sources(self):
        return {"prompt_embeds": "text_encoder+text_encoder_2+text_encoder_3",
                "pooled_prompt_embeds": "text_encoder+text_encoder_2"}

    def text_conditioning(self, prompts):
        l_h, l_p = self.clip_penultimate_and_proj(prompts, "text_encoder", "tokenizer")
        g_h, g_p = self.clip_penultimate_and_proj(prompts, "text_encoder_2", "tokenizer_2")
        t5 = self.t5_plain(prompts, "text_encoder_3", "tokenizer_3")
        clip = torch.cat([l_h.to(t5.dtype), g_h.to(t5.dtype)], dim=-1)
        if clip.shape[-1] > t5.shape[-1]:
            raise ValueError(f"SD3: CLIP width {clip.shape[-1]} exceeds T5 width {t5.shape[-1]}")
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2),
                "pooled_prompt_embeds": torch.cat([l_p, g_p.to(l_p.dtype)], dim=-1)}


@ADAPTERS.register("sd3", paths=("model_path",), signature_of=SD3Adapter, encoding=SD3Encoding)
def build_sd3(**kwargs) -> SD3Adapter:
    return build_adapter(SD3Adapter, kwargs)
