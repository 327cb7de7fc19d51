"""Binary reward: threshold any registered reward to 0/1 (paper: HPS at 0.28, CLIP score at 0.39).

Registry name ``binary``. Config: ``reward`` (the inner reward's registry name), ``threshold``
(defaults to the paper's value for ``hps`` and ``clip_score``; required otherwise), and every
other field is passed to the inner reward, e.g.
``{"type": "binary", "reward": "hps", "model_path": "ckpts/hps_v2.1_hf"}``.
score = 1.0 if inner score > threshold else 0.0; the raw scores are kept in ``info["raw"]``.
"""

from __future__ import annotations

import torch

from .base import REWARDS, check_scores, validate_reward_inputs

PAPER_THRESHOLDS = {"hps": 0.28, "clip_score": 0.39}


@REWARDS.register("binary", wraps="reward")
def binary(reward=None, threshold=None, **inner_config):
    if not reward or not isinstance(reward, str):
        raise ValueError("binary: set reward= to the registry name of the reward to threshold "
                         f"(known: {', '.join(n for n in REWARDS.names() if n != 'binary')})")
    if reward == "binary":
        raise ValueError("binary: reward='binary' would wrap itself")
    if threshold is None:
        if reward not in PAPER_THRESHOLDS:
            raise ValueError(f"binary: no default threshold for {reward!r}; set threshold= "
                             f"(paper defaults: {PAPER_THRESHOLDS})")
        threshold = PAPER_THRESHOLDS[reward]
    threshold = float(threshold)
    inner = REWARDS.build(reward, **inner_config)

    def fn(images, prompts, **metadata):
        validate_reward_inputs(images, prompts)
        raw, info = inner(images, prompts, **metadata)
        raw = check_scores(reward, raw, images.shape[0])
        scores = (raw > threshold).to(torch.float32)
        return scores, {"raw": raw.tolist(), "threshold": threshold, "positive_rate": float(scores.mean()),
                        "inner": info}

    fn.inner = inner
    fn.modules, fn.device = getattr(inner, "modules", None), getattr(inner, "device", None)  # for offloading
    return fn
