"""LoRA through peft as an alternative to full fine-tuning, and merged export.

``add_lora`` freezes every base weight of a diffusers model and injects peft LoRA layers through
diffusers' ``add_adapter`` (the model keeps its class, config and forward signature, so FSDP
wrapping and gradient checkpointing see the same module tree). Only ``lora_*`` parameters train.
The B matrices start at zero, so the LoRA model starts exactly at the base model.

``merged_state_dict`` gives the plain diffusers state dict (W + scale * B A for every adapted
layer, ``base_layer.`` prefixes removed) without touching the live model, one layer at a time;
``save_merged`` writes it as a ``save_pretrained`` folder loadable by the model class directly.
(This is what peft's ``merge_and_unload`` produces, computed non-destructively so training can
continue after an export.)

``to_file_keys`` / ``from_file_keys`` translate LoRA parameter names both ways between peft's live
names (``...to_q.lora_A.default.weight``) and the file layout diffusers' ``load_lora_weights`` reads
(``transformer.<module>.to_q.lora_A.weight``): export writes one, evaluation reads it back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import torch
from torch import nn

#: attention projections shared by diffusers' UNets and transformers
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")

LORA_FILE = "pytorch_lora_weights.safetensors"
_LIVE_NAME = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.[^.]+(\.|$)")
_FILE_NAME = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)(\.|$)")


def to_file_keys(state: Dict[str, torch.Tensor], prefix: Optional[str]) -> Dict[str, torch.Tensor]:
    """The LoRA entries of a live state dict under file names: peft's adapter name dropped,
    ``prefix.`` (the model's subfolder, e.g. ``transformer``) prepended."""
    out = {}
    for k, v in state.items():
        if "lora_" not in k:
            continue
        k = _LIVE_NAME.sub(lambda m: f".{m.group(1)}{m.group(2)}", k)
        out[f"{prefix}.{k}" if prefix else k] = v
    return out


def from_file_keys(state: Dict[str, torch.Tensor], prefix: Optional[str], own_names: Iterable[str],
                   adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """Inverse of ``to_file_keys`` against a live model's parameter names (``own_names``)."""
    own = set(own_names)
    out = {}
    for k, v in state.items():
        if prefix and k.startswith(prefix + "."):
            k = k[len(prefix) + 1:]
        named = _FILE_NAME.sub(lambda m: f".{m.group(1)}.{adapter_name}{m.group(2)}", k, count=1)
        out[named if named in own else k] = v
    return out


def add_lora(model: nn.Module, rank: int, alpha: Optional[float] = None,
             target_modules: Optional[Sequence[str]] = None, dropout: float = 0.0, init="default"):
    """Freeze ``model`` and add LoRA(rank, alpha) to ``target_modules``; returns the peft LoraConfig. ``init``: how A
    is drawn (B starts at 0 either way): "default" (peft's Kaiming-uniform) or "gaussian" (N(0, 1 / rank): released
    Flow-GRPO / DiffusionNFT)."""
    if init not in ("default", "gaussian"):
        raise ValueError(f"model.kwargs.lora_init must be 'default' or 'gaussian', got {init!r}")
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"lora_rank must be > 0 to add LoRA layers, got {rank}")
    targets = list(target_modules) if target_modules else list(DEFAULT_TARGET_MODULES)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                        target_modules=targets, lora_dropout=float(dropout),
                        init_lora_weights=True if init == "default" else "gaussian")
    model.requires_grad_(False)
    try:
        model.add_adapter(config)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora_target_modules {targets} match no layer of {type(model).__name__}: {e}") from e
    n = 0
    for name, p in model.named_parameters():
        is_lora = "lora_" in name
        p.requires_grad_(is_lora)
        if is_lora and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()  # train LoRA weights in fp32 over a half-precision base (as diffusers' examples)
        n += is_lora
    if n == 0:
        raise ValueError(f"lora_target_modules {targets} match no layer of {type(model).__name__}")
    return config


def lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The base model's state dict with every active LoRA delta merged in (keys as without LoRA)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to merge")
    merged: Dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        base = layer.get_base_layer()
        w = base.weight.detach().clone()
        if not getattr(layer, "merged", False) and not getattr(layer, "disable_adapters", False):
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    w += layer.get_delta_weight(adapter).to(w.dtype)
        merged[f"{name}.weight"] = w
        if getattr(base, "bias", None) is not None:
            merged[f"{name}.bias"] = base.bias.detach().clone()
    out = {}
    for key, v in model.state_dict().items():
        if ".lora_" in key or "lora_magnitude" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        out[plain] = merged.get(plain, v)
    return out


def save_merged(model: nn.Module, path) -> Path:
    """Write the merged model as a plain ``save_pretrained`` folder of ``type(model)``."""
    path = Path(path)
    with torch.device("meta"):
        fresh = type(model).from_config(model.config)
    fresh.load_state_dict(merged_state_dict(model), strict=True, assign=True)
    fresh.save_pretrained(str(path))
    return path
