"""Deliberately incomplete toy rewards that GRPO can hack: the reward-hacking watchdog's demonstration.

* ``toy_checks``: the mean of a chosen subset of ``toy_geneval``'s checks (``checks``: any of ``colour``
  (no colour the prompt does not name), ``count``, ``shape``, ``position``, ``background``), each
  computed exactly as ``toy_geneval`` computes it (``rules.score_image``). A prompt without any of the
  chosen checks (``position`` for a counting prompt) scores 1.
* ``toy_colour_area``: the share of the image's pixels drawn in the colours the prompt names (pixels
  assigned to the nearest palette colour, as ``toy_geneval`` does): one piece of the colour check alone.

A subset of the checks is what a learned reward is to a human judge: right about what it looks at,
blind to the rest. Trained on alone long enough, the policy finds what the chosen checks cannot see
and ``toy_geneval`` (the held-out *gold* reward) falls while the trained reward keeps rising
(docs/watchdog.md). Never use these to train a real policy.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from ..toy.shapes import parse_prompt
from .base import REWARDS, validate_reward_inputs
from .rules import _NAMES, background_brightness, background_check, classify_pixels, find_objects, score_image

CHECKS = ("colour", "count", "shape", "position", "background")


def check_names(relation: bool) -> List[str]:
    """The name of each entry of ``rules.score_image``'s list, for a counting or a relation prompt."""
    if relation:
        return ["colour", "count", "count", "shape", "shape", "position"]
    return ["colour", "count", "shape"]


@REWARDS.register("toy_checks")
def toy_checks(checks: Sequence[str] = ("shape",), min_pixels: int = 8, max_background: float = 0.01):
    unknown = [c for c in checks if c not in CHECKS]
    if not checks or unknown:
        raise ValueError(f"toy_checks checks must be a non-empty subset of {list(CHECKS)}, got {list(checks)}")
    chosen = set(checks)

    def reward(images, prompts, **_):
        validate_reward_inputs(images, prompts)
        if images.ndim == 5:
            raise ValueError("toy_checks scores images (B, 3, H, W), not videos")
        imgs = images.detach().float().cpu().clamp(0, 1)
        cls = classify_pixels(imgs)
        objs = find_objects(imgs, min_pixels, cls)
        bright = background_brightness(imgs, cls).tolist()
        scores = []
        for p, o, bb in zip(prompts, objs, bright):
            spec = parse_prompt(p)
            named = list(zip(check_names(spec.relation is not None), score_image(spec, o)))
            named.append(("background", background_check(bb, max_background)))
            kept = [v for n, v in named if n in chosen]
            scores.append(sum(kept) / len(kept) if kept else 1.0)
        return torch.tensor(scores), {}

    return reward


@REWARDS.register("toy_colour_area")
def toy_colour_area():
    """Per image: the share of all pixels whose nearest palette colour is one the prompt names, in [0, 1]."""

    def reward(images, prompts, **_):
        validate_reward_inputs(images, prompts)
        if images.ndim == 5:
            raise ValueError("toy_colour_area scores images (B, 3, H, W), not videos")
        cls = classify_pixels(images.detach().float().cpu().clamp(0, 1))  # (B, H, W), 0 = background
        wanted = torch.zeros(cls.shape[0], len(_NAMES), dtype=torch.bool)
        for i, p in enumerate(prompts):
            for o in parse_prompt(p).objects:
                wanted[i, _NAMES.index(o.colour)] = True
        hit = torch.gather(wanted, 1, cls.clamp(min=0).flatten(1)) & (cls >= 0).flatten(1)
        return hit.float().mean(dim=1), {}

    return reward
