"""Distributed prompt sampling, per-rank seeding, and metric reduction across ranks.

``DistributedPromptSource`` has the interface of ``trainer.PromptSource`` (``next_batch(n)``,
``state_dict`` / ``load_state_dict``). Every rank walks the same global shuffled order (same seed);
each iteration the next ``n * dp_size`` prompts are taken and data-parallel rank r keeps the r-th
contiguous run of n. A prompt is therefore given to exactly one dp rank, which generates its whole
group of G samples (groups are never split, so group-relative advantages are computed locally),
and all sequence-parallel ranks of one dp group get the same prompts. The state is the position
in the global stream, so it does not depend on the world size: a checkpoint resumes on any number
of ranks, and with dp_size = 1 the stream equals ``PromptSource``'s.

Seeding: ``rank_seed(seed, dp_rank)`` gives every dp group its own noise / timestep generator while sp
peers share one (they must compute the same rollout); dp rank 0 keeps ``seed`` itself, so a
single-process run is unchanged.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from ..models.base import Cond  # noqa: F401
from ..trainer import PromptSource

_SEED_STRIDE = 1_000_003  # a prime: seed s on rank r never collides with seed s' on rank 0 for small seeds


def rank_seed(seed: int, dp_rank: int) -> int:
    """Seed of data-parallel group ``dp_rank`` (sp peers of one group use the same)."""
    return (int(seed) + _SEED_STRIDE * int(dp_rank)) % (2 ** 63)


# The group-preserving sampler lives in trainer.py (a single process is dp_size = 1); this name is kept
# for the distributed entry points.
DistributedPromptSource = PromptSource


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
