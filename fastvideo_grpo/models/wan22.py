"""Wan 2.2: T2V-A14B (two experts) and TI2V-5B (text, or text and a first frame, to video).

Both run diffusers' ``WanTransformer3DModel`` + ``AutoencoderKLWan`` as Wan 2.1 does (models/wan.py: latents
normalised with the VAE's per-channel mean / std, UMT5 prompt embeddings, Euler / SDE sampler over
linspace(1, 0, T + 1) with a static shift instead of the pipeline's UniPC, CFG with both branches trained).
Not models of the DanceGRPO paper.

T2V-A14B ("wan22_a14b", as diffusers' WanPipeline with ``transformer_2`` and ``boundary_ratio``): two experts of
one architecture, the high-noise ``transformer/`` for model timesteps t >= boundary_ratio * 1000 and the
low-noise ``transformer_2/`` below; ``boundary_ratio`` comes from the folder's model_index.json (0.875 for
Wan2.2-T2V-A14B; the planner, which has no folder, takes that value). CFG scale ``guidance_scale`` in the
high-noise stage and ``guidance_scale_2`` in the low-noise one (Wan's own defaults 4.0 / 3.0, shift 12.0).
How GRPO trains it (the project's choice, docs/recipes.md): ONLY the high-noise expert is trained; the
low-noise one is frozen (``frozen_denoisers``: sharded by FSDP2 like the trained one, no gradients or AdamW
state), and training may only pick steps the high-noise expert predicts (``trainable_steps``; the trainer
refuses a ``grpo.timestep_window`` reaching past the boundary). Why: the two 14B experts trained together need
2 x 14B x 16 bytes of parameters, gradients and AdamW state (56 GiB per GPU on 8 GPUs before activations);
the high-noise steps decide layout and motion, which the video rewards score, while the low-noise steps
render detail (Flow-Factory's Wan 2.2 example trains ``transformer`` only, as the toy demo's frozen low-noise
expert does at toy size). The export is the trained high-noise ``transformer/``; ``transformer_2/`` stays the
released one.

TI2V-5B, text to video ("wan22_5b", as WanPipeline with ``expand_timesteps``): one transformer over the Wan 2.2
VAE's 48-channel latents (16x spatial, 4x temporal compression). With text only every token has the same
timestep, so the per-token timesteps of the pipeline are passed as one per sample (the same numbers).

TI2V-5B, text and image to video ("wan22_5b_i2v", as WanImageToVideoPipeline with ``expand_timesteps``): the
reference image's normalised VAE latent (posterior mode, one latent frame) replaces the first latent frame of
the model input, whose tokens get timestep 0 (per-token timesteps, (B, tokens)). The pipeline integrates that
frame like the others and overwrites it with the reference at the end; here its velocity is the
parameter-free (z_0 - reference) / sigma, so the sampled first frame goes to the reference (exactly the
reference's clean prediction at every step), the other frames are the pipeline's, and that frame's
log-probability is the same for old and new policy (it adds nothing to the ratio or the gradient).
cond: ``prompt_embeds`` (+ ``negative_prompt_embeds``) as Wan 2.1, and ``image_latents`` (B, 48, 1, h, w).

Prompt encoding: Wan 2.1's (``wan``: UMT5, 512 tokens, zeros after the prompt; manifests made for Wan 2.1 with
the same UMT5 folder serve all three); ``wan22_5b_i2v`` adds ``image_latents`` (C, 1, h, w) from data_prep's
``--height/--width`` reference images (family ``wan22_5b_i2v``).
"""

from __future__ import annotations

import json
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from .base import ADAPTERS
from .diffusers_base import NEG, _cat_branches, build_adapter, component_from_config, load_component, \
    require_subfolders
from .wan import WanAdapter, WanEncoding

#: Wan2.2-T2V-A14B's expert boundary (model_index.json of Wan-AI/Wan2.2-T2V-A14B-Diffusers, diffusers'
#: conversion script); used when there is no folder to read it from (the planner)
A14B_BOUNDARY_RATIO = 0.875
NUM_TRAIN_TIMESTEPS = 1000  # Wan's scheduler: the boundary timestep is boundary_ratio * 1000


class Wan22A14BAdapter(WanAdapter):
    """Two experts: ``model`` (high noise, trained) and ``low_noise_model`` (low noise, frozen)."""

    low_noise_subfolder = "transformer_2"

    def __init__(self, model_path, *, num_frames: int = 81, guidance_scale: float = 4.0,
                 guidance_scale_2: Optional[float] = 3.0, boundary_ratio: Optional[float] = None,
                 shift: float = 12.0, **kwargs):
        super().__init__(model_path, num_frames=num_frames, guidance_scale=guidance_scale, shift=shift, **kwargs)
        self.cfg_scale_2 = self.cfg_scale if guidance_scale_2 is None else float(guidance_scale_2)
        if self.cfg_scale_2 < 1.0:
            raise ValueError(f"model.kwargs.guidance_scale_2 must be >= 1, got {guidance_scale_2}")
        if self.cfg_scale_2 > 1.0 and not self.uses_cfg:
            raise ValueError("model.kwargs.guidance_scale_2 > 1 needs guidance_scale > 1 (as WanPipeline, CFG is on "
                             "only when the high-noise scale is above 1)")
        if self.root is not None:
            require_subfolders(self.root, (self.low_noise_subfolder,))
            low = load_component(self.model_class, self.root, self.low_noise_subfolder, self.dtype)
        else:  # the planner's components: the low-noise expert has the trained one's architecture
            low = component_from_config(self.model_class, dict(self.model.config))
        self.low_noise_model = low.requires_grad_(False).eval()
        self.boundary_ratio = self._boundary_ratio(boundary_ratio)
        if kwargs.get("device") is not None:
            self.low_noise_model.to(kwargs["device"])

    def _boundary_ratio(self, given) -> float:
        if given is None and self.root is not None:
            index = self.root / "model_index.json"
            given = json.loads(index.read_text()).get("boundary_ratio") if index.is_file() else None
            if given is None:
                raise ValueError(f"{index} does not give the experts' boundary_ratio: set model.kwargs.boundary_ratio "
                                 f"(Wan2.2-T2V-A14B: {A14B_BOUNDARY_RATIO})")
        ratio = A14B_BOUNDARY_RATIO if given is None else float(given)
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"model.kwargs.boundary_ratio must be in (0, 1), got {given}")
        return ratio

    @classmethod
    def missing_model_files(cls, kwargs):
        try:
            require_subfolders(kwargs.get("model_path"), (cls.model_subfolder, cls.low_noise_subfolder, "vae"))
        except (FileNotFoundError, ValueError) as e:
            return [str(e)]
        return []

    @property
    def boundary_timestep(self) -> float:
        return self.boundary_ratio * NUM_TRAIN_TIMESTEPS

    def frozen_denoisers(self):
        return [self.low_noise_model]

    def trainable_steps(self, schedule):
        """The steps before the boundary: t = sigma * 1000 >= boundary (the high-noise expert's), a prefix."""
        t = (schedule.sigmas[:-1] * schedule.timestep_scale).to(torch.float32)
        high = (t >= self.boundary_timestep).tolist()
        n = sum(high)
        assert high == [True] * n + [False] * (len(high) - n), "sigmas must decrease"
        return 0, n

    def _forward(self, latents, timestep_B, c):
        return self._expert_forward(self.model, latents, timestep_B, c)

    def _expert_forward(self, model, latents, timestep_B, c):
        return model(hidden_states=self._to_model(latents), timestep=timestep_B.to(latents.dtype),
                     encoder_hidden_states=self._to_model(c["prompt_embeds"]), return_dict=False)[0]

    def _guided(self, model, scale, latents, timestep_B, cond):
        """One expert's prediction, CFG as WanPipeline (one batched forward over [uncond; cond])."""
        pos = {k: cond[k] for k in self.branch_keys}
        if not self.uses_cfg:
            return self._expert_forward(model, latents, timestep_B, pos)
        both = _cat_branches({k: cond[NEG + k] for k in self.branch_keys}, pos)
        out = self._expert_forward(model, torch.cat([latents, latents]), torch.cat([timestep_B, timestep_B]), both)
        uncond, c = out.float().chunk(2)
        return uncond + scale * (c - uncond)

    def predict(self, latents, timestep_B, cond):
        """The high-noise expert's guided prediction where t >= the boundary, the low-noise one's below."""
        self.validate_cond(cond, latents.shape[0])
        low = timestep_B.float() < self.boundary_timestep
        # one host sync per call: which experts run. The planner's fake tensors have no values: they measure the
        # trained (high-noise) expert, the one whose activations and FLOPs it scales (both have one architecture)
        n_low = 0 if is_fake(low) else int(low.sum())
        if n_low == 0:
            return self._guided(self.model, self.cfg_scale, latents, timestep_B, cond)
        if n_low == latents.shape[0]:
            return self._guided(self.low_noise_model, self.cfg_scale_2, latents, timestep_B, cond)
        rows = {}
        for name, model, scale, sel in (("high", self.model, self.cfg_scale, ~low),
                                        ("low", self.low_noise_model, self.cfg_scale_2, low)):
            idx = sel.nonzero().flatten()
            sub = {k: (v.index_select(0, idx.to(v.device)) if isinstance(v, torch.Tensor) else v)
                   for k, v in cond.items()}
            rows[name] = (idx, self._guided(model, scale, latents[idx], timestep_B[idx], sub))
        out = torch.empty((latents.shape[0],) + tuple(rows["high"][1].shape[1:]), dtype=torch.float32,
                          device=latents.device)
        for idx, pred in rows.values():
            out[idx] = pred.float()
        return out


class Wan22TI2VAdapter(WanAdapter):
    """TI2V-5B with text only (WanPipeline with expand_timesteps: the same timestep for every token)."""

    def __init__(self, model_path, *, num_frames: int = 121, guidance_scale: float = 5.0, shift: float = 5.0,
                 resolution=None, height=None, width=None, **kwargs):
        if resolution is None and height is None and width is None:
            height, width = 704, 1280  # the 5B model's 720p size
        super().__init__(model_path, num_frames=num_frames, guidance_scale=guidance_scale, shift=shift,
                         resolution=resolution, height=height, width=width, **kwargs)
        if self.model.config.in_channels != self.vae.config.z_dim:
            raise ValueError(f"transformer in_channels {self.model.config.in_channels} != VAE z_dim "
                             f"{self.vae.config.z_dim}: not a Wan 2.2 TI2V-5B folder?")


class Wan22TI2VImageAdapter(Wan22TI2VAdapter):
    """TI2V-5B conditioned on a first frame (WanImageToVideoPipeline with expand_timesteps)."""

    shared_keys = ("image_latents",)

    def _shared_spec(self):
        C, _, h, w = self.latent_shape()
        return {"image_latents": (C, 1, h, w)}

    def _forward(self, latents, timestep_B, c):
        ref = c["image_latents"].to(latents.dtype)  # (B, C, 1, h, w), normalised
        x = torch.cat([ref, latents[:, :, 1:]], dim=2)
        B, _, F, h, w = latents.shape
        _, ph, pw = self.model.config.patch_size
        per_frame = (h // ph) * (w // pw)
        t_tok = timestep_B.to(latents.dtype)[:, None].repeat(1, F * per_frame)
        t_tok[:, :per_frame] = 0  # the reference frame's tokens are clean
        v = self.model(hidden_states=self._to_model(x), timestep=t_tok,
                       encoder_hidden_states=self._to_model(c["prompt_embeds"]), return_dict=False)[0]
        sigma = (timestep_B.to(latents.dtype) / NUM_TRAIN_TIMESTEPS).view(B, 1, 1, 1, 1)
        v0 = (latents[:, :, :1] - ref) / sigma  # parameter-free: drives the first frame to the reference
        return torch.cat([v0.to(v.dtype), v[:, :, 1:]], dim=2)


class Wan22ImageEncoding(WanEncoding):
    family = "wan22_5b_i2v"
    vae_class = "AutoencoderKLWan"

    def tensor_sources(self):
        return {**super().tensor_sources(), "image_latents": "vae"}

    def settings(self):
        return {**super().settings(), **self.image_settings()}

    def image_conditioning(self, paths):
        """As WanImageToVideoPipeline.prepare_latents with expand_timesteps: the image alone (one frame) through
        the VAE, posterior mode, normalised with the VAE's per-channel mean and std."""
        _, pix, vdtype = self.vae_pixels(paths)
        vae = self.c["vae"]
        z = vae.encode(pix[:, :, None].to(vdtype)).latent_dist.mode()
        C = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, C, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, C, 1, 1, 1).to(z.device, z.dtype)
        return {"image_latents": (z - mean) * inv_std}


@ADAPTERS.register("wan22_a14b", paths=("model_path",), signature_of=Wan22A14BAdapter, encoding=WanEncoding)
def build_wan22_a14b(**kwargs) -> Wan22A14BAdapter:
    return build_adapter(Wan22A14BAdapter, kwargs)


@ADAPTERS.register("wan22_5b", paths=("model_path",), signature_of=Wan22TI2VAdapter, encoding=WanEncoding)
def build_wan22_5b(**kwargs) -> Wan22TI2VAdapter:
    return build_adapter(Wan22TI2VAdapter, kwargs)


@ADAPTERS.register("wan22_5b_i2v", paths=("model_path",), signature_of=Wan22TI2VImageAdapter,
                   encoding=Wan22ImageEncoding)
def build_wan22_5b_i2v(**kwargs) -> Wan22TI2VImageAdapter:
    return build_adapter(Wan22TI2VImageAdapter, kwargs)
