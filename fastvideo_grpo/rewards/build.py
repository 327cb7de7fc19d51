"""Reward functions from config: the training rewards (thresholded ones become binary) and the
held-out evaluation rewards (``eval.rewards``, or the training rewards in their continuous form)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from .base import REWARDS, ConfiguredReward, RewardFn, check_scores, is_group_level


def build_reward_fns(reward_cfgs) -> Tuple[Dict[str, RewardFn], Dict[str, float]]:
    """Instantiate rewards from config; thresholded ones become binary (named '<name>_bin').

    A reward with ``batch_size`` > 0 or ``offload`` scores through ``ConfiguredReward`` (chunks of
    ``batch_size`` samples; models in host memory between calls)."""
    fns, weights = {}, {}
    for rc in reward_cfgs:
        fn = REWARDS.build(rc.name, **rc.kwargs)
        if rc.batch_size or rc.offload:
            fn = ConfiguredReward(fn, batch_size=rc.batch_size, offload=bool(rc.offload))
        key = rc.key or rc.name
        if rc.threshold is not None:
            key = rc.key or f"{rc.name}_bin"
            fn = _thresholded(fn, rc.threshold, key)
        if key in fns:
            raise ValueError(f"reward {key!r} is listed twice in the config")
        fns[key] = fn
        weights[key] = rc.weight
    return fns, weights


def binarize(rewards_B: torch.Tensor, threshold: float) -> torch.Tensor:
    """Thresholded binary reward (paper: HPS 0.28, CLIP 0.39): 1.0 where r >= threshold else 0.0."""
    return (rewards_B >= threshold).to(torch.float32)


def _thresholded(fn: RewardFn, threshold: float, key: str) -> RewardFn:
    """``fn``'s scores binarised at ``threshold``; the raw scores are checked first (shape, finiteness: a NaN
    compares false, so it would silently become 0)."""

    def binary_reward(images, prompts, **meta):
        scores, info = fn(images, prompts, **meta)
        raw = check_scores(key, scores, len(prompts), prompts, before=f"the threshold {threshold:g}, any weight or "
                           "advantage")
        return binarize(raw, threshold), dict(info, raw=scores)

    binary_reward.group_level = is_group_level(fn)
    return binary_reward


def build_eval_reward_fns(cfg, train_fns: Dict[str, RewardFn]) -> Dict[str, RewardFn]:
    """``eval.rewards`` when given; else the training rewards in continuous form (thresholds dropped).
    Without thresholded rewards these are the training instances themselves (no second model copy).

    Group-level rewards (a win rate within the group: rewards/base.py) train only; they are left out of the
    default, refused in ``eval.rewards``, and a run whose training rewards are all group-level must set
    ``eval.rewards`` (e.g. the judge's own pointwise score)."""
    from ..config import RewardConfig

    if cfg.eval.rewards:
        fns = build_reward_fns(cfg.eval.rewards)[0]
        grouped = [k for k, fn in fns.items() if is_group_level(fn)]
        if grouped:
            raise ValueError(f"eval.rewards {grouped} score whole groups (a within-group win rate averages the same "
                             "on every evaluation); list pointwise rewards there (e.g. the judge itself)")
        return fns
    plain = [RewardConfig(name=rc.name, key=rc.key or rc.name, weight=rc.weight, kwargs=rc.kwargs,
                          batch_size=rc.batch_size, offload=rc.offload)
             for rc in cfg.rewards if rc.threshold is not None]
    fns = {k: fn for k, fn in train_fns.items() if not is_group_level(fn)}
    if plain:
        for k in [k for k in fns if k.endswith("_bin")]:
            del fns[k]
        fns.update(build_reward_fns(plain)[0])
    fns = {k: fn for k, fn in fns.items() if not is_group_level(fn)}
    if not fns:
        raise ValueError("every training reward scores whole groups (group-level), which held-out evaluation cannot "
                         "use: set eval.rewards (e.g. the judge's pointwise score)")
    return fns
