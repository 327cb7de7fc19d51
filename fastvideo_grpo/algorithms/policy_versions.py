"""Other versions of the policy's weights, run by the same model: the frozen starting policy of a KL term (the
reference) and DiffusionNFT's slowly moving old policy.

``with version.applied(): version.adapter(policy).predict(...)`` computes with the version's weights; the
trained weights are in place again after the block. The objectives enter a version once per update (their
``prepare`` evaluates every kept step under it), not once per micro-step.

* ``LoRAOff`` -- a LoRA run's starting policy is its base model: the LoRA layers switched off for the block
  (``PolicyAdapter.lora_adapter_off``; released Flow-GRPO and DiffusionNFT: ``disable_adapter()``). No copy of
  any weight, sharded or not.
* ``WeightCopy`` -- a copy of the trainable parameters, cloned from them as they are: under FSDP2 a parameter
  is a DTensor shard, so its copy is one too (1/N of the weights per rank). ``applied`` swaps copy and
  parameters tensor by tensor (one parameter's worth of extra memory at a time, not a second model) and swaps
  them back after. With LoRA the trainable parameters are the adapter's weights, so the copy holds exactly what
  a second LoRA adapter holds (released DiffusionNFT's "old" adapter). ``blend_(decay)`` moves the copy
  towards the weights: ``copy <- decay * copy + (1 - decay) * weights``.
* ``SeparateAdapter`` -- a frozen policy held by its own adapter (a caller's reference model; tests).

``reference_policy(adapter)``: ``LoRAOff`` for a LoRA adapter, else a frozen ``WeightCopy`` (one more copy of
the trainable weights, sharded like them; the planner counts it).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

from ..distributed.fsdp import reshard_gathered, stable_param_name
from ..models.base import PolicyAdapter


class PolicyVersion:
    """A version of the policy: a context that makes ``adapter(policy)`` compute with its weights."""

    #: what the version holds, for the planner and the docs
    holds_copy: bool = False

    def applied(self):
        return contextlib.nullcontext()

    def adapter(self, policy: PolicyAdapter) -> PolicyAdapter:
        """The adapter to call inside ``applied()`` (the policy's own, unless the version has its own model)."""
        return policy


class LoRAOff(PolicyVersion):
    """The base model of a LoRA policy: its adapter switched off inside ``applied()``."""

    def __init__(self, adapter: PolicyAdapter):
        if adapter.lora_adapter_off() is None:
            raise ValueError(f"{type(adapter).__name__} has no LoRA adapter to switch off (model.kwargs.lora_rank)")
        self._adapter = adapter

    def applied(self):
        return self._adapter.lora_adapter_off()


class SeparateAdapter(PolicyVersion):
    """A frozen policy with a model of its own (``Trainer(ref_adapter=...)``)."""

    def __init__(self, adapter: PolicyAdapter):
        self._adapter = adapter

    def adapter(self, policy: PolicyAdapter) -> PolicyAdapter:
        return self._adapter


class WeightCopy(PolicyVersion):
    """A copy of ``module``'s trainable parameters (sharded like them), swapped in by ``applied()``."""

    holds_copy = True

    def __init__(self, module: nn.Module):
        self.module = module
        self.params: List[Tuple[str, nn.Parameter]] = [(stable_param_name(n), p)
                                                       for n, p in module.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters to copy")
        with torch.no_grad():
            self.copy: Dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in self.params}

    @torch.no_grad()
    def _swap(self) -> None:
        for name, p in self.params:
            c = self.copy[name]
            held = p.detach().clone()  # one tensor at a time
            p.detach().copy_(c)
            c.copy_(held)
        reshard_gathered(self.module)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def blend_(self, decay: float) -> None:
        """copy <- decay * copy + (1 - decay) * weights (decay 0: the copy becomes the weights)."""
        for name, p in self.params:
            c = self.copy[name]
            if decay == 0.0:
                c.copy_(p.detach())
            else:
                c.mul_(decay).add_(p.detach().to(c.dtype), alpha=1.0 - decay)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """name -> copy tensor (the tensors themselves: a checkpoint loads into them in place)."""
        return self.copy


def reference_policy(adapter: PolicyAdapter) -> PolicyVersion:
    """The starting policy as it is now, frozen: the base model of a LoRA adapter (``LoRAOff``), else a
    ``WeightCopy`` of the trainable weights."""
    if adapter.lora_adapter_off() is not None:
        return LoRAOff(adapter)
    return WeightCopy(adapter.trainable_module())
