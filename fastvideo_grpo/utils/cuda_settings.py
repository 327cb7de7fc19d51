"""Process-wide CUDA kernel choices the trainer makes before its first forward pass.

cuDNN's fused attention (one of the backends behind ``F.scaled_dot_product_attention``) is off by
default: on an H200 with torch 2.11 + CUDA 13 its bf16 forward / backward for FLUX-like shapes (head
dim 128, ~2.5k tokens) failed with "mha_graph.execute(...) is_good() ... false" and an illegal
memory access, and at a smaller width it returned non-finite gradients (bench/gpu_check.py,
2026-11-28). Flash and memory-efficient attention, which PyTorch picks next, ran these shapes cleanly
(the HunyuanVideo check, whose masked attention never takes cuDNN, passed). ``train.cudnn_attention:
true`` turns it back on.
"""

from __future__ import annotations

import torch


def configure_attention(cudnn_attention: bool = False) -> None:
    """Allow or forbid the cuDNN SDPA backend for this process (no-op without CUDA support)."""
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(bool(cudnn_attention))
