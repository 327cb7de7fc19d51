"""HunyuanVideo 1.5 text to video: ``HunyuanVideo15Transformer3DModel`` + ``AutoencoderKLHunyuanVideo15``, rectified
flow, CFG. Not a model of the DanceGRPO paper.

As diffusers' HunyuanVideo15Pipeline feeds the transformer: latents (B, 32, F', h, w), F' = (num_frames - 1) // 4 + 1,
h = height // 16 (the VAE's ratios are read from it), concatenated along channels with the text-to-video
condition (zero latents and a zero mask: 32 + 32 + 1 = the transformer's 65 input channels); the vision slot of
the text sequence is 729 zero SigLIP embeddings (masked out); timestep = sigma * 1000; the decoded latent is
divided by the VAE's scaling factor. CFG (``guidance_scale``, 6.0 for the 480p / 720p T2V checkpoints, 1.0 for the
CFG-distilled one: diffusers' conversion script) as the pipeline's ClassifierFreeGuidance guider, in one batched
forward with both branches trained (docs/method.md 4). Sigmas: linspace(1, 0, T + 1) with a static shift (5.0 at
480p, 9.0 at 720p: the conversion script's scheduler configs), the pipeline's own grid; Euler / SDE steps.

The diffusers forward selects the valid text tokens ([vision slot; ByT5 glyph tokens; Qwen2.5-VL tokens]) with
boolean masks per sample and branches on whether the image embeddings are all zero: shapes and a branch that
depend on values, which the planner's fake tensors do not have. There (``is_fake``) the adapter runs a replica of
that forward with static shapes (``_static_forward``): the same submodules, the text tokens put in the model's
order -- valid ones first, then the padding, padding embeddings zeroed -- by a stable sort of the masks (one
gather), text to video always; it equals the diffusers forward (tests/integration/test_adapters.py). Everywhere
else the model's own forward runs (FSDP2's hooks on the root module need it).
Sequence parallelism (``sequence_parallel_plan``): as HunyuanVideo's dual-stream blocks (video tokens sharded,
the text tokens after them whole on every rank, the rotary tables sharded with the video tokens).
cond: ``prompt_embeds`` (B, L, 3584) + ``prompt_attention_mask`` (B, L) from Qwen2.5-VL (L = 1000 padded),
``glyph_embeds`` (B, 256, 1472) + ``glyph_attention_mask`` (B, 256) from the ByT5 glyph encoder, and the
``negative_`` ones of each (CFG).

Prompt encoding (data_prep family ``hunyuan15``), as HunyuanVideo15Pipeline.encode_prompt: the prompt (" " for an
empty one) as the user turn after the pipeline's system message, through the tokenizer's chat template with the
generation prompt, padded to ``qwen_max_length`` (1000) + ``crop_start`` (108) tokens; hidden_states[-(skip + 1)]
(skip 2) of the Qwen2.5-VL text model, the first ``crop_start`` tokens cropped -> ``prompt_embeds`` +
``prompt_attention_mask``. The quoted texts of the prompt ("..." or “...”, joined as 'Text "a". Text "b". ')
through ByT5 (256 tokens, masked) -> ``glyph_embeds`` + ``glyph_attention_mask``; zeros and an all-zero
mask for a prompt without quotes. A negative (empty prompt) embedding is saved for CFG by default.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch._subclasses.fake_tensor import is_fake

from ..sde import FlowSchedule
from .base import ADAPTERS
from .diffusers_base import DiffusersAdapter, build_adapter, resolve_size, to_unit
from .encoding import PromptEncoding

VISION_TOKENS = 729  # the pipeline's vision_num_semantic_tokens: SigLIP tokens of the (absent) reference image
CROP_START = 108  # the pipeline's prompt_template_encode_start_idx for Qwen2.5-VL's tokenizer and its system message


class HunyuanVideo15Adapter(DiffusersAdapter):
    model_class = "HunyuanVideo15Transformer3DModel"
    vae_class = "AutoencoderKLHunyuanVideo15"
    branch_keys = ("prompt_embeds", "prompt_attention_mask", "glyph_embeds", "glyph_attention_mask")
    default_num_steps = 50
    # a 3D VAE decodes a whole video at once: spatial tiles and one video per decoder call bound its activations
    default_vae_tiling = True
    default_vae_slicing = True

    def __init__(self, model_path, *, num_frames: int = 121, guidance_scale: float = 6.0, shift: float = 5.0,
                 resolution=None, height=None, width=None, **kwargs):
        super().__init__(model_path, cfg_scale=guidance_scale, **kwargs)
        self.shift = float(shift)
        self.height, self.width = resolve_size(resolution, height, width, (480, 848))  # the pipeline's 480p 16:9
        self.t_ratio = int(self.vae.temporal_compression_ratio)
        self.s_ratio = int(self.vae.spatial_compression_ratio)
        self.num_frames = int(num_frames)
        if self.num_frames < 1 or (self.num_frames - 1) % self.t_ratio:
            raise ValueError(f"num_frames must be {self.t_ratio}k + 1 (e.g. 121), got {num_frames}")
        c = self.model.config
        mult = self.s_ratio * c.patch_size
        if self.height % mult or self.width % mult:
            raise ValueError(f"height and width must be multiples of {mult}, got {self.height}x{self.width}")
        C = self.vae.config.latent_channels
        if c.in_channels != 2 * C + 1:
            raise ValueError(f"transformer in_channels {c.in_channels} is not latents + condition latents + mask "
                             f"(2 x {C} + 1): not a HunyuanVideo 1.5 folder?")

    def _make_schedule(self, num_steps, eta):
        return FlowSchedule.create(num_steps, eta=eta, shift=self.shift)

    def sequence_parallel_plan(self):
        """Blocks are called ``block(hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis)``; the
        joint attention runs over [video tokens; text tokens]: the video tokens and the rotary (cos, sin) tables
        (N_video, D) are sharded, the text tokens stay whole on every rank, the video stream is gathered."""
        from ..distributed.sequence_parallel import SPPlan

        return SPPlan(shard_every_block={4: 0, "freqs_cis": 0}, replicated_tokens={1: 1, "encoder_hidden_states": 1},
                      gather_output_indices=(0,))

    def latent_shape(self, cond=None):
        F = (self.num_frames - 1) // self.t_ratio + 1
        return (self.vae.config.latent_channels, F, self.height // self.s_ratio, self.width // self.s_ratio)

    def _branch_spec(self):
        c = self.model.config
        return {"prompt_embeds": (None, c.text_embed_dim), "prompt_attention_mask": (None,),
                "glyph_embeds": (None, c.text_embed_2_dim), "glyph_attention_mask": (None,)}

    def _text_tokens(self, t, c, batch):
        """The model's text sequence: [vision slot; ByT5; Qwen2.5-VL] tokens, valid ones first (stable order)."""
        m = self.model
        mask = c["prompt_attention_mask"].to(self.dtype)
        mask_2 = c["glyph_attention_mask"].to(self.dtype)
        txt = m.context_embedder(self._to_model(c["prompt_embeds"]), t, mask)
        txt = txt + m.cond_type_embed(torch.zeros_like(txt[:, :, 0], dtype=torch.long))
        txt_2 = m.context_embedder_2(self._to_model(c["glyph_embeds"]))
        txt_2 = txt_2 + m.cond_type_embed(torch.ones_like(txt_2[:, :, 0], dtype=torch.long))
        zeros = torch.zeros(batch, VISION_TOKENS, m.config.image_embed_dim, device=txt.device, dtype=txt.dtype)
        img = m.image_embedder(zeros) * 0.0  # text to video: the vision slot carries no image, masked out
        img = img + m.cond_type_embed(2 * torch.ones_like(img[:, :, 0], dtype=torch.long))
        valid = torch.cat([torch.zeros(batch, VISION_TOKENS, dtype=torch.bool, device=txt.device), mask_2.bool(),
                           mask.bool()], dim=1)
        tokens = torch.cat([img, txt_2 * valid[:, VISION_TOKENS:VISION_TOKENS + txt_2.shape[1], None],
                            txt * valid[:, VISION_TOKENS + txt_2.shape[1]:, None]], dim=1)
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        tokens = tokens.gather(1, order[:, :, None].expand(-1, -1, tokens.shape[2]))
        return tokens, valid.gather(1, order)

    def _forward(self, latents, timestep_B, c):
        x = torch.cat([latents, torch.zeros_like(latents), torch.zeros_like(latents[:, :1])], dim=1)  # T2V condition
        x = self._to_model(x)
        t = timestep_B.to(x.dtype)
        if is_fake(x):  # the planner: no values to select tokens or branch on
            return self._static_forward(x, t, c)
        B = x.shape[0]
        return self.model(hidden_states=x, timestep=t, encoder_hidden_states=self._to_model(c["prompt_embeds"]),
                          encoder_attention_mask=c["prompt_attention_mask"].to(self.dtype),
                          encoder_hidden_states_2=self._to_model(c["glyph_embeds"]),
                          encoder_attention_mask_2=c["glyph_attention_mask"].to(self.dtype),
                          image_embeds=x.new_zeros(B, VISION_TOKENS, self.model.config.image_embed_dim),
                          return_dict=False)[0]

    def _static_forward(self, x, t, c):
        """The diffusers forward for text to video with static shapes (see the module docstring)."""
        m = self.model
        B, _, F, H, W = x.shape
        p, pt = m.config.patch_size, m.config.patch_size_t
        rotary = m.rope(x)
        temb = m.time_embed(t, timestep_r=None)
        h = m.x_embedder(x)
        text, text_mask = self._text_tokens(t, c, B)
        for block in m.transformer_blocks:
            if torch.is_grad_enabled() and m.gradient_checkpointing:
                h, text = m._gradient_checkpointing_func(block, h, text, temb, text_mask, rotary)
            else:
                h, text = block(h, text, temb, text_mask, rotary)
        h = m.proj_out(m.norm_out(h, temb))
        h = h.reshape(B, F // pt, H // p, W // p, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def decode(self, latents):
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        video = to_unit(self.vae.decode(z, return_dict=False)[0])  # (B, 3, F, H, W)
        return video.permute(0, 2, 1, 3, 4).contiguous()


@functools.lru_cache(maxsize=1)
def system_message() -> str:
    """The pipeline's system message (its default argument, whitespace and all)."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import HunyuanVideo15Pipeline

    return inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default


def glyph_text(prompt: str):
    """The quoted texts of ``prompt`` as the pipeline gives them to ByT5 (None without quotes)."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    return extract_glyph_texts(prompt)


class HunyuanVideo15Encoding(PromptEncoding):
    family = "hunyuan15"
    text_encoders = (("text_encoder", "Qwen2_5_VLTextModel"), ("text_encoder_2", "T5EncoderModel"))
    cfg_by_default = True
    crop_start_default = CROP_START
    qwen_max_length_default = 1000
    t5_max_length_default = 256
    # every text token the blocks carry: vision slot + ByT5 + Qwen2.5-VL (the padding included, as the model)
    plan_text_len = VISION_TOKENS + 256 + 1000

    def __init__(self, components, **options):
        # Qwen2.5-VL's chat format around the pipeline's system message (for crop_start "auto" and the manifest);
        # the tokens themselves come from the tokenizer's own chat template, as in the pipeline
        self.template = ("<|im_start|>system\n" + system_message().replace("{", "{{").replace("}", "}}")
                         + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
        super().__init__(components, **options)

    def tensor_sources(self):
        return {"prompt_embeds": "text_encoder", "prompt_attention_mask": "tokenizer",
                "glyph_embeds": "text_encoder_2", "glyph_attention_mask": "tokenizer_2"}

    def settings(self):
        return {**super().settings(), "qwen_max_length": self.qwen_max_length, "crop_start": self.crop_start,
                "num_hidden_layers_to_skip": self.skip, "prompt_template_sha256": self.template_sha()}

    def text_conditioning(self, prompts):
        tok, te = self.c["tokenizer"], self.c["text_encoder"]
        chats = [[{"role": "system", "content": system_message()}, {"role": "user", "content": p if p else " "}]
                 for p in prompts]
        t = tok.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    padding="max_length", max_length=self.qwen_max_length + self.crop_start,
                                    truncation=True, return_tensors="pt")
        ids, mask = t["input_ids"].to(self.device), t["attention_mask"].to(self.device)
        h = te(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-(self.skip + 1)]
        emb_2, mask_2 = self._glyph_embeddings(prompts)
        return {"prompt_embeds": h[:, self.crop_start:], "prompt_attention_mask": mask[:, self.crop_start:],
                "glyph_embeds": emb_2, "glyph_attention_mask": mask_2}

    def _glyph_embeddings(self, prompts):
        tok, te = self.c["tokenizer_2"], self.c["text_encoder_2"]
        n, dim = self.t5_max_length, te.config.d_model
        dtype = next(te.parameters()).dtype
        embs, masks = [], []
        for p in prompts:
            text = glyph_text(p)
            if text is None:
                embs.append(torch.zeros(1, n, dim, device=self.device, dtype=dtype))
                masks.append(torch.zeros(1, n, device=self.device, dtype=torch.int64))
                continue
            ids, mask = self._ids(tok, [text], n, mask=True)
            embs.append(te(input_ids=ids, attention_mask=mask.float())[0])
            masks.append(mask)
        return torch.cat(embs), torch.cat(masks)


@ADAPTERS.register("hunyuan15_t2v", paths=("model_path",), signature_of=HunyuanVideo15Adapter,
                   encoding=HunyuanVideo15Encoding)
def build_hunyuan15_t2v(**kwargs) -> HunyuanVideo15Adapter:
    return build_adapter(HunyuanVideo15Adapter, kwargs)
