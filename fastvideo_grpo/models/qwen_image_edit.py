"""Qwen-Image-Edit: Qwen-Image's transformer and VAE conditioned on a reference image, as QwenImageEditPipeline.

Everything but the image conditioning is the text-to-image adapter's (qwen_image.py: latents, schedule,
timestep / 1000, the prompt mask, CFG with norm rescaling, decoding). The reference image enters as
the pipeline feeds it: its VAE latent -- posterior mode, normalised per channel with the VAE's
latents_mean / latents_std, precomputed by data_prep (family ``qwen_image_edit``) -- is packed into 2x2
patches like the noisy latent and appended to the noisy latent's tokens along the sequence; ``img_shapes``
lists both images, [(1, h/2, w/2) of the noisy latent, (1, h_ref/2, w_ref/2) of the reference], so each
gets its own rotary positions; only the first h/2 * w/2 output tokens (the noisy latent's velocity) are
used. The reference latent is the same for both CFG branches, never noised and never trained. Its size may
differ from the generated image's (the pipeline encodes the reference at about 1024 x 1024 pixels whatever
the output size; the released DanceGRPO recipe generates 512 x 512).

The dynamic shift's mu counts the noisy latent's tokens only, as the pipeline does.
cond: ``prompt_embeds`` (B, L, 3584) + ``prompt_attention_mask`` (B, L) -- Qwen2.5-VL's last hidden states
over the edit template with the reference image's vision tokens, the template's first 64 tokens dropped --
and ``image_latents`` (B, z_dim, h_ref, w_ref) with h_ref, w_ref even.
"""

from __future__ import annotations

import torch

from .base import ADAPTERS
from .diffusers_base import build_adapter
from .flux import pack_latents
from .qwen_image import QwenImageAdapter


class QwenImageEditAdapter(QwenImageAdapter):
    shared_keys = ("image_latents",)

    def _shared_spec(self):
        return {"image_latents": (self.vae.config.z_dim, None, None)}

    def validate_cond(self, cond, batch_size=None):
        super().validate_cond(cond, batch_size)
        h, w = cond["image_latents"].shape[-2:]
        if h < 2 or w < 2 or h % 2 or w % 2:
            raise ValueError(f"{type(self).__name__} conditioning: image_latents has latent size {h}x{w}; the "
                             "reference latent must have an even height and width (2x2 patches): encode the "
                             "reference image with data_prep (family qwen_image_edit) at a size divisible by "
                             f"{2 * self.vae_scale} pixels")

    def _image_stream(self, latents, c):
        noisy, shapes = super()._image_stream(latents, c)
        ref = c["image_latents"].to(noisy.dtype)
        h, w = ref.shape[-2:]
        return torch.cat([noisy, pack_latents(ref)], dim=1), shapes + [(1, h // 2, w // 2)]


@ADAPTERS.register("qwen_image_edit", paths=("model_path",), signature_of=QwenImageEditAdapter)
def build_qwen_image_edit(**kwargs) -> QwenImageEditAdapter:
    return build_adapter(QwenImageEditAdapter, kwargs)
