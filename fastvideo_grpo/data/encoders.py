"""Per-family prompt encoders (and I2V reference-image encoders), following the diffusers pipelines.

Each encoder turns a batch of prompts into the conditioning tensors the model adapter reads, with the
same names, shapes and numerics as the family's diffusers pipeline ``encode_prompt`` (names are the
pipeline's argument names; negatives get a ``negative_`` prefix in prep.py):

* ``sd``      StableDiffusionPipeline: CLIPTextModel last hidden state, padded to 77 -> ``prompt_embeds`` (77, D).
* ``flux``    FluxPipeline: T5EncoderModel last hidden state (padded to 512, no mask) -> ``prompt_embeds``;
              CLIPTextModel pooled output -> ``pooled_prompt_embeds``.
* ``hunyuan`` HunyuanVideoPipeline: the prompt inside the LLaVA/LLaMA template, hidden_states[-(skip + 1)]
              of the LLaMA encoder with the first ``crop_start`` template tokens cropped (padded to 256)
              -> ``prompt_embeds`` + ``prompt_attention_mask``; CLIP pooled -> ``pooled_prompt_embeds``.
* ``wan``     WanPipeline: prompt cleaned (html-unescaped, whitespace collapsed), UMT5EncoderModel with the
              attention mask, positions after the mask set to zero (padded to 512) -> ``prompt_embeds``.
* ``sd3``     StableDiffusion3Pipeline: CLIP-L and CLIP-G penultimate states concatenated, zero-padded to the
              T5 width and joined with T5 (padded to 256) along the sequence -> ``prompt_embeds``; CLIP-L and
              CLIP-G projected pooled outputs concatenated -> ``pooled_prompt_embeds``.
* ``qwen_image`` QwenImagePipeline: the prompt inside Qwen-Image's chat template, the last hidden state of
              Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration) over the prompt's tokens with the first
              ``crop_start`` (34) template tokens dropped, zero-padded to ``qwen_max_length`` (512, the
              pipeline's default max_sequence_length) -> ``prompt_embeds`` + ``prompt_attention_mask``.
* ``qwen_image_edit`` QwenImageEditPipeline: the instruction AND the reference image through Qwen2.5-VL
              (qwen_edit.py: the edit template, the image's vision tokens kept, the first 64 template tokens
              dropped, padded to ``qwen_max_length``, 2048 by default) -> ``prompt_embeds`` +
              ``prompt_attention_mask``; ``image_latents`` (C, h, w): the reference image's VAE latent (posterior
              mode) normalised with the VAE's latents_mean / latents_std, as the pipeline's _encode_vae_image.
              Its tokenizer and image processor come from the folder's ``processor/``, as the pipeline's.
* ``hunyuan_i2v`` hunyuan text + ``image_latents`` (C, 1, h, w): the reference image's VAE latent (one frame)
              times the VAE scaling factor, as HunyuanSkyreelsImageToVideoPipeline.
* ``wan_i2v`` wan text + ``image_condition`` (4 + C, F', h, w): [first-frame mask; normalised VAE latent of the
              video (image, then num_frames - 1 black frames)] as WanImageToVideoPipeline.prepare_latents,
              and ``image_embeds`` (257, D) = CLIPVisionModel hidden_states[-2] when the folder has an
              ``image_encoder``.

Departures: VAE latents use the posterior mode (mean), not a sample, so outputs are deterministic (the
SkyReels pipeline samples with a generator; Wan uses the mode too). Reference images whose size differs
from (height, width) are resized (Lanczos) to cover it and center-cropped; the pipelines resize without
cropping (identical when the aspect ratio already matches). Wan's CLIP image embedding is computed from
the original image, as WanImageToVideoPipeline does. Wan's ftfy text fix
is applied only when ftfy is installed, as in diffusers.

Models are loaded from a local diffusers-format folder (``tokenizer/``, ``text_encoder/``, ... subfolders)
with ``from_pretrained(..., local_files_only=True)``; tokenizers through ``AutoTokenizer``.
"""

from __future__ import annotations

import hashlib
import html
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .qwen_edit import (CROP_MARKER, QWEN_IMAGE_EDIT_CROP_START, QWEN_IMAGE_EDIT_MAX_LENGTH,
                        QWEN_IMAGE_EDIT_PROMPT_TEMPLATE, encode_edit_prompts)

FAMILIES = ("sd", "flux", "hunyuan", "wan", "sd3", "qwen_image", "hunyuan_i2v", "wan_i2v", "qwen_image_edit")

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

QWEN_IMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_IMAGE_CROP_START = 34  # diffusers' prompt_template_encode_start_idx: the template's tokens before the prompt
QWEN_IMAGE_MAX_LENGTH = 512  # QwenImagePipeline's default max_sequence_length

#: (template, default crop) of the families whose prompt goes through a chat template
_TEMPLATES = {"hunyuan": (HUNYUAN_PROMPT_TEMPLATE, HUNYUAN_CROP_START),
              "hunyuan_i2v": (HUNYUAN_PROMPT_TEMPLATE, HUNYUAN_CROP_START),
              "qwen_image": (QWEN_IMAGE_PROMPT_TEMPLATE, QWEN_IMAGE_CROP_START),
              "qwen_image_edit": (QWEN_IMAGE_EDIT_PROMPT_TEMPLATE, QWEN_IMAGE_EDIT_CROP_START)}
#: where the template's cropped prefix ends ('auto' counts the tokens before it); default: the prompt's "{}"
_CROP_MARKER = {"qwen_image_edit": CROP_MARKER}
_QWEN_MAX_LENGTH = {"qwen_image": QWEN_IMAGE_MAX_LENGTH, "qwen_image_edit": QWEN_IMAGE_EDIT_MAX_LENGTH}

# (subfolder, transformers class) of the text encoders each family needs
_TEXT_PARTS = {
    "sd": [("text_encoder", "CLIPTextModel")],
    "flux": [("text_encoder", "CLIPTextModel"), ("text_encoder_2", "T5EncoderModel")],
    "hunyuan": [("text_encoder", "LlamaModel"), ("text_encoder_2", "CLIPTextModel")],
    "wan": [("text_encoder", "UMT5EncoderModel")],
    "sd3": [("text_encoder", "CLIPTextModelWithProjection"), ("text_encoder_2", "CLIPTextModelWithProjection"),
            ("text_encoder_3", "T5EncoderModel")],
    "qwen_image": [("text_encoder", "Qwen2_5_VLForConditionalGeneration")],
}
_TEXT_PARTS["hunyuan_i2v"] = _TEXT_PARTS["hunyuan"]
_TEXT_PARTS["wan_i2v"] = _TEXT_PARTS["wan"]
_TEXT_PARTS["qwen_image_edit"] = _TEXT_PARTS["qwen_image"]
#: tokenizer folders other than text_encoder* -> tokenizer* (the edit pipeline tokenizes with its processor's)
_TOKENIZER_FOLDER = {"qwen_image_edit": "processor"}
_VAE_CLASS = {"hunyuan_i2v": "AutoencoderKLHunyuanVideo", "wan_i2v": "AutoencoderKLWan",
              "qwen_image_edit": "AutoencoderKLQwenImage"}
#: the families whose adapters use CFG by default (a negative / empty-prompt embedding is saved)
CFG_BY_DEFAULT = {"sd": True, "flux": False, "hunyuan": False, "wan": True, "sd3": True, "qwen_image": False,
                  "hunyuan_i2v": True,
                  "wan_i2v": True, "qwen_image_edit": False}
IMAGE_FAMILIES = ("hunyuan_i2v", "wan_i2v", "qwen_image_edit")
#: families whose text conditioning depends on the reference image (no shared negative embedding possible)
IMAGE_TEXT_FAMILIES = ("qwen_image_edit",)
QWEN_IMAGE_EDIT_REF_SIZE = 1024  # the pipeline's reference size for a square image (1024 x 1024 pixels' area)


def _tokenizer_folder(text_encoder_subfolder: str, family: str = "") -> str:
    if family in _TOKENIZER_FOLDER:
        return _TOKENIZER_FOLDER[family]
    return text_encoder_subfolder.replace("text_encoder", "tokenizer")


def _config_sha(folder: Path) -> str:
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        cfg = folder / name
        if cfg.is_file():
            return hashlib.sha256(cfg.read_bytes()).hexdigest()[:16]
    return ""


def wan_prompt_clean(text: str) -> str:
    """Wan's prompt cleaning: optional ftfy fix, html-unescape twice, collapse whitespace."""
    try:
        import ftfy  # optional, as in diffusers
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class FamilyEncoder:
    """Text (and image) encoders of one family. ``components`` maps diffusers component names
    (``text_encoder``, ``tokenizer``, ``text_encoder_2``, ..., ``vae``, ``image_encoder``,
    ``image_processor``) to loaded objects; ``ids`` maps component names to identifiers recorded in the
    manifest (class, path, config hash)."""

    def __init__(self, family: str, components: Dict[str, object], *, ids: Optional[Dict[str, dict]] = None,
                 device="cpu", clip_max_length: int = 77, t5_max_length: Optional[int] = None,
                 llama_max_length: int = 256, qwen_max_length: Optional[int] = None, crop_start="default", num_hidden_layers_to_skip: int = 2,
                 height: Optional[int] = None, width: Optional[int] = None, num_frames: Optional[int] = None,
                 image_embeds: bool = True):
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
        self.family = family
        self.c = components
        self.device = torch.device(device)
        for k, v in components.items():
            if isinstance(v, torch.nn.Module):
                v.requires_grad_(False).eval()
        self.ids = ids or {k: {"class": type(v).__name__} for k, v in components.items()}
        self.clip_max_length = int(clip_max_length)
        default_t5 = {"flux": 512, "wan": 512, "wan_i2v": 512, "sd3": 256}.get(family)
        self.t5_max_length = int(t5_max_length) if t5_max_length else default_t5
        self.llama_max_length = int(llama_max_length)
        self.qwen_max_length = int(qwen_max_length or _QWEN_MAX_LENGTH.get(family, QWEN_IMAGE_MAX_LENGTH))
        if self.qwen_max_length < 1:
            raise ValueError(f"qwen_max_length must be >= 1, got {qwen_max_length}")
        self.skip = int(num_hidden_layers_to_skip)
        self.crop_start = self._resolve_crop_start(crop_start) if family in _TEMPLATES else None
        if family == "qwen_image_edit":
            height = height or QWEN_IMAGE_EDIT_REF_SIZE
            width = width or QWEN_IMAGE_EDIT_REF_SIZE
            m = 2 * 2 ** len(self.c["vae"].config.temperal_downsample)  # VAE downsampling x the 2x2 packing
            if height % m or width % m:
                raise ValueError(f"family 'qwen_image_edit': the reference size --height x --width must be "
                                 f"divisible by {m} (VAE x 2x2 packing), got {height}x{width}")
        self.height, self.width, self.num_frames = height, width, num_frames
        if family in IMAGE_FAMILIES:
            if not height or not width:
                raise ValueError(f"family {family!r} encodes reference images: --height and --width are required")
            if family == "wan_i2v":
                if not num_frames:
                    raise ValueError("family 'wan_i2v' needs --num-frames (4k + 1, e.g. 81)")
                t = int(self.c["vae"].config.scale_factor_temporal)
                if (int(num_frames) - 1) % t:
                    raise ValueError(f"--num-frames must be {t}k + 1 (e.g. 81), got {num_frames}")
        self.use_image_embeds = bool(image_embeds) and family == "wan_i2v" and "image_encoder" in components

    # ------------------------------------------------------------------ description for the manifest

    def _resolve_crop_start(self, crop_start) -> int:
        template, default = _TEMPLATES[self.family]
        if crop_start in (None, "default"):
            return default
        if crop_start == "auto":
            # tokens of the template before the prompt placeholder (incl. BOS if the tokenizer adds one)
            prefix = template.split(_CROP_MARKER.get(self.family, "{}"))[0]
            return len(self.c[_tokenizer_folder("text_encoder", self.family)](prefix).input_ids)
        n = int(crop_start)
        if n < 0:
            raise ValueError(f"crop_start must be >= 0, got {crop_start}")
        return n

    def tensor_sources(self) -> Dict[str, str]:
        """Conditioning name -> the component producing it (the manifest's per-tensor encoder)."""
        f = self.family
        if f == "sd":
            return {"prompt_embeds": "text_encoder"}
        if f == "flux":
            return {"prompt_embeds": "text_encoder_2", "pooled_prompt_embeds": "text_encoder"}
        if f.startswith("hunyuan"):
            out = {"prompt_embeds": "text_encoder", "prompt_attention_mask": "tokenizer",
                   "pooled_prompt_embeds": "text_encoder_2"}
            if f == "hunyuan_i2v":
                out["image_latents"] = "vae"
            return out
        if f.startswith("wan"):
            out = {"prompt_embeds": "text_encoder"}
            if f == "wan_i2v":
                out["image_condition"] = "vae"
                if self.use_image_embeds:
                    out["image_embeds"] = "image_encoder"
            return out
        if f == "sd3":
            return {"prompt_embeds": "text_encoder+text_encoder_2+text_encoder_3",
                    "pooled_prompt_embeds": "text_encoder+text_encoder_2"}
        if f == "qwen_image":
            return {"prompt_embeds": "text_encoder", "prompt_attention_mask": "tokenizer"}
        if f == "qwen_image_edit":
            return {"prompt_embeds": "text_encoder", "prompt_attention_mask": "processor", "image_latents": "vae"}
        raise AssertionError(f)

    def text_names(self) -> List[str]:
        return [k for k in self.tensor_sources() if k not in ("image_latents", "image_condition", "image_embeds")]

    def settings(self) -> dict:
        """Everything that changes the numbers (goes into the manifest header and the resume fingerprint)."""
        s = {"clip_max_length": self.clip_max_length}
        if self.t5_max_length:
            s["t5_max_length"] = self.t5_max_length
        if self.family.startswith("hunyuan"):
            s.update(llama_max_length=self.llama_max_length, crop_start=self.crop_start,
                     num_hidden_layers_to_skip=self.skip,
                     prompt_template_sha256=hashlib.sha256(HUNYUAN_PROMPT_TEMPLATE.encode()).hexdigest()[:16])
        if self.family in ("qwen_image", "qwen_image_edit"):
            template = _TEMPLATES[self.family][0]
            s.update(qwen_max_length=self.qwen_max_length, crop_start=self.crop_start,
                     prompt_template_sha256=hashlib.sha256(template.encode()).hexdigest()[:16])
        if self.family in IMAGE_FAMILIES:
            s.update(height=int(self.height), width=int(self.width), image_latent="posterior_mode",
                     image_resize="cover_center_crop")
            if self.family == "wan_i2v":
                s.update(num_frames=int(self.num_frames), image_embeds=self.use_image_embeds)
        return s

    # ------------------------------------------------------------------ text

    def _ids(self, tokenizer, prompts, max_length, mask=False):
        t = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                      return_attention_mask=mask, return_tensors="pt")
        ids = t.input_ids.to(self.device)
        return (ids, t.attention_mask.to(self.device)) if mask else ids

    def _clip_last(self, prompts, te="text_encoder", tok="tokenizer"):
        encoder = self.c[te]
        if getattr(encoder.config, "use_attention_mask", False):  # as StableDiffusionPipeline
            ids, mask = self._ids(self.c[tok], prompts, self.clip_max_length, mask=True)
            return encoder(ids, attention_mask=mask)[0]
        return encoder(self._ids(self.c[tok], prompts, self.clip_max_length))[0]

    def _clip_pooled(self, prompts, te, tok):
        out = self.c[te](self._ids(self.c[tok], prompts, self.clip_max_length), output_hidden_states=False)
        return out.pooler_output

    def _clip_penultimate_and_proj(self, prompts, te, tok):
        out = self.c[te](self._ids(self.c[tok], prompts, self.clip_max_length), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _t5_plain(self, prompts, te, tok):
        ids = self._ids(self.c[tok], prompts, self.t5_max_length)
        return self.c[te](ids, output_hidden_states=False)[0]

    def _umt5_masked(self, prompts):
        prompts = [wan_prompt_clean(p) for p in prompts]
        ids, mask = self._ids(self.c["tokenizer"], prompts, self.t5_max_length, mask=True)
        h = self.c["text_encoder"](ids, mask).last_hidden_state
        return h * (mask[..., None] > 0).to(h.dtype)  # zero every position after the prompt's tokens

    def _llama(self, prompts):
        texts = [HUNYUAN_PROMPT_TEMPLATE.format(p) for p in prompts]
        ids, mask = self._ids(self.c["tokenizer"], texts, self.llama_max_length + self.crop_start, mask=True)
        h = self.c["text_encoder"](input_ids=ids, attention_mask=mask, output_hidden_states=True)
        h = h.hidden_states[-(self.skip + 1)]
        return h[:, self.crop_start:], mask[:, self.crop_start:]

    def _qwen(self, prompts):
        """As QwenImagePipeline: template, last hidden state, each prompt's valid tokens without the first
        ``crop_start`` ones, zero-padded to ``qwen_max_length`` (truncating at drop + max length keeps the same
        tokens as the pipeline's 1024 + drop truncation followed by max_sequence_length: the encoder is causal)."""
        texts = [QWEN_IMAGE_PROMPT_TEMPLATE.format(p) for p in prompts]
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
        return emb, out_mask

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Batched conditioning (leading batch dim) for ``prompts``, in the encoders' dtype."""
        f = self.family
        if f == "sd":
            return {"prompt_embeds": self._clip_last(prompts)}
        if f == "flux":
            return {"prompt_embeds": self._t5_plain(prompts, "text_encoder_2", "tokenizer_2"),
                    "pooled_prompt_embeds": self._clip_pooled(prompts, "text_encoder", "tokenizer")}
        if f.startswith("hunyuan"):
            emb, mask = self._llama(prompts)
            return {"prompt_embeds": emb, "prompt_attention_mask": mask.to(torch.int64),
                    "pooled_prompt_embeds": self._clip_pooled(prompts, "text_encoder_2", "tokenizer_2")}
        if f.startswith("wan"):
            return {"prompt_embeds": self._umt5_masked(prompts)}
        if f == "sd3":
            l_h, l_p = self._clip_penultimate_and_proj(prompts, "text_encoder", "tokenizer")
            g_h, g_p = self._clip_penultimate_and_proj(prompts, "text_encoder_2", "tokenizer_2")
            t5 = self._t5_plain(prompts, "text_encoder_3", "tokenizer_3")
            clip = torch.cat([l_h.to(t5.dtype), g_h.to(t5.dtype)], dim=-1)
            if clip.shape[-1] > t5.shape[-1]:
                raise ValueError(f"SD3: CLIP width {clip.shape[-1]} exceeds T5 width {t5.shape[-1]}")
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            return {"prompt_embeds": torch.cat([clip, t5], dim=-2),
                    "pooled_prompt_embeds": torch.cat([l_p, g_p.to(l_p.dtype)], dim=-1)}
        if f == "qwen_image":
            emb, mask = self._qwen(prompts)
            return {"prompt_embeds": emb, "prompt_attention_mask": mask}
        if f in IMAGE_TEXT_FAMILIES:
            raise ValueError(f"family {f!r} encodes each prompt with its reference image: use encode(prompts, images)")
        raise AssertionError(f)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], images: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """All the conditioning of a batch: the text's, plus the reference images' for image families
        (``images``: one path per prompt)."""
        if self.family not in IMAGE_FAMILIES:
            return self.encode_text(prompts)
        if images is None or len(images) != len(prompts):
            raise ValueError(f"family {self.family!r} needs one reference image per prompt")
        if self.family == "qwen_image_edit":
            resized = [self._load_resized(p)[1] for p in images]
            emb, mask = encode_edit_prompts(self.c["processor"], self.c["image_processor"], self.c["text_encoder"],
                                            prompts, resized, drop=self.crop_start, max_length=self.qwen_max_length,
                                            device=self.device)
            return {"prompt_embeds": emb, "prompt_attention_mask": mask, **self.encode_images(images)}
        return {**self.encode_text(prompts), **self.encode_images(images)}

    # ------------------------------------------------------------------ images

    def load_image(self, path):
        """(original RGB PIL image, (3, H, W) tensor in [-1, 1] resized to cover (height, width) and
        center-cropped). Lanczos resampling and x / 255 * 2 - 1 as diffusers' VaeImageProcessor."""
        import numpy as np

        orig, im = self._load_resized(path)
        x = torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0).permute(2, 0, 1)
        return orig, 2.0 * x - 1.0

    def _load_resized(self, path):
        """(original RGB PIL image, the PIL image resized to cover (height, width) and center-cropped)."""
        from PIL import Image, UnidentifiedImageError

        H, W = int(self.height), int(self.width)
        try:
            with Image.open(path) as im:
                orig = im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"reference image {str(path)!r} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"reference image {str(path)!r} could not be read as an image: {e}") from None
        im = orig
        if (im.height, im.width) != (H, W):
            scale = max(H / im.height, W / im.width)
            rh, rw = max(H, round(im.height * scale)), max(W, round(im.width * scale))
            im = im.resize((rw, rh), Image.Resampling.LANCZOS)
            top, left = (rh - H) // 2, (rw - W) // 2
            im = im.crop((left, top, left + W, top + H))
        return orig, im

    @torch.no_grad()
    def encode_images(self, paths: Sequence[str]) -> Dict[str, torch.Tensor]:
        vae = self.c["vae"]
        vdtype = next(vae.parameters()).dtype
        loaded = [self.load_image(p) for p in paths]
        pix = torch.stack([x for _, x in loaded]).to(self.device)  # (B, 3, H, W)
        if self.family == "hunyuan_i2v":
            z = vae.encode(pix[:, :, None].to(vdtype)).latent_dist.mode()
            return {"image_latents": z * vae.config.scaling_factor}
        if self.family == "qwen_image_edit":  # as QwenImageEditPipeline._encode_vae_image, one frame dropped
            z = vae.encode(pix[:, :, None].to(vdtype)).latent_dist.mode()[:, :, 0]
            C = vae.config.z_dim
            mean = torch.tensor(vae.config.latents_mean).view(1, C, 1, 1).to(z.device, z.dtype)
            std = torch.tensor(vae.config.latents_std).view(1, C, 1, 1).to(z.device, z.dtype)
            return {"image_latents": (z - mean) / std}
        # wan_i2v, as WanImageToVideoPipeline.prepare_latents (no last image, expand_timesteps off)
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


# ----------------------------------------------------------------------------- loading


def _load(class_name: str, folder: Path, dtype, device, module="transformers"):
    import importlib

    cls = getattr(importlib.import_module(module), class_name)
    kw = {"torch_dtype": dtype} if module == "diffusers" else {"dtype": dtype}
    m = cls.from_pretrained(str(folder), local_files_only=True, **kw)
    return m.to(device)


def load_family_encoder(family: str, model_path, *, dtype=torch.float32, device="cpu", image_embeds: bool = True,
                        **options) -> FamilyEncoder:
    """Load ``family``'s encoders from a local diffusers-format folder (see docs/data_prep.md)."""
    from transformers import AutoTokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    root = Path(model_path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"model path {str(root)!r} is not a folder; expected a local diffusers-format "
                                "folder with tokenizer/ and text_encoder/ subfolders (see docs/data_prep.md)")
    need = []
    for te, _ in _TEXT_PARTS[family]:
        need += [te, _tokenizer_folder(te, family)]
    if family in IMAGE_FAMILIES:
        need.append("vae")
    missing = [s for s in need if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"model folder {str(root)!r} lacks the subfolders {missing} needed for family "
                                f"{family!r} (expected: {need})")
    comps, ids = {}, {}

    def ident(name, obj):
        ids[name] = {"class": type(obj).__name__, "path": str(root / name), "config_sha256": _config_sha(root / name)}

    for te, cls in _TEXT_PARTS[family]:
        tk = _tokenizer_folder(te, family)
        comps[tk] = AutoTokenizer.from_pretrained(str(root / tk), local_files_only=True)
        comps[te] = _load(cls, root / te, dtype, device)
        ident(tk, comps[tk])
        ident(te, comps[te])
    if family in IMAGE_FAMILIES:
        comps["vae"] = _load(_VAE_CLASS[family], root / "vae", dtype, device, module="diffusers")
        ident("vae", comps["vae"])
    if family == "qwen_image_edit":  # the Qwen2-VL image processor saved with the pipeline's processor
        from transformers import AutoImageProcessor

        comps["image_processor"] = AutoImageProcessor.from_pretrained(str(root / "processor"), local_files_only=True)
        cfg = root / "processor" / "preprocessor_config.json"
        ids["image_processor"] = {"class": type(comps["image_processor"]).__name__, "path": str(cfg.parent),
                                  "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest()[:16]
                                  if cfg.is_file() else ""}
    if family == "wan_i2v" and image_embeds and (root / "image_encoder").is_dir():
        from transformers import CLIPImageProcessor

        comps["image_encoder"] = _load("CLIPVisionModel", root / "image_encoder", dtype, device)
        comps["image_processor"] = CLIPImageProcessor.from_pretrained(str(root / "image_processor"),
                                                                      local_files_only=True)
        ident("image_encoder", comps["image_encoder"])
        ident("image_processor", comps["image_processor"])
    return FamilyEncoder(family, comps, ids=ids, device=device, image_embeds=image_embeds, **options)
