"""Qwen-Image text-to-image: ``QwenImageTransformer2DModel`` (transformer/) + ``AutoencoderKLQwenImage`` (vae/).

Rectified flow. Latents are stored unpacked, (B, C, h, w) with C = the VAE's z_dim (16) and
h = 2 * (height // (2 * vae_scale)), normalised per channel with the VAE's latents_mean / latents_std
(undone in ``decode``, which decodes them as one-frame videos and returns images). Each forward
packs them into 2x2 patches (B, h/2 * w/2, 4C) -- the same packing as FLUX -- and passes
``img_shapes`` [(1, h/2, w/2)] per sample for the transformer's rotary positions and the prompt's
attention mask (``encoder_hidden_states_mask``; the text length the released code passes as
``txt_seq_lens`` is its row sum). The transformer gets the timestep divided by 1000, as diffusers'
QwenImagePipeline does.

CFG: the released DanceGRPO recipe trains without it (``--cfg 0.0``), so ``true_cfg_scale`` defaults
to 1. With ``true_cfg_scale > 1`` (diffusers' pipeline default: 4.0 with a negative prompt) the
guided output is rescaled as the pipeline does: ``comb * |cond| / |comb|`` with the norms taken per
packed token over its 4C channels (``cfg_renorm``, default on), both branches trained.

Sigmas: linspace(1, 0, T + 1) with a static ``shift`` (default 3, the released recipe's), or
``shift: dynamic``: the pipeline's resolution-dependent shift, mu linear in the number of image
tokens and the scheduler's time-shift function and terminal stretch, all read from the folder's
scheduler/scheduler_config.json (diffusers' defaults for absent keys).
cond: ``prompt_embeds`` (B, L, joint_attention_dim = 3584) -- Qwen2.5-VL's last hidden states with
the prompt template's first 34 tokens dropped -- and ``prompt_attention_mask`` (B, L).

Prompt encoding (data_prep family ``qwen_image``), as QwenImagePipeline: the prompt inside Qwen-Image's chat
template, the last hidden state of Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration) over the prompt's tokens
with the first ``crop_start`` (34) template tokens dropped, zero-padded to ``qwen_max_length`` (512, the
pipeline's default max_sequence_length) -> ``prompt_embeds`` + ``prompt_attention_mask``.
"""

from __future__ import annotations

import json
import math
from typing import Dict, Union

import torch

from ..sde import FlowSchedule, eta_per_step
from .base import ADAPTERS
from .diffusers_base import DiffusersAdapter, build_adapter, resolve_size, to_unit
from .encoding import PromptEncoding
from .flux import pack_latents, unpack_latents

QWEN_IMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_IMAGE_CROP_START = 34  # diffusers' prompt_template_encode_start_idx: the template's tokens before the prompt
QWEN_IMAGE_MAX_LENGTH = 512  # QwenImagePipeline's default max_sequence_length

# diffusers' QwenImagePipeline falls back to these when the scheduler config lacks the key
DYNAMIC_SHIFT_DEFAULTS = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
                              time_shift_type="exponential", shift_terminal=None)


def dynamic_shift_mu(image_seq_len: int, cfg: Dict) -> float:
    """The pipeline's mu: linear in the image token count through (base_len, base_shift), (max_len, max_shift)."""
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    return image_seq_len * m + cfg["base_shift"] - m * cfg["base_image_seq_len"]


def dynamic_sigmas(num_steps: int, image_seq_len: int, cfg: Dict) -> torch.Tensor:
    """num_steps + 1 sigmas: linspace(1, 1/T, T) shifted by mu (exponential: e^mu / (e^mu + 1/s - 1), linear:
    mu / (mu + 1/s - 1)), stretched so the last one is ``shift_terminal`` when set, then a final 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    mu = dynamic_shift_mu(image_seq_len, cfg)
    if cfg["time_shift_type"] == "exponential":
        s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    elif cfg["time_shift_type"] == "linear":
        s = mu / (mu + (1.0 / s - 1.0))
    else:
        raise ValueError(f"scheduler time_shift_type must be 'exponential' or 'linear', got {cfg['time_shift_type']!r}")
    if cfg.get("shift_terminal"):
        one_minus = 1.0 - s
        s = 1.0 - one_minus / (one_minus[-1] / (1.0 - cfg["shift_terminal"]))
    return torch.cat([s, s.new_zeros(1)])


class QwenImageAdapter(DiffusersAdapter):
    model_class = "QwenImageTransformer2DModel"
    vae_class = "AutoencoderKLQwenImage"
    branch_keys = ("prompt_embeds", "prompt_attention_mask")
    default_num_steps = 20

    def __init__(self, model_path, *, true_cfg_scale: float = 1.0, cfg_renorm: bool = True,
                 shift: Union[float, str] = 3.0, resolution=None, height=None, width=None, **kwargs):
        super().__init__(model_path, cfg_scale=true_cfg_scale, **kwargs)
        self.cfg_renorm = bool(cfg_renorm)
        self.height, self.width = resolve_size(resolution, height, width, (720, 720))
        self.vae_scale = 2 ** len(self.vae.config.temperal_downsample)
        self.latent_h = 2 * (self.height // (self.vae_scale * 2))
        self.latent_w = 2 * (self.width // (self.vae_scale * 2))
        if self.latent_h == 0 or self.latent_w == 0:
            raise ValueError(f"height and width must be at least {2 * self.vae_scale}, got {self.height}x{self.width}")
        c = self.model.config
        if c.in_channels != 4 * self.vae.config.z_dim:
            raise ValueError(f"transformer in_channels {c.in_channels} != 4 x VAE z_dim {self.vae.config.z_dim}: "
                             "not a Qwen-Image folder?")
        if c.guidance_embeds:
            raise ValueError("a guidance-distilled Qwen-Image transformer (guidance_embeds) is not supported")
        if isinstance(shift, str):
            if shift != "dynamic":
                raise ValueError(f"model.kwargs.shift must be a number or 'dynamic', got {shift!r}")
            self.shift = shift
            self.dynamic_shift = self._scheduler_shift_config()
        else:
            self.shift = float(shift)
            self.dynamic_shift = None

    def _scheduler_shift_config(self) -> Dict:
        cfg = dict(DYNAMIC_SHIFT_DEFAULTS)
        path = self.root / "scheduler" / "scheduler_config.json" if self.root is not None else None
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            cfg.update({k: saved[k] for k in DYNAMIC_SHIFT_DEFAULTS if k in saved})
        return cfg

    def sequence_parallel_plan(self):
        """Not built for Qwen-Image yet: its blocks take the text mask and a (image, text) pair of rotary
        tables that the generic plan does not shard; refused rather than run wrong."""
        raise ValueError(f"Ulysses sequence parallelism (parallel.sp > 1) is not supported for {type(self).__name__} "
                         "yet; set parallel.sp: 1 (the recipe's FSDP-only setting)")

    @property
    def image_seq_len(self) -> int:
        """Packed image tokens per sample."""
        return (self.latent_h // 2) * (self.latent_w // 2)

    def _make_schedule(self, num_steps, eta):
        if self.dynamic_shift is None:
            return FlowSchedule.create(num_steps, eta=eta, shift=self.shift)
        return FlowSchedule(dynamic_sigmas(num_steps, self.image_seq_len, self.dynamic_shift),
                            eta_per_step(eta, num_steps))

    def latent_shape(self, cond=None):
        return (self.vae.config.z_dim, self.latent_h, self.latent_w)

    def _branch_spec(self):
        return {"prompt_embeds": (None, self.model.config.joint_attention_dim), "prompt_attention_mask": (None,)}

    def _image_stream(self, latents, c):
        """The transformer's image-stream tokens and their ``img_shapes`` entry (one (frames, rows, cols) per
        packed image, in sequence order): here the noisy latent alone. The first (rows * cols) tokens of the
        output are always the noisy latent's velocity (the edit adapter appends its reference image)."""
        _, _, H, W = latents.shape
        return pack_latents(latents), [(1, H // 2, W // 2)]

    def _forward(self, latents, timestep_B, c):
        B, _, H, W = latents.shape
        tokens, shapes = self._image_stream(latents, c)
        out = self.model(
            hidden_states=self._to_model(tokens),
            timestep=timestep_B.to(latents.dtype) / 1000.0,
            encoder_hidden_states=self._to_model(c["prompt_embeds"]),
            encoder_hidden_states_mask=c["prompt_attention_mask"],
            img_shapes=[shapes] * B,
            return_dict=False,
        )[0]
        return unpack_latents(out[:, :(H // 2) * (W // 2)], H, W)

    def _combine_cfg(self, uncond, cond):
        comb = uncond + self.cfg_scale * (cond - uncond)
        if not self.cfg_renorm:
            return comb
        H, W = comb.shape[-2:]
        c_p, comb_p = pack_latents(cond), pack_latents(comb)
        scaled = comb_p * (c_p.norm(dim=-1, keepdim=True) / comb_p.norm(dim=-1, keepdim=True))
        return unpack_latents(scaled, H, W)

    def decode(self, latents):
        vc = self.vae.config
        shape = (1, vc.z_dim, 1, 1, 1)
        mean = torch.tensor(vc.latents_mean, device=latents.device, dtype=torch.float32).view(shape)
        std = torch.tensor(vc.latents_std, device=latents.device, dtype=torch.float32).view(shape)
        z = (latents.float().unsqueeze(2) * std + mean).to(self.vae.dtype)
        return to_unit(self.vae.decode(z, return_dict=False)[0][:, :, 0])


class QwenImageEncoding(PromptEncoding):
    family = "qwen_image"
    text_encoders = (("text_encoder", "Qwen2_5_VLForConditionalGeneration"),)
    template = QWEN_IMAGE_PROMPT_TEMPLATE
    crop_start_default = QWEN_IMAGE_CROP_START
    qwen_max_length_default = QWEN_IMAGE_MAX_LENGTH
    plan_text_len = QWEN_IMAGE_MAX_LENGTH

    def tensor_sources(self):
        return {"prompt_embeds": "text_encoder", "prompt_attention_mask": "tokenizer"}

    def settings(self):
        return {**super().settings(), "qwen_max_length": self.qwen_max_length, "crop_start": self.crop_start,
                "prompt_template_sha256": self.template_sha()}

    def text_conditioning(self, prompts):
        """As QwenImagePipeline: template, last hidden state, each prompt's valid tokens without the first
        ``crop_start`` ones, zero-padded to ``qwen_max_length`` (truncating at drop + max length keeps the same
        tokens as the pipeline's 1024 + drop truncation followed by max_sequence_length: the encoder is causal)."""
        texts = [self.template.format(p) for p in prompts]
        L, drop = self.qwen_max_length, self.crop_start
        t = self.c["tokenizer"](texts, padding=True, max_length=L + drop, truncation=True, return_tensors="pt")
        ids, mask = t.input_ids.to(self.device), t.attention_mask.to(self.device)
        h = self.c["text_encoder"](input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        emb = h.new_zeros(len(texts), L, h.shape[-1])
        out_mask = torch.zeros(len(texts), L, dtype=torch.int64, device=h.device)
        for i in range(len(texts)):
            valid = h[i][mask[i].bool()][drop:drop + L]  # works for either padding side
            emb[i, :valid.shape[0]] = valid
            out_mask[i, :valid.shape[0]] = 1
        return {"prompt_embeds": emb, "prompt_attention_mask": out_mask}


@ADAPTERS.register("qwen_image", paths=("model_path",), signature_of=QwenImageAdapter, encoding=QwenImageEncoding)
def build_qwen_image(**kwargs) -> QwenImageAdapter:
    return build_adapter(QwenImageAdapter, kwargs)
