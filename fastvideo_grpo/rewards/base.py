"""The reward protocol and registry.

A reward is a callable ``fn(images, prompts, **metadata) -> (scores_B, info)``:

* ``images``: float tensor in [0, 1], (B, 3, H, W) for images or (B, F, 3, H, W) for videos;
* ``prompts``: list of B strings, one per sample (each sample is scored against ITS OWN prompt);
* ``scores_B``: float32 CPU tensor of shape (B,), finite; ``info``: a dict of extra per-batch values
  for logging (never needed by the trainer).

Factories are registered by name with ``@REWARDS.register("name")`` and receive their config
fields as keyword arguments; heavy imports (transformers, open_clip) happen inside the factory.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..registry import Registry

RewardOutput = Tuple[torch.Tensor, Dict]
RewardFn = Callable[..., RewardOutput]

REWARDS: Registry[RewardFn] = Registry("reward")


def validate_reward_inputs(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """Clear ValueErrors for the mistakes users make most often."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim not in (4, 5) or images.shape[-3] != 3:
        raise ValueError(
            f"images must be (B, 3, H, W) or (B, F, 3, H, W) floats in [0, 1]; got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype} (divide uint8 by 255)")
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, one per image, not a single string")
    if len(prompts) == 0:
        raise ValueError("prompt list is empty")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf (the sampler diverged?)")


def check_scores(name: str, scores: torch.Tensor, batch: int) -> torch.Tensor:
    """Scores must be (B,) and finite: a failing reward is an error, never a silent constant."""
    scores = torch.as_tensor(scores).detach().to(torch.float32).cpu().reshape(-1)
    if scores.numel() != batch:
        raise ValueError(f"reward {name!r} returned {scores.numel()} scores for a batch of {batch}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"reward {name!r} returned non-finite scores: {scores.tolist()}")
    return scores


def compute_rewards(reward_fns: Dict[str, RewardFn], images: torch.Tensor, prompts: List[str], **metadata) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Run every named reward on one batch; returns ({name: scores_B}, {name: info})."""
    validate_reward_inputs(images, prompts)
    scores, infos = {}, {}
    for name, fn in reward_fns.items():
        s, info = fn(images, prompts, **metadata)
        scores[name] = check_scores(name, s, images.shape[0])
        infos[name] = info
    return scores, infos
