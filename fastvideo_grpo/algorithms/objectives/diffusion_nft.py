"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process"), as its
authors released it (NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``, cited by line below).

Policy improvement on the forward (noising) process with the flow-matching objective; no log-probs, so the
rollouts may use any sampler (SDE, ODE, DPM-Solver++). Each clean rollout sample x0 gets an optimality
probability from its advantage A (the weighted sum over rewards of the estimator's normalised rewards):

    r = 1/2 + 1/2 clip(A, -m, m) / m                       (m = ``adv_clip_max``, released 5: lines 910-929)

With x_t = (1 - t) x0 + t eps (a fresh eps per sample and trained time) and the velocities of the current
policy v_theta and of the old policy v_old (frozen):

    v+ = beta v_theta + (1 - beta) v_old,    v- = (1 + beta) v_old - beta v_theta            (lines 934-937)
    x0+- = x_t - t v+-                                          (the data predictions: "adaptive weighting")
    l+- = mean over elements of (x0+- - x0)^2 / w+-,   w+- = sg(mean over elements of |x0+- - x0|) >= 1e-5
    L = m / beta * mean over samples of [r l+ + (1 - r) l-]  +  kl_coef * mean(|v_theta - v_ref|^2)  (940-970)

(``weighting: mse`` replaces l+- by the velocity MSE mean |v+- - (eps - x0)|^2, the pre-release objective; with
m = 1 and beta = 1 it is that objective exactly.) The per-sample minimiser of the policy term is
v_theta = v_old + (2r - 1)(eps - x0 - v_old) / beta in both weightings.

The old policy (released lines 438-444, 576-579, 640, 873-883, 1034-1039): a version of the weights that the
rollouts sample with and that gives v_old, moved after each update towards the trained weights,
``old <- d old + (1 - d) weights``, with d = ``return_decay(optimiser steps so far, decay_type)`` (lines
169-189): type 0: d = 0 (the old policy is the weights at the start of each update); type 1 (released default):
min(0.001 s, 0.5); type 2 (released OCR): 0 for s < 75, then min(0.0075 (s - 75), 0.999). It is a
``policy_versions.WeightCopy`` of the trainable weights (sharded like them; with LoRA a copy of the adapter's
weights, what the released second adapter "old" holds), checkpointed with the model. Type 0 keeps no copy.

The reference of the KL term (``kl_coef`` > 0; released ``train.beta`` 1e-4) is the starting policy: the LoRA base
model (the released ``disable_adapter()``) or a frozen copy of the weights. v_old and v_ref are evaluated once per
update, before its first optimiser step (one no-grad forward each per trained step).

Options (``grpo.*`` fields, else ``grpo.objective_kwargs``): ``nft_beta`` (beta), ``adv_clip_max`` (m),
``kl_coef``, ``weighting`` ("adaptive" | "mse"), ``decay_type`` (0 | 1 | 2), ``sample_with_old`` (rollouts with the
old policy, released; false: with the trained weights).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ...utils import rng
from ...models.base import PolicyAdapter
from ..policy_versions import WeightCopy
from ..rollout import Trajectory
from .base import OBJECTIVES, Objective, TrainBatch

#: the released decay schedules of the old policy: (flat steps, rate per step, cap) (train_nft_sd3.py 169-189)
DECAY_TYPES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}
WEIGHTINGS = ("adaptive", "mse")


def return_decay(step: int, decay_type: int) -> float:
    """The old policy's decay after ``step`` optimiser steps (released ``return_decay``)."""
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"DiffusionNFT decay_type must be one of {sorted(DECAY_TYPES)}, got {decay_type!r}")
    flat, rate, cap = DECAY_TYPES[decay_type]
    return 0.0 if step < flat else min((step - flat) * rate, cap)


def optimality_probability(advantages_B: torch.Tensor, adv_clip_max: float = 5.0) -> torch.Tensor:
    """r = 1/2 + 1/2 clip(A, -m, m) / m: in [0, 1], 1/2 at the group mean (released lines 910-929, m = 5)."""
    m = float(adv_clip_max)
    if not m > 0:
        raise ValueError(f"DiffusionNFT's adv_clip_max (grpo.adv_clip_max) must be > 0, got {adv_clip_max}")
    return (0.5 + 0.5 * advantages_B.clamp(-m, m) / m).clamp(0.0, 1.0)


def _branch_loss(v_branch, x0, xt, t, target, weighting):
    """Per-sample loss of one implicit policy: the adaptively weighted x0-space error, or the velocity MSE."""
    dims = tuple(range(1, v_branch.ndim))
    if weighting == "mse":
        return ((v_branch - target) ** 2).mean(dim=dims)
    err = (xt - t * v_branch) - x0
    with torch.no_grad():
        w = err.detach().double().abs().mean(dim=dims, keepdim=True).clip(min=1e-5)
    return (err ** 2 / w).mean(dim=dims)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, r_B: torch.Tensor, beta: float, *,
             x0: Optional[torch.Tensor] = None, xt: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None,
             weighting: str = "adaptive", scale: float = 1.0):
    """The DiffusionNFT policy loss ``scale / beta * mean(r l+ + (1 - r) l-)`` (module docstring) and the two
    branches' per-sample losses. ``weighting="adaptive"`` needs the clean sample ``x0``, the noised ``xt`` and the
    times ``t`` (broadcastable, (B, 1, ...)); ``"mse"`` only the flow-matching ``target`` eps - x0.

    Returns ``(loss, positive_B, negative_B)``; ``v_old``, ``target``, ``x0``, ``xt`` carry no gradient."""
    if not beta > 0:
        raise ValueError(f"DiffusionNFT's beta must be > 0, got {beta}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"DiffusionNFT weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    dt = v_theta.dtype
    v_old = v_old.detach().to(dt)
    target = target.detach().to(dt)
    if weighting == "adaptive":
        if x0 is None or xt is None or t is None:
            raise ValueError("adaptive weighting needs x0, xt and t")
        x0, xt, t = x0.detach().to(dt), xt.detach().to(dt), t.to(dt)
    positive = beta * v_theta + (1.0 - beta) * v_old
    negative = (1.0 + beta) * v_old - beta * v_theta
    pos = _branch_loss(positive, x0, xt, t, target, weighting)
    neg = _branch_loss(negative, x0, xt, t, target, weighting)
    r = r_B.to(dt)
    loss = (scale * (r * pos / beta + (1.0 - r) * neg / beta)).mean()
    return loss, pos.detach(), neg.detach()


@OBJECTIVES.register("diffusion_nft", aliases=("nft",))
class DiffusionNFT(Objective):
    """Flow matching on the clean rollout samples, contrasting implicit positive / negative policies around an
    EMA old policy (module docstring)."""

    name = "diffusion_nft"
    label = "DiffusionNFT"
    needs_log_probs = False
    needs_flow_model = True
    stat_names = ("loss", "nft_positive", "nft_negative", "kl")
    config_fields = {"beta": "nft_beta", "adv_clip_max": "adv_clip_max", "kl_coef": "kl_coef"}

    def __init__(self, beta: float = 1.0, adv_clip_max: Optional[float] = 5.0, kl_coef: float = 0.0,
                 weighting: str = "adaptive", decay_type: int = 1, sample_with_old: bool = True):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"grpo.objective_kwargs.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if decay_type not in DECAY_TYPES:
            raise ValueError(f"grpo.objective_kwargs.decay_type must be one of {sorted(DECAY_TYPES)} (the released "
                             f"old-policy schedules), got {decay_type!r}")
        if adv_clip_max is None or not adv_clip_max > 0:
            raise ValueError(f"grpo.adv_clip_max must be > 0 for DiffusionNFT (it normalises the advantages to r; "
                             f"released: 5), got {adv_clip_max}")
        self.beta, self.adv_clip_max, self.kl_coef = float(beta), float(adv_clip_max), float(kl_coef)
        self.weighting, self.decay_type, self.sample_with_old = weighting, int(decay_type), bool(sample_with_old)
        self.old: Optional[WeightCopy] = None
        self.optimizer_steps = 0

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    @property
    def extra_forwards_per_trained_step(self) -> int:
        return 1 + (1 if self.needs_reference else 0)  # v_old (+ v_ref)

    @property
    def keeps_old_copy(self) -> bool:
        """Whether the old policy is a copy of the weights (decay types 1 and 2; type 0 is the weights)."""
        return DECAY_TYPES[self.decay_type][2] > 0

    @property
    def own_weight_copies(self) -> int:
        return 1 if self.keeps_old_copy else 0

    def attach(self, adapter):
        self.old = WeightCopy(adapter.trainable_module()) if self.keeps_old_copy else None

    def rollout_weights(self):
        return self.old.applied() if (self.old is not None and self.sample_with_old) else super().rollout_weights()

    def prepare(self, batch, row_chunks):
        """The update's noise, the forward-process samples' times, v_old (the old policy) and v_ref (the
        reference), before the first optimiser step."""
        traj, device = batch.traj, batch.device
        x0 = traj.final_latents
        B, K = traj.steps_BK.shape
        self._r_B = optimality_probability(batch.advantages_B.to(device=device, dtype=torch.float32),
                                           self.adv_clip_max)
        self._t_BK = batch.schedule.sigmas.to(torch.float64)[traj.steps_BK].to(torch.float32)  # (B, K) CPU
        self._noise = rng.randn((B, K) + tuple(x0.shape[1:]), batch.generator, device=device, dtype=torch.float32)
        batch.adapter.trainable_module().eval()

        def inputs(rows, k):
            xt, _, idx, _, _ = self._noised(batch, rows, k)
            return xt, batch.schedule.model_timestep(idx, xt)

        self._v_old = batch.predict_all(self.old, row_chunks, inputs)
        self._v_ref = batch.predict_all(batch.reference, row_chunks, inputs) if self.needs_reference else None

    def _noised(self, batch, rows, k):
        """(x_t, the flow-matching target eps - x0, the step indices, x0, t) of samples ``rows`` at slot ``k``."""
        x0 = batch.traj.final_latents
        rows_dev = batch.on_device(rows)  # copied once per update
        t = batch.on_device(self._t_BK)[rows_dev, k].reshape(-1, *([1] * (x0.ndim - 1)))
        x = x0[rows_dev].to(torch.float32)
        eps = self._noise[rows_dev, k]
        return ((1.0 - t) * x + t * eps).to(x0.dtype), eps - x, batch.on_device(batch.traj.steps_BK)[rows_dev, k], x, t

    def loss(self, batch, rows, k):
        xt, target, idx, x0, t = self._noised(batch, rows, k)
        v = batch.predict(xt, batch.schedule.model_timestep(idx, xt), batch.cond(rows)).float()
        rows_dev = batch.on_device(rows)  # copied once per update
        loss, pos, neg = nft_loss(v, self._v_old[rows_dev, k], target, self._r_B[rows_dev], self.beta, x0=x0,
                                  xt=xt.float(), t=t, weighting=self.weighting, scale=self.adv_clip_max)
        kl = torch.zeros((), dtype=loss.dtype, device=loss.device)
        if self.needs_reference:
            dims = tuple(range(1, v.ndim))
            kl = ((v - self._v_ref[rows_dev, k]) ** 2).mean(dim=dims).mean()
            loss = loss + self.kl_coef * kl
        return loss, (loss.detach(), pos.mean(), neg.mean(), kl.detach())

    def on_optimizer_step(self):
        self.optimizer_steps += 1

    def finish(self, batch):
        decay = return_decay(self.optimizer_steps, self.decay_type)
        if self.old is not None:
            self.old.blend_(decay)
        out = {"nft_r_mean": self._r_B.mean(), "nft_old_decay": torch.tensor(decay, device=batch.device)}
        self._v_old = self._v_ref = self._noise = None
        return out

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        return {f"old.{k}": v for k, v in self.old.state_dict().items()} if self.old is not None else {}

    def state_dict(self) -> Dict:
        return {"optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: Dict) -> None:
        self.optimizer_steps = int(state.get("optimizer_steps", 0))


def nft_update(adapter: PolicyAdapter, schedule, traj: Trajectory, advantages_B: torch.Tensor,
               optimizer: torch.optim.Optimizer, generator: torch.Generator, *, beta: float = 1.0,
               adv_clip_max: float = 5.0, weighting: str = "adaptive", decay_type: int = 0, autocast_dtype=None,
               lr_scheduler=None, **settings) -> Dict[str, float]:
    """One DiffusionNFT update of ``traj`` through the driver (``algorithms.update.update``), the old policy being
    the weights at its start (``decay_type`` 0; others keep a copy across calls only through an ``Objective``
    instance); ``settings``: ``num_updates``, ``micro_batch_size``, ``max_grad_norm`` (``UpdateSettings``). For
    tests and scripts."""
    from ..update import UpdateSettings, update

    objective = DiffusionNFT(beta, adv_clip_max, weighting=weighting, decay_type=decay_type)
    objective.attach(adapter)
    batch = TrainBatch(adapter, schedule, traj, advantages_B, autocast_dtype=autocast_dtype, generator=generator)
    return update(objective, batch, optimizer, UpdateSettings(**settings), lr_scheduler)
