"""Flow-DPPO (Divergence Proximal Policy Optimization for flow models; arXiv 2606.11025, Tencent's UniRL
``unirl/algorithms/flowdppo.py``; verl-omni's ``FlowDPPOLoss``): Flow-GRPO's rollout, advantages and per-step
ratios, with PPO's ratio clipping replaced by an exact trust region.

At a kept SDE step the rollout policy and the current one are Gaussians with the same covariance sigma_t^2 I
(sigma_t = the step's std, eta sqrt(sigma - sigma_next) here), so their divergence is exact:

    D = KL(N(mu_new, sigma_t^2 I) || N(mu_old, sigma_t^2 I)) = |mu_new - mu_old|^2 / (2 sigma_t^2)

(averaged over the latent's elements, as the log-probs are). With the ratio rho = pi_new / pi_old of the
sampled transition and its advantage A, the update of a transition is blocked (its loss term set to 0, no
gradient) only when it is outside the threshold AND still moving away -- D >= eps_D and (A > 0 and rho > 1, or
A < 0 and rho < 1) -- so corrective updates always pass. The loss is

    L = -mean( m * rho * A ),   m = 1 - blocked  (no clipping of rho)

``divergence_threshold`` eps_D (``grpo.objective_kwargs``): 1e-5, the value of both released implementations.
mu_old is the rollout policy's step mean, kept by the rollout (``needs_step_means``: one more latent per kept
step), so no extra forward -- the released code replays the rollout weights once per update instead (UniRL's
``prepare_segment``), which gives the same means at one more forward per trained transition; the old log-prob is
the rollout's. Designed for several epochs over one rollout (``grpo.num_epochs``): pi_old stays the rollout policy
for all of them.
Not implemented: UniRL's optional KL to a reference model (``beta``, off by default).
"""

from __future__ import annotations

from typing import Tuple

import torch

from .. import grpo
from .base import OBJECTIVES, Objective


def flow_dppo_loss(log_prob_B: torch.Tensor, old_log_prob_B: torch.Tensor, mean_new: torch.Tensor,
                   mean_old: torch.Tensor, std_B: torch.Tensor, advantages_B: torch.Tensor,
                   threshold: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Flow-DPPO loss (module docstring). Returns ``(loss, blocked_B, divergence_B, ratio_B)``, the last three
    detached; ``mean_old``, ``old_log_prob_B`` and the advantages carry no gradient."""
    if not threshold > 0:
        raise ValueError(f"Flow-DPPO's divergence_threshold must be > 0, got {threshold}")
    adv = advantages_B.detach().to(log_prob_B.dtype)
    ratio = torch.exp(log_prob_B - old_log_prob_B.detach())
    with torch.no_grad():
        divergence = grpo.gaussian_kl_same_std(mean_new.detach(), mean_old.detach(), std_B)
        away = ((adv > 0) & (ratio > 1.0)) | ((adv < 0) & (ratio < 1.0))
        blocked = (divergence >= threshold) & away
    per_sample = torch.where(blocked, torch.zeros_like(ratio), -adv * ratio)
    return per_sample.mean(), blocked, divergence, ratio.detach()


@OBJECTIVES.register("flow_dppo", aliases=("dppo",))
class FlowDPPO(Objective):
    """The ratio of each transition, masked where it both leaves the divergence threshold and moves away."""

    name = "flow_dppo"
    label = "Flow-DPPO"
    stat_names = ("loss", "masked_frac", "divergence", "ratio_mean", "approx_kl")
    per_step_advantages = True
    needs_step_means = True

    def __init__(self, divergence_threshold: float = 1e-5):
        if not float(divergence_threshold) > 0:
            raise ValueError("grpo.objective_kwargs.divergence_threshold must be > 0 (Flow-DPPO's eps_D; released "
                             f"value 1e-5), got {divergence_threshold}")
        self.threshold = float(divergence_threshold)

    def prepare(self, batch, row_chunks):
        if batch.traj.means_BK is None:
            raise ValueError("Flow-DPPO compares with the rollout's step means, but the trajectory holds none: roll out "
                             "with keep_means=True (the trainer does, for an objective that needs_step_means)")
        self._first_dev = torch.zeros((), dtype=torch.float32, device=batch.device)
        self._first = True

    @staticmethod
    def _step(batch, rows, k):
        """(mean, log-prob, std) of the stored transition of samples ``rows`` at slot ``k`` under the current weights."""
        traj, sched = batch.traj, batch.schedule
        rows_dev = batch.on_device(rows)  # copied once per update, not per micro-step
        idx = traj.steps_BK[rows, k]  # on the host: the step kernel takes its coefficient rows by value
        z = traj.latents_BK[rows_dev, k]
        out = batch.predict(z, sched.model_timestep(batch.on_device(traj.steps_BK)[rows_dev, k], z), batch.cond(rows))
        _, logp, mean, std = sched.step(idx, out, z, prev_sample=traj.next_latents_BK[rows_dev, k], need_mean=True)
        return mean, logp, std

    def loss(self, batch, rows, k):
        rows_dev = batch.on_device(rows)
        mean, logp, std = self._step(batch, rows, k)
        old = batch.traj.log_probs_BK[rows_dev, k]
        loss, blocked, divergence, ratio = flow_dppo_loss(logp, old, mean, batch.traj.means_BK[rows_dev, k], std,
                                                          batch.advantages_at(rows, k), self.threshold)
        if self._first:  # before any optimiser step the ratio is 1: same weights, same arithmetic as the rollout
            self._first = False
            self._first_dev = (ratio - 1.0).abs().max().float()
        log_ratio = logp.detach() - old
        self.last_logp_gap_B = log_ratio.abs()  # the rollout / training gap, logged by the driver
        return loss, (loss.detach(), blocked.float().mean(), divergence.mean(), ratio.mean(),
                      (0.5 * log_ratio ** 2).mean())

    def finish(self, batch):
        return {"first_ratio_dev": self._first_dev}
