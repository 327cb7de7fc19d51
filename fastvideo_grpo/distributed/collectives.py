"""Small collectives of the training loop: metrics averaged over ranks, rewards gathered from ranks.

Both are no-ops in one process. On CUDA the process group also has a gloo backend for CPU tensors
(distributed/init.py), so they run on CPU tensors whatever the device.
"""

from __future__ import annotations

import math
import zlib
from typing import Dict, List

import torch
import torch.distributed as dist


def reduce_metrics(metrics: Dict[str, float], group=None, op: str = "mean") -> Dict[str, float]:
    """Mean (or sum / max / min) of every numeric entry over the ranks of ``group`` (all when None).

    Collective: every rank calls it. Ranks may report different keys (e.g. a per-sampling-step metric of the
    steps each rank happened to train): a key is then reduced over the ranks that report it (its mean is over
    them), at the cost of one gather of the key names, made only when the key sets differ. Non-numeric
    entries pass through."""
    if op not in ("mean", "sum", "max", "min"):
        raise ValueError(f"op must be mean, sum, max or min, got {op!r}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return dict(metrics)
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    keys = _union_of_keys(keys, group, device)
    fill = {"mean": 0.0, "sum": 0.0, "max": -math.inf, "min": math.inf}[op]
    values = [float(metrics[k]) if k in metrics else fill for k in keys]
    present = [1.0 if k in metrics else 0.0 for k in keys]
    if op in ("mean", "sum"):  # values and how many ranks reported each, in one all-reduce
        t = torch.tensor(values + present, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        t, n = t[:len(keys)], t[len(keys):]
        if op == "mean":
            t = t / n.clamp(min=1.0)
    else:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN, group=group)
    out = dict(metrics)
    out.update({k: float(v) for k, v in zip(keys, t.tolist())})
    return out


def _union_of_keys(keys: List[str], group, device) -> List[str]:
    """``keys`` when every rank of ``group`` has the same sorted key list (checked by one all-reduce of a
    fingerprint), else the sorted union of all ranks' keys (one gather of the names)."""
    crc = zlib.crc32("\n".join(keys).encode()) + len(keys) * 2 ** 32
    f = torch.tensor([crc, -crc], dtype=torch.float64, device=device)
    dist.all_reduce(f, op=dist.ReduceOp.MAX, group=group)
    if f[0].item() == -f[1].item():  # max == min: the same list everywhere
        return keys
    gathered: List[List[str]] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
    dist.all_gather_object(gathered, keys, group=group)
    return sorted(set().union(*gathered))


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
