"""The train state: what the loop (``loop.fit`` and its components), checkpointing and the EMA see of a
trainer -- and all they may use of it. ``training.trainer.Trainer`` implements it; a test may hand the loop
anything else that does."""

from __future__ import annotations

from typing import Dict, Optional, Protocol

import torch

from .ema import WeightEMA
from ..models.base import PolicyAdapter


class TrainState(Protocol):
    #: completed iterations (the loop stops at its total; checkpoints are named by it)
    iteration: int
    #: the policy: its ``trainable_module()`` is what checkpoints save and exports write
    adapter: PolicyAdapter
    #: saved and restored (sharded) with the model by checkpoint.py
    optimizer: torch.optim.Optimizer
    #: the weight EMA when ``train.ema_decay`` is set (updated by ``loop.EMAUpdate``, used for evaluation)
    ema: Optional[WeightEMA]
    #: the noise / timestep stream, reseeded per data-parallel rank
    generator: torch.Generator

    def train_iteration(self) -> Dict[str, float]:
        """One iteration; returns its metrics."""

    def state_dict(self) -> Dict:
        """Everything besides the model, optimiser and EMA tensors needed to continue bit-for-bit."""

    def load_state_dict(self, state: Dict, restore_generator: bool = True) -> None:
        """Inverse of ``state_dict``."""
