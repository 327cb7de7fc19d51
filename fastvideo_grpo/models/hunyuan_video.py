"""HunyuanVideo T2V and T2I: ``HunyuanVideoTransformer3DModel`` + ``AutoencoderKLHunyuanVideo``, rectified flow.

Latents are (B, C, F', h, w) with F' = (num_frames - 1) // 4 + 1 and h = height // 8 (the VAE's
compression ratios are read from its config); T2I ("hunyuan_t2i") is the same model with
num_frames = 1, i.e. one latent frame, and decodes to images (B, 3, H, W) instead of videos
(B, F, 3, H, W). The guidance-distilled model gets guidance * 1000 as an input (embedded
guidance, as diffusers' HunyuanVideoPipeline); no CFG by default (docs/method.md section 4), or
``true_cfg_scale > 1`` with negative_* conditioning.

Sigmas: linspace(1, 0, T + 1) with a static shift (default 5.0, DanceGRPO's HunyuanVideo recipe;
the diffusers scheduler config of hunyuanvideo-community/HunyuanVideo uses 7.0). The recipe's
training size is 480 x 480 with 53 frames (14 latent frames).
cond: ``prompt_embeds`` (B, L, 4096) from the LLaMA encoder, ``prompt_attention_mask`` (B, L),
``pooled_prompt_embeds`` (B, 768) from CLIP.

Prompt encoding (data_prep family ``hunyuan``, for T2V and T2I), as HunyuanVideoPipeline: the prompt inside
the LLaVA/LLaMA template, hidden_states[-(skip + 1)] of the LLaMA encoder with the first ``crop_start`` (95)
template tokens cropped (padded to 256) -> ``prompt_embeds`` + ``prompt_attention_mask``; CLIP's pooled
output -> ``pooled_prompt_embeds``.
"""

from __future__ import annotations

import torch

from ..sde import FlowSchedule
from .base import ADAPTERS
from .diffusers_base import DiffusersAdapter, build_adapter, resolve_size, to_unit
from .encoding import PromptEncoding

HUNYUAN_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
HUNYUAN_CROP_START = 95  # diffusers' value for the template above with the HunyuanVideo LLaMA tokenizer


class HunyuanVideoAdapter(DiffusersAdapter):
    model_class = "HunyuanVideoTransformer3DModel"
    vae_class = "AutoencoderKLHunyuanVideo"
    branch_keys = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")
    default_num_steps = 25
    # a 3D VAE decodes a whole video at once: spatial tiles (diffusers' defaults: 256 px, stride 192) and
    # one video per decoder call bound its activations (docs/performance.md)
    default_vae_tiling = True
    default_vae_slicing = True

    def __init__(self, model_path, *, num_frames: int = 53, guidance_scale: float = 6.0, true_cfg_scale: float = 1.0,
                 shift: float = 5.0, resolution=None, height=None, width=None, **kwargs):
        super().__init__(model_path, cfg_scale=true_cfg_scale, **kwargs)
        self.guidance_scale = float(guidance_scale)
        self.shift = float(shift)
        self.height, self.width = resolve_size(resolution, height, width, (480, 480))
        vc = self.vae.config
        self.t_ratio, self.s_ratio = int(vc.temporal_compression_ratio), int(vc.spatial_compression_ratio)
        self.num_frames = int(num_frames)
        if self.num_frames < 1 or (self.num_frames - 1) % self.t_ratio:
            raise ValueError(f"num_frames must be 1 or {self.t_ratio}k + 1 (e.g. 53), got {num_frames}")
        if self.height % self.s_ratio or self.width % self.s_ratio:
            raise ValueError(f"height and width must be multiples of {self.s_ratio}, got {self.height}x{self.width}")

    @property
    def num_latent_frames(self) -> int:
        return (self.num_frames - 1) // self.t_ratio + 1

    def _make_schedule(self, num_steps, eta):
        return FlowSchedule.create(num_steps, eta=eta, shift=self.shift)

    def sequence_parallel_plan(self):
        """Ulysses plan for diffusers' HunyuanVideo blocks (dual- and single-stream, both called as
        ``block(hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb, ...)``):
        the image tokens are sharded, the text tokens stay whole on every rank. The rotary (cos, sin)
        tables (positional arg 4 / ``freqs_cis`` / ``image_rotary_emb``, (N_img, D)) are sharded like
        the image tokens at every block; every joint attention over [image; text] exchanges only the
        image part (text length = ``encoder_hidden_states``' dim 1); the (B, 1, 1, N_img + N_txt)
        text-padding mask is over all tokens and passes whole; only the image stream (output 0) of
        the last block is gathered."""
        from ..distributed.sequence_parallel import SPPlan

        return SPPlan(shard_every_block={4: 0, "freqs_cis": 0, "image_rotary_emb": 0},
                      replicated_tokens={1: 1, "encoder_hidden_states": 1}, gather_output_indices=(0,))

    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def latent_shape(self, cond=None):
        return (self.latent_channels(), self.num_latent_frames, self.height // self.s_ratio, self.width // self.s_ratio)

    def _branch_spec(self):
        c = self.model.config
        return {"prompt_embeds": (None, c.text_embed_dim), "prompt_attention_mask": (None,),
                "pooled_prompt_embeds": (c.pooled_projection_dim,)}

    def _model_input(self, latents, c):
        return latents

    def _forward(self, latents, timestep_B, c):
        B = latents.shape[0]
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full((B,), self.guidance_scale * 1000.0, device=latents.device, dtype=self.dtype)
        return self.model(
            hidden_states=self._to_model(self._model_input(latents, c)),
            timestep=timestep_B.to(latents.dtype),
            encoder_hidden_states=self._to_model(c["prompt_embeds"]),
            encoder_attention_mask=c["prompt_attention_mask"].to(self.dtype),
            pooled_projections=self._to_model(c["pooled_prompt_embeds"]),
            guidance=guidance,
            return_dict=False,
        )[0]

    def decode(self, latents):
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        video = to_unit(self.vae.decode(z, return_dict=False)[0])  # (B, 3, F, H, W)
        if self.num_frames == 1:
            return video[:, :, 0]
        return video.permute(0, 2, 1, 3, 4).contiguous()


class HunyuanVideoEncoding(PromptEncoding):
    family = "hunyuan"
    text_encoders = (("text_encoder", "LlamaModel"), ("text_encoder_2", "CLIPTextModel"))
    template = HUNYUAN_PROMPT_TEMPLATE
    crop_start_default = HUNYUAN_CROP_START
    plan_text_len = 256

    def tensor_sources(self):
        return {"prompt_embeds": "text_encoder", "prompt_attention_mask": "tokenizer",
                "pooled_prompt_embeds": "text_encoder_2"}

    def settings(self):
        return {**super().settings(), "llama_max_length": self.llama_max_length, "crop_start": self.crop_start,
                "num_hidden_layers_to_skip": self.skip, "prompt_template_sha256": self.template_sha()}

    def text_conditioning(self, prompts):
        emb, mask = self.template_hidden_states(prompts, self.llama_max_length, -(self.skip + 1))
        return {"prompt_embeds": emb, "prompt_attention_mask": mask.to(torch.int64),
                "pooled_prompt_embeds": self.clip_pooled(prompts, "text_encoder_2", "tokenizer_2")}


@ADAPTERS.register("hunyuan_t2v", paths=("model_path",), signature_of=HunyuanVideoAdapter,
                   encoding=HunyuanVideoEncoding)
def build_hunyuan_t2v(**kwargs) -> HunyuanVideoAdapter:
    return build_adapter(HunyuanVideoAdapter, kwargs)


@ADAPTERS.register("hunyuan_t2i", paths=("model_path",), signature_of=HunyuanVideoAdapter,
                   encoding=HunyuanVideoEncoding)
def build_hunyuan_t2i(**kwargs) -> HunyuanVideoAdapter:
    """HunyuanVideo-T2I: the video model with one latent frame (num_frames=1)."""
    kwargs.setdefault("num_frames", 1)
    if kwargs["num_frames"] != 1:
        raise ValueError("hunyuan_t2i generates single frames; use hunyuan_t2v for num_frames > 1")
    return build_adapter(HunyuanVideoAdapter, kwargs)
