"""Pref-GRPO's win-rate reward (Wang et al. 2025, "Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable
Text-to-Image Reinforcement Learning", arXiv 2508.20751): a group-level reward (base.py). Within each group of G
samples of one prompt, every unordered pair is compared once by a judge, and a sample's reward is its win rate

    w_i = (1 / (G - 1)) sum_{j != i} P(i preferred to j)

(a tie, or a comparison the judge cannot decide, counts half a win to each side: P = 1/2). The group-relative
advantage is then computed from the win rates as from any reward. The point (the paper's): small differences of a
pointwise score are blown up by the group normalisation ("illusory advantage"); win rates are bounded and rank-based.

Registry name ``win_rate``; ``judge`` names the judge's registered reward and every other field goes to it, e.g.
``{name: win_rate, kwargs: {judge: hps, model_path: ckpts/hps}}``. The judge is

* pairwise when its function provides ``compare(images_a, images_b, prompts) -> P(a preferred to b)`` in [0, 1]
  for a batch of pairs (a preference model, such as the paper's UnifiedReward-Think VLM): one call per group
  with its G (G - 1) / 2 pairs, a (the lower index) shown first;
* otherwise pointwise: its scores are compared, i beats j when s_i > s_j (``judge_batch_size`` samples per call,
  0 = the whole batch the reward is given; its ``batch_size`` must hold whole groups).
"""

from __future__ import annotations

import torch

from .base import REWARDS, check_groups, check_scores, score_in_chunks, validate_reward_inputs


def pairs_in_group(group_size: int):
    """(first, second) local indices of the G (G - 1) / 2 unordered pairs of a group, first < second."""
    return torch.triu_indices(group_size, group_size, offset=1)


def win_rates(preference_P: torch.Tensor, first: torch.Tensor, second: torch.Tensor, batch: int,
              group_size: int) -> torch.Tensor:
    """Win rates (B,) from P(first preferred to second) of pairs given by batch indices (float64 sums)."""
    p = preference_P.to(torch.float64)
    wins = torch.zeros(batch, dtype=torch.float64)
    wins.index_add_(0, first, p)
    wins.index_add_(0, second, 1.0 - p)
    return (wins / (group_size - 1)).to(torch.float32)


def pointwise_preference(scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
    """P(a preferred to b) from two scores: 1 if a's is higher, 0 if lower, 1/2 when equal."""
    return (scores_a > scores_b).to(torch.float32) + 0.5 * (scores_a == scores_b).to(torch.float32)


@REWARDS.register("win_rate", wraps="judge")
def win_rate(judge=None, judge_batch_size: int = 0, **judge_config):
    if not judge or not isinstance(judge, str):
        raise ValueError("win_rate: set judge= to the registry name of the reward that compares the samples "
                         f"(known: {', '.join(n for n in REWARDS.names() if n != 'win_rate')})")
    if judge == "win_rate":
        raise ValueError("win_rate: judge='win_rate' would judge with itself")
    if judge_batch_size < 0:
        raise ValueError(f"win_rate: judge_batch_size must be >= 0 (0 = the whole batch), got {judge_batch_size}")
    inner = REWARDS.build(judge, **judge_config)
    compare = getattr(inner, "compare", None)

    def fn(images, prompts, group_size=None, **metadata):
        validate_reward_inputs(images, prompts)
        B = images.shape[0]
        G = check_groups("win_rate", B, group_size)
        if G < 2:
            raise ValueError("win_rate compares the samples of a group: grpo.group_size must be >= 2")
        for g in range(0, B, G):
            if len(set(prompts[g:g + G])) != 1:
                raise ValueError(f"win_rate: samples {g}..{g + G - 1} are one group but hold different prompts "
                                 f"{sorted(set(prompts[g:g + G]))}; groups are G consecutive samples of one prompt")
        local = pairs_in_group(G)
        offsets = torch.arange(0, B, G).repeat_interleave(local.shape[1])
        first = local[0].repeat(B // G) + offsets
        second = local[1].repeat(B // G) + offsets
        info = {}
        if compare is not None:
            per_group = []
            for g in range(0, B, G):
                a, b = local[0] + g, local[1] + g
                p = torch.as_tensor(compare(images[a], images[b], [prompts[i] for i in a.tolist()])).detach()
                per_group.append(p.to(torch.float32).cpu().reshape(-1))
            prefer = torch.cat(per_group)
            if prefer.numel() != first.numel() or not torch.isfinite(prefer).all() or (prefer < 0).any() \
                    or (prefer > 1).any():
                raise ValueError(f"win_rate: the judge {judge!r}'s compare() must return one probability in [0, 1] per "
                                 f"pair ({first.numel()}), got {prefer.tolist()}")
            info["preference"] = prefer.tolist()
        else:
            raw, judge_info = score_in_chunks(inner, images, prompts, judge_batch_size, **metadata)
            s = check_scores(judge, raw, B)
            prefer = pointwise_preference(s[first], s[second])
            info.update({"judge": judge_info, "judge_scores": s.tolist()})
        return win_rates(prefer, first, second, B, G), info

    fn.group_level = True
    fn.judge = inner
    fn.modules, fn.device = getattr(inner, "modules", None), getattr(inner, "device", None)  # for offloading
    return fn
