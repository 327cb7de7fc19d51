"""Qwen-Image-Edit: Qwen-Image's transformer and VAE conditioned on a reference image, as QwenImageEditPipeline.

Everything but the image conditioning is the text-to-image adapter's (qwen_image.py: latents, schedule,
timestep / 1000, the prompt mask, CFG with norm rescaling, decoding). The reference image enters as
the pipeline feeds it: its VAE latent -- posterior mode, normalised per channel with the VAE's
latents_mean / latents_std, precomputed by data_prep (family ``qwen_image_edit``) -- is packed into 2x2
patches like the noisy latent and appended to the noisy latent's tokens along the sequence; ``img_shapes``
lists both images, [(1, h/2, w/2) of the noisy latent, (1, h_ref/2, w_ref/2) of the reference], so each
gets its own rotary positions; only the first h/2 * w/2 output tokens (the noisy latent's velocity) are
used. The reference latent is the same for both CFG branches, never noised and never trained. Its size,
``reference_resolution`` (pixels, int or [h, w], default 1024: the pipeline's size for a square reference,
and data_prep's default), may differ from the generated image's (the pipeline encodes the reference at about
1024 x 1024 pixels whatever the output size; the released DanceGRPO recipe generates 512 x 512); the
reference latents must have been encoded at that size (checked, with a message naming both settings).

The dynamic shift's mu counts the noisy latent's tokens only, as the pipeline does.
cond: ``prompt_embeds`` (B, L, 3584) + ``prompt_attention_mask`` (B, L) -- Qwen2.5-VL's last hidden states
over the edit template with the reference image's vision tokens, the template's first 64 tokens dropped --
and ``image_latents`` (B, z_dim, h_ref, w_ref), h_ref = reference height / VAE scale.
"""

from __future__ import annotations

import torch

from .base import ADAPTERS
from .diffusers_base import build_adapter, resolve_size
from .flux import pack_latents
from .qwen_image import QwenImageAdapter


class QwenImageEditAdapter(QwenImageAdapter):
    shared_keys = ("image_latents",)

    def __init__(self, model_path, *, reference_resolution=1024, **kwargs):
        super().__init__(model_path, **kwargs)
        self.ref_height, self.ref_width = resolve_size(reference_resolution, None, None, (1024, 1024))
        m = 2 * self.vae_scale
        if self.ref_height % m or self.ref_width % m:
            raise ValueError(f"model.kwargs.reference_resolution must be divisible by {m} (VAE x 2x2 packing), got "
                             f"{self.ref_height}x{self.ref_width}")

    @property
    def extra_image_tokens(self) -> int:
        """Reference-image tokens each sample adds to the transformer's sequence (the planner counts them)."""
        return (self.ref_height // self.vae_scale // 2) * (self.ref_width // self.vae_scale // 2)

    def _shared_spec(self):
        return {"image_latents": (self.vae.config.z_dim, self.ref_height // self.vae_scale,
                                  self.ref_width // self.vae_scale)}

    def validate_cond(self, cond, batch_size=None):
        ref, want = cond.get("image_latents"), self._shared_spec()["image_latents"]
        if isinstance(ref, torch.Tensor) and tuple(ref.shape[1:]) != want:
            raise ValueError(
                f"{type(self).__name__} conditioning: image_latents has trailing shape {tuple(ref.shape[1:])}, expected "
                f"{want}: the normalised VAE latent of a {self.ref_height}x{self.ref_width}-pixel reference image "
                f"(model.kwargs.reference_resolution). Encode the references with data_prep --family qwen_image_edit "
                f"--height {self.ref_height} --width {self.ref_width}, or set reference_resolution to the size they "
                "were encoded at")
        super().validate_cond(cond, batch_size)

    def _image_stream(self, latents, c):
        noisy, shapes = super()._image_stream(latents, c)
        ref = c["image_latents"].to(noisy.dtype)
        h, w = ref.shape[-2:]
        return torch.cat([noisy, pack_latents(ref)], dim=1), shapes + [(1, h // 2, w // 2)]


@ADAPTERS.register("qwen_image_edit", paths=("model_path",), signature_of=QwenImageEditAdapter)
def build_qwen_image_edit(**kwargs) -> QwenImageEditAdapter:
    return build_adapter(QwenImageEditAdapter, kwargs)
