"""The adapter protocol every model family implements, and the adapter registry.

Core code (rollout, trainer) talks to models only through ``PolicyAdapter``; it never branches on a
model name. Adding a model = one file in this package defining a subclass registered with
``@ADAPTERS.register("name")`` plus its import in ``models/__init__.py``.

Conventions
-----------
* ``cond`` is a dict of tensors (and None values) with a leading batch dim: precomputed prompt
  embeddings for one row per sample (e.g. ``{"prompt_embeds": ..., "pooled": ...}``). The rollout
  expands per-prompt conditioning to per-sample rows with ``index_cond``.
* Latents have a leading batch dim; video latents are (B, C, F, H, W).
* ``predict`` returns the policy's output for the SDE step: a velocity for ``prediction_type ==
  "flow"``, an eps for ``"eps"``. For CFG-trained models it is already the CFG combination of the
  conditional and unconditional branches, both differentiable (docs/method.md section 4).
* ``decode`` returns float pixels in [0, 1]: (B, 3, H, W) for images, (B, F, 3, H, W) for videos.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..utils.registry import Registry
from ..utils.transfer import to_device

Cond = Dict[str, Optional[torch.Tensor]]


def index_cond(cond: Cond, index: torch.Tensor) -> Cond:
    """Select rows of every tensor in ``cond`` (index_select along dim 0); None values pass through."""
    out = {}
    for k, v in cond.items():
        out[k] = v.index_select(0, to_device(index, v.device)) if isinstance(v, torch.Tensor) else v
    return out


def slice_cond(cond: Cond, start: int, end: int) -> Cond:
    """Rows ``start:end`` of every tensor in ``cond`` as views (no copy); None values pass through."""
    return {k: v[start:end] if isinstance(v, torch.Tensor) else v for k, v in cond.items()}


class PolicyAdapter(abc.ABC):
    """One model family behind one small protocol."""

    #: "flow" (velocity, rectified flow) or "eps" (noise, diffusion)
    prediction_type: str = "flow"

    @abc.abstractmethod
    def trainable_module(self) -> nn.Module:
        """The module whose parameters the optimiser updates (transformer / UNet, maybe with LoRA)."""

    @abc.abstractmethod
    def make_schedule(self, num_steps: int, eta=0.0):
        """A ``FlowSchedule`` or ``DDIMSchedule`` for ``num_steps`` sampling steps with noise level eta."""

    @abc.abstractmethod
    def initial_noise(self, num_samples: int, generator: torch.Generator, device=None, cond: Optional[Cond] = None) -> torch.Tensor:
        """N(0, I) initial latents of the model's shape for ``num_samples`` samples."""

    @abc.abstractmethod
    def predict(self, latents: torch.Tensor, timestep_B: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Model output at (latents, t, cond) in the sampler's space (CFG applied when configured)."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [0, 1]."""

    # ---- optional hooks with sensible defaults

    @classmethod
    def missing_model_files(cls, kwargs) -> List[str]:
        """Start-up check of the files the adapter will load from ``kwargs`` (its declared paths exist
        already): one message per missing piece. Nothing is loaded."""
        return []

    @property
    def device(self) -> torch.device:
        """Where the model computes and the rollout keeps its latents: the device given to
        ``set_compute_device`` (parallelize does, since CPU-offloaded parameters live on the CPU
        while FSDP2 computes on the GPU), else the first trainable parameter's device."""
        explicit = getattr(self, "_compute_device", None)
        return explicit if explicit is not None else next(self.trainable_module().parameters()).device

    def set_compute_device(self, device) -> None:
        self._compute_device = torch.device(device)

    def guidance(self, mode: str):
        """A context in which ``predict`` guides as ``mode`` says (``grpo.train_guidance``: "both",
        "detach_uncond", "none"); the update driver wraps the training forwards in it. A model without
        classifier-free guidance has nothing to change."""
        return contextlib.nullcontext()

    def lora_adapter_off(self):
        """A context in which the model computes without its LoRA adapter (the base weights: the starting
        policy of a LoRA run), or None when it has no LoRA adapter to switch off."""
        return None

    def decoder_modules(self) -> List[nn.Module]:
        """The frozen modules only ``decode`` uses (the VAE), which ``sampling.offload_vae`` keeps in host
        memory between decodes; [] = nothing to offload (e.g. a pixel-space model)."""
        return []

    def encode_prompts(self, prompts) -> Cond:
        """Encode prompts on the fly (toy models). Big models read precomputed embeddings instead."""
        raise NotImplementedError(
            f"{type(self).__name__} consumes precomputed prompt embeddings; run data_prep first"
        )

    def state_dict_for_export(self) -> Dict[str, torch.Tensor]:
        return self.trainable_module().state_dict()

    def blocks_for_sharding(self) -> Optional[List[nn.Module]]:
        """The repeated transformer blocks in forward order, each wrapped by FSDP / activation
        checkpointing (distributed/fsdp.py). None = found by attribute name (``transformer_blocks``,
        ``single_transformer_blocks``, ``blocks``, ``down_blocks`` / ``up_blocks``, ...)."""
        return None

    def sequence_parallel_plan(self):
        """A ``distributed.sequence_parallel.SPPlan`` saying which first-block inputs to shard along
        the sequence; None = the first positional argument / ``hidden_states`` along dim 1."""
        return None

    def frozen_denoisers(self) -> List[nn.Module]:
        """Frozen denoisers that ``predict`` runs besides the trainable module (e.g. Wan 2.2's low-noise
        expert): ``parallelize`` shards each like the trainable module (FSDP2 per block, then its root; the
        same sequence-parallel plan), without gradients or optimiser state, and the planner counts their
        sharded weights. [] = none."""
        return []

    def trainable_steps(self, schedule) -> Optional[Tuple[int, int]]:
        """The sampling steps ``[lo, hi)`` of ``schedule`` whose prediction depends on the trainable module;
        None = every step. The trainer refuses a training window (``grpo.timestep_window``) reaching outside
        them: a step that only a frozen denoiser predicts has nothing to train."""
        return None


ADAPTERS: Registry[PolicyAdapter] = Registry("model adapter")

