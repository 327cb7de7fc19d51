"""Advantage Weighted Matching (Xue et al. 2025, "Advantage Weighted Matching: Aligning RL with Pretraining in
Diffusion Models", arXiv 2509.25050): the flow-matching loss of pretraining on the clean rollout samples, each
sample's loss weighted by its advantage. No log-probs, so the rollouts may use any sampler (ODE included).

Per trained (sample, kept step): the clean sample x0, the time t (the schedule's sigma at the kept step), noise eps,
x_t = (1 - t) x0 + t eps and the target u = eps - x0 (what pretraining matches); with e = ||v_theta(x_t, t) - u||^2
(the mean over the latent's elements) the matching loss is l = w(t, e):

    uniform: e     t: t e     t2: t^2 e     huber: t (sqrt(e + c) - sqrt(c))     ghuber: t / p ((e + c)^p - c^p)

(c = 1e-10, p = ``ghuber_power``), and the update minimises the advantage-weighted matching loss

    L = E[ A l_theta ]

with A clamped to +-``adv_clip_max`` and, when ``advantage_max`` is set, rescaled to A * advantage_max / adv_clip_max
(the released code's ``advantage_max``). With ``clip_range`` set, the released code's trust region: the ratio
r = exp(l_old - l_theta) (l_old: the same loss under the rollout policy, same x_t) enters PPO-clip,
max(-A r, -A clip(r, 1 - eps, 1 + eps)), whose gradient at r = 1 is that of A l_theta; l_old costs one more no-grad
forward per trained step (before the first optimiser step). ``kl_coef`` > 0 adds kl_coef ||v_theta - v_ref||^2 to a
frozen copy of the starting policy (the released code's "Uniform" KL weight; one more forward per trained step).

Options (``grpo.objective_kwargs``): ``weighting`` (uniform), ``ghuber_power`` (0.25), ``clip_range`` (null: no
ratio), ``advantage_max`` (null); mapped: ``grpo.adv_clip_max``, ``grpo.kl_coef``. Departures: docs/algorithms.md.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...utils import rng
from .base import OBJECTIVES, Objective

WEIGHTINGS = ("uniform", "t", "t2", "huber", "ghuber")
_C = 1e-10  # the released code's constant inside the (generalised) Huber losses


def matching_loss(v: torch.Tensor, target: torch.Tensor, t_B: torch.Tensor, weighting: str,
                  power: float = 0.25) -> torch.Tensor:
    """w(t, e) per sample, e = mean((v - target)^2) over the non-batch elements (module docstring)."""
    e = ((v - target.detach().to(v.dtype)) ** 2).mean(dim=tuple(range(1, v.ndim)))
    t = t_B.to(e.dtype)
    if weighting == "uniform":
        return e
    if weighting == "t":
        return t * e
    if weighting == "t2":
        return t * t * e
    if weighting == "huber":
        return t * (torch.sqrt(e + _C) - _C ** 0.5)
    if weighting == "ghuber":
        return t / power * ((e + _C) ** power - _C ** power)
    raise ValueError(f"grpo.objective_kwargs.weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def awm_loss(loss_B: torch.Tensor, advantages_B: torch.Tensor, old_loss_B: Optional[torch.Tensor] = None,
             clip_range: Optional[float] = None):
    """mean(A l_theta), or with ``clip_range`` PPO-clip on r = exp(l_old - l_theta); returns (loss, ratio or None)."""
    adv = advantages_B.to(loss_B.dtype)
    if clip_range is None:
        return (adv * loss_B).mean(), None
    ratio = torch.exp(old_loss_B.detach().to(loss_B.dtype) - loss_B)
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)).mean(), ratio


@OBJECTIVES.register("awm")
class AdvantageWeightedMatching(Objective):
    """The advantage-weighted flow-matching loss on the clean rollout samples."""

    name = "awm"
    label = "AWM"
    needs_log_probs = False
    needs_flow_model = True
    stat_names = ("loss", "awm_matching_loss", "clipfrac", "kl")
    config_fields = {"adv_clip_max": "adv_clip_max", "kl_coef": "kl_coef"}

    def __init__(self, weighting: str = "uniform", ghuber_power: float = 0.25, clip_range: Optional[float] = None,
                 advantage_max: Optional[float] = None, adv_clip_max: Optional[float] = 5.0, kl_coef: float = 0.0):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"grpo.objective_kwargs.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not ghuber_power > 0:
            raise ValueError(f"grpo.objective_kwargs.ghuber_power must be > 0, got {ghuber_power}")
        if clip_range is not None and not clip_range > 0:
            raise ValueError(f"grpo.objective_kwargs.clip_range must be > 0 (or null: no ratio), got {clip_range}")
        if advantage_max is not None and adv_clip_max is None:
            raise ValueError("grpo.objective_kwargs.advantage_max rescales A / grpo.adv_clip_max: set grpo.adv_clip_max")
        self.weighting, self.power = weighting, float(ghuber_power)
        self.clip_range = None if clip_range is None else float(clip_range)
        self.advantage_max, self.adv_clip_max, self.kl_coef = advantage_max, adv_clip_max, float(kl_coef)

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def extra_forwards_per_trained_step(self) -> int:
        return int(self.clip_range is not None) + int(self.needs_reference)

    def prepare(self, batch, row_chunks):
        """The advantages, the times and noise of the forward process, and (with a clip range) l_old: the loss under
        the rollout policy, i.e. the weights before the first optimiser step."""
        traj, device = batch.traj, batch.device
        x0 = traj.final_latents
        B, K = traj.steps_BK.shape
        adv = batch.advantages_B.to(device=device, dtype=torch.float32)
        if self.adv_clip_max is not None:
            adv = adv.clamp(-self.adv_clip_max, self.adv_clip_max)
            if self.advantage_max is not None:
                adv = adv * (float(self.advantage_max) / float(self.adv_clip_max))
        self._adv_B = adv
        self._t_BK = batch.schedule.sigmas.to(torch.float64)[traj.steps_BK].to(torch.float32)  # (B, K) CPU
        self._noise = rng.randn((B, K) + tuple(x0.shape[1:]), batch.generator, device=device, dtype=torch.float32)
        self._old = None
        # the reference's velocities at every slot, no gradient, before the first optimiser step (a version of the
        # policy's own weights is swapped in once for all of them)
        self._v_ref = batch.predict_all(batch.reference, row_chunks, lambda rows, k: self._inputs(batch, rows, k)) \
            if self.needs_reference else None
        if self.clip_range is not None:
            batch.adapter.trainable_module().eval()
            self._old = torch.empty((B, K), dtype=torch.float32, device=device)
            with torch.no_grad():
                for k in range(K):
                    for rows in row_chunks:
                        self._old[batch.on_device(rows), k] = self._matching(batch, rows, k)[0].float()

    def _inputs(self, batch, rows, k):
        """(x_t, the model's timestep) of samples ``rows`` at slot ``k``: the forward process at the slot's time."""
        x0 = batch.traj.final_latents
        rows_dev = batch.on_device(rows)  # copied once per update
        t = batch.on_device(self._t_BK)[rows_dev, k].reshape(-1, *([1] * (x0.ndim - 1)))
        xt = ((1.0 - t) * x0[rows_dev].to(torch.float32) + t * self._noise[rows_dev, k]).to(x0.dtype)
        return xt, batch.schedule.model_timestep(batch.on_device(batch.traj.steps_BK)[rows_dev, k], xt)

    def _matching(self, batch, rows, k):
        """(l per sample, v) of samples ``rows`` at slot ``k`` under the policy."""
        rows_dev = batch.on_device(rows)
        xt, timestep = self._inputs(batch, rows, k)
        v = batch.predict(xt, timestep, batch.cond(rows)).float()
        target = self._noise[rows_dev, k] - batch.traj.final_latents[rows_dev].to(torch.float32)
        return matching_loss(v, target, batch.on_device(self._t_BK)[rows_dev, k], self.weighting, self.power), v

    def loss(self, batch, rows, k):
        rows_dev = batch.on_device(rows)  # copied once per update
        l_B, v = self._matching(batch, rows, k)
        old = None if self._old is None else self._old[rows_dev, k]
        loss, ratio = awm_loss(l_B, self._adv_B[rows_dev], old, self.clip_range)
        clipped = torch.zeros((), device=loss.device) if ratio is None else \
            ((ratio.detach() - 1.0).abs() > self.clip_range).float().mean()
        kl = torch.zeros((), device=loss.device)
        if self.needs_reference:
            kl_t = ((v - self._v_ref[rows_dev, k]) ** 2).mean()
            loss = loss + self.kl_coef * kl_t
            kl = kl_t.detach()
        return loss, (loss.detach(), l_B.detach().mean(), clipped, kl)

    def finish(self, batch):
        return {"awm_adv_abs_mean": self._adv_B.abs().mean()}
