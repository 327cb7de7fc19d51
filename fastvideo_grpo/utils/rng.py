"""Random draws that work whatever device the tensors live on.

The trainer keeps its generators on the CPU: their state is small, checkpointable and identical on
every machine, so a seed gives the same noise on a laptop and on a GPU. A CPU generator cannot draw
directly into CUDA memory ("Expected a 'cuda' device type for generator"), so every seeded draw in
the package goes through ``randn`` here, which has the semantics of diffusers' ``randn_tensor``:
draw on the generator's device, then move the result to where it is needed. On a CPU-only run this
is exactly ``torch.randn(..., generator=g)``: results are bit-identical to a direct draw.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def randn(shape: Sequence[int], generator: Optional[torch.Generator], device=None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal tensor of ``shape`` drawn with ``generator`` and placed on ``device``.

    With ``generator=None`` the draw uses the target device's global RNG directly.
    """
    target = torch.device(device) if device is not None else torch.device("cpu")
    if generator is None:
        return torch.randn(tuple(shape), device=target, dtype=dtype)
    source = generator.device
    if source == target or (source.type == target.type and target.index is None):
        return torch.randn(tuple(shape), generator=generator, device=source, dtype=dtype)
    pin = source.type == "cpu" and target.type == "cuda"
    out = torch.randn(tuple(shape), generator=generator, device=source, dtype=dtype, pin_memory=pin)
    # from pinned memory the copy is asynchronous: the host does not wait for the GPU every step
    return out.to(target, non_blocking=pin)
