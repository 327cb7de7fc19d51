"""Host-to-device copies that do not make the host wait for the device.

A copy from ordinary (pageable) host memory to a GPU is synchronous: PyTorch waits for everything queued
on the stream before it returns, so one such copy per micro-step or per sampling step stops the host
there and leaves the GPU idle while the next kernels are being queued (docs/performance.md, "Host syncs").
``to_device`` stages a CPU tensor bound for a GPU in pinned memory and copies it asynchronously, as
``utils.rng.randn`` does for the rollout's noise; the caching host allocator keeps the pinned block until
the copy has run. Anything else (same device, a GPU tensor to the host, CPU runs) is a plain ``.to``:
on a CPU-only run ``to_device(t, "cpu")`` is ``t`` itself.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device`` (``t`` itself when it is there already), without a host sync for host -> GPU."""
    target = torch.device(device)
    if t.device == target or (t.device.type == target.type and target.index is None):
        return t
    if t.device.type == "cpu" and target.type == "cuda":
        return t.pin_memory().to(target, non_blocking=True)
    return t.to(target)
