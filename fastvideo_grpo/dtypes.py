"""Dtype names from configs and command lines ('bf16', 'bfloat16', 'torch.float16', ...) -> torch.dtype."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def autocast_dtype(name: str):
    """``train.autocast`` ("bf16" / "none") -> the autocast dtype on CUDA, or None."""
    return None if name == "none" else parse_dtype(name)


def parse_dtype(dtype) -> torch.dtype:
    """A torch.dtype passes through; a known name maps to its dtype; anything else is a ValueError."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]
