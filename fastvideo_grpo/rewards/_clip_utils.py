"""Shared helpers for the CLIP-based rewards (CLIP score, HPS-v2.1, PickScore, aesthetic).

Everything here works on the reward protocol's tensors directly: images are float in [0, 1],
(B, 3, H, W), or videos (B, F, 3, H, W) whose frames are scored one by one and averaged per video.
Pre-processing (resize of the shortest side, center crop, mean/std normalisation) is batched in
torch on the tensor's device, with no PIL round trip. It matches the CLIP / OpenCLIP eval
transforms up to resampling details (torch bicubic with antialias vs PIL bicubic on uint8).

Weights always come from a local folder (``local_files_only=True``); a missing file is a
FileNotFoundError naming the files and where to get them.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# OpenAI CLIP normalisation (also used by OpenCLIP ViT-H-14 / HPS / PickScore processors).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


SCORE_MODES = ("cosine", "logit", "logit/100")


def resolve_device(device: Optional[str]) -> torch.device:
    """``None``/"auto" -> cuda when available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


from ..utils.dtypes import parse_dtype as resolve_dtype  # noqa: E402,F401


def require_files(folder: Optional[str], groups: Sequence[Sequence[str]], what: str, hint: str) -> str:
    """Check that ``folder`` exists and holds, for every group, at least one of its files.

    ``groups`` is e.g. ``[["config.json"], ["model.safetensors", "pytorch_model.bin"]]``.
    Raises FileNotFoundError naming the expected files and ``hint`` (where to get them).
    """
    if not folder:
        raise FileNotFoundError(f"{what}: no model_path given; expected a local folder with "
                                f"{_describe(groups)}. {hint}")
    folder = os.path.expanduser(str(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what}: model folder {folder!r} does not exist; expected a local folder with "
                                f"{_describe(groups)}. {hint}")
    present = set(os.listdir(folder))
    missing = [g for g in groups if not any(_present(folder, present, name) for name in g)]
    if missing:
        raise FileNotFoundError(f"{what}: {folder!r} lacks {_describe(missing)} (has: {sorted(present)[:12]}). {hint}")
    return folder


def require_file(path: Optional[str], what: str, hint: str) -> str:
    if not path or not os.path.isfile(os.path.expanduser(str(path))):
        raise FileNotFoundError(f"{what}: file {path!r} not found. {hint}")
    return os.path.expanduser(str(path))


def _present(folder, present, name):
    if name in present:
        return True
    if name.endswith(".safetensors") and name.replace(".safetensors", ".safetensors.index.json") in present:
        return True
    return False


def _describe(groups):
    return " and ".join(" or ".join(repr(n) for n in g) for g in groups)


CLIP_FILES = [["config.json"], ["model.safetensors", "pytorch_model.bin"],
              ["tokenizer.json", "vocab.json"]]


def to_frames(images: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(B, 3, H, W) -> itself, 1; (B, F, 3, H, W) -> (B*F, 3, H, W), F."""
    if images.ndim == 5:
        b, f = images.shape[:2]
        return images.reshape(b * f, *images.shape[2:]), f
    return images, 1


def preprocess(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
               crop: Optional[int] = None) -> torch.Tensor:
    """Resize the shortest side to ``size`` (bicubic, antialias), center crop ``crop`` (default
    ``size``), normalise. ``images``: (N, 3, H, W) floats in [0, 1]. Returns float32."""
    crop = crop or size
    x = images.to(torch.float32)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    x = x[..., top:top + crop, left:left + crop].clamp(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _read_json(path):
    with open(path) as f:
        return json.load(f)


class ClipScorer:
    """A transformers CLIPModel + tokenizer loaded from a local folder, scoring pairs.

    ``score_mode``: "cosine" -> cos(image, text) (CLIP score, HPS); "logit" -> exp(logit_scale) *
    cos (PickScore); "logit/100" -> the same divided by 100 (PickScore as printed in papers;
    with the usual logit_scale of ln(100) this equals the cosine).
    """

    def __init__(self, model_path: str, what: str, hint: str, device=None, dtype="float32",
                 batch_size: int = 32, score_mode: str = "cosine", need_text: bool = True,
                 model=None, tokenizer=None):
        """``model``/``tokenizer`` may be passed ready-made (e.g. converted from OpenCLIP in memory);
        otherwise both are loaded from ``model_path``."""
        from transformers import AutoTokenizer, CLIPModel

        if score_mode not in SCORE_MODES:
            raise ValueError(f"{what}: score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        if int(batch_size) < 1:
            raise ValueError(f"{what}: batch_size must be >= 1, got {batch_size}")
        self.what, self.score_mode, self.batch_size = what, score_mode, int(batch_size)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        folder = None
        if model is None:
            groups = CLIP_FILES if (need_text and tokenizer is None) else CLIP_FILES[:2]
            folder = require_files(model_path, groups, what, hint)
            model = CLIPModel.from_pretrained(folder, local_files_only=True)
        self.model = model.to(self.dtype).eval().requires_grad_(False).to(self.device)
        if tokenizer is None and need_text:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer = tokenizer
        vcfg = self.model.config.vision_config
        self.size, self.crop = vcfg.image_size, vcfg.image_size
        self.mean, self.std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pp = os.path.join(folder, "preprocessor_config.json") if folder else ""
        if pp and os.path.isfile(pp):  # honour the checkpoint's own processor settings when present
            cfg = _read_json(pp)
            self.mean = tuple(cfg.get("image_mean", self.mean))
            self.std = tuple(cfg.get("image_std", self.std))
            self.size = _size_of(cfg.get("size"), self.size)
            self.crop = _size_of(cfg.get("crop_size"), self.crop)
        self.max_len = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> L2-normalised (N, D) float32 features."""
        out = []
        for i in range(0, frames.shape[0], self.batch_size):
            x = preprocess(frames[i:i + self.batch_size].to(self.device), self.size, self.mean, self.std, self.crop)
            f = _as_tensor(self.model.get_image_features(pixel_values=x.to(self.dtype)))
            out.append(F.normalize(f.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tok = self.tokenizer(list(prompts[i:i + self.batch_size]), padding="max_length", truncation=True,
                                 max_length=self.max_len, return_tensors="pt")
            f = _as_tensor(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                        attention_mask=tok["attention_mask"].to(self.device)))
            out.append(F.normalize(f.float(), dim=-1))
        return torch.cat(out)

    def scale(self) -> float:
        if self.score_mode == "cosine":
            return 1.0
        s = float(self.model.logit_scale.exp())
        return s if self.score_mode == "logit" else s / 100.0

    @torch.no_grad()
    def pair_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score image i (or every frame of video i, averaged) against prompts[i]; (B,) float32 CPU."""
        frames, nf = to_frames(images)
        img = self.image_features(frames)                                  # (B*F, D)
        txt = self.text_features(list(prompts))                            # (B, D)
        txt = txt.repeat_interleave(nf, dim=0)                             # frame j of video i -> prompt i
        cos = (img * txt).sum(-1).view(-1, nf).mean(-1)
        return (cos * self.scale()).cpu()


def _size_of(v, default):
    if v is None:
        return default
    if isinstance(v, dict):
        return int(v.get("shortest_edge") or v.get("height") or default)
    return int(v)


def _as_tensor(out):
    """get_*_features returns a tensor (transformers 4.x) or a model output (5.x)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    raise RuntimeError(f"unexpected CLIP feature output type {type(out).__name__}")
