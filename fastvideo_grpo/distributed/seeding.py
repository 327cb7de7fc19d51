"""Per-rank random streams: every data-parallel group its own, sequence-parallel peers the same.

``rank_seed(seed, dp_rank)`` gives dp group r its own noise / timestep generator while the sp peers of a
group share one (they must compute the same rollout); dp rank 0 keeps ``seed`` itself, so a
single-process run is unchanged.
"""

from __future__ import annotations

import torch

_SEED_STRIDE = 1_000_003  # a prime: seed s on rank r never collides with seed s' on rank 0 for small seeds


def rank_seed(seed: int, dp_rank: int) -> int:
    """Seed of data-parallel group ``dp_rank`` (sp peers of one group use the same)."""
    return (int(seed) + _SEED_STRIDE * int(dp_rank)) % (2 ** 63)


def seed_rank_generators(generator: torch.Generator, seed: int, dp_rank: int, iteration: int = 0) -> int:
    """Seed ``generator`` (the trainer's) and torch's global RNG for dp group ``dp_rank`` (sp peers equal).

    ``iteration`` > 0 is used after resuming on a different world size, where saved per-rank RNG
    states cannot be matched to ranks: the new streams are still distinct per rank and reproducible.
    """
    s = rank_seed(seed + 7_919 * iteration, dp_rank)
    generator.manual_seed(s)
    torch.manual_seed(s)
    return s
