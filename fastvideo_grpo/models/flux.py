"""FLUX.1-dev: ``FluxTransformer2DModel`` (transformer/) + ``AutoencoderKL`` (vae/), rectified flow.

Latents are stored unpacked, (B, C, h, w) with h = 2 * (height // (2 * vae_scale)); each forward
packs them into 2x2 patches (B, h/2 * w/2, 4C) with img_ids (0, row, col) and txt_ids zeros, as
diffusers' FluxPipeline does, and unpacks the predicted velocity. The transformer gets the
timestep divided by 1000 and the guidance-distilled model its guidance scale as an input
(embedded guidance, default 3.5); there is no CFG by default (docs/method.md section 4); set
``true_cfg_scale > 1`` with negative_* embeddings for true CFG.

Sigmas: linspace(1, 0, T + 1) with the static shift 3 (DanceGRPO's FLUX recipe), where diffusers'
pipeline uses a resolution-dependent dynamic shift over linspace(1, 1/T, T).
cond: ``prompt_embeds`` (B, L, 4096) from T5 and ``pooled_prompt_embeds`` (B, 768) from CLIP.

Prompt encoding (data_prep family ``flux``), as FluxPipeline: T5EncoderModel's last hidden state over the
prompt padded to 512 tokens, no mask -> ``prompt_embeds``; CLIPTextModel's pooled output ->
``pooled_prompt_embeds``.
"""

from __future__ import annotations

import torch

from ..sde import FlowSchedule
from .base import ADAPTERS
from .diffusers_base import DiffusersAdapter, build_adapter, resolve_size, to_unit
from .encoding import PromptEncoding


def pack_latents(z_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches, channel-major inside a patch."""
    B, C, H, W = z_BCHW.shape
    return z_BCHW.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(z_BLD: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for latent height/width (H, W)."""
    B, _, D = z_BLD.shape
    C = D // 4
    return z_BLD.reshape(B, height // 2, width // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """Position ids (0, row, col) of the packed tokens: (H/2 * W/2, 3)."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


class FluxAdapter(DiffusersAdapter):
    model_class = "FluxTransformer2DModel"
    packed_patch_size = 2  # 2x2 latent patches packed into tokens (the transformer's patch_size is 1)
    branch_keys = ("prompt_embeds", "pooled_prompt_embeds")
    default_num_steps = 16

    def __init__(self, model_path, *, guidance_scale: float = 3.5, true_cfg_scale: float = 1.0, shift: float = 3.0,
                 resolution=None, height=None, width=None, **kwargs):
        super().__init__(model_path, cfg_scale=true_cfg_scale, **kwargs)
        self.guidance_scale = float(guidance_scale)
        self.shift = float(shift)
        self.height, self.width = resolve_size(resolution, height, width, (720, 720))
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_h = 2 * (self.height // (self.vae_scale * 2))
        self.latent_w = 2 * (self.width // (self.vae_scale * 2))
        c = self.model.config
        if c.in_channels != 4 * self.vae.config.latent_channels:
            raise ValueError(f"transformer in_channels {c.in_channels} != 4 x VAE latent_channels "
                             f"{self.vae.config.latent_channels}: not a FLUX folder?")

    def sequence_parallel_plan(self):
        """Ulysses plan for diffusers' FLUX blocks (dual- and single-stream, ``block(hidden_states,
        encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)``, both returning
        ``(encoder_hidden_states, hidden_states)``): image tokens sharded, text tokens whole on every
        rank; joint attention runs over [text; image]; the rotary tables span [text; image] tokens
        ((N_txt + N_img, D)), so only their image rows are sharded; the image stream (output 1) of the
        last block is gathered."""
        from ..distributed.sequence_parallel import SPPlan

        return SPPlan(shard_every_block={3: 0, "image_rotary_emb": 0},
                      replicated_tokens={1: 1, "encoder_hidden_states": 1}, replicated_first=True,
                      gather_output_indices=(1,))

    def _make_schedule(self, num_steps, eta):
        return FlowSchedule.create(num_steps, eta=eta, shift=self.shift)

    def latent_shape(self, cond=None):
        return (self.vae.config.latent_channels, self.latent_h, self.latent_w)

    def _branch_spec(self):
        c = self.model.config
        return {"prompt_embeds": (None, c.joint_attention_dim), "pooled_prompt_embeds": (c.pooled_projection_dim,)}

    def _forward(self, latents, timestep_B, c):
        B, _, H, W = latents.shape
        text = self._to_model(c["prompt_embeds"])
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full((B,), self.guidance_scale, device=latents.device, dtype=torch.float32)
        out = self.model(
            hidden_states=self._to_model(pack_latents(latents)),
            timestep=timestep_B.to(latents.dtype) / 1000.0,
            guidance=guidance,
            pooled_projections=self._to_model(c["pooled_prompt_embeds"]),
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=latents.device, dtype=text.dtype),
            img_ids=image_ids(H, W, latents.device, text.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, H, W)

    def decode(self, latents):
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return to_unit(self.vae.decode(z, return_dict=False)[0])


class FluxEncoding(PromptEncoding):
    family = "flux"
    text_encoders = (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "T5EncoderModel"))
    t5_max_length_default = 512
    plan_text_len = 512

    def tensor_sources(self):
        return {"prompt_embeds": "text_encoder_2", "pooled_prompt_embeds": "text_encoder"}

    def text_conditioning(self, prompts):
        return {"prompt_embeds": self.t5_plain(prompts, "text_encoder_2", "tokenizer_2"),
                "pooled_prompt_embeds": self.clip_pooled(prompts, "text_encoder", "tokenizer")}


@ADAPTERS.register("flux", paths=("model_path",), signature_of=FluxAdapter, encoding=FluxEncoding)
def build_flux(**kwargs) -> FluxAdapter:
    return build_adapter(FluxAdapter, kwargs)
