"""The objective protocol and its registry: what the update driver (``algorithms/update.py``) asks of a
policy-improvement objective, and the batch it trains on.

An objective declares what the rest of the run must provide -- log-probs of the sampled transitions
(``needs_log_probs``: every step training may pick must then be stochastic), a flow-matching model
(``needs_flow_model``), the rollout policy's step means of the kept transitions (``needs_step_means``),
a frozen copy of the starting policy (``needs_reference``), how many no-grad
forwards one trained (sample, step) costs besides the trained one (``extra_forwards_per_trained_step``, once
per update, in ``prepare``; for the planner), whether it reads per-(sample, step) advantages
(``per_step_advantages``: a tree sampler's per-node ones) and whether the kept steps must be the same for the
whole batch (``shared_timesteps``) -- and computes one micro-step's loss. The driver owns everything else: the split into
micro-batches and optimiser steps, backward, gradient clipping, finiteness, the optimiser and LR steps.
Config checks, the trainer and the planner read these declarations; none of them tests a name.

Registering: ``@OBJECTIVES.register("name")`` on the class (``aliases=`` for older recipe values). Its
keyword options come from ``grpo.objective_kwargs`` (checked against the constructor: unknown keys are a
ValueError naming the accepted ones) and from the ``grpo`` fields it maps in ``config_fields``.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import ClassVar, Dict, Optional, Sequence, Tuple

import torch

from ...utils.dtypes import autocast_context
from ...utils.transfer import to_device
from ...models.base import Cond, PolicyAdapter, index_cond
from ...utils.registry import Registry
from ..policy_versions import PolicyVersion
from ..rollout import Trajectory


@dataclass
class TrainBatch:
    """What one update trains on: the policy and its sampling schedule, the rollout's kept transitions and
    their advantages, and how the policy is run (the rollout's autocast, so re-scoring repeats its
    arithmetic; ``guidance``: ``grpo.train_guidance``). ``reference``: the frozen starting policy
    (``policy_versions.PolicyVersion``), for objectives that declare ``needs_reference``; ``generator``: the
    objective's own random draws (e.g. DiffusionNFT's forward-process noise); ``advantages_BK``: per-(sample,
    kept step) advantages from the sampler (``step_advantages``), None when the per-sample ones apply to every
    step (``advantages_at`` reads whichever applies)."""

    adapter: PolicyAdapter
    schedule: object
    traj: Trajectory
    advantages_B: torch.Tensor
    autocast_dtype: Optional[torch.dtype] = None
    reference: Optional[PolicyVersion] = None
    generator: Optional[torch.Generator] = None
    guidance: str = "both"
    advantages_BK: Optional[torch.Tensor] = None
    _on_device: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    _adv: Optional[torch.Tensor] = field(default=None, init=False, repr=False)  # advantages_at's float32 copy

    @property
    def device(self) -> torch.device:
        return self.traj.final_latents.device

    @property
    def size(self) -> int:
        return self.traj.steps_BK.shape[0]

    @property
    def num_kept_steps(self) -> int:
        return self.traj.steps_BK.shape[1]

    def advantages_at(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        """The advantages (float32, on the device) of samples ``rows`` (CPU index) at kept-step slot ``k``: the
        sampler's per-step ones when it gave them, else the per-sample ones. Converted at most once per update."""
        if self._adv is None:
            adv = self.advantages_B if self.advantages_BK is None else self.advantages_BK
            if adv.device != self.device or adv.dtype != torch.float32:
                adv = adv.to(device=self.device, dtype=torch.float32)
            self._adv = adv
        adv = self._adv if self._adv.ndim == 1 else self._adv[:, k]
        return adv[self.on_device(rows)]

    def on_device(self, index: torch.Tensor) -> torch.Tensor:
        """A host tensor of this update (a micro-batch's ``rows``, ``traj.steps_BK``) on the batch's device,
        copied the first time it is asked for and reused for the rest of the update: a copy per micro-step
        would stop the host at every micro-step on a GPU (docs/performance.md, "Host syncs")."""
        hit = self._on_device.get(id(index))
        if hit is None or hit[0] is not index:  # (the entry holds ``index``, so its id cannot be reused)
            hit = (index, to_device(index, self.device))
            self._on_device[id(index)] = hit
        return hit[1]

    def cond(self, rows: torch.Tensor) -> Cond:
        """The conditioning rows of ``rows`` (a CPU index; the whole batch without a copy)."""
        if rows.numel() == self.size:
            return self.traj.cond
        return index_cond(self.traj.cond, self.on_device(rows))

    def predict(self, latents: torch.Tensor, timestep_B: torch.Tensor, cond: Cond,
                adapter: Optional[PolicyAdapter] = None) -> torch.Tensor:
        """``adapter.predict`` (default: the policy) under the rollout's autocast and the training guidance."""
        adapter = adapter or self.adapter
        with autocast_context(latents.device, self.autocast_dtype), adapter.guidance(self.guidance):
            return adapter.predict(latents, timestep_B, cond)

    @torch.no_grad()
    def predict_all(self, version: Optional[PolicyVersion], row_chunks: Sequence[torch.Tensor], inputs):
        """The outputs of ``version`` (None: the policy as it is) at every kept slot k and row chunk, without
        gradient: ``inputs(rows, k) -> (latents, timestep_B)`` gives each forward's inputs; returns
        ``(B, K, *latent)`` float32. The version is entered once for all of them."""
        B, K = self.traj.steps_BK.shape
        out = None
        with (version.applied() if version is not None else contextlib.nullcontext()):
            adapter = version.adapter(self.adapter) if version is not None else self.adapter
            for k in range(K):
                for rows in row_chunks:
                    z, t = inputs(rows, k)
                    v = self.predict(z, t, self.cond(rows), adapter=adapter).float()
                    if out is None:
                        out = torch.empty((B, K) + tuple(v.shape[1:]), dtype=torch.float32, device=self.device)
                    out[rows.to(self.device), k] = v
        return out


class Objective(abc.ABC):
    """One objective. Instances live for the whole run; ``prepare`` starts each update."""

    #: trains on the SDE transitions' log-probs: the steps training may pick must have eta > 0
    needs_log_probs: ClassVar[bool] = True
    #: trains a flow-matching (velocity) model only
    needs_flow_model: ClassVar[bool] = False
    #: compares with the rollout policy's step means: the rollout keeps them (``Trajectory.means_BK``)
    needs_step_means: ClassVar[bool] = False
    #: names of the per-micro-step statistics ``loss`` returns, in order (logged as ``train/<name>``,
    #: averaged over the micro-steps of the update)
    stat_names: ClassVar[Tuple[str, ...]] = ("loss",)
    #: option name -> the ``grpo`` config field holding it (the built-in objectives' established keys)
    config_fields: ClassVar[Dict[str, str]] = {}
    #: reads the advantages per (sample, kept step) through ``TrainBatch.advantages_at`` (so a sampler's
    #: per-node advantages, e.g. a tree's, reach it); an objective of whole-sample advantages leaves it False
    per_step_advantages: ClassVar[bool] = False
    #: the kept steps must be one subset for the whole batch (it compares a group's samples at one time)
    shared_timesteps: ClassVar[bool] = False
    #: compares the samples of a group with each other in the loss: the update must hold whole groups (no
    #: ``grpo.drop_zero_advantage``, micro-batches of whole groups)
    needs_whole_groups: ClassVar[bool] = False

    name: str = ""
    #: set by ``loss`` when it re-scores the rollout's transitions: |log pi_train - log pi_rollout| of each row of
    #: the micro-step (detached, on the device). The driver logs it by sampling-step index (``train/logp_gap/*``);
    #: None = the objective has no log-probs to compare
    last_logp_gap_B: Optional[torch.Tensor] = None

    @classmethod
    def from_config(cls, cfg, **options) -> "Objective":
        """The objective of ``cfg``: ``options`` (``grpo.objective_kwargs``) plus the mapped ``grpo`` fields."""
        mapped = {opt: getattr(cfg.grpo, fld) for opt, fld in cls.config_fields.items()}
        repeated = sorted(set(mapped) & set(options))
        if repeated:
            raise ValueError(f"grpo.objective_kwargs sets {repeated}, which grpo."
                             f"{', grpo.'.join(cls.config_fields[r] for r in repeated)} already set; set them there")
        return cls(**mapped, **options)

    @property
    def needs_reference(self) -> bool:
        """Whether the trainer must keep the frozen starting policy (``TrainBatch.reference``: the LoRA base
        model, or a copy of the trainable weights)."""
        return False

    def check_batch(self, batch: "TrainBatch") -> None:
        """ValueError when ``batch`` lacks what this objective declares it needs (a flow model, the reference
        policy); the update driver calls it before ``prepare``, for every objective."""
        if self.needs_flow_model and getattr(batch.schedule, "prediction_type", None) != "flow":
            raise ValueError(f"grpo.objective: {self.name} trains the flow-matching objective and needs a flow "
                             "model; this model samples with a DDIM schedule")
        if self.needs_reference and batch.reference is None:
            raise ValueError(f"grpo.objective: {self.name} needs the frozen reference policy (TrainBatch.reference: "
                             "grpo.kl_coef > 0, or the objective's own reference)")

    @property
    def own_weight_copies(self) -> int:
        """Copies of the trainable weights the objective keeps for itself (``attach``; e.g. an old policy)."""
        return 0

    def weight_copies(self, lora: bool) -> int:
        """Copies of the trainable weights a run of this objective holds besides them, each sharded like them (the
        planner counts their memory): the reference of a full fine-tuning run (with LoRA the reference is the
        base model, switched on by turning the adapter off: no copy) and the objective's own."""
        return (1 if self.needs_reference and not lora else 0) + self.own_weight_copies

    def attach(self, adapter: PolicyAdapter) -> None:
        """Once, when the trainer is built (the weights are the starting ones, sharded when they will be): an
        objective that keeps a version of the weights across iterations makes it here."""

    def rollout_weights(self):
        """The context the rollout runs in: the policy's weights (default), or the objective's own sampling
        policy (DiffusionNFT samples with its old policy)."""
        return contextlib.nullcontext()

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """Tensors the objective keeps across iterations (sharded like the weights), saved and restored with
        the model by checkpoints; {} when it keeps none."""
        return {}

    def state_dict(self) -> Dict:
        """Small (non-tensor) state the objective keeps across iterations, saved in the trainer's state."""
        return {}

    def load_state_dict(self, state: Dict) -> None:
        """Inverse of ``state_dict``."""

    @property
    def extra_forwards_per_trained_step(self) -> int:
        """No-grad policy forwards one trained (sample, kept step) costs besides its trained forward
        (reference-model or old-policy evaluations, in ``prepare``: once per update, whatever
        ``grpo.num_epochs``); the planner counts them."""
        return 0

    def trained_advantages(self, advantages_B: torch.Tensor) -> torch.Tensor:
        """The advantages as the loss uses them (after its clamp, if any): the trainer logs their statistics
        (``adv/*``), so the logs show what is trained on."""
        return advantages_B

    def prepare(self, batch: TrainBatch, row_chunks: Sequence[torch.Tensor]) -> None:
        """Before the update's first optimiser step (the weights are still the rollout policy's)."""

    @abc.abstractmethod
    def loss(self, batch: TrainBatch, rows: torch.Tensor, k: int) -> Tuple[torch.Tensor, Sequence[torch.Tensor]]:
        """The loss of one micro-step -- samples ``rows`` (CPU index) at kept-step slot ``k`` -- to minimise,
        and its detached statistics (0-dim tensors on the device, in ``stat_names`` order: no host sync)."""

    def on_optimizer_step(self) -> None:
        """After each optimiser step of the update (an objective that counts them: DiffusionNFT's decay)."""

    def finish(self, batch: TrainBatch) -> Dict[str, torch.Tensor]:
        """Diagnostics of the whole update as 0-dim device tensors (logged as ``train/<name>``), read back
        with the statistics in one sync."""
        return {}


OBJECTIVES: Registry[Objective] = Registry("objective (grpo.objective)")
