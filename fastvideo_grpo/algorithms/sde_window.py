"""Per-iteration SDE windows: where the sampler is stochastic and which steps train (MixGRPO, Flow-GRPO-Fast).

DanceGRPO samples every step with the SDE and trains a random subset of them. Its successors confine
both to a window of W consecutive steps that changes with the iteration, with deterministic (ODE)
steps outside it (``grpo.sde_window``, docs/algorithms.md):

* ``sliding`` (MixGRPO, Li et al. 2025): the window starts at ``start`` and moves by ``stride`` steps
  every ``shift_every`` iterations, from early (noisy) steps to late ones. At the last position it stays
  there, or goes back to ``start`` with ``roll_back`` (the released MixGRPO script's setting).
* ``random`` (Flow-GRPO-Fast, Liu et al. 2025): a new position every iteration, drawn uniformly with a
  generator seeded by (train.seed, iteration) (``window_seed``): shared by the whole batch on every
  data-parallel rank, reproduced on resume, and independent of the rollout's noise stream.

In both, the window lies inside the steps training may pick (``grpo.trainable_window``: the static
``grpo.timestep_window``, without the last step unless ``grpo.train_last_step``), eta is set to 0 outside
it (the schedule is copied, not changed), and the trained steps are drawn from the window only.

MixGRPO-Flash (``sampling.dpm_apply: post`` with ``sampling.dpm_post_compress_ratio``): the deterministic steps
after the window are taken on a coarser grid (``compress_after_window``, the released ``dpm_post_compress_ratio``),
so an iteration costs fewer forwards; ``mean_rollout_steps`` is the planner's average over the run.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from . import grpo
from .. import sde
from ..config import WINDOW_MODES


def sliding_window_start(iteration: int, lo: int, hi: int, size: int, start: int = 0, stride: int = 1,
                         shift_every: int = 1, roll_back: bool = False) -> int:
    """First step of the sliding window at (0-based) ``iteration``: ``lo + start + stride * (iteration //
    shift_every)``, kept where the whole window ``[s, s + size)`` fits in ``[lo, hi)``: at the last position
    that fits (or, with ``roll_back``, cycling through the positions from ``start`` again)."""
    if size < 1 or stride < 1 or shift_every < 1 or start < 0 or iteration < 0:
        raise ValueError(f"sliding window needs size, stride, shift_every >= 1 and start, iteration >= 0; got "
                         f"size={size}, stride={stride}, shift_every={shift_every}, start={start}, iteration={iteration}")
    first = lo + start
    if first + size > hi:
        raise ValueError(f"a window of {size} steps starting at step {first} does not fit in the trainable steps "
                         f"[{lo}, {hi}); lower grpo.sde_window.start or size")
    positions = (hi - size - first) // stride + 1  # how many whole windows fit
    shift = iteration // shift_every
    shift = shift % positions if roll_back else min(shift, positions - 1)
    return first + stride * shift


def window_seed(seed: int, iteration: int) -> int:
    """Seed of the random window's draw at ``iteration`` (the same on every rank)."""
    return (int(seed) * 1_000_003 + int(iteration) * 7_919 + 12_345) % (2**63 - 1)


def random_window_start(lo: int, hi: int, size: int, generator: Optional[torch.Generator]) -> int:
    """A uniformly random first step of a ``size``-step window inside ``[lo, hi)`` (one draw)."""
    if not 1 <= size <= hi - lo:
        raise ValueError(f"a window of {size} steps does not fit in the trainable steps [{lo}, {hi}); lower "
                         "grpo.sde_window.size")
    return lo + int(torch.randint(0, hi - lo - size + 1, (1,), generator=generator))


def window_for_iteration(window_cfg, iteration: int, trainable: Tuple[int, int],
                         generator: Optional[torch.Generator] = None) -> Optional[Tuple[int, int]]:
    """The window ``[a, b)`` of this iteration for a ``config.SDEWindowConfig``; None when mode is "off"."""
    mode = window_cfg.mode
    assert mode in WINDOW_MODES, mode  # the config's own check (SDEWindowConfig.validate)
    if mode == "off":
        return None
    lo, hi = trainable
    if mode == "sliding":
        a = sliding_window_start(iteration, lo, hi, window_cfg.size, window_cfg.start, window_cfg.stride,
                                 window_cfg.shift_every, window_cfg.roll_back)
    else:
        a = random_window_start(lo, hi, window_cfg.size, generator)
    return a, a + window_cfg.size


def training_window(cfg) -> Tuple[int, int]:
    """The steps ``[lo, hi)`` training may pick (``grpo.trainable_window`` of ``grpo.timestep_window`` and
    ``grpo.train_last_step`` over ``sampling.num_steps``), after checking that ``grpo.sde_window`` fits in them:
    a ValueError naming the key to change otherwise. Model-free: preflight runs it through the objective's
    builder."""
    g = cfg.grpo
    lo, hi = grpo.trainable_window(cfg.sampling.num_steps, g.timestep_window, g.train_last_step)
    window_for_iteration(g.sde_window, 0, (lo, hi), torch.Generator().manual_seed(0))  # raises when it cannot fit
    return lo, hi


def only_in_window(schedule, window: Tuple[int, int]):
    """A copy of ``schedule`` whose eta is 0 (deterministic ODE step) outside ``[a, b)`` and unchanged inside."""
    a, b = window
    eta = torch.zeros_like(schedule.eta)
    eta[a:b] = schedule.eta[a:b]
    return dataclasses.replace(schedule, eta=eta)


def compress_after_window(schedule, ratio: float):
    """A copy of a flow ``schedule`` whose deterministic steps after its last stochastic step lie on the compressed
    grid of ``sde.compressed_tail`` (MixGRPO-Flash), with eta 0 there; unchanged without a stochastic step. The
    steps up to the window's end keep their indices, so the kept (trained) steps do not move."""
    eta = schedule.eta
    stochastic = torch.nonzero(eta > 0).reshape(-1)
    if stochastic.numel() == 0:
        return schedule
    last = int(stochastic[-1])
    sigmas = sde.compressed_tail(schedule.sigmas, last, ratio, getattr(schedule, "shift", 1.0))
    new_eta = torch.zeros(sigmas.numel() - 1, dtype=eta.dtype)
    new_eta[:last + 1] = eta[:last + 1]
    return dataclasses.replace(schedule, sigmas=sigmas, eta=new_eta)


def mean_rollout_steps(cfg) -> float:
    """Sampling steps per rollout averaged over the run's ``train.num_iterations`` iterations: ``sampling.num_steps``,
    fewer where ``sampling.dpm_apply: post`` compresses the steps after each iteration's window (the window moves,
    so the count changes with the iteration). Model-free: the etas are the config's, the grid a linspace (the
    count does not depend on the grid)."""
    s, g = cfg.sampling, cfg.grpo
    if s.dpm_apply != "post" or s.dpm_post_compress_ratio >= 1.0:
        return float(s.num_steps)
    lo, hi = training_window(cfg)
    etas = torch.tensor(s.eta_per_step(), dtype=torch.float64)
    if s.deterministic_last_step is not False:  # flow schedules' default: the last step is deterministic
        etas[-1] = 0.0
    base = sde.FlowSchedule(sde.flow_sigmas(s.num_steps), etas)
    total, n = 0, max(1, int(cfg.train.num_iterations))
    for it in range(n):
        draw = torch.Generator().manual_seed(window_seed(cfg.train.seed, it))
        moving = window_for_iteration(g.sde_window, it, (lo, hi), draw)
        sched = base if moving is None else only_in_window(base, moving)
        total += compress_after_window(sched, s.dpm_post_compress_ratio).num_steps
    return total / n
