"""Small collectives of the training loop: metrics averaged over ranks, rewards gathered from ranks.

Both are no-ops in one process. On CUDA the process group also has a gloo backend for CPU tensors
(distributed/init.py), so they run on CPU tensors whatever the device.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist


def reduce_metrics(metrics: Dict[str, float], group=None, op: str = "mean") -> Dict[str, float]:
    """Mean (or sum / max) of every numeric entry over the ranks of ``group`` (all when None).

    Collective: every rank must call it with the same keys. Non-numeric entries pass through.
    """
    if op not in ("mean", "sum", "max", "min"):
        raise ValueError(f"op must be mean, sum, max or min, got {op!r}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return dict(metrics)
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    red = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(t, op=red, group=group)
    if op == "mean":
        t /= dist.get_world_size(group)
    out = dict(metrics)
    out.update({k: float(v) for k, v in zip(keys, t.tolist())})
    return out


def all_gather_rewards(rewards: Dict[str, torch.Tensor], group=None) -> Dict[str, torch.Tensor]:
    """Concatenate per-rank reward tensors (equal lengths) over ``group`` in rank order (for logging and
    for global advantage normalisation)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return dict(rewards)
    out = {}
    backend = dist.get_backend(group)
    for k in sorted(rewards):
        v = torch.as_tensor(rewards[k], dtype=torch.float32)
        if backend == "nccl":
            v = v.cuda()
        parts = [torch.empty_like(v) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, v.contiguous(), group=group)
        out[k] = torch.cat(parts).cpu()
    return out


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is True on any rank (collective; no-op in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])  # a CPU tensor: gloo, or the gloo half of cuda:nccl,cpu:gloo
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item() > 0)
