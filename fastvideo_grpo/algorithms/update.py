"""The update driver: one call trains any objective on one iteration's batch.

``update(objective, batch, optimizer, settings)`` owns what every objective shares: the trainable
parameters, the split of the batch into micro-batches of ``micro_batch_size`` samples and of the iteration
into ``num_updates`` optimiser steps: ``split`` "steps" cuts the K kept steps into consecutive chunks
(``grpo.update_chunks``; each chunk's gradients are accumulated over its steps and every micro-batch), "samples"
cuts the micro-batches into consecutive groups (each group's gradients accumulated over its micro-batches and
every kept step: the released DanceGRPO / Flow-GRPO split); then one optimiser step each. Backward, the global gradient norm
clipped to ``max_grad_norm`` (a DTensor's full norm under FSDP2), the finiteness check, the optimiser and
LR-scheduler steps. The objective (``algorithms/objectives/``) only computes each micro-step's loss.

One host sync per optimiser step (the gradient norm and which micro-steps had a finite loss) and one at
the end (the statistics, averaged over micro-steps); nothing per micro-step (host indices reach the device once
per update: ``TrainBatch.on_device``).

When the objective re-scores the rollout's transitions (``Objective.last_logp_gap_B``), the update also logs
the gap |log pi_train - log pi_rollout| by sampling-step index (``train/logp_gap/step_<i>``, mean over the
(sample, step) pairs trained at that index), over the whole update (``train/logp_gap/mean``) and over the
micro-steps before the first optimiser step (``train/logp_gap/before_update``: the same weights as the rollout,
so only arithmetic differs; 0 when re-scoring repeats the rollout's shapes). After the first optimiser step the
gap also holds what the update has learnt. A non-finite loss or gradient norm raises
FloatingPointError before the optimiser steps (gradients zeroed); backward still runs for a bad loss, so
every rank takes part in the same collectives and sees the same (non-finite) global norm.

``num_epochs`` > 1 passes over the same batch again (Flow-DPPO's several epochs per rollout); ``prepare`` runs
once. A trajectory may mark kept slots untrained (``trained_BK``: a tree's shared prefix is trained once); their
micro-steps leave those rows out, and each micro-step's loss is weighted by its share of the optimiser step's
trained slots.

pi_old stays the rollout policy for the whole iteration (PPO's usual convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from . import grpo
from .objectives.base import Objective, TrainBatch


@dataclass(frozen=True)
class UpdateSettings:
    """How an update is split and clipped (``grpo.num_updates_per_iteration``, ``grpo.micro_batch_size``,
    ``optim.max_grad_norm``)."""

    num_updates: int = 1
    micro_batch_size: int = 0  # samples per forward / backward; 0 = the whole batch
    max_grad_norm: float = 1.0
    split: str = "steps"  # grpo.update_split: "steps" or "samples"
    num_epochs: int = 1  # passes over the batch, each of num_updates optimiser steps

    @classmethod
    def from_config(cls, cfg) -> "UpdateSettings":
        return cls(cfg.grpo.num_updates_per_iteration, cfg.grpo.micro_batch_size, cfg.optim.max_grad_norm,
                   cfg.grpo.update_split, cfg.grpo.num_epochs)


def optimizer_steps(batch_size: int, kept_steps: int, settings: UpdateSettings):
    """The micro-batch rows of the update, and per optimiser step the (kept-step slots, micro-batches) it
    accumulates over (module docstring)."""
    row_chunks, step_chunks = grpo.update_chunks(batch_size, kept_steps, settings.micro_batch_size,
                                                 settings.num_updates)
    if settings.split == "steps":
        return row_chunks, [(steps, row_chunks) for steps in step_chunks]
    if settings.split != "samples":
        raise ValueError(f"grpo.update_split must be 'steps' or 'samples', got {settings.split!r}")
    parts = max(1, min(settings.num_updates, len(row_chunks)))
    bounds = [round(i * len(row_chunks) / parts) for i in range(parts + 1)]
    return row_chunks, [(range(kept_steps), row_chunks[bounds[i]:bounds[i + 1]]) for i in range(parts)]


def trainable_parameters(module: torch.nn.Module):
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the adapter's trainable module has no parameters with requires_grad=True")
    return params


def update(objective: Objective, batch: TrainBatch, optimizer: torch.optim.Optimizer, settings: UpdateSettings,
           lr_scheduler=None) -> Dict[str, float]:
    """Train ``objective`` on ``batch``: ``settings.num_epochs`` passes of ``settings.num_updates`` optimiser steps
    (fewer when there are fewer kept steps); returns the averaged statistics (``train/<stat>``), the objective's
    update diagnostics, ``train/grad_norm`` (mean over steps) and ``train/num_updates``."""
    module = batch.adapter.trainable_module()
    params = trainable_parameters(module)
    row_chunks, plan = optimizer_steps(batch.size, batch.num_kept_steps, settings)
    trained = batch.traj.trained_BK
    objective.check_batch(batch)
    objective.prepare(batch, row_chunks)
    module.train()
    # statistics stay on the device, summed over micro-steps, and are read back once at the end
    totals = torch.zeros(len(objective.stat_names), dtype=torch.float32, device=batch.device)
    # the (sample, kept slot) pairs the first optimiser step trains: the ratio's distance from 1 is measured there
    first_pairs = sum(int(r.numel()) for _, r, _ in _micro_steps(*plan[0], trained)) if plan else 0
    gap = LogProbGap(batch, first_pairs, settings.num_epochs)
    count, grad_norms = 0, []
    for _epoch in range(settings.num_epochs):
        for step_chunk, rows_of_step in plan:
            optimizer.zero_grad(set_to_none=True)
            finite, where = [], []  # per micro-step: finiteness on the device, and its kept-step slot
            for k, rows, divisor in _micro_steps(step_chunk, rows_of_step, trained):
                objective.last_logp_gap_B = None
                loss, stats = objective.loss(batch, rows, k)
                finite.append(torch.isfinite(loss.detach()))
                where.append(k)
                (loss / divisor).backward()
                totals += torch.stack([s.float() for s in stats])
                if objective.last_logp_gap_B is not None:
                    gap.add(objective.last_logp_gap_B, rows, k, before_first_step=not grad_norms)
                count += 1
            grad_norms.append(_clip_and_check(params, settings.max_grad_norm, finite, where, objective, optimizer))
            optimizer.step()
            objective.on_optimizer_step()
            if lr_scheduler is not None:
                lr_scheduler.step()
    once = objective.finish(batch)
    parts = [totals, *(v.detach().float().reshape(1) for v in once.values()), *gap.device_sums()]
    values = torch.cat(parts).tolist()
    n_stats, n_once = len(objective.stat_names), len(once)
    out = {f"train/{name}": v / max(count, 1) for name, v in zip(objective.stat_names, values)}
    out.update({f"train/{name}": v for name, v in zip(once, values[n_stats:n_stats + n_once])})
    out.update(gap.metrics(values[n_stats + n_once:]))
    out["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
    out["train/num_updates"] = len(grad_norms)
    return out


def _micro_steps(step_chunk, row_chunks, trained_BK) -> List[Tuple[int, torch.Tensor, float]]:
    """(kept-step slot, sample rows, loss divisor) of each micro-step of one optimiser step. Every (slot, rows
    chunk) weighs 1 / their count; with ``trained_BK`` only its trained rows run, a micro-step of n of the
    step's N trained slots weighing n / N (chunks with none are skipped: the pattern is the sampler's, the same
    on every rank, so every rank runs the same micro-steps)."""
    if trained_BK is None:
        denom = len(step_chunk) * len(row_chunks)
        return [(k, rows, denom) for k in step_chunk for rows in row_chunks]
    parts = [(k, rows[trained_BK[rows, k]]) for k in step_chunk for rows in row_chunks]
    total = sum(r.numel() for _, r in parts)
    return [(k, rows, total / rows.numel()) for k, rows in parts if rows.numel()]


#: what can make a loss or gradient non-finite once the config's values and the rewards are known to be finite
NONFINITE_LOSS_CAUSES = (
    "Possible causes: too large a step (optim.lr, optim.warmup_iterations, optim.max_grad_norm); a trained SDE "
    "step with almost no noise, whose tiny std blows up the log-probs (sampling.eta / eta_schedule at the trained "
    "steps, grpo.timestep_window); reduced precision overflowing (try train.autocast: none); or non-finite "
    "weights or conditioning going in (the resumed checkpoint, the prompt embeddings)")


class LogProbGap:
    """|log pi_train - log pi_rollout| of the re-scored transitions, summed on the device by sampling-step index
    and over the micro-steps before the first optimiser step; read back with the update's statistics."""

    def __init__(self, batch: TrainBatch, first_step_pairs: int, epochs: int = 1):
        self.batch = batch
        self.num_steps = batch.schedule.num_steps
        # every trained (sample, kept slot) is trained once per epoch: the pairs per sampling step are known on the
        # host (slots a sampler marks untrained, ``traj.trained_BK``, are not)
        steps = batch.traj.steps_BK
        if batch.traj.trained_BK is not None:
            steps = steps[batch.traj.trained_BK]
        self.count_T = (torch.bincount(steps.reshape(-1), minlength=self.num_steps) * epochs).tolist()
        self.count_before = first_step_pairs
        self.sum_T = self.before = None

    def add(self, gap_B: torch.Tensor, rows: torch.Tensor, k: int, before_first_step: bool) -> None:
        if self.sum_T is None:
            self.sum_T = torch.zeros(self.num_steps, dtype=torch.float32, device=gap_B.device)
            self.before = torch.zeros(1, dtype=torch.float32, device=gap_B.device)
        b = self.batch
        index = b.on_device(b.traj.steps_BK)[b.on_device(rows), k]  # on the device: no copy per micro-step
        self.sum_T.index_add_(0, index, gap_B.float())
        if before_first_step:
            self.before += gap_B.float().sum()

    def device_sums(self):
        return [] if self.sum_T is None else [self.sum_T, self.before]

    def metrics(self, values) -> Dict[str, float]:
        if self.sum_T is None:
            return {}
        sums, before = values[:self.num_steps], values[self.num_steps]
        width = max(2, len(str(self.num_steps - 1)))
        out = {f"train/logp_gap/step_{i:0{width}d}": s / n for i, (s, n) in enumerate(zip(sums, self.count_T)) if n}
        out["train/logp_gap/mean"] = sum(sums) / max(1, sum(self.count_T))
        out["train/logp_gap/before_update"] = before / max(1, self.count_before)
        return out


def _clip_and_check(params, max_grad_norm: float, finite, where, objective: Objective, optimizer) -> float:
    """Clip the global gradient norm; FloatingPointError (gradients zeroed) when it or a micro-step's loss is
    not finite. Returns the norm before clipping (the one host sync of this optimiser step)."""
    gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # global norm under FSDP
    if hasattr(gn, "full_tensor"):  # a DTensor when the parameters are sharded
        gn = gn.full_tensor()
    norm_and_flags = torch.cat([gn.detach().float().reshape(1), torch.stack(finite).float()]).tolist() if finite \
        else [gn.detach().float().item()]
    norm = norm_and_flags[0]
    bad = [i for i, ok in enumerate(norm_and_flags[1:]) if not ok]
    if bad or not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        label = getattr(objective, "label", None) or objective.name
        what = f"non-finite {label} loss at kept step {where[bad[0]]}" if bad else \
            f"non-finite {label} gradient norm"
        raise FloatingPointError(f"{what}; optimiser step skipped. {NONFINITE_LOSS_CAUSES}")
    return norm
