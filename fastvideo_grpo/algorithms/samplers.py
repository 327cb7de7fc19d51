"""Rollout samplers, registered by name (``sampling.rollout``) as the objectives are: how an iteration's
trajectories are drawn. The trainer calls the configured one; the planner reads its forward count.

A sampler returns a ``rollout.Trajectory`` of B = prompts x G samples (groups contiguous) holding the kept
transitions ``keep_steps_BK`` names, so every objective can train on it. ``sde`` (the default) is DanceGRPO's:
one shared initial noise per group (``grpo.shared_noise``), the SDE step by step (deterministic steps with
``sampling.ode_solver``). A sampler that draws differently (e.g. a tree of branches sharing prefixes) is one
file registering a ``RolloutSampler``; it declares its model forwards per sample for the planner.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..models.base import Cond, PolicyAdapter
from ..utils.registry import Registry
from .rollout import Trajectory, rollout


class RolloutSampler:
    """Draws one iteration's trajectories."""

    def forwards_per_sample(self, num_steps: int) -> int:
        """Policy forwards one sample of the batch costs in the rollout (the planner's count)."""
        return num_steps

    def __call__(self, adapter: PolicyAdapter, schedule, prompts: List[str], cond_P: Cond, group_size: int,
                 keep_steps_BK: torch.Tensor, generator: torch.Generator, *, shared_noise: bool = True,
                 autocast_dtype: Optional[torch.dtype] = None, rollout_batch_size: int = 0,
                 ode_solver: str = "euler", keep_means: bool = False) -> Trajectory:
        """``keep_means``: also keep the step means of the kept transitions (``Trajectory.means_BK``), asked for
        by an objective that ``needs_step_means``."""
        raise NotImplementedError


ROLLOUTS: Registry[RolloutSampler] = Registry("rollout sampler (sampling.rollout)")


@ROLLOUTS.register("sde")
class SDERollout(RolloutSampler):
    """``rollout.rollout`` without decoding (the trainer decodes in its own chunks)."""

    def __call__(self, adapter, schedule, prompts, cond_P, group_size, keep_steps_BK, generator, **options):
        return rollout(adapter, schedule, prompts, cond_P, group_size, keep_steps_BK, generator, decode=False,
                       **options)
