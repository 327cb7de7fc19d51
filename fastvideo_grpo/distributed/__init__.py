"""Distributed training: torchrun init, ParallelDims / DeviceMesh, FSDP2 + activation checkpointing,
Ulysses sequence parallelism, a group-preserving prompt sampler, and the distributed entry point.

See docs/distributed.md for launch commands and memory estimates.
"""

from .init import DistEnv, init_distributed, shutdown
from .parallel_dims import ParallelDims, parallel_dims_from_config
from .sampler import DistributedPromptSource, rank_seed, reduce_metrics

__all__ = ["DistEnv", "init_distributed", "shutdown", "ParallelDims", "parallel_dims_from_config",
           "DistributedPromptSource", "rank_seed", "reduce_metrics"]
