"""PPO-clip on the SDE transitions' log-probs (DanceGRPO's objective), with Flow-GRPO's optional KL term.

Per trained (sample, kept step): the stored transition z_t -> z_s is re-scored with the current weights
(the same step function and arithmetic as the rollout, so the ratio is exactly 1 before the first optimiser
step), and the loss is ``grpo.ppo_clip_loss``: mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))), with the
advantages clamped to +-``adv_clip_max``, plus ``kl_coef`` times the exact per-step Gaussian KL to a frozen
copy of the starting policy (``grpo.gaussian_kl_same_std``; one more no-grad forward per trained step).
Options: ``grpo.clip_range``, ``grpo.adv_clip_max``, ``grpo.kl_coef`` (docs/method.md section 3).

``train/first_ratio_dev`` reports |ratio - 1| at the update's first micro-step: 0 when rollout and
re-scoring run the same arithmetic; on GPUs, bf16 kernels chosen by batch shape can make it ~1e-6..1e-5, to
compare with the clip range. ``grpo_update`` is the functional form (one update through the driver).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .. import grpo
from ...models.base import PolicyAdapter
from ..rollout import Trajectory
from .base import OBJECTIVES, Objective, TrainBatch


@OBJECTIVES.register("ppo_clip", aliases=("grpo",))
class PPOClip(Objective):
    """PPO-clip (+ KL to the starting policy when ``kl_coef`` > 0)."""

    name = "ppo_clip"
    label = "GRPO"
    stat_names = ("loss", "clipfrac", "approx_kl", "ratio_mean", "kl")
    config_fields = {"clip_range": "clip_range", "adv_clip_max": "adv_clip_max", "kl_coef": "kl_coef"}

    def __init__(self, clip_range: float = 1e-4, adv_clip_max: Optional[float] = 5.0, kl_coef: float = 0.0,
                 on_first_ratio: Optional[Callable[[torch.Tensor], None]] = None):
        """``on_first_ratio`` (for tests) receives the first micro-step's ratio of every update."""
        self.clip_range = None if clip_range is None else float(clip_range)  # None: no clipping
        self.adv_clip_max, self.kl_coef = adv_clip_max, float(kl_coef)
        self.on_first_ratio = on_first_ratio

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def extra_forwards_per_trained_step(self) -> int:
        return 1 if self.needs_reference else 0

    def trained_advantages(self, advantages_B):
        return grpo.clamp_advantages(advantages_B, self.adv_clip_max)

    def prepare(self, batch, row_chunks):
        if self.needs_reference and batch.reference is None:
            raise ValueError("grpo.kl_coef > 0 needs the frozen reference policy (TrainBatch.reference)")
        self._adv_B = batch.advantages_B.to(device=batch.device, dtype=torch.float32)
        self._first_dev = torch.zeros(1, dtype=torch.float32, device=batch.device)
        self._first = True

    def loss(self, batch, rows, k):
        traj, sched = batch.traj, batch.schedule
        rows_dev = batch.on_device(rows)  # copied once per update, not per micro-step
        idx = traj.steps_BK[rows, k]  # on the host: the step kernel takes its coefficient rows by value
        z, z_next = traj.latents_BK[rows_dev, k], traj.next_latents_BK[rows_dev, k]
        cond = batch.cond(rows)
        t = sched.model_timestep(batch.on_device(traj.steps_BK)[rows_dev, k], z)
        use_kl = self.needs_reference
        out = batch.predict(z, t, cond)  # same precision as the rollout: the ratio stays 1
        _, logp, mean, std = sched.step(idx, out, z, prev_sample=z_next, need_mean=use_kl)
        kl_B = None
        if use_kl:
            with torch.no_grad():
                ref_out = batch.predict(z, t, cond, adapter=batch.reference)
                _, _, ref_mean, _ = sched.step(idx, ref_out, z, prev_sample=z_next)
            kl_B = grpo.gaussian_kl_same_std(mean, ref_mean, std)
        old = traj.log_probs_BK[rows_dev, k]
        self.last_logp_gap_B = (logp.detach() - old).abs()  # the rollout / training gap, logged by the driver
        if self._first:  # before any optimiser step: the ratio must be 1 (same weights, same arithmetic)
            self._first = False
            ratio = torch.exp(logp.detach() - old)
            self._first_dev = (ratio - 1.0).abs().max().float().reshape(1)
            if self.on_first_ratio is not None:
                self.on_first_ratio(ratio)
        loss, st = grpo.ppo_clip_loss(logp, old, self._adv_B[rows_dev], self.clip_range, self.adv_clip_max, kl_B,
                                      self.kl_coef)
        return loss, (st.loss, st.clipfrac, st.approx_kl, st.ratio_mean, st.kl)

    def finish(self, batch):
        return {"first_ratio_dev": self._first_dev.reshape(())}


def grpo_update(adapter: PolicyAdapter, schedule, traj: Trajectory, advantages_B: torch.Tensor,
                optimizer: torch.optim.Optimizer, *, clip_range: float, adv_clip_max: Optional[float] = 5.0,
                ref_adapter: Optional[PolicyAdapter] = None, kl_coef: float = 0.0,
                on_first_ratio: Optional[Callable[[torch.Tensor], None]] = None, autocast_dtype=None,
                lr_scheduler=None, **settings) -> Dict[str, float]:
    """One PPO-clip update of ``traj`` through the driver (``algorithms.update.update``); ``settings``:
    ``num_updates``, ``micro_batch_size``, ``max_grad_norm`` (``UpdateSettings``). For tests and scripts."""
    from ..update import UpdateSettings, update

    objective = PPOClip(clip_range, adv_clip_max, kl_coef, on_first_ratio=on_first_ratio)
    batch = TrainBatch(adapter, schedule, traj, advantages_B, autocast_dtype=autocast_dtype, reference=ref_adapter)
    return update(objective, batch, optimizer, UpdateSettings(**settings), lr_scheduler)
