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
the latent's elements (per sample), then over the batch.

Departures from the paper, stated: the old policy is the rollout policy of this iteration (the paper
keeps an EMA of the weights as pi_old, eta_i > 0), the times t are the sampler's sigmas at the steps
``grpo.subsample_timesteps`` picks (the same count of trained steps as GRPO), and there is no adaptive
loss weighting.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from . import grpo, rng
from .models.base import PolicyAdapter, index_cond
from .rollout import Trajectory, autocast_context


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



def nft_update(
    adapter: PolicyAdapter,
    schedule,
    traj: Trajectory,
    advantages_B: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    *,
    beta: float = 1.0,
    num_updates: int = 1,
    max_grad_norm: float = 1.0,
    micro_batch_size: int = 0,
    lr_scheduler=None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Dict[str, float]:
    """DiffusionNFT updates on the clean samples ``traj.final_latents`` at the times of ``traj.steps_BK``.

    One noise draw per (sample, kept step) from ``generator``; v_old is the policy's velocity on those
    noised samples before any optimiser step (the rollout policy). The K kept steps are split into
    ``num_updates`` chunks, each followed by one optimiser step, as ``trainer.grpo_update`` does."""
    if getattr(schedule, "prediction_type", None) != "flow":
        raise ValueError("grpo.objective: nft trains the flow-matching objective and needs a flow model")
    module = adapter.trainable_module()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the adapter's trainable module has no parameters with requires_grad=True")
    x0 = traj.final_latents
    B, K = traj.steps_BK.shape
    device = x0.device
    r = optimality_probability(advantages_B.to(device=device, dtype=torch.float32))
    row_chunks, step_chunks = grpo.update_chunks(B, K, micro_batch_size, num_updates)
    sig = schedule.sigmas.to(torch.float64)
    t_BK = sig[traj.steps_BK].to(torch.float32)  # (B, K) CPU
    noise = rng.randn((B, K) + tuple(x0.shape[1:]), generator, device=device, dtype=torch.float32)

    def noised(rows, k):
        t = t_BK[rows, k].to(device).reshape(-1, *([1] * (x0.ndim - 1)))
        x = x0[rows.to(device)].to(torch.float32)
        eps = noise[rows.to(device), k]
        return ((1.0 - t) * x + t * eps).to(x0.dtype), eps - x, traj.steps_BK[rows, k]

    def cond_of(rows):
        return traj.cond if len(row_chunks) == 1 else index_cond(traj.cond, rows.to(device))

    # v_old: the rollout policy, i.e. the weights before the first optimiser step
    module.eval()
    v_old = torch.empty((B, K) + tuple(x0.shape[1:]), dtype=torch.float32, device=device)
    with torch.no_grad():
        for k in range(K):
            for rows in row_chunks:
                xt, _, idx = noised(rows, k)
                with autocast_context(device, autocast_dtype):
                    v_old[rows.to(device), k] = adapter.predict(xt, schedule.model_timestep(idx, xt),
                                                                cond_of(rows)).float()
    module.train()
    totals = torch.zeros(3, dtype=torch.float32, device=device)
    count, grad_norms = 0, []
    for step_chunk in step_chunks:
        optimizer.zero_grad(set_to_none=True)
        denom = len(step_chunk) * len(row_chunks)
        for k in step_chunk:
            for rows in row_chunks:
                xt, target, idx = noised(rows, k)
                with autocast_context(device, autocast_dtype):
                    v = adapter.predict(xt, schedule.model_timestep(idx, xt), cond_of(rows))
                loss, pos, neg = nft_loss(v.float(), v_old[rows.to(device), k], target, r[rows.to(device)], beta)
                (loss / denom).backward()
                totals += torch.stack([loss.detach(), pos.mean(), neg.mean()])
                count += 1
        gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        gn = float(gn)
        if not math.isfinite(gn):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError("non-finite DiffusionNFT gradient norm; optimiser step skipped "
                                     "(lower the learning rate or check the rewards)")
        grad_norms.append(gn)
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
    loss_m, pos_m, neg_m = (totals / max(count, 1)).tolist()
    return {"train/loss": loss_m, "train/nft_positive_mse": pos_m, "train/nft_negative_mse": neg_m,
            "train/nft_r_mean": float(r.mean()), "train/grad_norm": sum(grad_norms) / len(grad_norms),
            "train/num_updates": len(grad_norms)}
