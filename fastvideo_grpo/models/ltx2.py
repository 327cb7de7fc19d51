"""LTX-2 text to video: ``LTX2VideoTransformer3DModel`` + ``AutoencoderKLLTX2Video``, rectified flow. Not a model of
the DanceGRPO paper.

LTX-2 generates video and audio together: one transformer with a video and an audio stream that attend to each
other in every block. The audio branch stays in the denoiser and is off everywhere else: as LTX2Pipeline, the
audio latents are denoised with the video (the video tokens attend to them, so a video-only denoiser would not
be this model), but they are never decoded (no audio VAE or vocoder is loaded) and the rewards score the video
only. The policy's latent is therefore both streams' tokens in one tensor, (B, N_video + N_audio, C): the video
latent packed as the pipeline packs it (tokens in frame, row, column order; C = the VAE's latent channels,
normalised with its per-channel mean / std and scaling factor), then the audio latent packed (C = audio latent
channels x latent mel bins, normalised with the audio VAE's statistics); the two widths are equal for LTX-2
(128). The SDE noise and the log-probabilities cover both (the audio tokens are part of the sampled action).
N_audio = round(num_frames / frame_rate * sampling rate / hop length / audio compression) from the
transformer's audio settings (the audio VAE's own: the transformer's audio positions use the same ones).

Sampling as the pipeline: sigmas linspace(1, 1/T, T) shifted by the resolution-dependent mu (the number of
video tokens) with the scheduler's exponential time shift and terminal stretch (read from the folder's
scheduler/ config, diffusers' conversion values otherwise: base / max shift 0.95 / 2.05 over 1024 / 4096 tokens,
terminal 0.1); timestep = sigma * 1000, passed also as ``sigma``; positions from the latent's frame, height and
width at ``frame_rate``. CFG as the pipeline's (``guidance_scale`` for the video tokens, ``audio_guidance_scale``
for the audio ones, one batched forward, both branches trained): the guided clean prediction
x0_c + (s - 1)(x0_c - x0_u) with x0 = z - sigma * v, rescaled toward the conditional one's std
(``guidance_rescale``, ``audio_guidance_rescale``, diffusers' ``rescale_noise_cfg``), turned back into a velocity.
Departures: no spatio-temporal guidance and no modality-isolation guidance (the pipeline's defaults for LTX-2.3
add two forwards per step; run the pipeline with ``stg_scale=0, modality_scale=1`` to compare);
``use_cross_timestep`` is False (LTX-2.0's cross-attention modulation) unless set.
Sequence parallelism: refused. The audio tokens attend to every video token (video-to-audio cross-attention), which
Ulysses' sharding of the video sequence would split; ``parallel.sp`` must stay 1.
cond: ``prompt_embeds`` (B, L, caption_channels) and ``audio_prompt_embeds`` (B, L, ...) -- the text connectors'
outputs for each stream -- and ``prompt_attention_mask`` (B, L), each with its ``negative_`` copy for CFG.

Prompt encoding (data_prep family ``ltx2``), as LTX2Pipeline.encode_prompt and its connectors: the prompt
(stripped) tokenized with left padding to 1024 tokens (the pipeline's max_sequence_length; data_prep has no
flag for this encoder's length), every hidden state of the Gemma 3 text encoder stacked and flattened, then the
``connectors/`` stack (LTX2TextConnectors: per-layer masked normalisation, projection, learnable registers in
place of the padding) -> the video and audio text embeddings and their mask.
"""

from __future__ import annotations

import json
from typing import Dict, Optional

import torch

from ..sde import FlowSchedule, eta_per_step
from .base import ADAPTERS
from .diffusers_base import NEG, DiffusersAdapter, _cat_branches, build_adapter, resolve_size, to_unit
from .encoding import PromptEncoding, config_sha
from .qwen_image import dynamic_sigmas

#: FlowMatchEulerDiscreteScheduler of Lightricks/LTX-2 (diffusers' scripts/convert_ltx2_to_diffusers.py), used for
#: the keys the folder's scheduler config lacks
LTX2_SHIFT = dict(base_image_seq_len=1024, max_image_seq_len=4096, base_shift=0.95, max_shift=2.05,
                  time_shift_type="exponential", shift_terminal=0.1)
MAX_SEQUENCE_LENGTH = 1024  # LTX2Pipeline's default text length


class LTX2Adapter(DiffusersAdapter):
    model_class = "LTX2VideoTransformer3DModel"
    vae_class = "AutoencoderKLLTX2Video"
    branch_keys = ("prompt_embeds", "audio_prompt_embeds", "prompt_attention_mask")
    default_num_steps = 30
    default_vae_tiling = True
    default_vae_slicing = True

    def __init__(self, model_path, *, num_frames: int = 121, frame_rate: float = 24.0, guidance_scale: float = 3.0,
                 guidance_rescale: float = 0.7, audio_guidance_scale: Optional[float] = 7.0,
                 audio_guidance_rescale: Optional[float] = 0.7, use_cross_timestep: bool = False,
                 resolution=None, height=None, width=None, **kwargs):
        super().__init__(model_path, cfg_scale=guidance_scale, **kwargs)
        self.audio_cfg_scale = self.cfg_scale if audio_guidance_scale is None else float(audio_guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.audio_guidance_rescale = (self.guidance_rescale if audio_guidance_rescale is None
                                       else float(audio_guidance_rescale))
        if self.audio_cfg_scale < 1.0 or not 0.0 <= self.guidance_rescale <= 1.0 \
                or not 0.0 <= self.audio_guidance_rescale <= 1.0:
            raise ValueError("model.kwargs.audio_guidance_scale must be >= 1 and guidance_rescale / "
                             "audio_guidance_rescale in [0, 1]")
        self.frame_rate = float(frame_rate)
        if self.frame_rate <= 0:
            raise ValueError(f"model.kwargs.frame_rate must be positive, got {frame_rate}")
        self.use_cross_timestep = bool(use_cross_timestep)
        self.height, self.width = resolve_size(resolution, height, width, (512, 768))
        c, vae = self.model.config, self.vae
        self.t_ratio, self.s_ratio = int(vae.temporal_compression_ratio), int(vae.spatial_compression_ratio)
        self.num_frames = int(num_frames)
        if self.num_frames < 1 or (self.num_frames - 1) % self.t_ratio:
            raise ValueError(f"num_frames must be {self.t_ratio}k + 1 (e.g. 121), got {num_frames}")
        mult = self.s_ratio * c.patch_size
        if self.height % mult or self.width % mult:
            raise ValueError(f"height and width must be multiples of {mult}, got {self.height}x{self.width}")
        if c.in_channels != c.audio_in_channels or c.patch_size != 1 or c.patch_size_t != 1:
            raise ValueError(f"the policy latent holds video and audio tokens of one width: the transformer's "
                             f"in_channels {c.in_channels} and audio_in_channels {c.audio_in_channels} must agree "
                             "(and patch sizes be 1), as in LTX-2")
        self.latent_frames = (self.num_frames - 1) // self.t_ratio + 1
        self.latent_h, self.latent_w = self.height // self.s_ratio, self.width // self.s_ratio
        self.video_tokens = self.latent_frames * self.latent_h * self.latent_w
        seconds = self.num_frames / self.frame_rate
        self.audio_tokens = round(seconds * c.audio_sampling_rate / c.audio_hop_length / c.audio_scale_factor)
        self.shift_config = self._scheduler_shift_config()

    def _scheduler_shift_config(self) -> Dict:
        cfg = dict(LTX2_SHIFT)
        path = self.root / "scheduler" / "scheduler_config.json" if self.root is not None else None
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            cfg.update({k: saved[k] for k in LTX2_SHIFT if k in saved})
            if not saved.get("use_dynamic_shifting", True):
                raise ValueError(f"{path} turns dynamic shifting off (a distilled checkpoint?): not supported")
        return cfg

    @property
    def uses_cfg(self) -> bool:
        return max(self.cfg_scale, getattr(self, "audio_cfg_scale", 1.0)) > 1.0

    @property
    def attention_tokens(self) -> int:
        """Tokens of one sample's video self-attention (the planner's attention FLOPs)."""
        return self.video_tokens

    def _make_schedule(self, num_steps, eta):
        return FlowSchedule(dynamic_sigmas(num_steps, self.video_tokens, self.shift_config),
                            eta_per_step(eta, num_steps))

    def sequence_parallel_plan(self):
        raise ValueError("LTX-2 has no sequence-parallel plan: its audio tokens attend to every video token "
                         "(video-to-audio cross-attention), which sharding the video sequence would split; set "
                         "parallel.sp: 1")

    def latent_shape(self, cond=None):
        return (self.video_tokens + self.audio_tokens, self.model.config.in_channels)

    def _branch_spec(self):
        c = self.model.config
        video = c.caption_channels if c.use_prompt_embeddings else c.cross_attention_dim
        audio = c.caption_channels if c.use_prompt_embeddings else c.audio_cross_attention_dim
        return {"prompt_embeds": (None, video), "audio_prompt_embeds": (None, audio), "prompt_attention_mask": (None,)}

    def _forward(self, latents, timestep_B, c):
        n = self.video_tokens
        t = timestep_B.to(torch.float32)
        video, audio = self.model(
            hidden_states=self._to_model(latents[:, :n]), audio_hidden_states=self._to_model(latents[:, n:]),
            encoder_hidden_states=self._to_model(c["prompt_embeds"]),
            audio_encoder_hidden_states=self._to_model(c["audio_prompt_embeds"]), timestep=t, sigma=t,
            encoder_attention_mask=c["prompt_attention_mask"], audio_encoder_attention_mask=c["prompt_attention_mask"],
            num_frames=self.latent_frames, height=self.latent_h, width=self.latent_w, fps=self.frame_rate,
            audio_num_frames=self.audio_tokens, use_cross_timestep=self.use_cross_timestep, return_dict=False)
        return torch.cat([video, audio], dim=1)

    def predict(self, latents, timestep_B, cond):
        """The pipeline's guidance per stream, in clean-prediction space (see the module docstring)."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import rescale_noise_cfg

        self.validate_cond(cond, latents.shape[0])
        pos = {k: cond[k] for k in self.branch_keys}
        if not self.uses_cfg:
            return self._forward(latents, timestep_B, pos)
        both = _cat_branches({k: cond[NEG + k] for k in self.branch_keys}, pos)
        out = self._forward(torch.cat([latents, latents]), torch.cat([timestep_B, timestep_B]), both).float()
        v_u, v_c = out.chunk(2)
        x = latents.float()
        sigma = (timestep_B.float() / 1000.0).view(-1, 1, 1)
        n = self.video_tokens
        parts = []
        for sl, scale, rescale in ((slice(0, n), self.cfg_scale, self.guidance_rescale),
                                   (slice(n, None), self.audio_cfg_scale, self.audio_guidance_rescale)):
            x0_c, x0_u = x[:, sl] - v_c[:, sl] * sigma, x[:, sl] - v_u[:, sl] * sigma
            guided = x0_c + (scale - 1) * (x0_c - x0_u)
            if rescale > 0:
                guided = rescale_noise_cfg(guided, x0_c, guidance_rescale=rescale)
            parts.append((x[:, sl] - guided) / sigma)
        return torch.cat(parts, dim=1)

    def decode(self, latents):
        """The video tokens only (the audio is not decoded): unpacked, denormalised, the VAE's decode (timestep 0
        and no decode noise where the VAE is timestep-conditioned: the pipeline's defaults)."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline

        vae = self.vae
        z = LTX2Pipeline._unpack_latents(latents[:, :self.video_tokens].float(), self.latent_frames, self.latent_h,
                                         self.latent_w)
        z = LTX2Pipeline._denormalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        temb = None
        if vae.config.timestep_conditioning:
            temb = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        video = to_unit(vae.decode(z.to(vae.dtype), temb, return_dict=False)[0])  # (B, 3, F, H, W)
        return video.permute(0, 2, 1, 3, 4).contiguous()


class LTX2Encoding(PromptEncoding):
    family = "ltx2"
    text_encoders = (("text_encoder", "Gemma3ForConditionalGeneration"),)
    cfg_by_default = True
    plan_text_len = MAX_SEQUENCE_LENGTH

    @classmethod
    def extra_components(cls, root, dtype, device, image_embeds):
        from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

        folder = root / "connectors"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model folder {str(root)!r} lacks connectors/config.json: LTX-2's text connectors "
                                    "(LTX2TextConnectors) turn the text encoder's states into the transformer's input")
        conn = LTX2TextConnectors.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True).to(device)
        return {"connectors": (conn, {"class": type(conn).__name__, "path": str(folder),
                                      "config_sha256": config_sha(folder)})}

    def tensor_sources(self):
        return {"prompt_embeds": "connectors", "audio_prompt_embeds": "connectors",
                "prompt_attention_mask": "connectors"}

    def settings(self):
        return {**super().settings(), "max_sequence_length": MAX_SEQUENCE_LENGTH, "padding_side": "left"}

    def text_conditioning(self, prompts):
        tok, te = self.c["tokenizer"], self.c["text_encoder"]
        tok.padding_side = "left"  # as the pipeline: Gemma is padded on the left
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        ids, mask = self._ids(tok, [p.strip() for p in prompts], MAX_SEQUENCE_LENGTH, mask=True)
        states = te(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        packed = torch.stack(states, dim=-1).flatten(2, 3)
        video, audio, conn_mask = self.c["connectors"](packed.to(next(self.c["connectors"].parameters()).dtype),
                                                       mask, padding_side="left")
        return {"prompt_embeds": video, "audio_prompt_embeds": audio, "prompt_attention_mask": conn_mask}


@ADAPTERS.register("ltx2", paths=("model_path",), signature_of=LTX2Adapter, encoding=LTX2Encoding)
def build_ltx2(**kwargs) -> LTX2Adapter:
    return build_adapter(LTX2Adapter, kwargs)
