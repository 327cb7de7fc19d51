"""Dtype names from configs and command lines ('bf16', 'bfloat16', 'torch.float16', ...) -> torch.dtype, and
the autocast context every model forward of the loop runs under."""

from __future__ import annotations

import contextlib

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


def autocast_context(device, dtype):
    """bf16 / fp16 autocast on CUDA when ``dtype`` is set; elsewhere autocast explicitly off
    (nothing at all on device types autocast does not know, e.g. ``meta``)."""
    device = torch.device(device)
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    if dtype is None or device.type != "cuda":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type="cuda", dtype=dtype)
