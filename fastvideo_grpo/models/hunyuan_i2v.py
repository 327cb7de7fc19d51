"""SkyReels-V1 / HunyuanVideo image-to-video: the reference-image latent concatenated to the input channels.

As diffusers' HunyuanSkyreelsImageToVideoPipeline feeds the transformer: the VAE latent of the
reference image (already multiplied by the VAE scaling factor) is one latent frame, zero-padded
along time to F' frames and concatenated to the noisy latents along channels, so the transformer
has in_channels = 2 * latent_channels and predicts the velocity of the C noisy channels only.
The image latent is the same for both CFG branches and is never noised.

CFG is on by default (``true_cfg_scale`` 6.0, the SkyReels pipeline's default): the policy is the CFG
combination with both branches trained (docs/method.md section 4); embedded guidance (``guidance_scale``)
defaults to 1.0 as in that pipeline.

Not covered: the official HunyuanVideo-I2V checkpoint (``image_condition_type`` "latent_concat" /
"token_replace" plus LLaVA image tokens in the text embedding) -- its transformer config is rejected.
cond: prompt_embeds, prompt_attention_mask, pooled_prompt_embeds (and negative_* of each), plus
``image_latents`` (B, C, 1, h, w) precomputed by data_prep.

Prompt encoding (data_prep family ``hunyuan_i2v``): HunyuanVideo's text encoding, plus ``image_latents``
(C, 1, h, w): the reference image's VAE latent (one frame, posterior mode) times the VAE scaling factor, as
HunyuanSkyreelsImageToVideoPipeline (which samples the posterior with a generator); a negative embedding
is saved for CFG.
"""

from __future__ import annotations

import torch

from .base import ADAPTERS
from .diffusers_base import build_adapter
from .hunyuan_video import HunyuanVideoAdapter, HunyuanVideoEncoding


class HunyuanI2VAdapter(HunyuanVideoAdapter):
    shared_keys = ("image_latents",)

    def __init__(self, model_path, *, true_cfg_scale: float = 6.0, guidance_scale: float = 1.0, num_frames: int = 53,
                 **kwargs):
        super().__init__(model_path, true_cfg_scale=true_cfg_scale, guidance_scale=guidance_scale,
                         num_frames=num_frames, **kwargs)
        c = self.model.config
        if getattr(c, "image_condition_type", None) is not None:
            raise ValueError(f"transformer image_condition_type={c.image_condition_type!r} (official HunyuanVideo-I2V) "
                             "is not supported; this adapter implements the SkyReels channel-concat I2V")
        if c.in_channels != 2 * self.latent_channels():
            raise ValueError(f"transformer in_channels {c.in_channels} != 2 x VAE latent_channels "
                             f"{self.latent_channels()}: not an image-latent-concat (SkyReels I2V) model")

    def _shared_spec(self):
        _, _, h, w = self.latent_shape()
        return {"image_latents": (self.latent_channels(), 1, h, w)}

    def _model_input(self, latents, c):
        img = c["image_latents"].to(latents.dtype)
        pad = torch.zeros_like(latents[:, :, 1:])
        return torch.cat([latents, torch.cat([img, pad], dim=2)], dim=1)


class HunyuanI2VEncoding(HunyuanVideoEncoding):
    family = "hunyuan_i2v"
    vae_class = "AutoencoderKLHunyuanVideo"
    cfg_by_default = True

    def tensor_sources(self):
        return {**super().tensor_sources(), "image_latents": "vae"}

    def settings(self):
        return {**super().settings(), **self.image_settings()}

    def image_conditioning(self, paths):
        _, pix, vdtype = self.vae_pixels(paths)
        vae = self.c["vae"]
        z = vae.encode(pix[:, :, None].to(vdtype)).latent_dist.mode()
        return {"image_latents": z * vae.config.scaling_factor}


@ADAPTERS.register("hunyuan_i2v", paths=("model_path",), signature_of=HunyuanI2VAdapter, encoding=HunyuanI2VEncoding)
def build_hunyuan_i2v(**kwargs) -> HunyuanI2VAdapter:
    return build_adapter(HunyuanI2VAdapter, kwargs)
