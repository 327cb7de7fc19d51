"""The objective of a run's config, checked against the sampling settings through what it declares
(``needs_log_probs``, ``needs_reference``), before anything heavy is built."""

from __future__ import annotations

from typing import Sequence

from .. import sde_window
from ..samplers import build_sampler
from .base import OBJECTIVES, Objective


#: why the last step has eta 0 (``check_stochastic_steps``' ``why``)
LAST_STEP_HINT = ("; the last step is deterministic: sampling.deterministic_last_step; set grpo.train_last_step: "
                  "false, as the released code")


def check_stochastic_steps(etas: Sequence[float], lo: int, hi: int, why: str = "") -> None:
    """ValueError when a step in ``[lo, hi)`` (the steps training may pick) has eta = 0: its transition is a
    point mass, with no log-prob to train (an objective that ``needs_log_probs`` cannot use it)."""
    dead = [i for i in range(lo, hi) if float(etas[i]) <= 0]
    if dead:
        raise ValueError(f"steps {dead} have eta = 0 (sampling.eta / sampling.eta_schedule{why}) but training may "
                         f"pick them (window [{lo}, {hi})), and an eta = 0 step has no log-prob to train; set eta > 0 "
                         "there or narrow grpo.timestep_window")


def build_objective(cfg) -> Objective:
    """``grpo.objective`` with its options (``grpo.objective_kwargs`` and its ``grpo`` fields), refusing
    settings it cannot train with: eta = 0 at a step training may pick when it needs log-probs, a KL
    coefficient when it keeps no reference. The sampler's own settings are checked here too: a deterministic
    sampler from one shared noise per group gives G identical samples (every advantage 0) whatever the
    objective. The configured rollout sampler is built too (its own checks), and an objective that cannot read
    the sampler's per-step advantages is refused. Collective-free and model-free: preflight runs it at start-up."""
    g, s = cfg.grpo, cfg.sampling
    name = OBJECTIVES.canonical(g.objective)
    OBJECTIVES.check_kwargs(name, g.objective_kwargs, "grpo.objective_kwargs")
    objective = OBJECTIVES.get(name).from_config(cfg, **g.objective_kwargs)
    objective.name = name
    etas = s.eta_per_step()
    lo, hi = sde_window.training_window(cfg)
    if s.deterministic_last_step:
        etas[-1] = 0.0
    if objective.needs_log_probs:
        only_last = [i for i in range(lo, hi) if etas[i] <= 0] == [s.num_steps - 1]
        check_stochastic_steps(etas, lo, hi, LAST_STEP_HINT if only_last and s.deterministic_last_step else "")
    if g.shared_noise and all(e <= 0 for e in etas):
        raise ValueError("a deterministic sampler (sampling.eta 0 at every step) from one shared initial noise per group "
                         "gives G identical samples, hence zero advantages; set grpo.shared_noise: false (or "
                         "sampling.eta > 0)")
    if g.kl_coef > 0 and not objective.needs_reference:
        raise ValueError(f"grpo.kl_coef is a KL to the starting policy, which grpo.objective: {g.objective} does not "
                         "use; set it to 0")
    if g.drop_zero_advantage and objective.needs_whole_groups:
        raise ValueError(f"grpo.objective: {g.objective} compares the samples of each group, which "
                         "grpo.drop_zero_advantage breaks up; set grpo.drop_zero_advantage: false")
    sampler = build_sampler(cfg)  # sampling.rollout and its options, against the sampling settings
    if sampler.per_step_advantages and not objective.per_step_advantages:
        raise ValueError(f"sampling.rollout: {s.rollout} gives each trained step its own advantage, which "
                         f"grpo.objective: {g.objective} does not read (it trains on whole-sample advantages); use an "
                         "objective that reads them (ppo_clip, flow_dppo) or sampling.rollout: sde")
    return objective
