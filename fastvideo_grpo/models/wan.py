"""Wan 2.1 T2V and I2V: ``WanTransformer3DModel`` + ``AutoencoderKLWan``, rectified flow with shift, CFG.

Not a model of the DanceGRPO paper. Latents are (B, 16, F', h, w), F' = (num_frames - 1) // 4 + 1,
h = height // 8, normalised per channel with the VAE's latents_mean / latents_std (undone in
``decode``). CFG (default 5.0, Wan's default) in rollout and training, both branches trained
(docs/method.md 4). Sigmas: linspace(1, 0, T + 1) with a static shift (default 3.0, Wan's 480p value);
diffusers' WanPipeline samples with UniPC by default -- this is the Euler / SDE sampler instead.
cond: ``prompt_embeds`` (B, L, text_dim) from UMT5 (L = 512 padded) and ``negative_prompt_embeds``.

I2V ("wan_i2v", Wan 2.1 I2V as diffusers' WanImageToVideoPipeline feeds it): shared conditioning
``image_condition`` (B, 4 + 16, F', h, w) = [first-frame mask (4 temporal sub-channels); the
normalised VAE latent of the reference image followed by zero frames], concatenated to the noisy
latents along channels, and ``image_embeds`` (B, 257, image_dim) from the CLIP vision encoder
(when the transformer has ``image_dim``). Both are precomputed (data_prep).

Prompt encoding (data_prep families ``wan`` and ``wan_i2v``), as WanPipeline: the prompt cleaned
(html-unescaped, whitespace collapsed; ftfy's text fix only when ftfy is installed, as in diffusers),
UMT5EncoderModel with the attention mask, positions after the mask set to zero (padded to 512) ->
``prompt_embeds``; a negative embedding is saved for CFG. ``wan_i2v`` adds, as
WanImageToVideoPipeline.prepare_latents, ``image_condition`` (4 + C, F', h, w): [first-frame mask; the
normalised VAE latent (posterior mode) of the video (the image, then num_frames - 1 black frames)], and
``image_embeds`` (257, D) = CLIPVisionModel hidden_states[-2] of the original image when the folder has an
``image_encoder``.
"""

from __future__ import annotations

import html
import re

import torch

from ..sde import FlowSchedule
from .base import ADAPTERS
from .diffusers_base import DiffusersAdapter, build_adapter, resolve_size, to_unit
from .encoding import PromptEncoding, config_sha, load_pretrained


class WanAdapter(DiffusersAdapter):
    model_class = "WanTransformer3DModel"
    vae_class = "AutoencoderKLWan"
    default_num_steps = 25
    # a 3D VAE decodes a whole video at once: spatial tiles (diffusers' defaults: 256 px, stride 192) and
    # one video per decoder call bound its activations (docs/performance.md)
    default_vae_tiling = True
    default_vae_slicing = True

    def __init__(self, model_path, *, num_frames: int = 81, guidance_scale: float = 5.0, shift: float = 3.0,
                 resolution=None, height=None, width=None, **kwargs):
        super().__init__(model_path, cfg_scale=guidance_scale, **kwargs)
        self.shift = float(shift)
        self.height, self.width = resolve_size(resolution, height, width, (480, 832))
        vc = self.vae.config
        self.t_ratio, self.s_ratio = int(vc.scale_factor_temporal), int(vc.scale_factor_spatial)
        self.num_frames = int(num_frames)
        if self.num_frames < 1 or (self.num_frames - 1) % self.t_ratio:
            raise ValueError(f"num_frames must be {self.t_ratio}k + 1 (e.g. 81), got {num_frames}")
        mult = self.s_ratio * self.model.config.patch_size[1]
        if self.height % mult or self.width % mult:
            raise ValueError(f"height and width must be multiples of {mult}, got {self.height}x{self.width}")

    def _make_schedule(self, num_steps, eta):
        return FlowSchedule.create(num_steps, eta=eta, shift=self.shift)

    def sequence_parallel_plan(self):
        """Ulysses plan for diffusers' Wan blocks: the rotary (cos, sin) tables (positional args 2, 3 /
        ``rotary_emb``) cover every image token, so each block gets them sharded like the tokens."""
        from ..distributed.sequence_parallel import SPPlan

        return SPPlan(shard_every_block={2: 1, 3: 1, "rotary_emb": 1})

    def latent_shape(self, cond=None):
        F = (self.num_frames - 1) // self.t_ratio + 1
        return (self.vae.config.z_dim, F, self.height // self.s_ratio, self.width // self.s_ratio)

    def _branch_spec(self):
        return {"prompt_embeds": (None, self.model.config.text_dim)}

    def _model_input(self, latents, c):
        return latents

    def _image_embeds(self, c):
        return None

    def _forward(self, latents, timestep_B, c):
        return self.model(
            hidden_states=self._to_model(self._model_input(latents, c)),
            timestep=timestep_B.to(latents.dtype),
            encoder_hidden_states=self._to_model(c["prompt_embeds"]),
            encoder_hidden_states_image=self._to_model(self._image_embeds(c)),
            return_dict=False,
        )[0]

    def decode(self, latents):
        vc = self.vae.config
        shape = (1, vc.z_dim, 1, 1, 1)
        mean = torch.tensor(vc.latents_mean, device=latents.device, dtype=torch.float32).view(shape)
        std = torch.tensor(vc.latents_std, device=latents.device, dtype=torch.float32).view(shape)
        z = (latents.float() * std + mean).to(self.vae.dtype)
        video = to_unit(self.vae.decode(z, return_dict=False)[0])  # (B, 3, F, H, W)
        return video.permute(0, 2, 1, 3, 4).contiguous()


class WanI2VAdapter(WanAdapter):
    shared_keys = ("image_condition", "image_embeds")

    def __init__(self, model_path, **kwargs):
        super().__init__(model_path, **kwargs)
        c = self.model.config
        extra = c.in_channels - self.vae.config.z_dim
        if extra != self.t_ratio + self.vae.config.z_dim:
            raise ValueError(f"transformer in_channels {c.in_channels} is not z_dim + {self.t_ratio} mask + z_dim "
                             "condition channels: not a Wan 2.1 I2V folder?")
        if c.image_dim is None:
            self.shared_keys = ("image_condition",)

    def _shared_spec(self):
        C, F, h, w = self.latent_shape()
        spec = {"image_condition": (self.t_ratio + C, F, h, w)}
        if self.model.config.image_dim is not None:
            spec["image_embeds"] = (None, self.model.config.image_dim)
        return spec

    def _model_input(self, latents, c):
        return torch.cat([latents, c["image_condition"].to(latents.dtype)], dim=1)

    def _image_embeds(self, c):
        return c.get("image_embeds")


def wan_prompt_clean(text: str) -> str:
    """Wan's prompt cleaning: optional ftfy fix, html-unescape twice, collapse whitespace."""
    try:
        import ftfy  # optional, as in diffusers
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanEncoding(PromptEncoding):
    family = "wan"
    text_encoders = (("text_encoder", "UMT5EncoderModel"),)
    t5_max_length_default = 512
    cfg_by_default = True
    plan_text_len = 512

    def tensor_sources(self):
        return {"prompt_embeds": "text_encoder"}

    def text_conditioning(self, prompts):
        prompts = [wan_prompt_clean(p) for p in prompts]
        ids, mask = self._ids(self.c["tokenizer"], prompts, self.t5_max_length, mask=True)
        h = self.c["text_encoder"](ids, mask).last_hidden_state
        return {"prompt_embeds": h * (mask[..., None] > 0).to(h.dtype)}  # zero every position after the prompt's


class WanI2VEncoding(WanEncoding):
    family = "wan_i2v"
    vae_class = "AutoencoderKLWan"

    def check_options(self):
        super().check_options()
        if not self.num_frames:
            raise ValueError("family 'wan_i2v' needs --num-frames (4k + 1, e.g. 81)")
        t = int(self.c["vae"].config.scale_factor_temporal)
        if (int(self.num_frames) - 1) % t:
            raise ValueError(f"--num-frames must be {t}k + 1 (e.g. 81), got {self.num_frames}")

    @classmethod
    def extra_components(cls, root, dtype, device, image_embeds):
        if not (image_embeds and (root / "image_encoder").is_dir()):
            return {}
        from transformers import CLIPImageProcessor

        enc = load_pretrained("CLIPVisionModel", root / "image_encoder", dtype, device)
        proc = CLIPImageProcessor.from_pretrained(str(root / "image_processor"), local_files_only=True)
        return {name: (obj, {"class": type(obj).__name__, "path": str(root / name), "config_sha256": config_sha(root / name)})
                for name, obj in (("image_encoder", enc), ("image_processor", proc))}

    @property
    def use_image_embeds(self) -> bool:
        return self.image_embeds and "image_encoder" in self.c

    def tensor_sources(self):
        out = {**super().tensor_sources(), "image_condition": "vae"}
        if self.use_image_embeds:
            out["image_embeds"] = "image_encoder"
        return out

    def settings(self):
        return {**super().settings(), **self.image_settings(), "num_frames": int(self.num_frames),
                "image_embeds": self.use_image_embeds}

    def image_conditioning(self, paths):
        """As WanImageToVideoPipeline.prepare_latents (no last image, expand_timesteps off)."""
        loaded, pix, vdtype = self.vae_pixels(paths)
        vae = self.c["vae"]
        B, _, H, W = pix.shape
        T, F = int(vae.config.scale_factor_temporal), int(self.num_frames)
        video = torch.cat([pix[:, :, None], pix.new_zeros(B, 3, F - 1, H, W)], dim=2)
        z = vae.encode(video.to(vdtype)).latent_dist.mode()
        C = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, C, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, C, 1, 1, 1).to(z.device, z.dtype)
        z = (z - mean) * inv_std
        h, w = z.shape[3:]
        mask = torch.zeros(B, 1, F, h, w, device=z.device, dtype=z.dtype)
        mask[:, :, 0] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(T, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(B, -1, T, h, w).transpose(1, 2)  # (B, T, F', h, w)
        out = {"image_condition": torch.cat([mask, z], dim=1)}
        if self.use_image_embeds:  # from the original image, as the pipeline's encode_image
            inputs = self.c["image_processor"](images=[o for o, _ in loaded], return_tensors="pt")
            enc = self.c["image_encoder"]
            pv = inputs["pixel_values"].to(self.device, next(enc.parameters()).dtype)
            out["image_embeds"] = enc(pixel_values=pv, output_hidden_states=True).hidden_states[-2]
        return out


@ADAPTERS.register("wan", paths=("model_path",), signature_of=WanAdapter, encoding=WanEncoding)
def build_wan(**kwargs) -> WanAdapter:
    return build_adapter(WanAdapter, kwargs)


@ADAPTERS.register("wan_i2v", paths=("model_path",), signature_of=WanI2VAdapter, encoding=WanI2VEncoding)
def build_wan_i2v(**kwargs) -> WanI2VAdapter:
    return build_adapter(WanI2VAdapter, kwargs)
