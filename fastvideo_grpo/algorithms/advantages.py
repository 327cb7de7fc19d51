"""Advantage estimators, registered by name (``grpo.advantage``) as the objectives are.

An estimator turns one reward's scores of a batch (groups contiguous, ``group_size`` samples each) into
advantages; the trainer applies it to every reward and takes the weighted sum (rewards live on different
scales, so they are never added raw: docs/method.md section 3). ``needs_global_batch`` says whether it
normalises over every data-parallel rank's samples: the trainer then gathers all ranks' rewards first and
keeps this rank's slice. Options: ``grpo.advantage_std`` (``std``) and ``grpo.advantage_eps`` (``eps``; None =
the estimator's own default) for the built-in ones.

* ``group`` (GRPO): (r - mean(group)) / std(group), per group of G samples of one prompt;
* ``global`` (DDPO-style, an ablation): over the whole global batch, ignoring groups;
* ``group_global_std`` (Flow-GRPO, DiffusionNFT): (r - mean(group)) / (std(all rewards of the global batch) +
  eps), the released ``PerPromptStatTracker(global_std=True)`` (flow_grpo ``stat_tracking.py`` 25-31: numpy's
  population std, eps 1e-4). The released tracker groups by prompt text; here a group is one prompt's G samples.
"""

from __future__ import annotations

from typing import ClassVar, Mapping, Optional

import torch

from . import grpo
from ..utils.registry import Registry


class AdvantageEstimator:
    """One reward's scores (B,) -> advantages (B,)."""

    #: normalises over every data-parallel rank's samples (the trainer gathers them first)
    needs_global_batch: ClassVar[bool] = False

    #: epsilon of the normalisation when ``grpo.advantage_eps`` is null
    default_eps: ClassVar[float] = 1e-8

    def __init__(self, std: str = "bessel", eps: Optional[float] = None):
        self.std = std  # "bessel" or "population" (grpo.advantage_std; grpo.group_advantages checks it)
        self.eps = self.default_eps if eps is None else float(eps)

    def __call__(self, rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
        raise NotImplementedError


ADVANTAGES: Registry[AdvantageEstimator] = Registry("advantage estimator (grpo.advantage)")


@ADVANTAGES.register("group")
class GroupAdvantage(AdvantageEstimator):
    def __call__(self, rewards_B, group_size):
        return grpo.group_advantages(rewards_B, group_size, eps=self.eps, std=self.std)


@ADVANTAGES.register("global")
class GlobalAdvantage(AdvantageEstimator):
    needs_global_batch = True

    def __call__(self, rewards_B, group_size):
        return grpo.global_advantages(rewards_B, eps=self.eps, std=self.std)


@ADVANTAGES.register("group_global_std")
class GroupGlobalStdAdvantage(AdvantageEstimator):
    needs_global_batch = True
    default_eps = 1e-4

    def __call__(self, rewards_B, group_size):
        return grpo.group_mean_global_std_advantages(rewards_B, group_size, eps=self.eps, std=self.std)


def build_estimator(cfg) -> AdvantageEstimator:
    """``grpo.advantage`` with ``grpo.advantage_std`` and ``grpo.advantage_eps``."""
    return ADVANTAGES.build(cfg.grpo.advantage, std=cfg.grpo.advantage_std, eps=cfg.grpo.advantage_eps)


def weighted_advantages(rewards: Mapping[str, torch.Tensor], group_size: int, estimator: AdvantageEstimator,
                        weights: Optional[Mapping[str, float]] = None) -> torch.Tensor:
    """The weighted sum over rewards of each reward's advantages (``grpo.aggregate_advantages`` with any
    estimator)."""
    return grpo.weighted_sum({name: estimator(r, group_size) for name, r in rewards.items()}, weights)
