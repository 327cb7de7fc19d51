"""FLUX.2: ``Flux2Transformer2DModel`` (transformer/) + ``AutoencoderKLFlux2`` (vae/), rectified flow.

Two registrations share the adapter and differ in their text encoder (diffusers' ``Flux2KleinPipeline`` and
``Flux2Pipeline``):

* ``flux2_klein``: FLUX.2 [klein] 4B / 9B (distilled, or the undistilled "base" checkpoints). Qwen3
  (``Qwen3ForCausalLM``) encodes the prompt inside the tokenizer's chat template (generation prompt, thinking
  off), padded to 512 tokens; the hidden states of layers 9, 18 and 27 are concatenated per token ->
  ``prompt_embeds`` (B, 512, 3 x hidden). No guidance embedding: the base checkpoints use true CFG
  (``true_cfg_scale`` > 1 with an empty-prompt negative, the pipeline's ``guidance_scale``), the distilled ones
  none (``true_cfg_scale: 1``, the pipeline's ``is_distilled``).
* ``flux2_dev``: FLUX.2 [dev] (32 B). Mistral Small 3.1 (``Mistral3ForConditionalGeneration``) encodes the prompt
  after BFL's system message, through the processor's chat template, padded to 512 tokens; layers 10, 20 and 30
  concatenated. Guidance-distilled: ``guidance_scale`` (default 4.0, the pipeline's) is a model input, no CFG.

Latents live in the pipeline's own space: the VAE latent patchified 2 x 2 into channels and normalised by the
VAE's batch-norm statistics, (B, 4 x latent_channels, H / 16, W / 16) for an H x W image, drawn as N(0, I) by
the pipeline. Each forward flattens them row-major into tokens (no further packing: the transformer's patch size
is 1) with 4-axis position ids (0, row, col, 0) and text ids (0, 0, 0, l), as ``Flux2KleinPipeline``;
``decode`` undoes the normalisation and the patchification and runs the VAE. The transformer gets sigma (the
scheduler's timestep / 1000) and scales it by 1000 itself.

Sigmas: ``shift: dynamic`` (default): the pipeline's, linspace(1, 1/T, T) shifted exponentially by BFL's
empirical mu (linear in the image token count and the step count, ``compute_empirical_mu``) as a
FlowMatchEulerDiscreteScheduler with ``use_dynamic_shifting`` does, then 0; or a number: a static shift over
linspace(1, 0, T + 1).

Sequence parallelism (Ulysses): image tokens sharded, text tokens whole on every rank. The dual-stream blocks get
the text stream as an input; the single-stream blocks get [text; image] already concatenated, so the plan carries
the text token count from the dual blocks to them (``SPPlan.carry_replicated``) and gathers only the image part
of the last block's output (``SPPlan.output_has_replicated``).

Departures from the pipelines: the reference-image (editing) inputs of both pipelines are not supported (text to
image only); the dev pipeline's prompt upsampling is not run.
"""

from __future__ import annotations

import hashlib
import math
from typing import Union

import torch

from ..sde import FlowSchedule, eta_per_step
from .base import ADAPTERS
from .diffusers_base import DiffusersAdapter, build_adapter, resolve_size, to_unit
from .encoding import PromptEncoding

FLUX2_MAX_LENGTH = 512  # both pipelines' max_sequence_length
KLEIN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers
DEV_LAYERS = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers


def dev_system_message() -> str:
    """BFL's system message of the dev text encoder, as the pipeline holds it (diffusers'
    pipelines/flux2/system_messages.py, from BFL's flux2 repository)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    return SYSTEM_MESSAGE


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """BFL's resolution- and step-dependent shift (diffusers' ``compute_empirical_mu``): linear in the step count
    between the fits at 10 and 200 steps for up to 4300 image tokens, the 200-step fit above."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    m_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m_200)
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)


def flux2_sigmas(num_steps: int, image_seq_len: int) -> torch.Tensor:
    """num_steps + 1 sigmas: linspace(1, 1/T, T) shifted by e^mu / (e^mu + 1/s - 1), then a final 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    e = math.exp(empirical_mu(image_seq_len, num_steps))
    return torch.cat([e / (e + (1.0 / s - 1.0)), s.new_zeros(1)])


def token_ids(h: int, w: int, device) -> torch.Tensor:
    """Position ids (t, row, col, layer) = (0, r, c, 0) of the h * w row-major image tokens."""
    r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    z = torch.zeros_like(r)
    return torch.stack([z, r, c, z], dim=-1).reshape(h * w, 4)


def text_ids(n: int, device) -> torch.Tensor:
    """Position ids (0, 0, 0, l) of n text tokens."""
    ids = torch.zeros(n, 4, dtype=torch.int64, device=device)
    ids[:, 3] = torch.arange(n, device=device)
    return ids


def unpatchify(z_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, 4C, h, w) -> (B, C, 2h, 2w): the VAE latent from its 2 x 2 patchified form (the pipeline's)."""
    B, C4, h, w = z_BCHW.shape
    return z_BCHW.reshape(B, C4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, 2 * h, 2 * w)


class Flux2Adapter(DiffusersAdapter):
    model_class = "Flux2Transformer2DModel"
    vae_class = "AutoencoderKLFlux2"
    branch_keys = ("prompt_embeds",)
    default_num_steps = 50

    def __init__(self, model_path, *, guidance_scale=None, true_cfg_scale: float = 1.0,
                 shift: Union[float, str] = "dynamic", resolution=None, height=None, width=None, **kwargs):
        super().__init__(model_path, cfg_scale=true_cfg_scale, **kwargs)
        c = self.model.config
        if guidance_scale is not None and not c.guidance_embeds:
            raise ValueError("model.kwargs.guidance_scale: this FLUX.2 transformer has no guidance embedding "
                             "(FLUX.2 [klein]); use true_cfg_scale for classifier-free guidance, or remove it")
        self.guidance_scale = float(4.0 if guidance_scale is None else guidance_scale)
        if isinstance(shift, str) and shift != "dynamic":
            raise ValueError(f"model.kwargs.shift must be a number or 'dynamic', got {shift!r}")
        self.shift = shift if isinstance(shift, str) else float(shift)
        self.height, self.width = resolve_size(resolution, height, width, (1024, 1024))
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        m = 2 * self.vae_scale
        self.latent_h, self.latent_w = self.height // m, self.width // m
        if self.latent_h == 0 or self.latent_w == 0:
            raise ValueError(f"height and width must be at least {m}, got {self.height}x{self.width}")
        channels = 4 * self.vae.config.latent_channels
        if c.in_channels != channels:
            raise ValueError(f"transformer in_channels {c.in_channels} != 4 x VAE latent_channels "
                             f"{self.vae.config.latent_channels}: not a FLUX.2 folder?")

    @property
    def image_seq_len(self) -> int:
        return self.latent_h * self.latent_w

    def sequence_parallel_plan(self):
        """Ulysses plan (module docstring): the first dual-stream block's image tokens sharded; the text tokens
        (the dual blocks' ``encoder_hidden_states``, the head of the single blocks' sequence) whole on every rank;
        the rotary tables over [text; image] sharded in their image rows (keyword, or positional 4 in the dual
        and 3 in the single blocks under diffusers' gradient checkpointing); only the image part of the last
        single block's output gathered."""
        from ..distributed.sequence_parallel import SPPlan

        return SPPlan(shard_every_block={"image_rotary_emb": 0, 3: 0, 4: 0},
                      replicated_tokens={1: 1, "encoder_hidden_states": 1}, replicated_first=True,
                      carry_replicated=True, output_has_replicated=True)

    def _make_schedule(self, num_steps, eta):
        if self.shift == "dynamic":
            return FlowSchedule(flux2_sigmas(num_steps, self.image_seq_len), eta_per_step(eta, num_steps))
        return FlowSchedule.create(num_steps, eta=eta, shift=self.shift)

    def latent_shape(self, cond=None):
        return (4 * self.vae.config.latent_channels, self.latent_h, self.latent_w)

    def _branch_spec(self):
        return {"prompt_embeds": (None, self.model.config.joint_attention_dim)}

    def _forward(self, latents, timestep_B, c):
        B, C, h, w = latents.shape
        text = self._to_model(c["prompt_embeds"])
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full((B,), self.guidance_scale, device=latents.device, dtype=torch.float32)
        out = self.model(
            hidden_states=self._to_model(latents.reshape(B, C, h * w).transpose(1, 2)),
            encoder_hidden_states=text,
            timestep=timestep_B.to(latents.dtype) / 1000.0,
            img_ids=token_ids(h, w, latents.device),
            txt_ids=text_ids(text.shape[1], latents.device),
            guidance=guidance,
            return_dict=False,
        )[0]
        return out.transpose(1, 2).reshape(B, C, h, w)

    def decode(self, latents):
        vae = self.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        z = latents.to(vae.dtype) * std.to(vae.dtype) + mean.to(vae.dtype)
        return to_unit(vae.decode(unpatchify(z), return_dict=False)[0])


def stacked_hidden_states(encoder, ids, mask, layers) -> torch.Tensor:
    """The hidden states of ``layers`` concatenated per token: (B, L, len(layers) x hidden), as both FLUX.2
    pipelines build ``prompt_embeds``."""
    out = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    h = torch.stack([out.hidden_states[k] for k in layers], dim=1)  # (B, n, L, H)
    B, n, L, H = h.shape
    return h.permute(0, 2, 1, 3).reshape(B, L, n * H)


def template_sha(template) -> str:
    return hashlib.sha256(str(template).encode()).hexdigest()[:16]


class Flux2KleinEncoding(PromptEncoding):
    """As ``Flux2KleinPipeline.encode_prompt``: the chat template (user turn, generation prompt, thinking off),
    padded / truncated to ``qwen_max_length`` (512) tokens, Qwen3 layers 9, 18, 27 concatenated."""

    family = "flux2_klein"
    text_encoders = (("text_encoder", "Qwen3ForCausalLM"),)
    qwen_max_length_default = FLUX2_MAX_LENGTH
    plan_text_len = FLUX2_MAX_LENGTH
    layers = KLEIN_LAYERS

    def tensor_sources(self):
        return {"prompt_embeds": "text_encoder"}

    def settings(self):
        return {**super().settings(), "qwen_max_length": self.qwen_max_length, "hidden_layers": list(self.layers),
                "chat_template_sha256": template_sha(self.c["tokenizer"].chat_template)}

    def text_conditioning(self, prompts):
        tok = self.c["tokenizer"]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False) for p in prompts]
        t = tok(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=self.qwen_max_length)
        return {"prompt_embeds": stacked_hidden_states(self.c["text_encoder"], t.input_ids.to(self.device),
                                                       t.attention_mask.to(self.device), self.layers)}


class Flux2DevEncoding(PromptEncoding):
    """As ``Flux2Pipeline.encode_prompt``: BFL's system message and the prompt (``[IMG]`` removed) through the
    processor's chat template (no generation prompt), padded / truncated to ``qwen_max_length`` (512) tokens,
    Mistral Small 3.1 layers 10, 20, 30 concatenated. The processor is the pipeline's ``tokenizer`` folder."""

    family = "flux2_dev"
    text_encoders = (("text_encoder", "Mistral3ForConditionalGeneration"),)
    qwen_max_length_default = FLUX2_MAX_LENGTH
    plan_text_len = FLUX2_MAX_LENGTH
    layers = DEV_LAYERS

    @classmethod
    def extra_components(cls, root, dtype, device, image_embeds):
        """The pipeline's processor (``AutoProcessor`` of tokenizer/), whose chat template tokenizes the prompts.
        Without torchvision transformers cannot build FLUX.2-dev's PixtralProcessor: the tokenizer of the same
        folder is used instead, which for text-only prompts renders the folder's chat template and tokenizes the
        result without added special tokens as the processor does (transformers' apply_chat_template)."""
        from transformers import AutoProcessor

        from .encoding import config_sha

        try:
            proc = AutoProcessor.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        except ImportError:
            return {}
        return {"processor": (proc, {"class": type(proc).__name__, "path": str(root / "tokenizer"),
                                     "config_sha256": config_sha(root / "tokenizer")})}

    def tensor_sources(self):
        return {"prompt_embeds": "text_encoder"}

    def settings(self):
        proc = self.c.get("processor", self.c["tokenizer"])
        return {**super().settings(), "qwen_max_length": self.qwen_max_length, "hidden_layers": list(self.layers),
                "system_message_sha256": template_sha(dev_system_message()),
                "chat_template_sha256": template_sha(getattr(proc, "chat_template", None))}

    def text_conditioning(self, prompts):
        proc = self.c.get("processor", self.c["tokenizer"])
        system = dev_system_message()
        messages = [[{"role": "system", "content": [{"type": "text", "text": system}]},
                     {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}] for p in prompts]
        t = proc.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                     return_tensors="pt", padding="max_length", truncation=True,
                                     max_length=self.qwen_max_length)
        return {"prompt_embeds": stacked_hidden_states(self.c["text_encoder"], t["input_ids"].to(self.device),
                                                       t["attention_mask"].to(self.device), self.layers)}


@ADAPTERS.register("flux2_klein", paths=("model_path",), signature_of=Flux2Adapter, encoding=Flux2KleinEncoding)
def build_flux2_klein(**kwargs) -> Flux2Adapter:
    return build_adapter(Flux2Adapter, kwargs)


@ADAPTERS.register("flux2_dev", paths=("model_path",), signature_of=Flux2Adapter, encoding=Flux2DevEncoding)
def build_flux2_dev(**kwargs) -> Flux2Adapter:
    return build_adapter(Flux2Adapter, kwargs)
