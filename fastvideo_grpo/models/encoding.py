"""How a family's prompts (and reference images) become the conditioning its adapter reads: the
``PromptEncoding`` base each family file subclasses next to its adapter, and the building blocks they share.

A family declares, beside its adapter and in the same registration (``ADAPTERS.register(...,
encoding=<its PromptEncoding>)``): the text encoders and the folders they and their tokenizers load from
(``text_encoders``, ``tokenizer_folders``), the VAE that encodes reference images (``vae_class``; image
inputs), whether the text is encoded together with the image (``text_needs_image``), a chat template and
the template tokens cropped from the encoder's output (``template``, ``crop_start_default``,
``crop_marker``), its max lengths (``t5_max_length_default``, ``qwen_max_length_default``), whether a
negative (empty-prompt) embedding is saved for CFG by default (``cfg_by_default``), and the text tokens per
sample the planner counts (``plan_text_len``). It implements ``tensor_sources`` (conditioning name -> the
component producing it, for the manifest), ``encode_text`` and, for image inputs, ``encode_images``; the
names, shapes and numerics are those of the family's diffusers pipeline ``encode_prompt`` (negatives get a
``negative_`` prefix in data/prep.py). ``data/encoders.py`` loads the declared components from a local
diffusers-format folder and data/prep.py runs the encoding over a prompt file.

Options shared by every family (data_prep's flags): ``clip_max_length``, ``t5_max_length`` (T5 / UMT5),
``llama_max_length`` (HunyuanVideo's LLaMA), ``qwen_max_length`` (Qwen2.5-VL), ``crop_start`` ('default',
'auto' = the template's tokens before the prompt, or an int), ``num_hidden_layers_to_skip``, and for
reference images ``height``, ``width``, ``num_frames``, ``image_embeds``; a family reads those it uses.

Departures common to the image families: VAE latents use the posterior mode (mean), not a sample, so
outputs are deterministic; reference images whose size differs from (height, width) are resized (Lanczos)
to cover it and center-cropped (the pipelines resize without cropping: identical when the aspect ratio
already matches).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar, Dict, Optional, Sequence, Tuple

import torch


def config_sha(folder: Path) -> str:
    """The first 16 hex digits of the sha256 of a component folder's config (its identity in the manifest)."""
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        cfg = folder / name
        if cfg.is_file():
            return hashlib.sha256(cfg.read_bytes()).hexdigest()[:16]
    return ""


def load_pretrained(class_name: str, folder: Path, dtype, device, module: str = "transformers"):
    """``<module>.<class_name>.from_pretrained(folder)`` from local files only, on ``device``."""
    import importlib

    cls = getattr(importlib.import_module(module), class_name)
    kw = {"torch_dtype": dtype} if module == "diffusers" else {"dtype": dtype}
    return cls.from_pretrained(str(folder), local_files_only=True, **kw).to(device)


class PromptEncoding:
    """One family's encoders over loaded ``components`` (diffusers component names -> objects); ``ids``: the
    components' identities recorded in the manifest (class, path, config hash)."""

    #: the family's name in manifests and ``data_prep --family``
    family: ClassVar[str] = ""
    #: (subfolder, transformers class) of each text encoder
    text_encoders: ClassVar[Tuple[Tuple[str, str], ...]] = ()
    #: text-encoder subfolder -> its tokenizer's folder, where it is not text_encoder* -> tokenizer*
    tokenizer_folders: ClassVar[Dict[str, str]] = {}
    #: the diffusers VAE class that encodes reference images (loaded from vae/); None = text only
    vae_class: ClassVar[Optional[str]] = None
    #: the text is encoded together with the reference image (no shared negative embedding possible)
    text_needs_image: ClassVar[bool] = False
    #: the family's adapter uses CFG by default: a negative (empty-prompt) embedding is saved
    cfg_by_default: ClassVar[bool] = False
    #: text tokens per sample the planner counts (the stored sequence length)
    plan_text_len: ClassVar[int] = 0
    #: chat template around the prompt ("{}"), the tokens cropped from its start by default, and where the
    #: cropped prefix ends ('auto' counts the tokens before it)
    template: ClassVar[Optional[str]] = None
    crop_start_default: ClassVar[int] = 0
    crop_marker: ClassVar[str] = "{}"
    t5_max_length_default: ClassVar[Optional[int]] = None
    qwen_max_length_default: ClassVar[int] = 512

    def __init__(self, components: Dict[str, object], *, ids: Optional[Dict[str, dict]] = None, device="cpu",
                 clip_max_length: int = 77, t5_max_length: Optional[int] = None, llama_max_length: int = 256,
                 qwen_max_length: Optional[int] = None, crop_start="default", num_hidden_layers_to_skip: int = 2,
                 height: Optional[int] = None, width: Optional[int] = None, num_frames: Optional[int] = None,
                 image_embeds: bool = True):
        self.c = components
        self.device = torch.device(device)
        for v in components.values():
            if isinstance(v, torch.nn.Module):
                v.requires_grad_(False).eval()
        self.ids = ids or {k: {"class": type(v).__name__} for k, v in components.items()}
        self.clip_max_length = int(clip_max_length)
        self.t5_max_length = int(t5_max_length) if t5_max_length else self.t5_max_length_default
        self.llama_max_length = int(llama_max_length)
        self.qwen_max_length = int(qwen_max_length or self.qwen_max_length_default)
        if self.qwen_max_length < 1:
            raise ValueError(f"qwen_max_length must be >= 1, got {qwen_max_length}")
        self.skip = int(num_hidden_layers_to_skip)
        self.crop_start = self._resolve_crop_start(crop_start) if self.template is not None else None
        self.height, self.width, self.num_frames = height, width, num_frames
        self.image_embeds = bool(image_embeds)
        self.check_options()

    # ------------------------------------------------------------------ what a family declares / implements

    @property
    def image_inputs(self) -> bool:
        """Whether each prompt comes with a reference image (a VAE encodes it)."""
        return self.vae_class is not None

    def check_options(self) -> None:
        """ValueError naming the data_prep flag when the options do not suit the family (after ``__init__``)."""
        if self.image_inputs and (not self.height or not self.width):
            raise ValueError(f"family {self.family!r} encodes reference images: --height and --width are required")

    @classmethod
    def extra_components(cls, root: Path, dtype, device, image_embeds: bool) -> Dict[str, Tuple[object, dict]]:
        """Components beyond the text encoders, tokenizers and VAE (an image encoder, an image processor)
        loaded from the model folder ``root``: name -> (object, its identity for the manifest)."""
        return {}

    def tensor_sources(self) -> Dict[str, str]:
        """Conditioning name -> the component producing it (the manifest's per-tensor encoder)."""
        raise NotImplementedError

    def settings(self) -> dict:
        """Everything that changes the numbers (the manifest header and the resume fingerprint)."""
        s = {"clip_max_length": self.clip_max_length}
        if self.t5_max_length:
            s["t5_max_length"] = self.t5_max_length
        return s

    def text_conditioning(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """What ``encode_text`` returns (called without gradients)."""
        raise NotImplementedError

    def image_conditioning(self, paths: Sequence[str]) -> Dict[str, torch.Tensor]:
        """What ``encode_images`` returns (called without gradients; image families)."""
        return {}

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Batched conditioning (leading batch dim) for ``prompts``, in the encoders' dtype."""
        return self.text_conditioning(prompts)

    @torch.no_grad()
    def encode_images(self, paths: Sequence[str]) -> Dict[str, torch.Tensor]:
        """The reference images' conditioning (image families; one path per sample)."""
        return self.image_conditioning(paths)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], images: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """All the conditioning of a batch: the text's, plus the reference images' for image families
        (``images``: one path per prompt)."""
        if not self.image_inputs:
            return self.encode_text(prompts)
        if images is None or len(images) != len(prompts):
            raise ValueError(f"family {self.family!r} needs one reference image per prompt")
        return {**self.encode_text(prompts), **self.encode_images(images)}

    # ------------------------------------------------------------------ shared building blocks

    @classmethod
    def tokenizer_folder(cls, text_encoder_subfolder: str = "text_encoder") -> str:
        """The folder of a text encoder's tokenizer (``tokenizer_folders``, else text_encoder* -> tokenizer*)."""
        return cls.tokenizer_folders.get(text_encoder_subfolder,
                                         text_encoder_subfolder.replace("text_encoder", "tokenizer"))

    def template_sha(self) -> str:
        """The identity of the chat template in the manifest's settings."""
        return hashlib.sha256(self.template.encode()).hexdigest()[:16]

    def _resolve_crop_start(self, crop_start) -> int:
        if crop_start in (None, "default"):
            return self.crop_start_default
        if crop_start == "auto":
            # tokens of the template before the prompt placeholder (incl. BOS if the tokenizer adds one)
            prefix = self.template.split(self.crop_marker)[0]
            return len(self.c[self.tokenizer_folder()](prefix).input_ids)
        n = int(crop_start)
        if n < 0:
            raise ValueError(f"crop_start must be >= 0, got {crop_start}")
        return n

    def _ids(self, tokenizer, prompts, max_length, mask=False):
        t = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                      return_attention_mask=mask, return_tensors="pt")
        ids = t.input_ids.to(self.device)
        return (ids, t.attention_mask.to(self.device)) if mask else ids

    def clip_last(self, prompts, te="text_encoder", tok="tokenizer"):
        """CLIP's last hidden state over the prompt padded to ``clip_max_length`` (as StableDiffusionPipeline)."""
        encoder = self.c[te]
        if getattr(encoder.config, "use_attention_mask", False):
            ids, mask = self._ids(self.c[tok], prompts, self.clip_max_length, mask=True)
            return encoder(ids, attention_mask=mask)[0]
        return encoder(self._ids(self.c[tok], prompts, self.clip_max_length))[0]

    def clip_pooled(self, prompts, te, tok):
        """CLIP's pooled output."""
        out = self.c[te](self._ids(self.c[tok], prompts, self.clip_max_length), output_hidden_states=False)
        return out.pooler_output

    def clip_penultimate_and_proj(self, prompts, te, tok):
        """(CLIP's penultimate hidden state, its projected pooled output) (as StableDiffusion3Pipeline)."""
        out = self.c[te](self._ids(self.c[tok], prompts, self.clip_max_length), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def t5_plain(self, prompts, te, tok):
        """T5's last hidden state over the prompt padded to ``t5_max_length``, no mask (as FluxPipeline)."""
        ids = self._ids(self.c[tok], prompts, self.t5_max_length)
        return self.c[te](ids, output_hidden_states=False)[0]

    def template_hidden_states(self, prompts, max_length: int, layer: int, te="text_encoder", tok="tokenizer"):
        """The prompts inside ``template``, hidden_states[``layer``] over ``max_length + crop_start`` padded
        tokens, the first ``crop_start`` cropped: (states, mask) (as HunyuanVideoPipeline)."""
        texts = [self.template.format(p) for p in prompts]
        ids, mask = self._ids(self.c[tok], texts, max_length + self.crop_start, mask=True)
        h = self.c[te](input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        return h[:, self.crop_start:], mask[:, self.crop_start:]

    # ------------------------------------------------------------------ reference images

    def load_image(self, path):
        """(original RGB PIL image, (3, H, W) tensor in [-1, 1] resized to cover (height, width) and
        center-cropped). Lanczos resampling and x / 255 * 2 - 1 as diffusers' VaeImageProcessor."""
        import numpy as np

        orig, im = self.load_resized(path)
        x = torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0).permute(2, 0, 1)
        return orig, 2.0 * x - 1.0

    def load_resized(self, path):
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

    def image_settings(self) -> dict:
        return {"height": int(self.height), "width": int(self.width), "image_latent": "posterior_mode",
                "image_resize": "cover_center_crop"}

    def vae_pixels(self, paths):
        """(the loaded images, their pixels (B, 3, H, W) on the device, the VAE's dtype)."""
        loaded = [self.load_image(p) for p in paths]
        pix = torch.stack([x for _, x in loaded]).to(self.device)
        return loaded, pix, next(self.c["vae"].parameters()).dtype
