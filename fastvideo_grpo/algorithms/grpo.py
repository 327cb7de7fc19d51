"""GRPO objective pieces: group advantages, reward aggregation, best-of-N, timestep subsets, PPO-clip.

All follow ``docs/method.md`` section 3. Samples of one prompt group are laid out
contiguously: a batch of B = num_groups * group_size samples, group g owning rows
[g * group_size, (g + 1) * group_size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

#: how the std of a group is estimated (``grpo.advantage_std``): "bessel" (unbiased, n - 1; the released code's
#: ``group_rewards.std()``) or "population" (n)
from ..config import STD_ESTIMATORS


def _check_groups(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards_B.ndim != 1:
        raise ValueError(f"rewards must be 1-D (one score per sample), got shape {tuple(rewards_B.shape)}")
    if group_size < 1 or rewards_B.numel() % group_size != 0:
        raise ValueError(f"batch of {rewards_B.numel()} samples is not a whole number of groups of {group_size}")
    if not torch.isfinite(rewards_B).all():
        raise ValueError("rewards contain NaN or inf; check the reward model's inputs")
    return rewards_B.reshape(-1, group_size)


def group_advantages(rewards_B: torch.Tensor, group_size: int, eps: float = 1e-8, std: str = "bessel") -> torch.Tensor:
    """A_i = (r_i - mean(group)) / std(group).

    ``std="bessel"`` (default) is the released DanceGRPO code's formula exactly,
    ``(r - mean) / (r.std() + 1e-8)`` with torch's unbiased (n - 1) std; a group whose rewards are all
    equal gets 0. ``std="population"`` divides by the population (n) std instead, larger advantages by
    sqrt(n / (n - 1)) (1.04 at G = 12), and gives 0 to a group whose std is below ``eps``.
    The paper writes std(group) without saying which.
    """
    if std not in STD_ESTIMATORS:
        raise ValueError(f"std must be one of {STD_ESTIMATORS}, got {std!r}")
    r = _check_groups(rewards_B.to(torch.float64), group_size)
    mean = r.mean(dim=1, keepdim=True)
    if std == "bessel":
        if group_size < 2:
            raise ValueError("the Bessel-corrected std needs at least 2 samples per group (grpo.group_size >= 2)")
        adv = (r - mean) / (r.std(dim=1, unbiased=True, keepdim=True) + eps)
    else:
        sd = r.std(dim=1, unbiased=False, keepdim=True)
        adv = torch.where(sd > eps, (r - mean) / sd.clamp(min=eps), torch.zeros_like(r))
    return adv.reshape(-1).to(torch.float32)


def group_mean_global_std_advantages(rewards_B: torch.Tensor, group_size: int, eps: float = 1e-4,
                                     std: str = "population") -> torch.Tensor:
    """A_i = (r_i - mean(group)) / (std(all of rewards_B) + eps): each group's own mean, one std for the batch
    (released Flow-GRPO ``PerPromptStatTracker(global_std=True)``: numpy's population std + 1e-4; computed in
    float64 as there). A group whose rewards are all equal gets 0 exactly (the float mean of equal values can
    miss them by an ulp, which would leave such samples in the update of ``grpo.drop_zero_advantage``)."""
    if std not in STD_ESTIMATORS:
        raise ValueError(f"std must be one of {STD_ESTIMATORS}, got {std!r}")
    r = _check_groups(rewards_B.to(torch.float64), group_size)
    sd = r.reshape(-1).std(unbiased=(std == "bessel"))
    adv = (r - r.mean(dim=1, keepdim=True)) / (sd + eps)
    flat = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(adv), adv).reshape(-1).to(torch.float32)


def global_advantages(rewards_B: torch.Tensor, eps: float = 1e-8, std: str = "bessel") -> torch.Tensor:
    """DDPO-style normalisation over the whole batch (ignores groups); for ablations."""
    return group_advantages(rewards_B, rewards_B.numel(), eps, std)


def aggregate_advantages(
    rewards: Mapping[str, torch.Tensor],
    group_size: int,
    weights: Optional[Mapping[str, float]] = None,
    normalise: str = "group",
    std: str = "bessel",
) -> torch.Tensor:
    """Normalise each reward within its group, then take the weighted sum of advantages.

    Rewards live on different scales, so they are never added raw (docs/method.md section 3).
    ``normalise`` is "group" (GRPO) or "global" (DDPO-style, for ablations); ``std`` as in
    ``group_advantages``. (The trainer goes through the registered estimators of algorithms/advantages.py,
    which compute the same.)
    """
    if normalise not in ("group", "global"):
        raise ValueError(f"normalise must be 'group' or 'global', got {normalise!r}")
    per_reward = {name: group_advantages(r, group_size, std=std) if normalise == "group"
                  else global_advantages(r, std=std) for name, r in rewards.items()}
    return weighted_sum(per_reward, weights)


def weighted_sum(advantages: Mapping[str, torch.Tensor], weights: Optional[Mapping[str, float]] = None) -> torch.Tensor:
    """sum over rewards of weight * advantages (weight 1 where none is given), in the rewards' order."""
    if not advantages:
        raise ValueError("at least one reward is needed")
    weights = dict(weights or {})
    unknown = set(weights) - set(advantages)
    if unknown:
        raise ValueError(f"weights given for rewards that were not computed: {sorted(unknown)}")
    total = None
    for name, a in advantages.items():
        a = a * float(weights.get(name, 1.0))
        total = a if total is None else total + a
    return total


def best_of_n_indices(rewards_B: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """Indices (into the batch) of the top-k and bottom-k samples of every group, group-contiguous.

    The result has num_groups * 2k entries laid out as groups of 2k, so ``group_advantages`` can be
    called on the selection with group_size = 2k.
    """
    r = _check_groups(rewards_B, group_size)
    if not 1 <= k <= group_size // 2:
        raise ValueError(f"best-of-N k must be in [1, group_size // 2 = {group_size // 2}], got {k}")
    order = torch.argsort(r, dim=1, descending=True, stable=True)
    chosen = torch.cat([order[:, :k], order[:, -k:]], dim=1)
    offsets = torch.arange(r.shape[0], device=r.device).unsqueeze(1) * group_size
    return (chosen + offsets).reshape(-1)


def num_train_steps(num_candidates: int, tau: float) -> int:
    """int(tau * n): how many of ``n`` candidate steps each sample trains on, at least 1.

    The released DanceGRPO code trains ``int(len(timesteps) * timestep_fraction)`` steps, its timesteps
    being the T - 1 steps before the last, so with n = T - 1 (``trainable_window``) this is its count
    (FLUX, T = 16, tau 0.6: 9). The product is rounded to 9 decimals first, so float noise cannot drop
    a step (0.29 * 100 = 28.999999999999996 gives 29, where the released ``int()`` gives 28).
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"timestep fraction tau must be in (0, 1], got {tau}")
    if num_candidates < 1:
        raise ValueError(f"there must be at least one step to train on, got {num_candidates}")
    return max(1, math.floor(round(tau * num_candidates, 9)))


def trainable_window(num_steps: int, window: Optional[Sequence[int]] = None,
                     train_last_step: bool = False) -> Tuple[int, int]:
    """The steps ``[lo, hi)`` that training may pick from: ``window`` (default all T steps), without the
    last step unless ``train_last_step`` (the released code never trains it: ``[:, :-1]`` on the
    timesteps, latents and log-probs of every trajectory). ValueError when nothing is left."""
    if window is not None and len(window) != 2:
        raise ValueError(f"grpo.timestep_window {list(window)} must be [lo, hi)")
    lo, hi = (0, num_steps) if window is None else (int(window[0]), int(window[1]))
    if not 0 <= lo < hi <= num_steps:
        raise ValueError(f"grpo.timestep_window {list(window)} must be [lo, hi) with 0 <= lo < hi <= "
                         f"sampling.num_steps={num_steps}")
    if not train_last_step:
        if num_steps < 2:
            raise ValueError("sampling.num_steps must be >= 2 while the last step is not trained "
                             "(grpo.train_last_step: false); or set grpo.train_last_step: true")
        hi = min(hi, num_steps - 1)
        if hi <= lo:
            raise ValueError(f"no step left to train on: the window [{lo}, {hi + 1}) of {num_steps} steps holds only "
                             "the last step, which is not trained (grpo.train_last_step: false, as the released "
                             "code); widen grpo.timestep_window or set grpo.train_last_step: true")
    return lo, hi


def subsample_timesteps(
    num_steps: int,
    tau: float,
    batch_size: int,
    generator: Optional[torch.Generator] = None,
    window: Optional[tuple] = None,
    shared: bool = False,
) -> torch.Tensor:
    """Per-sample random subsets of ``num_train_steps(hi - lo, tau)`` step indices in ``[lo, hi)``:
    an int64 (B, K) CPU tensor.

    Each sample draws its own subset (as the reference implementation does), in random order.
    ``window=(lo, hi)`` restricts choices to steps lo..hi-1; the trainer passes ``trainable_window``
    (which leaves out the last step by default). Without a window all ``num_steps`` are candidates.
    ``shared``: one subset for the whole batch (an objective that compares the samples of a group at one
    time, as DGPO, declares ``shared_timesteps``).
    """
    lo, hi = (0, num_steps) if window is None else window
    if not 0 <= lo < hi <= num_steps:
        raise ValueError(f"timestep window {window} must satisfy 0 <= lo < hi <= {num_steps}")
    k = num_train_steps(hi - lo, tau)
    keys = torch.rand(1 if shared else batch_size, hi - lo, generator=generator)
    return (keys.argsort(dim=1)[:, :k] + lo).expand(batch_size, k).contiguous()


@dataclass
class PPOStats:
    """Diagnostics of one PPO-clip loss as detached 0-dim tensors on the loss's device.

    Kept as tensors so a training loop can sum them over micro-steps and read them back once per
    update (``float()`` on each would cost a host-device sync per micro-step on GPU).
    """

    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    kl: torch.Tensor


def update_chunks(batch: int, steps: int, micro_batch_size: int, num_updates: int
                  ) -> Tuple[List[torch.Tensor], List[range]]:
    """How an iteration's update is split: the sample rows of each micro-batch (``micro_batch_size`` rows,
    0 = all ``batch``), and the kept-step columns of each of the ``num_updates`` optimiser steps (as even as
    possible, at most ``steps`` of them)."""
    mb = micro_batch_size or batch
    rows = [torch.arange(s, min(s + mb, batch)) for s in range(0, batch, mb)]
    parts = max(1, min(num_updates, steps))
    bounds = [round(i * steps / parts) for i in range(parts + 1)]
    return rows, [range(bounds[i], bounds[i + 1]) for i in range(parts)]


def clamp_advantages(advantages_B: torch.Tensor, adv_clip_max: Optional[float]) -> torch.Tensor:
    """Advantages clamped to +-``adv_clip_max`` (``grpo.adv_clip_max``; None: unchanged)."""
    return advantages_B if adv_clip_max is None else advantages_B.clamp(-adv_clip_max, adv_clip_max)


def ppo_clip_loss(
    log_prob_B: torch.Tensor,
    old_log_prob_B: torch.Tensor,
    advantages_B: torch.Tensor,
    clip_range: Optional[float],
    adv_clip_max: Optional[float] = None,
    kl_B: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
):
    """PPO-clip surrogate to minimise: mean(max(-A rho, -A clip(rho, 1-eps, 1+eps))) [+ kl_coef * KL];
    ``clip_range`` None: no clipping, mean(-A rho) (``grpo.clip_range: null``).

    Returns ``(loss, PPOStats)``: clip fraction, approx KL 0.5 * E[(log rho)^2], mean ratio and mean
    KL, as detached tensors (no host sync here).
    """
    if clip_range is not None and not (math.isfinite(clip_range) and clip_range > 0):
        raise ValueError(f"clip_range must be a finite number > 0 or None (no clipping), got {clip_range}")
    adv = clamp_advantages(advantages_B.to(log_prob_B.dtype), adv_clip_max)
    log_ratio = log_prob_B - old_log_prob_B.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    if clip_range is None:
        loss = unclipped.mean()
    else:
        clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        loss = torch.maximum(unclipped, clipped).mean()
    kl_val = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if kl_B is not None and kl_coef > 0:
        loss = loss + kl_coef * kl_B.mean()
        kl_val = kl_B.detach().mean().to(loss.dtype)
    with torch.no_grad():
        stats = PPOStats(
            loss=loss.detach(),
            clipfrac=(((ratio - 1.0).abs() > clip_range).to(loss.dtype).mean() if clip_range is not None
                      else torch.zeros((), dtype=loss.dtype, device=loss.device)),
            approx_kl=(0.5 * (log_ratio**2)).mean(),
            ratio_mean=ratio.mean(),
            kl=kl_val,
        )
    return loss, stats


def gaussian_kl_same_std(mean_p: torch.Tensor, mean_q: torch.Tensor, std_B: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, s^2 I) || N(mean_q, s^2 I)) per element, averaged per sample: |dm|^2 / (2 s^2).

    The policy and the frozen reference share the step's std, so this is the exact per-step KL
    (averaged over elements like the log-prob). Deterministic steps (std 0) contribute 0.
    """
    s = std_B.reshape(-1, *([1] * (mean_p.ndim - 1))).to(mean_p.dtype)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    kl = ((mean_p - mean_q) ** 2 / (2 * safe**2)).mean(dim=tuple(range(1, mean_p.ndim)))
    return torch.where(std_B.to(kl.device) > 0, kl, torch.zeros_like(kl))


def flow_grpo_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, eta_B: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's KL of one SDE step as released (``scripts/train_sd3.py`` 895): per sample the mean over
    elements of |mean_p - mean_q|^2, divided by 2 eta_t^2 with eta_t the step's noise level (``std_dev_t`` of
    ``sd3_sde_with_logprob.py`` 47), not by the step's variance eta_t^2 |dt|: the exact KL
    (``gaussian_kl_same_std``) times |dt|. Steps with eta 0 contribute 0."""
    return gaussian_kl_same_std(mean_p, mean_q, eta_B)


def summarize_rewards(rewards: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Per-reward mean and std for logging."""
    out = {}
    for name, r in rewards.items():
        r = r.detach().to(torch.float64)
        out[f"reward/{name}/mean"] = float(r.mean())
        out[f"reward/{name}/std"] = float(r.std(unbiased=False))
    return out
