"""Z-Image (Turbo and base): ``ZImageTransformer2DModel`` (transformer/) + ``AutoencoderKL`` (vae/), rectified flow.

A single-stream DiT as diffusers' ``ZImagePipeline`` runs it: each sample's latent (C, 1, h, w) and its prompt's
valid text tokens go to the transformer as lists (it patchifies 2 x 2, pads image and text each to a multiple of
32 tokens, refines them apart - ``noise_refiner`` / ``context_refiner`` - then runs its main ``layers`` over the
joined [image; text] sequence, batch padding masked). Its conventions, kept here: the transformer is conditioned
on t = 1 - sigma ((1000 - timestep) / 1000) and predicts the negative velocity (the sampler's velocity is its
output negated). Latents (B, C, h, w) with h = 2 * (height // (2 * vae_scale)); ``decode`` is the FLUX.1 VAE's
(z / scaling_factor + shift_factor).

CFG as the pipeline's: ``guidance_scale`` g > 0 gives pos + g (pos - neg) = neg + (1 + g)(pos - neg) (so the
shared CFG path runs with scale 1 + g, both branches in one batched forward and trained), optionally
``cfg_normalization`` c > 0: a sample whose guided prediction's norm exceeds c x the conditional one's is scaled
down to it (per sample, over the whole latent). Z-Image-Turbo is distilled: g = 0, no CFG (its model card). The
pipeline's ``cfg_truncation`` (CFG switched off late in sampling) is not supported: its default 1.0, never off.

Sigmas: linspace(1, 0, T + 1) with the static ``shift`` (default 3: Z-Image-Turbo's scheduler config,
``use_dynamic_shifting`` false); the pipeline's own grid, linspace(1, 1/T, T) then 0, is the same.

cond: ``prompt_embeds`` (B, L, 2560) zero-padded + ``prompt_attention_mask`` (B, L); each forward keeps each
row's masked-in tokens (one host sync per forward to read the lengths, as the pipeline's list of embeddings).
Prompt encoding (data_prep family ``z_image``), as ``ZImagePipeline._encode_prompt``: the prompt as a user turn
in the tokenizer's chat template (generation prompt, ``enable_thinking=True``), padded / truncated to 512 tokens,
the penultimate hidden state of Qwen3 (``Qwen3Model``) at the valid tokens.

Sequence parallelism (Ulysses) over the main ``layers``: the whole joined sequence (image and text tokens, padded
to multiples of 32) sharded along the sequence with its per-token rotary table, the batch-padding mask whole;
the refiners (which see image or text alone) are outside the sharded blocks (they run, as the embedders, on
every rank). sp must divide the attention heads (30 at full size: sp 2).
"""

from __future__ import annotations

from typing import List

import torch

from ..sde import FlowSchedule
from .base import ADAPTERS
from .diffusers_base import DiffusersAdapter, build_adapter, resolve_size, to_unit
from .encoding import PromptEncoding

Z_IMAGE_MAX_LENGTH = 512  # ZImagePipeline's max_sequence_length


class ZImageAdapter(DiffusersAdapter):
    model_class = "ZImageTransformer2DModel"
    branch_keys = ("prompt_embeds", "prompt_attention_mask")
    default_num_steps = 8
    packed_patch_size = 2  # the transformer patchifies 2 x 2 itself (the planner counts tokens with it)

    def __init__(self, model_path, *, guidance_scale: float = 0.0, cfg_normalization: float = 0.0,
                 shift: float = 3.0, resolution=None, height=None, width=None, **kwargs):
        if guidance_scale < 0:
            raise ValueError(f"model.kwargs.guidance_scale must be >= 0 (0 = no CFG), got {guidance_scale}")
        super().__init__(model_path, cfg_scale=1.0 + float(guidance_scale), **kwargs)
        self.guidance_scale = float(guidance_scale)
        self.cfg_normalization = float(cfg_normalization or 0.0)
        if self.cfg_normalization < 0:
            raise ValueError(f"model.kwargs.cfg_normalization must be >= 0 (0 = off), got {cfg_normalization}")
        self.shift = float(shift)
        self.height, self.width = resolve_size(resolution, height, width, (1024, 1024))
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        m = 2 * self.vae_scale
        self.latent_h, self.latent_w = 2 * (self.height // m), 2 * (self.width // m)
        if self.latent_h == 0 or self.latent_w == 0:
            raise ValueError(f"height and width must be at least {m}, got {self.height}x{self.width}")
        c = self.model.config
        if c.in_channels != self.vae.config.latent_channels:
            raise ValueError(f"transformer in_channels {c.in_channels} != VAE latent_channels "
                             f"{self.vae.config.latent_channels}: not a Z-Image folder?")
        if 2 not in tuple(c.all_patch_size) or 1 not in tuple(c.all_f_patch_size):
            raise ValueError("the Z-Image transformer has no 2 x 2 (frame 1) patch embedder: not a Z-Image folder?")

    def attention_shape(self):
        """(heads, head dim, attention layers) for the planner: the main layers and both refiners."""
        c = self.model.config
        return c.n_heads, c.dim // c.n_heads, c.n_layers + 2 * c.n_refiner_layers

    def sequence_parallel_plan(self):
        """The main layers (``layer(x, attn_mask, freqs_cis, adaln_input, ...)``, called positionally): x and its
        rotary table (B, N, d/2) sharded along the sequence; the (B, N) batch-padding mask stays whole (it masks
        keys, which the attention sees in full after the all-to-all); the last layer's output gathered."""
        from ..distributed.sequence_parallel import SPPlan

        return SPPlan(shard_inputs={0: 1, "x": 1}, shard_every_block={2: 1, "freqs_cis": 1})

    def _make_schedule(self, num_steps, eta):
        return FlowSchedule.create(num_steps, eta=eta, shift=self.shift)

    def latent_shape(self, cond=None):
        return (self.vae.config.latent_channels, self.latent_h, self.latent_w)

    def _branch_spec(self):
        return {"prompt_embeds": (None, self.model.config.cap_feat_dim), "prompt_attention_mask": (None,)}

    @staticmethod
    def _valid_tokens(emb, mask) -> List[torch.Tensor]:
        """Each row's masked-in tokens (in order), as the pipeline's list of embeddings. Under fake tensors (the
        planner: shapes without values) every stored token counts, as the planner's all-ones masks say."""
        from torch._subclasses.fake_tensor import is_fake

        if is_fake(mask):
            return list(emb.unbind(0))
        keep = mask.bool().cpu()  # one host sync: the lengths decide the shapes
        return [emb[i].index_select(0, keep[i].nonzero().squeeze(1).to(emb.device)) for i in range(emb.shape[0])]

    def _forward(self, latents, timestep_B, c):
        x = list(self._to_model(latents).unsqueeze(2).unbind(0))  # (C, 1, h, w) each
        caps = self._valid_tokens(self._to_model(c["prompt_embeds"]), c["prompt_attention_mask"])
        t = (1000.0 - timestep_B.to(torch.float32)) / 1000.0  # float32, as the pipeline passes it
        out = self.model(x, t, caps, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    def _combine_cfg(self, uncond, cond):
        guided = uncond + self.cfg_scale * (cond - uncond)
        if not self.cfg_normalization:
            return guided
        dims = tuple(range(1, guided.ndim))
        cap = self.cfg_normalization * torch.linalg.vector_norm(cond, dim=dims, keepdim=True)
        norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
        return torch.where(norm > cap, guided * (cap / norm), guided)

    def decode(self, latents):
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return to_unit(self.vae.decode(z, return_dict=False)[0])


class ZImageEncoding(PromptEncoding):
    family = "z_image"
    text_encoders = (("text_encoder", "Qwen3Model"),)
    qwen_max_length_default = Z_IMAGE_MAX_LENGTH
    plan_text_len = Z_IMAGE_MAX_LENGTH  # the stored length; the transformer sees only each prompt's valid tokens

    def tensor_sources(self):
        return {"prompt_embeds": "text_encoder", "prompt_attention_mask": "tokenizer"}

    def settings(self):
        import hashlib

        template = str(self.c["tokenizer"].chat_template)
        return {**super().settings(), "qwen_max_length": self.qwen_max_length, "hidden_layer": -2,
                "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16]}

    def text_conditioning(self, prompts):
        """The pipeline's ``_encode_prompt``: hidden_states[-2] at the valid tokens, here zero-padded to
        ``qwen_max_length`` with their mask (the adapter takes the valid rows back out)."""
        tok = self.c["tokenizer"]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=True) for p in prompts]
        t = tok(texts, padding="max_length", max_length=self.qwen_max_length, truncation=True, return_tensors="pt")
        ids, mask = t.input_ids.to(self.device), t.attention_mask.to(self.device)
        h = self.c["text_encoder"](input_ids=ids, attention_mask=mask.bool(), output_hidden_states=True).hidden_states[-2]
        return {"prompt_embeds": h * mask[..., None].to(h.dtype), "prompt_attention_mask": mask.to(torch.int64)}


@ADAPTERS.register("z_image", paths=("model_path",), signature_of=ZImageAdapter, encoding=ZImageEncoding)
def build_z_image(**kwargs) -> ZImageAdapter:
    return build_adapter(ZImageAdapter, kwargs)
