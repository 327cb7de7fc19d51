"""Distributed training: torchrun init, ParallelDims / DeviceMesh, FSDP2 + activation checkpointing,
Ulysses sequence parallelism, per-rank seeding and the collectives of the training loop.

See docs/distributed.md for launch commands and memory estimates.
"""

from .collectives import all_gather_rewards, reduce_metrics
from .init import DistEnv, init_distributed, shutdown
from .parallel_dims import ParallelDims, parallel_dims_from_config
from .seeding import rank_seed, seed_rank_generators

__all__ = ["DistEnv", "init_distributed", "shutdown", "ParallelDims", "parallel_dims_from_config",
           "rank_seed", "seed_rank_generators", "reduce_metrics", "all_gather_rewards"]
