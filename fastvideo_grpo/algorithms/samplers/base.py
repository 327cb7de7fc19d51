"""The rollout-sampler protocol and its registry (``sampling.rollout``, options ``sampling.rollout_kwargs``), as
the objectives have theirs: how an iteration's trajectories are drawn. The trainer calls the configured one;
the planner and the config checks read its declarations; none of them tests a name.

A sampler returns a ``rollout.Trajectory`` of B = prompts x G samples (groups contiguous) holding the kept
transitions ``keep_steps_BK`` names, so every objective can train on it. ``sde`` (the default) is DanceGRPO's:
one shared initial noise per group (``grpo.shared_noise``), the SDE step by step (deterministic steps with
``sampling.ode_solver``). A sampler that draws differently (``tree``: branches sharing prefixes) is one file in
this folder registering a ``RolloutSampler``. Besides drawing, it may declare

* which steps are kept for training (``keep_steps``; default: ``grpo.subsample_timesteps``),
* its model forwards per group and the transitions it trains per group (the planner's counts),
* per-(sample, kept step) advantages computed from the rewards (``step_advantages``, with
  ``per_step_advantages = True``: the objective must then read them, ``TrainBatch.advantages_at``), and kept
  slots that are not trained (``Trajectory.trained_BK``: a transition shared by several samples is trained once),
* its own checks of the run's config (``check``).
"""

from __future__ import annotations

from typing import ClassVar, Dict, List, Mapping, Optional, Tuple

import torch

from ...models.base import Cond, PolicyAdapter
from ...utils.registry import Registry
from .. import grpo
from ..rollout import Trajectory, rollout


class RolloutSampler:
    """Draws one iteration's trajectories."""

    #: ``step_advantages`` returns per-(sample, kept step) advantages the objective must train with
    per_step_advantages: ClassVar[bool] = False

    def forwards_per_sample(self, num_steps: int) -> int:
        """Policy forwards one sample of the batch costs in the rollout (the planner's count)."""
        return num_steps

    def forwards_per_group(self, num_steps: int, group_size: int) -> int:
        """Policy forwards (per sample) one group of ``group_size`` samples costs in the rollout."""
        return group_size * self.forwards_per_sample(num_steps)

    def keep_steps(self, num_steps: int, tau: float, batch_size: int, group_size: int,
                   generator: Optional[torch.Generator], window: Tuple[int, int], shared: bool = False) -> torch.Tensor:
        """The (B, K) int64 CPU tensor of the steps whose transitions are kept for training (drawn before the
        rollout); ``shared``: one subset for the whole batch (the objective's ``shared_timesteps``)."""
        return grpo.subsample_timesteps(num_steps, tau, batch_size, generator, window, shared=shared)

    def kept_per_sample(self, num_steps: int, window: Tuple[int, int], num_kept: int) -> int:
        """K, the kept slots per sample, given the default count ``num_kept`` (int(tau x the window))."""
        return num_kept

    def trained_per_group(self, num_steps: int, group_size: int, window: Tuple[int, int], num_kept: int) -> int:
        """Transitions one group trains per epoch of the update (the planner's count of trained steps)."""
        return group_size * num_kept

    def check(self, cfg) -> None:
        """ValueError for config settings this sampler cannot draw with (called at start-up, model-free)."""

    def step_advantages(self, traj: Trajectory, rewards: Mapping[str, torch.Tensor], estimator,
                        weights: Optional[Mapping[str, float]] = None) -> Optional[torch.Tensor]:
        """Per-(sample, kept step) advantages (B, K), or None: the estimator's per-sample ones apply to every
        kept step. May also narrow ``traj.trained_BK`` (pruning on the rewards)."""
        return None

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


def build_sampler(cfg) -> RolloutSampler:
    """``sampling.rollout`` with its ``sampling.rollout_kwargs`` (checked against its constructor), after its own
    config checks. Model-free: preflight runs it at start-up."""
    s = cfg.sampling
    name = ROLLOUTS.canonical(s.rollout)
    kwargs: Dict = dict(s.rollout_kwargs or {})
    ROLLOUTS.check_kwargs(name, kwargs, "sampling.rollout_kwargs")
    sampler = ROLLOUTS.build(name, **kwargs)
    sampler.check(cfg)
    return sampler
