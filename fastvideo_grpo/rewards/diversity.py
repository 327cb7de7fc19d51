"""Diversity of generated samples, for the reward-hacking watchdog (watchdog.py, docs/watchdog.md).

A hacked policy often collapses: every prompt's samples look alike, and prompts look alike too. Two
statistics over a set of samples, each the mean over pairs of samples of a distance:

* ``within_group``: pairs of samples of the same prompt (different initial noise): mode collapse;
* ``across_prompts``: pairs of samples of different prompts: the prompt stops mattering.

Distances are either in pixel space (``pixel_features``: each image area-downsampled to at most ``size``
px a side, flattened; the distance is the RMS pixel difference, in [0, 1]) or between image embeddings
(``EmbeddingFeatures``: a CLIP image tower from a local folder; the distance is 1 - cosine). Videos are
flattened over their frames (pixels) or averaged over them (embeddings). Pure functions of the samples.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F


def pixel_features(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """(N, 3, H, W) or (N, F, 3, H, W) in [0, 1] -> (N, D) float64 features whose Euclidean distance divided
    by sqrt(D) is the RMS pixel difference (images wider than ``size`` are area-downsampled first)."""
    x = images.detach().to(torch.float64).cpu()
    frames = x.flatten(0, 1) if x.ndim == 5 else x
    h, w = frames.shape[-2:]
    scale = min(1.0, size / max(h, w))
    if scale < 1.0:
        frames = F.interpolate(frames, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
    feats = frames.reshape(x.shape[0], -1)
    return feats / feats.shape[1] ** 0.5


class EmbeddingFeatures:
    """L2-normalised image embeddings of a CLIP model in a local folder (transformers format); distances
    between them are 1 - cosine. ``kwargs``: ``model_path`` (required), ``device``, ``dtype``, ``batch_size``."""

    def __init__(self, model_path: str, device: Optional[str] = None, dtype: str = "float32", batch_size: int = 32):
        from ._clip_utils import ClipScorer

        self.scorer = ClipScorer(model_path, "train.watchdog.diversity_model",
                                 "Give a CLIP model folder (e.g. openai/clip-vit-large-patch14, transformers format).",
                                 device=device, dtype=dtype, batch_size=batch_size, need_text=False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from ._clip_utils import to_frames

        frames, nf = to_frames(images)
        f = self.scorer.image_features(frames).view(images.shape[0], nf, -1).mean(1)
        return F.normalize(f.to(torch.float64), dim=-1).cpu()


def distance_matrix(features_ND: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, N) distances: "euclidean" (of ``pixel_features``: the RMS difference) or "cosine" (1 - cos of
    normalised features)."""
    f = features_ND.to(torch.float64)
    if metric == "euclidean":
        return torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")
    if metric == "cosine":
        return (1.0 - f @ f.T).clamp(min=0.0)
    raise ValueError(f"unknown distance metric {metric!r}; use 'euclidean' or 'cosine'")


def pairwise_diversity(dist_NN: torch.Tensor, group_N: Sequence[int]) -> Dict[str, Optional[float]]:
    """Mean distance over the unordered pairs of samples in the same group (``within_group``) and in different
    groups (``across_prompts``); None where there is no such pair."""
    g = torch.as_tensor(list(group_N))
    n = g.numel()
    if dist_NN.shape != (n, n):
        raise ValueError(f"distance matrix {tuple(dist_NN.shape)} does not match {n} samples")
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    same = g.view(-1, 1) == g.view(1, -1)
    out: Dict[str, Optional[float]] = {}
    for name, mask in (("within_group", upper & same), ("across_prompts", upper & ~same)):
        out[name] = float(dist_NN[mask].mean()) if bool(mask.any()) else None
    return out


def sample_diversity(images: torch.Tensor, group_N: Sequence[int], mode: str = "pixel", size: int = 64,
                     embed=None) -> Dict[str, Optional[float]]:
    """``pairwise_diversity`` of ``images`` in pixel space (``mode`` "pixel") or with ``embed`` (a callable
    images -> normalised features, e.g. ``EmbeddingFeatures``; ``mode`` "embedding")."""
    if mode == "pixel":
        return pairwise_diversity(distance_matrix(pixel_features(images, size), "euclidean"), group_N)
    if mode == "embedding":
        if embed is None:
            raise ValueError("diversity mode 'embedding' needs an embedding model (train.watchdog.diversity_model)")
        return pairwise_diversity(distance_matrix(embed(images), "cosine"), group_N)
    raise ValueError(f"diversity mode must be 'pixel' or 'embedding', got {mode!r}")
