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

Prompt encoding (data_prep family ``qwen_image_edit``), as QwenImageEditPipeline._get_qwen_prompt_embeds:
the instruction goes inside the edit chat template, whose user turn starts with the image placeholder
``<|vision_start|><|image_pad|><|vision_end|>``; the reference image (resized to the size it is
VAE-encoded at) goes through the Qwen2-VL image processor (patches + ``image_grid_thw``) and the
placeholder is expanded to one ``<|image_pad|>`` per merged patch (grid t * h * w / merge_size^2), as
Qwen2VLProcessor does; Qwen2.5-VL's last hidden state is taken over each sequence's valid tokens and the
template's first 64 tokens (the system turn, up to the user turn's image) are dropped, so the embedding holds
the image's vision tokens then the instruction's. Nothing is truncated (the pipeline does not truncate
either): a sequence longer than ``qwen_max_length`` (2048 by default) is an error naming the length needed;
shorter ones are zero-padded with a mask. ``image_latents`` (C, h, w): the reference image's VAE latent
(posterior mode) normalised with the VAE's latents_mean / latents_std, as the pipeline's _encode_vae_image.
The tokenizer and image processor come from the folder's ``processor/``, as the pipeline's; the
processor's own class is not used (in transformers 5 Qwen2VLProcessor cannot be built without a video
processor, which needs torchvision): the tokenizer and image processor it wraps are used directly (tests
compare against the real Qwen2VLProcessor inside the diffusers pipeline). The text depends on the image, so
there is no shared negative embedding: the recipe runs without CFG.
"""

from __future__ import annotations

import hashlib
from typing import List, Sequence, Tuple

import torch

from .base import ADAPTERS
from .diffusers_base import build_adapter, resolve_size
from .flux import pack_latents
from .qwen_image import QwenImageAdapter, QwenImageEncoding

QWEN_IMAGE_EDIT_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_IMAGE_EDIT_CROP_START = 64  # diffusers' prompt_template_encode_start_idx for the template above
QWEN_IMAGE_EDIT_MAX_LENGTH = 2048  # stored length: ~1370 vision tokens of a 1024 x 1024 reference + the instruction
IMAGE_TOKEN = "<|image_pad|>"
#: the template text before this marker is what ``crop_start='auto'`` counts
CROP_MARKER = "<|vision_start|>"
_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", IMAGE_TOKEN, "<|video_pad|>")


def expand_image_tokens(texts: Sequence[str], grid_thw: torch.Tensor, merge_size: int) -> List[str]:
    """One ``<|image_pad|>`` per merged vision patch: text i (holding one placeholder) gets
    prod(grid_thw[i]) // merge_size^2 of them."""
    out = []
    for i, t in enumerate(texts):
        if t.count(IMAGE_TOKEN) != 1:
            raise AssertionError(f"expected one image placeholder in the edit template, found {t.count(IMAGE_TOKEN)}")
        n = int(grid_thw[i].prod()) // (merge_size ** 2)
        out.append(t.replace(IMAGE_TOKEN, IMAGE_TOKEN * n))
    return out


def check_instructions(prompts: Sequence[str]) -> None:
    bad = [p for p in prompts if any(v in p for v in _VISION_TOKENS)]
    if bad:
        raise ValueError(f"edit instructions must not contain Qwen2-VL vision tokens {_VISION_TOKENS}: {bad[0]!r}")


def encode_edit_prompts(tokenizer, image_processor, text_encoder, prompts: Sequence[str], images, *, drop: int,
                        max_length: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, max_length, D), prompt_attention_mask (B, max_length) int64) for instructions
    ``prompts`` and RGB PIL ``images`` (one per prompt, at the size they are VAE-encoded at)."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} instructions but {len(images)} reference images")
    check_instructions(prompts)
    vision = image_processor(images=list(images), return_tensors="pt")
    grid = vision["image_grid_thw"]
    texts = expand_image_tokens([QWEN_IMAGE_EDIT_PROMPT_TEMPLATE.format(p) for p in prompts], grid,
                                int(image_processor.merge_size))
    tok = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    h = text_encoder(input_ids=ids, attention_mask=mask, pixel_values=vision["pixel_values"].to(device),
                     image_grid_thw=grid.to(device), output_hidden_states=True).hidden_states[-1]
    emb = h.new_zeros(len(texts), max_length, h.shape[-1])
    out_mask = torch.zeros(len(texts), max_length, dtype=torch.int64, device=h.device)
    for i in range(len(texts)):
        valid = h[i][mask[i].bool()][drop:]  # works for either padding side
        if valid.shape[0] > max_length:
            raise ValueError(f"prompt {i} of this batch ({prompts[i][:60]!r}) with its reference image's "
                             f"{int(grid[i].prod()) // int(image_processor.merge_size) ** 2} vision tokens needs "
                             f"{valid.shape[0]} embedding positions, more than --qwen-max-length {max_length}: "
                             "raise it (or encode smaller reference images)")
        emb[i, :valid.shape[0]] = valid
        out_mask[i, :valid.shape[0]] = 1
    return emb, out_mask


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


QWEN_IMAGE_EDIT_REF_SIZE = 1024  # the pipeline's reference size for a square image (1024 x 1024 pixels' area)


class QwenImageEditEncoding(QwenImageEncoding):
    family = "qwen_image_edit"
    tokenizer_folders = {"text_encoder": "processor"}  # the edit pipeline tokenizes with its processor's
    vae_class = "AutoencoderKLQwenImage"
    text_needs_image = True
    template = QWEN_IMAGE_EDIT_PROMPT_TEMPLATE
    crop_start_default = QWEN_IMAGE_EDIT_CROP_START
    crop_marker = CROP_MARKER
    qwen_max_length_default = QWEN_IMAGE_EDIT_MAX_LENGTH
    plan_text_len = QWEN_IMAGE_EDIT_MAX_LENGTH

    def check_options(self):
        self.height = self.height or QWEN_IMAGE_EDIT_REF_SIZE
        self.width = self.width or QWEN_IMAGE_EDIT_REF_SIZE
        m = 2 * 2 ** len(self.c["vae"].config.temperal_downsample)  # VAE downsampling x the 2x2 packing
        if self.height % m or self.width % m:
            raise ValueError(f"family 'qwen_image_edit': the reference size --height x --width must be "
                             f"divisible by {m} (VAE x 2x2 packing), got {self.height}x{self.width}")
        super().check_options()

    @classmethod
    def extra_components(cls, root, dtype, device, image_embeds):
        """The Qwen2-VL image processor saved with the pipeline's processor."""
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(str(root / "processor"), local_files_only=True)
        cfg = root / "processor" / "preprocessor_config.json"
        return {"image_processor": (proc, {"class": type(proc).__name__, "path": str(cfg.parent), "config_sha256":
                                           hashlib.sha256(cfg.read_bytes()).hexdigest()[:16] if cfg.is_file() else ""})}

    def tensor_sources(self):
        return {"prompt_embeds": "text_encoder", "prompt_attention_mask": "processor", "image_latents": "vae"}

    def settings(self):
        return {**super().settings(), **self.image_settings()}

    def text_conditioning(self, prompts):
        raise ValueError(f"family {self.family!r} encodes each prompt with its reference image: use encode(prompts, "
                         "images)")

    @torch.no_grad()
    def encode(self, prompts, images=None):
        if images is None or len(images) != len(prompts):
            raise ValueError(f"family {self.family!r} needs one reference image per prompt")
        resized = [self.load_resized(p)[1] for p in images]
        emb, mask = encode_edit_prompts(self.c["processor"], self.c["image_processor"], self.c["text_encoder"],
                                        prompts, resized, drop=self.crop_start, max_length=self.qwen_max_length,
                                        device=self.device)
        return {"prompt_embeds": emb, "prompt_attention_mask": mask, **self.encode_images(images)}

    def image_conditioning(self, paths):
        """As QwenImageEditPipeline._encode_vae_image, one frame dropped."""
        _, pix, vdtype = self.vae_pixels(paths)
        vae = self.c["vae"]
        z = vae.encode(pix[:, :, None].to(vdtype)).latent_dist.mode()[:, :, 0]
        C = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, C, 1, 1).to(z.device, z.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, C, 1, 1).to(z.device, z.dtype)
        return {"image_latents": (z - mean) / std}


@ADAPTERS.register("qwen_image_edit", paths=("model_path",), signature_of=QwenImageEditAdapter,
                   encoding=QwenImageEditEncoding)
def build_qwen_image_edit(**kwargs) -> QwenImageEditAdapter:
    return build_adapter(QwenImageEditAdapter, kwargs)
