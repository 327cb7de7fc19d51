"""Rule-based rewards for the embedded toy task (a small GenEval of our own), batched in torch.

* ``toy_geneval``: checks each image against its own prompt (count, colour, shape, position) and that
  nothing else is drawn (a clean background: the image shows exactly the prompt), and returns the mean
  check score in [0, 1] (counts and background with partial credit); ``info["all_correct"]`` is
  GenEval's strict per-image success (every check passed), ``info["background"]`` the background's
  mean brightness. Without the background check GRPO paints a faint texture into every patch that
  the prompt checks cannot see (reward hacking of an incomplete reward).
* ``toy_colour_fidelity``: a smooth score in [0, 1] over the drawn pixels (brighter than
  ``min_brightness``): 1 - their mean distance to the nearest colour the prompt names, normalised
  by sqrt(3); an empty image scores 0.

Pixels are assigned to the nearest palette colour; objects are 4-connected components of one
colour with at least ``min_pixels`` pixels. Shape is read from how much of its bounding box a
component fills and how bottom-heavy it is (``classify_shape``: rendered, a square fills 1.0, a disk
0.67, an upward triangle 0.6 with its mass 0.11 box heights below the middle). Background pixels are
those nearest black; their brightness is the max over RGB.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..toy.shapes import COLOURS, PromptSpec, parse_prompt
from .base import REWARDS, validate_reward_inputs

_NAMES = ["background"] + list(COLOURS)
_PALETTE = torch.tensor([(0.0, 0.0, 0.0)] + list(COLOURS.values()))  # (C+1, 3)


def classify_pixels(images: torch.Tensor, max_dist: float = 0.45) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H, W) palette index (0 = background), -1 where nothing is close."""
    px = images.permute(0, 2, 3, 1).unsqueeze(-2)  # B H W 1 3
    # squared distances (same nearest colour and threshold as the norm; the norm's kernel is slow here)
    d2 = (px - _PALETTE.to(images)).square().sum(dim=-1)  # B H W C+1
    dist2, idx = d2.min(dim=-1)
    return torch.where(dist2 <= max_dist * max_dist, idx, torch.full_like(idx, -1))


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected component labels of a (B, H, W) bool mask; 0 = not in mask. Label propagation."""
    B, H, W = mask.shape
    labels = torch.arange(1, H * W + 1, dtype=torch.float32).reshape(1, H, W).expand(B, H, W).clone()
    labels = labels * mask
    for _ in range(H * W):
        p = F.pad(labels, (1, 1, 1, 1))
        nb = torch.stack([p[:, 1:-1, 1:-1], p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0)
        new = nb * mask
        if torch.equal(new, labels):
            break
        labels = new
    return labels.to(torch.int64)


def find_objects(images: torch.Tensor, min_pixels: int = 8, cls: Optional[torch.Tensor] = None
                 ) -> List[Dict[str, List[dict]]]:
    """Per image: {colour: [ {area, cx, cy, fill, skew}, ... ]} for every component of that colour.
    ``cls``: the images' ``classify_pixels`` when the caller has it already."""
    cls = classify_pixels(images) if cls is None else cls
    B, H, W = cls.shape
    out: List[Dict[str, List[dict]]] = [{c: [] for c in COLOURS} for _ in range(B)]
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    for ci, colour in enumerate(_NAMES[1:], start=1):
        labels = connected_components(cls == ci)
        for b in range(B):
            lab = labels[b]
            ids, areas = torch.unique(lab[lab > 0], return_counts=True)
            for i, a in zip(ids.tolist(), areas.tolist()):
                if a < min_pixels:
                    continue
                m = lab == i
                y, x = ys[m], xs[m]
                height = int(y.max() - y.min()) + 1
                bbox = height * (int(x.max() - x.min()) + 1)
                cy = float(y.float().mean())
                # how far the mass sits below the box's middle, in box heights (an upward triangle ~0.11)
                skew = (cy - (float(y.min()) + float(y.max())) / 2) / height
                out[b][colour].append({"area": a, "cx": float(x.float().mean()), "cy": cy, "fill": a / bbox,
                                       "skew": skew})
    return out


def classify_shape(obj: Dict[str, float]) -> str:
    """Square: fills its box (1.0 rendered; >= 0.83). Triangle: bottom-heavy (skew ~0.11 rendered; >= 0.05).
    Circle: neither (fill 0.67, skew 0 rendered)."""
    if obj["fill"] >= 0.83:
        return "square"
    if obj["skew"] >= 0.05:
        return "triangle"
    return "circle"


def background_brightness(images: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """(B,) mean brightness (max over RGB) of the pixels classified as background (0 where there are none)."""
    bg = (cls == 0).to(images.dtype)
    return (images.amax(dim=1) * bg).sum(dim=(1, 2)) / bg.sum(dim=(1, 2)).clamp(min=1.0)


def background_check(brightness: float, max_background: float) -> float:
    """The clean-background check: 1 up to ``max_background``, falling linearly to 0 at twice it."""
    return min(1.0, max(0.0, 2.0 - brightness / max_background))


def score_image(spec: PromptSpec, objects: Dict[str, List[dict]]) -> List[float]:
    """Per-check scores in [0, 1] of one image against its prompt (1.0 = check passed).

    Counts get partial credit (1 - |found - wanted| / wanted, floored at 0) so that "two of three"
    scores between "none" and "three"; every other check is pass/fail.
    """
    wanted = {o.colour for o in spec.objects}
    checks = [float(all(len(objects[c]) == 0 for c in objects if c not in wanted))]  # no stray colours
    if spec.relation is None:
        (o,) = spec.objects
        found = objects[o.colour]
        checks.append(max(0.0, 1.0 - abs(len(found) - o.count) / o.count))
        checks.append(float(bool(found) and all(classify_shape(f) == o.shape for f in found)))
        return checks
    a, b = spec.objects
    fa, fb = objects[a.colour], objects[b.colour]
    checks += [max(0.0, 1.0 - abs(len(fa) - 1)), max(0.0, 1.0 - abs(len(fb) - 1))]
    checks.append(float(bool(fa) and classify_shape(max(fa, key=lambda f: f["area"])) == a.shape))
    checks.append(float(bool(fb) and classify_shape(max(fb, key=lambda f: f["area"])) == b.shape))
    if fa and fb:
        ca = max(fa, key=lambda f: f["area"])["cx"]
        cb = max(fb, key=lambda f: f["area"])["cx"]
        checks.append(float(ca < cb))
    else:
        checks.append(0.0)
    return checks


def _flat(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(0, 1) if images.ndim == 5 else images


@REWARDS.register("toy_geneval")
def toy_geneval(min_pixels: int = 8, max_background: float = 0.01):
    """``max_background``: the clean-background check's limit on the background's mean brightness
    (``background_check``); 0 leaves the check out (the prompt checks only)."""
    if max_background < 0:
        raise ValueError(f"toy_geneval max_background must be >= 0 (0 = no background check), got {max_background}")

    def reward(images, prompts, **_):
        validate_reward_inputs(images, prompts)
        if images.ndim == 5:
            raise ValueError("toy_geneval scores images (B, 3, H, W), not videos")
        imgs = images.detach().float().cpu().clamp(0, 1)
        cls = classify_pixels(imgs)
        objs = find_objects(imgs, min_pixels, cls)
        bright = background_brightness(imgs, cls)
        scores, strict = [], []
        for p, o, bb in zip(prompts, objs, bright.tolist()):
            checks = score_image(parse_prompt(p), o)
            if max_background > 0:
                checks.append(background_check(bb, max_background))
            scores.append(sum(checks) / len(checks))
            strict.append(float(all(c == 1.0 for c in checks)))
        return torch.tensor(scores), {"all_correct": torch.tensor(strict), "background": bright}

    return reward


@REWARDS.register("toy_colour_fidelity")
def toy_colour_fidelity(min_brightness: float = 0.15):
    """Smooth colour score over the drawn (non-background) pixels; an empty image scores 0."""

    def reward(images, prompts, **_):
        validate_reward_inputs(images, prompts)
        imgs = images.detach().float().cpu().clamp(0, 1)
        scores = []
        for img, p in zip(imgs, prompts):
            px = img.permute(1, 2, 0).reshape(-1, 3)
            fg = px[px.amax(-1) > min_brightness]
            if fg.shape[0] == 0:
                scores.append(0.0)
                continue
            allowed = torch.tensor([COLOURS[o.colour] for o in parse_prompt(p).objects])
            d = (fg.unsqueeze(1) - allowed).norm(dim=-1).amin(-1)
            scores.append(1.0 - float(d.mean()) / math.sqrt(3.0))
        return torch.tensor(scores), {}

    return reward
