"""GRPO-Guard (Wang et al. 2025, "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated
Clipping", arXiv 2510.22319): PPO-clip whose importance ratio is normalised per step (RatioNorm) and whose loss is
reweighted per step, so that the clip constrains the over-confident positive updates it otherwise lets through.

Why. A trained step is a Gaussian transition x ~ N(mu, s^2 I); with the rollout's draw x = mu_old + s eps and
d = mu_theta - mu_old, the log-ratio (log-probs averaged over the N elements, as everywhere here) is

    log r = log N(x; mu_theta, s^2) - log N(x; mu_old, s^2) = <eps, d> / s - ||d||^2 / (2 s^2)      (<a, b>, ||.||^2: means)

Its mean over the sampling noise, -||d||^2 / (2 s^2), is negative (the ratio is shifted below 1, so positive-advantage
samples rarely reach the upper clip) and its spread scales as 1 / s, which differs across steps. RatioNorm (the
paper's Eq. 8) adds the shift back and removes the 1 / s scale:

    log r_hat = s (log r + ||d||^2 / (2 s^2)) = <eps, d>

The gradient reweighting (Eq. 12) multiplies each step's loss by delta = 1 / |dt| (dt = sigma_{t+1} - sigma_t,
``reweight: dt``): d = C (u_theta - u_old) with |C| = |dt| (1 + a^2 / 2) under Flow-GRPO's noise level, so delta
evens out how much each step's velocity moves the loss. ``reweight: coefficient`` uses delta = 1 / |C| of the step's
own coefficients (the schedule's (A, C, std) table; the same weighting up to a constant under Flow-GRPO's noise
level, and the exact one for any other noise form: constant eta, CPS; derived here, not the paper's); ``none``
keeps delta = 1. Loss of a trained (sample, step), the advantage A clamped to +-``adv_clip_max``:

    delta * max(-A r_hat, -A clip(r_hat, 1 - eps, 1 + eps))

mu_old is the rollout's step mean, kept by the rollout (``needs_step_means``: one more latent per kept step), so
no extra forward; before the first optimiser step d = 0 and r_hat = exp(s (log p - log p_old)) = 1 exactly (same
arithmetic as the rollout). Options: ``grpo.clip_range``, ``grpo.adv_clip_max``, ``reweight``
(``grpo.objective_kwargs``). No KL term (the paper's point is to need none). Departures: docs/algorithms.md.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import OBJECTIVES, Objective

REWEIGHTS = ("dt", "coefficient", "none")


def guard_loss(log_prob_B: torch.Tensor, old_log_prob_B: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor,
               std_B: torch.Tensor, advantages_B: torch.Tensor, weight_B: torch.Tensor, clip_range: float,
               adv_clip_max: Optional[float] = None):
    """The GRPO-Guard loss of one micro-step (module docstring) and its detached statistics.

    ``mean`` (with gradient) / ``old_mean``: the step means under the current and the rollout policy; ``std_B`` the
    step's std (> 0: trained steps are stochastic); ``weight_B`` the per-step delta. Returns ``(loss, stats)`` with
    stats = (normalised ratio, its clip fraction, the removed mean shift ||d||^2 / (2 s^2), the raw log-ratio)."""
    if clip_range <= 0:
        raise ValueError(f"grpo.clip_range must be > 0, got {clip_range}")
    s = std_B.to(log_prob_B.dtype)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    dims = tuple(range(1, mean.ndim))
    shift_B = ((mean - old_mean.detach().to(mean.dtype)) ** 2).mean(dim=dims).to(log_prob_B.dtype) / (2 * safe * safe)
    log_ratio = log_prob_B - old_log_prob_B.detach()
    ratio = torch.exp(torch.where(s > 0, s * (log_ratio + shift_B), torch.zeros_like(s)))
    adv = advantages_B.to(log_prob_B.dtype)
    if adv_clip_max is not None:
        adv = adv.clamp(-adv_clip_max, adv_clip_max)
    per_B = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))
    loss = (weight_B.to(per_B.dtype) * per_B).mean()
    with torch.no_grad():
        clipped = ((ratio - 1.0).abs() > clip_range).to(loss.dtype).mean()
    return loss, (ratio.detach(), clipped, shift_B.detach(), log_ratio.detach())


def step_weights(schedule, idx: torch.Tensor, reweight: str) -> torch.Tensor:
    """delta of each step ``idx`` (CPU int64): 1 / |sigma_t - sigma_{t+1}| (``dt``), 1 / |C_t| (``coefficient``:
    the step's coefficient of the model output in its mean) or 1 (``none``), float64 on the CPU."""
    if reweight == "dt":
        sig = getattr(schedule, "sigmas", None)
        if sig is None:
            raise ValueError("grpo.objective_kwargs.reweight: dt needs a flow-matching schedule (its sigmas); "
                             "use 'coefficient' or 'none'")
        sig = sig.detach().to("cpu", torch.float64)
        return 1.0 / (sig[idx] - sig[idx + 1]).abs()
    if reweight == "coefficient":
        return 1.0 / schedule.coefficient_table()[idx, 1].abs()
    return torch.ones(idx.shape, dtype=torch.float64)


@OBJECTIVES.register("grpo_guard")
class GRPOGuard(Objective):
    """PPO-clip on the normalised per-step ratio, reweighted per step."""

    name = "grpo_guard"
    label = "GRPO-Guard"
    needs_step_means = True
    stat_names = ("loss", "clipfrac", "ratio_mean", "ratio_std", "mean_shift", "approx_kl")
    config_fields = {"clip_range": "clip_range", "adv_clip_max": "adv_clip_max"}

    def __init__(self, clip_range: float = 1e-4, adv_clip_max: Optional[float] = 5.0, reweight: str = "dt"):
        if reweight not in REWEIGHTS:
            raise ValueError(f"grpo.objective_kwargs.reweight must be one of {REWEIGHTS}, got {reweight!r}")
        self.clip_range, self.adv_clip_max, self.reweight = float(clip_range), adv_clip_max, reweight

    def prepare(self, batch, row_chunks):
        traj = batch.traj
        if traj.means_BK is None:
            raise ValueError("grpo.objective: grpo_guard compares with the rollout's step means, but the rollout "
                             "sampler (sampling.rollout) kept none (Trajectory.means_BK; rollout(keep_means=True))")
        self._adv_B = batch.advantages_B.to(device=batch.device, dtype=torch.float32)
        self._weight_BK = step_weights(batch.schedule, traj.steps_BK, self.reweight).to(batch.device, torch.float32)
        self._first_dev = torch.zeros(1, dtype=torch.float32, device=batch.device)
        self._first = True

    def loss(self, batch, rows, k):
        traj, sched = batch.traj, batch.schedule
        rows_dev = batch.on_device(rows)  # copied once per update, not per micro-step
        idx = traj.steps_BK[rows, k]  # on the host: the step kernel takes its coefficient rows by value
        z, z_next = traj.latents_BK[rows_dev, k], traj.next_latents_BK[rows_dev, k]
        t = sched.model_timestep(batch.on_device(traj.steps_BK)[rows_dev, k], z)
        out = batch.predict(z, t, batch.cond(rows))  # the rollout's precision: ratio 1
        _, logp, mean, std = sched.step(idx, out, z, prev_sample=z_next, need_mean=True)
        loss, (ratio, clipped, shift, log_ratio) = guard_loss(
            logp, traj.log_probs_BK[rows_dev, k], mean, traj.means_BK[rows_dev, k], std, self._adv_B[rows_dev],
            self._weight_BK[rows_dev, k], self.clip_range, self.adv_clip_max)
        self.last_logp_gap_B = (logp.detach() - traj.log_probs_BK[rows_dev, k]).abs()  # logged by the driver
        if self._first:  # before any optimiser step: r_hat must be 1 (same weights, same arithmetic)
            self._first = False
            self._first_dev = (ratio - 1.0).abs().max().float().reshape(1)
        std_ratio = ratio.std(unbiased=False) if ratio.numel() > 1 else torch.zeros_like(ratio.sum())
        return loss, (loss.detach(), clipped, ratio.mean(), std_ratio, shift.mean(), (0.5 * log_ratio ** 2).mean())

    def finish(self, batch):
        return {"first_ratio_dev": self._first_dev.reshape(())}
