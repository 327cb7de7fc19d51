"""``--suite vbench``: the VBench dimensions (Huang et al. 2024) that need nothing beyond weights given by path.

Prompts: VBench's ``VBench_full_info.json`` (a list of ``{"prompt_en": ..., "dimension": [...]}``; each prompt is
scored on the dimensions it lists) or its ``prompts_per_dimension/`` folder (``<dimension>.txt``). 5 videos per
prompt, as VBench. Dimensions run here (``dimensions`` picks some), each a per-video score in [0, 1]:

* ``subject_consistency``: DINO ViT-B/16 features (``dino_path``: ``facebook/dino-vitb16``, transformers
  ``ViTModel``; frames resized to 224 on the short side, ImageNet normalisation): per frame after the first,
  the mean of max(0, cos) with the previous frame and with the first frame, averaged over the frames;
* ``background_consistency``: the same with CLIP ViT-B/32 image features (``clip_path``);
* ``temporal_flickering``: 1 - the mean absolute difference of consecutive frames on the 0-255 scale / 255
  (VBench first keeps only static videos with RAFT optical flow: not done here, so moving videos score lower);
* ``aesthetic_quality``: the LAION aesthetic predictor on CLIP ViT-L/14 per frame / 10, averaged over frames
  (``aesthetic``: the kwargs of the package's ``aesthetic`` reward: ``model_path``, ``head_path``).

Not run (they need models VBench downloads that have no transformers port here): motion smoothness (AMT),
dynamic degree (RAFT), imaging quality (MUSIQ), and the semantic dimensions (GRiT, UMT, ViCLIP, Tag2Text).
Table: one column per dimension, the mean over its videos (VBench's per-frame weighting equals it for videos of
equal length), x100 as VBench's leaderboard; no total score (VBench's needs every dimension).
"""

from __future__ import annotations

import json
from typing import List, Sequence

import torch
import torch.nn.functional as F

from .base import SUITES, Item, Metric, Suite, read_lines

DIMENSIONS = {"subject_consistency": "Subject consistency", "background_consistency": "Background consistency",
              "temporal_flickering": "Temporal flickering", "aesthetic_quality": "Aesthetic quality"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def consistency(features_FD: torch.Tensor) -> float:
    """VBench's consistency of one video's L2-normalised frame features."""
    f = F.normalize(features_FD.double(), dim=-1)
    if f.shape[0] < 2:
        return 1.0
    prev = (f[1:] * f[:-1]).sum(-1).clamp(min=0)
    first = (f[1:] * f[:1]).sum(-1).clamp(min=0)
    return float(((prev + first) / 2).mean())


def temporal_flickering(video_F3HW: torch.Tensor) -> float:
    """1 - mean |frame_t+1 - frame_t| / 255 on the frames rounded to 8 bits (VBench reads them from a video)."""
    x = (video_F3HW.clamp(0, 1) * 255).round().double()
    if x.shape[0] < 2:
        return 1.0
    return float((255.0 - (x[1:] - x[:-1]).abs().mean()) / 255.0)


class DinoFeatures:
    """CLS features of a DINO ViT (transformers ``ViTModel``) from a local folder."""

    def __init__(self, model_path: str, device=None, size: int = 224):
        from transformers import ViTModel

        from ..rewards._clip_utils import require_files, resolve_device

        folder = require_files(model_path, [["config.json"], ["model.safetensors", "pytorch_model.bin"]],
                               "--suite-args dino_path", "VBench uses DINO ViT-B/16 (facebook/dino-vitb16).")
        self.device = resolve_device(device)
        self.model = ViTModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
        self.model = self.model.eval().requires_grad_(False).to(self.device)
        self.size = size

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        h, w = frames.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(frames.float(), size=(round(h * scale), round(w * scale)), mode="bilinear",
                          align_corners=False)
        m, s = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        out = self.model(pixel_values=((x - m) / s).to(self.device), interpolate_pos_encoding=True)
        return out.last_hidden_state[:, 0].float().cpu()


@SUITES.register("vbench")
class VBenchSuite(Suite):
    name = "vbench"
    media = "video"
    defaults = {"dimensions": list(DIMENSIONS), "dino_path": None, "clip_path": None, "aesthetic": None,
                "device": None}
    default_samples_per_prompt = 5
    category_titles = dict(DIMENSIONS)
    prompts_hint = "VBench's VBench_full_info.json or prompts/prompts_per_dimension/ (github.com/Vchitect/VBench)"
    notes = ["VBench dimensions not run: motion smoothness, dynamic degree, imaging quality and the semantic ones; "
             "temporal flickering without VBench's static-video filter (docs/benchmarks.md)."]

    def items(self) -> List[Item]:
        dims = list(self.args["dimensions"])
        unknown = [d for d in dims if d not in DIMENSIONS]
        if unknown:
            raise ValueError(f"--suite-args dimensions: {unknown} are not run here (run: {list(DIMENSIONS)})")
        path = self.prompts_path
        out = []
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected VBench_full_info.json, a list of {{prompt_en, dimension}} entries")
            for e in data:
                for d in e.get("dimension", []):
                    if d in dims:
                        out.append(Item(e["prompt_en"], d))
        else:
            for d in dims:
                f = path / f"{d}.txt"
                if f.is_file():
                    out += [Item(p, d) for p in read_lines(f)]
        if not out:
            raise ValueError(f"no prompts for the dimensions {dims} in {path} ({self.prompts_hint})")
        return out

    def metrics(self) -> List[Metric]:
        return [Metric("score", "VBench dimensions (per-video score)", overall="none", scale=100.0, digits=2)]

    def scorer(self, device):
        a = self.args
        dev = a["device"] or device
        dims = set(a["dimensions"])
        dino = clip = aesthetic = None
        if "subject_consistency" in dims:
            if not a["dino_path"]:
                raise ValueError("--suite-args dino_path (DINO ViT-B/16) is needed for subject_consistency")
            dino = DinoFeatures(a["dino_path"], device=dev)
        if "background_consistency" in dims:
            if not a["clip_path"]:
                raise ValueError("--suite-args clip_path (CLIP ViT-B/32) is needed for background_consistency")
            from ..rewards._clip_utils import ClipScorer

            clip = ClipScorer(a["clip_path"], "--suite-args clip_path", "VBench uses OpenAI CLIP ViT-B/32.",
                              device=dev, need_text=False)
        if "aesthetic_quality" in dims:
            if not a["aesthetic"]:
                raise ValueError("--suite-args aesthetic: {model_path: <CLIP ViT-L/14>, head_path: <LAION head>} is "
                                 "needed for aesthetic_quality")
            from ..rewards import REWARDS

            aesthetic = REWARDS.build("aesthetic", **dict(a["aesthetic"], device=str(dev)))

        def score(videos, items: Sequence[Item]):
            if videos.ndim != 5:
                raise ValueError("--suite vbench scores videos (B, F, 3, H, W); this model generates images")
            out: List[float] = []
            for v, it in zip(videos, items):
                d = it.category
                if d == "subject_consistency":
                    out.append(consistency(dino(v)))
                elif d == "background_consistency":
                    out.append(consistency(clip.image_features(v).cpu()))
                elif d == "temporal_flickering":
                    out.append(temporal_flickering(v))
                else:
                    out.append(float(aesthetic(v.unsqueeze(0), [it.prompt])[0][0]) / 10.0)
            return {"score": out}

        return score

