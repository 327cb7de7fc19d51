"""Exponential moving average of the trainable weights (``train.ema_decay``), as the released FLUX code's
``FSDP_EMA`` (decay 0.995 in its 8-GPU script): ``ema = decay * ema + (1 - decay) * weights`` once per
GRPO iteration, starting from the initial weights.

* **Sharded like the parameters.** The average is one float32 tensor per trainable parameter, made by
  cloning the parameter as it is: under FSDP2 a parameter is a DTensor shard, so its average is a
  DTensor with the same mesh, placements and local shard (each rank holds 1/N of it). The released code
  instead gathers the full state dict to rank 0's CPU at every update. Frozen weights (the base model
  under LoRA, the VAE) do not change, so their average is themselves and is not kept.
* **Checkpoints.** ``state_dict()`` maps parameter names to the average tensors; checkpoint.py writes it
  through DCP with the model and optimiser (resharded on load like them).
* **Evaluation and export.** ``applied()`` swaps the average into the parameters for the duration of a
  ``with`` block and restores the trained weights after; the runner wraps held-out evaluation, sample
  grids and the final export in it when ``train.ema_decay`` is set (the released code only saved the
  average as a separate checkpoint). Rollouts and updates always use the trained weights.
* ``loop.EMAUpdate`` is the component that calls ``update()`` after every iteration (runner.py puts it
  before the evaluator and the checkpointer, so both see the iteration's average).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

from ..distributed.fsdp import reshard_gathered, stable_param_name


class WeightEMA:
    """The EMA of ``module``'s trainable parameters (see the module docstring)."""

    def __init__(self, module: nn.Module, decay: float):
        decay = float(decay)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) to keep an EMA (0 turns it off), got {decay}")
        self.module = module
        self.decay = decay
        self.params: List[Tuple[str, nn.Parameter]] = [(stable_param_name(n), p) for n, p in module.named_parameters()
                                                       if p.requires_grad]
        if not self.params:
            raise ValueError("train.ema_decay is set but the model has no trainable parameters to average")
        with torch.no_grad():
            self.shadow: Dict[str, torch.Tensor] = {n: p.detach().clone().float() for n, p in self.params}
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """ema <- decay * ema + (1 - decay) * weights (one lerp per tensor, on each rank's shard)."""
        w = 1.0 - self.decay
        for name, p in self.params:
            e = self.shadow[name]
            e.lerp_(p.detach().to(e.dtype), w)
        self.num_updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average at the current weights (a resumed run whose checkpoint has no EMA)."""
        for name, p in self.params:
            self.shadow[name].copy_(p.detach())

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """name -> average tensor (the tensors themselves: DCP loads into them in place)."""
        return self.shadow

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the average; the trained weights are restored after (a copy of
        them, sharded like the parameters, is held meanwhile: one more copy of the trainable weights)."""
        with torch.no_grad():
            backup = [p.detach().clone() for _, p in self.params]
            for name, p in self.params:
                p.copy_(self.shadow[name].to(p.dtype))
        reshard_gathered(self.module)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), b in zip(self.params, backup):
                    p.copy_(b)
            reshard_gathered(self.module)


def weights_for_eval(ema: "WeightEMA | None"):
    """The context under which to evaluate / export a policy: with its EMA's weights when it keeps one."""
    return ema.applied() if ema is not None else contextlib.nullcontext()
