"""PPO-clip on the SDE transitions' log-probs (DanceGRPO's objective), with Flow-GRPO's optional KL term.

Per trained (sample, kept step): the stored transition z_t -> z_s is re-scored with the current weights
(the same step function and arithmetic as the rollout, so the ratio is exactly 1 before the first optimiser
step), and the loss is ``grpo.ppo_clip_loss``: mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))), with the
advantages clamped to +-``adv_clip_max``, plus ``kl_coef`` times the per-step KL of the step means to the
frozen starting policy (one more no-grad forward per trained step, all made in ``prepare``: the reference's
step means do not depend on the trained weights). ``kl_form``: "exact" is the Gaussian KL of the step,
|dmean|^2 / (2 std^2) with std = eta_t sqrt(-dt) (``grpo.gaussian_kl_same_std``); "flow_grpo" is the released
Flow-GRPO form |dmean|^2 / (2 eta_t^2) (``scripts/train_sd3.py`` 895, with ``std_dev_t`` of
``sd3_sde_with_logprob.py`` 47: the noise level without the step's sqrt(-dt)), i.e. the exact KL times |dt|.
The reference is ``TrainBatch.reference``: the LoRA base model, or a copy of the trainable weights
(``policy_versions``), so the KL runs under FSDP. Options: ``grpo.clip_range``, ``grpo.adv_clip_max``,
``grpo.kl_coef``, ``grpo.kl_form`` (docs/method.md section 3, docs/algorithms.md).

``train/first_ratio_dev`` reports |ratio - 1| at the update's first micro-step: 0 when rollout and
re-scoring run the same arithmetic; on GPUs, bf16 kernels chosen by batch shape can make it ~1e-6..1e-5, to
compare with the clip range. ``grpo_update`` is the functional form (one update through the driver).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .. import grpo
from ...config import KL_FORMS
from ...models.base import PolicyAdapter
from ..policy_versions import PolicyVersion, SeparateAdapter
from ..rollout import Trajectory
from .base import OBJECTIVES, Objective, TrainBatch


@OBJECTIVES.register("ppo_clip", aliases=("grpo",))
class PPOClip(Objective):
    """PPO-clip (+ KL to the starting policy when ``kl_coef`` > 0)."""

    name = "ppo_clip"
    label = "GRPO"
    stat_names = ("loss", "clipfrac", "approx_kl", "ratio_mean", "kl")
    per_step_advantages = True
    config_fields = {"clip_range": "clip_range", "adv_clip_max": "adv_clip_max", "kl_coef": "kl_coef",
                     "kl_form": "kl_form"}

    def __init__(self, clip_range: float = 1e-4, adv_clip_max: Optional[float] = 5.0, kl_coef: float = 0.0,
                 kl_form: str = "exact", on_first_ratio: Optional[Callable[[torch.Tensor], None]] = None):
        """``on_first_ratio`` (for tests) receives the first micro-step's ratio of every update."""
        if kl_form not in KL_FORMS:
            raise ValueError(f"grpo.kl_form must be one of {KL_FORMS}, got {kl_form!r}")
        self.clip_range = None if clip_range is None else float(clip_range)  # None: no clipping
        self.adv_clip_max, self.kl_coef = adv_clip_max, float(kl_coef)
        self.kl_form = kl_form
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
        self._first_dev = torch.zeros(1, dtype=torch.float32, device=batch.device)
        self._first = True
        self._ref_mean = None
        if self.needs_reference:
            if self.kl_form == "flow_grpo" and getattr(batch.schedule, "prediction_type", None) != "flow":
                raise ValueError("grpo.kl_form: flow_grpo is Flow-GRPO's KL of a flow SDE step; this model samples "
                                 "with a DDIM schedule: use grpo.kl_form: exact")
            traj, sched = batch.traj, batch.schedule

            def inputs(rows, k):
                z = traj.latents_BK[rows.to(batch.device), k]
                return z, sched.model_timestep(traj.steps_BK[rows, k], z)

            out = batch.predict_all(batch.reference, row_chunks, inputs)  # the reference's outputs, no gradient
            self._ref_mean = torch.empty_like(out)
            for k in range(out.shape[1]):
                for rows in row_chunks:
                    rd = rows.to(batch.device)
                    z, z_next = traj.latents_BK[rd, k], traj.next_latents_BK[rd, k]
                    _, _, mean, _ = sched.step(traj.steps_BK[rows, k], out[rd, k].to(z.dtype), z, prev_sample=z_next)
                    self._ref_mean[rd, k] = mean.float()

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
            ref_mean = self._ref_mean[rows_dev, k].to(mean.dtype)
            if self.kl_form == "exact":
                kl_B = grpo.gaussian_kl_same_std(mean, ref_mean, std)
            else:  # Flow-GRPO's: divided by the step's noise level eta_t, not its std eta_t sqrt(-dt)
                kl_B = grpo.flow_grpo_kl(mean, ref_mean, sched.eta.to(torch.float64)[idx].to(mean.device))
        old = traj.log_probs_BK[rows_dev, k]
        self.last_logp_gap_B = (logp.detach() - old).abs()  # the rollout / training gap, logged by the driver
        if self._first:  # before any optimiser step: the ratio must be 1 (same weights, same arithmetic)
            self._first = False
            ratio = torch.exp(logp.detach() - old)
            self._first_dev = (ratio - 1.0).abs().max().float().reshape(1)
            if self.on_first_ratio is not None:
                self.on_first_ratio(ratio)
        loss, st = grpo.ppo_clip_loss(logp, old, batch.advantages_at(rows, k), self.clip_range, self.adv_clip_max, kl_B,
                                      self.kl_coef)
        return loss, (st.loss, st.clipfrac, st.approx_kl, st.ratio_mean, st.kl)

    def finish(self, batch):
        return {"first_ratio_dev": self._first_dev.reshape(())}


def grpo_update(adapter: PolicyAdapter, schedule, traj: Trajectory, advantages_B: torch.Tensor,
                optimizer: torch.optim.Optimizer, *, clip_range: float, adv_clip_max: Optional[float] = 5.0,
                ref_adapter: Optional[PolicyAdapter] = None, kl_coef: float = 0.0, kl_form: str = "exact",
                reference: Optional[PolicyVersion] = None, guidance: str = "both",
                on_first_ratio: Optional[Callable[[torch.Tensor], None]] = None, autocast_dtype=None,
                lr_scheduler=None, **settings) -> Dict[str, float]:
    """One PPO-clip update of ``traj`` through the driver (``algorithms.update.update``); ``settings``:
    ``num_updates``, ``micro_batch_size``, ``max_grad_norm`` (``UpdateSettings``). The reference: ``reference``
    (a ``PolicyVersion``) or ``ref_adapter`` (a frozen adapter of its own). For tests and scripts."""
    from ..update import UpdateSettings, update

    objective = PPOClip(clip_range, adv_clip_max, kl_coef, kl_form, on_first_ratio=on_first_ratio)
    if reference is None and ref_adapter is not None:
        reference = SeparateAdapter(ref_adapter)
    batch = TrainBatch(adapter, schedule, traj, advantages_B, autocast_dtype=autocast_dtype, reference=reference,
                       guidance=guidance)
    return update(objective, batch, optimizer, UpdateSettings(**settings), lr_scheduler)
