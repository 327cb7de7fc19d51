"""DGPO (Direct Group Preference Optimization; Luo, Hu & Tang, ICLR 2026, arXiv 2510.08425; released code
Luo-Yihong/DGPO ``scripts/train_sd3_dgpo.py``): group-level preference learning on the clean rollout samples,
so no stochastic policy is needed and the rollouts are deterministic ODE samples.

A group's samples are split by the sign of their group-relative advantage A into a positive set G+ and a
negative set G-, and the model maximises the likelihood that G+ is preferred, log sigma(R(G+) - R(G-)), with the
group reward a weighted sum of DPO implicit rewards r(x) = beta log(p_theta(x) / p_ref(x)). The weights |A(x)|
make the two sets' weights equal (sum A = 0 in a group), so the intractable partition function cancels and
R(G+) - R(G-) = sum_i A_i r(x_i). Diffusion-DPO's bound gives r(x) ~ -beta (d_theta(x) - d_ref(x)) with the
denoising (flow-matching) error at a time t,

    x_t = (1 - t) x0 + t eps,   v = eps - x0,   d(x) = mean((v_theta(x_t) - v)^2)   (mean over the latent),

so per group and time the loss is  -log sigma(-S),  S = beta / G * sum_i A_i (d_theta(x_i) - d_ref(x_i)).
Its gradient is sigma(S) beta / G sum_i A_i grad d_theta(x_i): the released code minimises the same-direction
surrogate  mean_i( sigma(S_g(i)) A_i d_theta(x_i) )  with sigma(S) detached, i.e. the paper's loss / beta (per
group, averaged over the batch). That surrogate is what ``dgpo_loss`` returns; the tests check its gradient
against the paper's -log sigma(-S) written out.

As released (config/dgpo.py, the SD3.5-M GenEval / OCR recipes), also:
* times: a few steps of the sampler's own schedule, near the noise end (t >= t_min: ``grpo.timestep_window``,
  the released ``trunc_steps``), one random subset per iteration shared by the whole batch (``shared_timesteps``;
  ``grpo.tau`` sets how many: the released ``num_train_timesteps``);
* the forward-process noise eps is shared by a group's samples (``shared_train_noise``, released
  ``use_shared_noise``), one draw per group and time;
* PPO-style clipping of the denoising loss (``clip_range`` = ``grpo.clip_range``, released ``clip_dsm``): with
  rho = exp(d_old - d_theta), a sample with A > 0 and rho > 1 + c, or A < 0 and rho < 1 - c, contributes no
  gradient (its d_theta is detached);
* advantages clamped to +-``grpo.adv_clip_max``; a velocity KL ``grpo.kl_coef`` * mean((v_theta - v_ref)^2)
  (released ``train.beta``).
Departures, stated: the reference is the frozen starting policy (released: the base model without its LoRA,
the same thing when training starts from it); the clipping's old policy is the rollout policy of this iteration
(released: a fast EMA of the weights, decay min(0.3, 0.001 step), which also draws the rollouts after
``switch_ema_ref`` steps; not implemented); no CFG-detached training (the adapter's CFG settings apply).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...utils import rng
from .. import grpo
from .base import OBJECTIVES, Objective


def dgpo_loss(dsm_B: torch.Tensor, ref_dsm_B: torch.Tensor, advantages_B: torch.Tensor, group_size: int,
              beta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The released DGPO surrogate over whole groups (rows group-contiguous): mean_i(sigma(S_g(i)) A_i d_i) with
    S_g = beta / G sum_{i in g} A_i (d_i - d_ref_i) computed without gradient. Returns ``(loss, sigma(S)_B)``."""
    B = dsm_B.shape[0]
    if B % group_size:
        raise ValueError(f"DGPO needs whole groups: {B} rows are not groups of {group_size}")
    adv = advantages_B.detach().to(dsm_B.dtype)
    with torch.no_grad():
        terms = adv * (dsm_B.detach() - ref_dsm_B.detach().to(dsm_B.dtype))
        s_g = beta / group_size * terms.reshape(-1, group_size).sum(dim=1)
        weight = torch.sigmoid(s_g).repeat_interleave(group_size)
    return (weight * adv * dsm_B).mean(), weight


def velocity_mse(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of (v - target)^2 over the latent's elements."""
    return (v - target).pow(2).mean(dim=tuple(range(1, v.ndim)))


@OBJECTIVES.register("dgpo")
class DGPO(Objective):
    """Group preference (G+ over G-) on the clean samples' denoising errors against the frozen reference."""

    name = "dgpo"
    label = "DGPO"
    needs_log_probs = False
    needs_flow_model = True
    shared_timesteps = True
    needs_whole_groups = True
    stat_names = ("loss", "dgpo_dsm", "dgpo_group_weight", "clipfrac", "kl")
    config_fields = {"clip_range": "clip_range", "adv_clip_max": "adv_clip_max", "kl_coef": "kl_coef"}

    def __init__(self, beta: float = 100.0, clip_range: Optional[float] = 1e-2, clip_dsm: bool = True,
                 shared_train_noise: bool = True, adv_clip_max: Optional[float] = 5.0, kl_coef: float = 0.0):
        if not float(beta) > 0:
            raise ValueError(f"grpo.objective_kwargs.beta (DGPO's DPO beta, released 100) must be > 0, got {beta}")
        self.beta = float(beta)
        # grpo.clip_range null: no clipping (the released clip_dsm off)
        self.clip_range = None if clip_range is None else float(clip_range)
        self.clip_dsm = bool(clip_dsm) and self.clip_range is not None
        self.shared_train_noise, self.adv_clip_max, self.kl_coef = bool(shared_train_noise), adv_clip_max, float(kl_coef)

    @property
    def needs_reference(self) -> bool:
        return True

    @property
    def extra_forwards_per_trained_step(self) -> int:
        return 1 + int(self.clip_dsm)  # the reference's velocity, and the rollout policy's for the clipping

    def trained_advantages(self, advantages_B):
        return grpo.clamp_advantages(advantages_B, self.adv_clip_max)

    def prepare(self, batch, row_chunks):
        """Per (sample, slot): the forward-process noise, the reference's (and the rollout policy's) denoising
        errors; all before the first optimiser step."""
        traj, device = batch.traj, batch.device
        G = traj.group_size
        for rows in row_chunks:
            if rows.numel() % G or int(rows[0]) % G:
                raise ValueError(f"grpo.objective: dgpo compares whole groups: set grpo.micro_batch_size to a multiple "
                                 f"of grpo.group_size={G} (or 0)")
        x0 = traj.final_latents
        B, K = traj.steps_BK.shape
        shape = tuple(x0.shape[1:])
        draws = rng.randn((B // G if self.shared_train_noise else B, K) + shape, batch.generator, device=device)
        self._noise = draws.repeat_interleave(G, dim=0) if self.shared_train_noise else draws
        self._t_BK = batch.schedule.sigmas.to(torch.float64)[traj.steps_BK].to(torch.float32)  # (B, K) CPU
        adv = batch.advantages_B.to(device=device, dtype=torch.float32)
        self._adv_B = grpo.clamp_advantages(adv, self.adv_clip_max)
        # the reference's and (for the clip) the rollout policy's velocities, no gradient, before any optimiser step
        batch.adapter.trainable_module().eval()
        v_ref = batch.predict_all(batch.reference, row_chunks, lambda rows, k: self._noised(batch, rows, k)[::2])
        v_old = batch.predict_all(None, row_chunks, lambda rows, k: self._noised(batch, rows, k)[::2]) \
            if self.clip_dsm else None
        self._ref_dsm = torch.empty((B, K), dtype=torch.float32, device=device)
        self._old_dsm = torch.empty((B, K), dtype=torch.float32, device=device) if self.clip_dsm else None
        for k in range(K):
            for rows in row_chunks:
                rows_dev = rows.to(device)
                target = self._noised(batch, rows, k)[1]
                self._ref_dsm[rows_dev, k] = velocity_mse(v_ref[rows_dev, k], target)
                if self.clip_dsm:
                    self._old_dsm[rows_dev, k] = velocity_mse(v_old[rows_dev, k], target)
        self._v_ref = v_ref if self.kl_coef > 0 else None

    def _noised(self, batch, rows, k):
        """(x_t, the target eps - x0, the model timestep) of samples ``rows`` at slot ``k``."""
        x0 = batch.traj.final_latents
        rows_dev = rows.to(batch.device)
        t = self._t_BK[rows, k].to(batch.device).reshape(-1, *([1] * (x0.ndim - 1)))
        x = x0[rows_dev].to(torch.float32)
        eps = self._noise[rows_dev, k]
        xt = ((1.0 - t) * x + t * eps).to(x0.dtype)
        return xt, eps - x, batch.schedule.model_timestep(batch.traj.steps_BK[rows, k], xt)

    def loss(self, batch, rows, k):
        rows_dev = rows.to(batch.device)
        xt, target, t = self._noised(batch, rows, k)
        v = batch.predict(xt, t, batch.cond(rows)).float()
        dsm = velocity_mse(v, target)
        adv = self._adv_B[rows_dev]
        clipped = torch.zeros_like(dsm, dtype=torch.bool)
        if self.clip_dsm:
            with torch.no_grad():
                ratio = torch.exp(self._old_dsm[rows_dev, k] - dsm.detach())
                clipped = torch.where(adv > 0, ratio > 1.0 + self.clip_range, ratio < 1.0 - self.clip_range)
            dsm = torch.where(clipped, dsm.detach(), dsm)
        loss, weight = dgpo_loss(dsm, self._ref_dsm[rows_dev, k], adv, batch.traj.group_size, self.beta)
        kl = torch.zeros((), dtype=loss.dtype, device=loss.device)
        if self._v_ref is not None:
            kl = velocity_mse(v, self._v_ref[rows_dev, k]).mean()
            loss = loss + self.kl_coef * kl
        return loss, (loss.detach(), dsm.detach().mean(), weight.mean(), clipped.float().mean(), kl.detach())
