"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process").

Policy improvement on the forward (noising) process with the flow-matching objective; no log-probs,
so the rollouts may use any sampler (SDE, ODE, DPM-Solver++). For a prompt c, the rollout policy
pi_old draws clean samples x0 with raw rewards R; each gets an optimality probability

    r = 1/2 + 1/2 clip((R - E_c[R]) / Z_c, -1, 1)

(Z_c a reward normaliser: here the group-relative advantage of grpo.py, a weighted sum over rewards, is
(R - E_c[R]) / Z_c). With x_t = (1 - t) x0 + t eps and the flow-matching target v = eps - x0, the loss
contrasts an implicit positive and negative policy built from the current velocity v_theta and the
rollout policy's v_old (frozen):

    v+ = (1 - beta) v_old + beta v_theta,      v- = (1 + beta) v_old - beta v_theta
    L  = E[ r ||v+ - v||^2 + (1 - r) ||v- - v||^2 ]

whose per-sample minimiser is v_theta = v_old + (2r - 1)(v - v_old) / beta: towards the data for
positive samples (r > 1/2), away for negative ones, unchanged at r = 1/2. ``||.||^2`` is averaged over
the latent's elements (per sample), then over the batch. Option: ``grpo.nft_beta``.

Departures from the paper, stated: the old policy is the rollout policy of this iteration (the paper
keeps an EMA of the weights as pi_old, eta_i > 0), the times t are the sampler's sigmas at the steps
``grpo.subsample_timesteps`` picks (the same count of trained steps as GRPO), and there is no adaptive
loss weighting. One noise draw per (sample, kept step) from the batch's generator; v_old is the policy's
velocity on those noised samples before any optimiser step (one more no-grad forward per trained step).
"""

from __future__ import annotations

from typing import Dict

import torch

from ...utils import rng
from ...models.base import PolicyAdapter
from ..rollout import Trajectory
from .base import OBJECTIVES, Objective, TrainBatch


def optimality_probability(advantages_B: torch.Tensor) -> torch.Tensor:
    """r = 1/2 + 1/2 clip(A, -1, 1) for normalised rewards (advantages) A: in [0, 1], 1/2 at the group mean."""
    return 0.5 + 0.5 * advantages_B.clamp(-1.0, 1.0)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, r_B: torch.Tensor, beta: float):
    """The DiffusionNFT loss (module docstring) and its two branches' per-sample mean squared errors.

    Returns ``(loss, positive_mse_B, negative_mse_B)``; ``v_old`` and ``target`` carry no gradient."""
    if not beta > 0:
        raise ValueError(f"DiffusionNFT's beta must be > 0, got {beta}")
    v_old = v_old.detach().to(v_theta.dtype)
    target = target.detach().to(v_theta.dtype)
    dims = tuple(range(1, v_theta.ndim))
    pos = (((1.0 - beta) * v_old + beta * v_theta - target) ** 2).mean(dim=dims)
    neg = (((1.0 + beta) * v_old - beta * v_theta - target) ** 2).mean(dim=dims)
    r = r_B.to(v_theta.dtype)
    return (r * pos + (1.0 - r) * neg).mean(), pos.detach(), neg.detach()


@OBJECTIVES.register("diffusion_nft", aliases=("nft",))
class DiffusionNFT(Objective):
    """Flow matching on the clean rollout samples, contrasting implicit positive / negative policies."""

    name = "diffusion_nft"
    label = "DiffusionNFT"
    needs_log_probs = False
    needs_flow_model = True
    stat_names = ("loss", "nft_positive_mse", "nft_negative_mse")
    config_fields = {"beta": "nft_beta"}

    def __init__(self, beta: float = 1.0):
        self.beta = float(beta)

    @property
    def extra_forwards_per_trained_step(self) -> int:
        return 1  # v_old

    def prepare(self, batch, row_chunks):
        """The update's noise, the forward-process samples' times, and v_old: the rollout policy's velocity,
        i.e. the weights before the first optimiser step."""
        if getattr(batch.schedule, "prediction_type", None) != "flow":
            raise ValueError("grpo.objective: diffusion_nft trains the flow-matching objective and needs a flow model")
        traj, device = batch.traj, batch.device
        x0 = traj.final_latents
        B, K = traj.steps_BK.shape
        self._r_B = optimality_probability(batch.advantages_B.to(device=device, dtype=torch.float32))
        self._t_BK = batch.schedule.sigmas.to(torch.float64)[traj.steps_BK].to(torch.float32)  # (B, K) CPU
        self._noise = rng.randn((B, K) + tuple(x0.shape[1:]), batch.generator, device=device, dtype=torch.float32)
        batch.adapter.trainable_module().eval()
        self._v_old = torch.empty((B, K) + tuple(x0.shape[1:]), dtype=torch.float32, device=device)
        with torch.no_grad():
            for k in range(K):
                for rows in row_chunks:
                    xt, _, idx = self._noised(batch, rows, k)
                    self._v_old[batch.on_device(rows), k] = batch.predict(xt, batch.schedule.model_timestep(idx, xt),
                                                                    batch.cond(rows)).float()

    def _noised(self, batch, rows, k):
        """(x_t, the flow-matching target eps - x0, the step indices) of samples ``rows`` at slot ``k``."""
        x0 = batch.traj.final_latents
        rows_dev = batch.on_device(rows)  # copied once per update
        t = batch.on_device(self._t_BK)[rows_dev, k].reshape(-1, *([1] * (x0.ndim - 1)))
        x = x0[rows_dev].to(torch.float32)
        eps = self._noise[rows_dev, k]
        return ((1.0 - t) * x + t * eps).to(x0.dtype), eps - x, batch.on_device(batch.traj.steps_BK)[rows_dev, k]

    def loss(self, batch, rows, k):
        xt, target, idx = self._noised(batch, rows, k)
        v = batch.predict(xt, batch.schedule.model_timestep(idx, xt), batch.cond(rows))
        rows_dev = batch.on_device(rows)  # copied once per update
        loss, pos, neg = nft_loss(v.float(), self._v_old[rows_dev, k], target, self._r_B[rows_dev], self.beta)
        return loss, (loss.detach(), pos.mean(), neg.mean())

    def finish(self, batch):
        return {"nft_r_mean": self._r_B.mean()}


def nft_update(adapter: PolicyAdapter, schedule, traj: Trajectory, advantages_B: torch.Tensor,
               optimizer: torch.optim.Optimizer, generator: torch.Generator, *, beta: float = 1.0,
               autocast_dtype=None, lr_scheduler=None, **settings) -> Dict[str, float]:
    """One DiffusionNFT update of ``traj`` through the driver (``algorithms.update.update``); ``settings``:
    ``num_updates``, ``micro_batch_size``, ``max_grad_norm`` (``UpdateSettings``). For tests and scripts."""
    from ..update import UpdateSettings, update

    batch = TrainBatch(adapter, schedule, traj, advantages_B, autocast_dtype=autocast_dtype, generator=generator)
    return update(DiffusionNFT(beta), batch, optimizer, UpdateSettings(**settings), lr_scheduler)
