"""Process-group set-up from the torchrun environment, and a clean shutdown.

torchrun (or any launcher following its contract) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; nothing here hard-codes an address. Backend: NCCL when CUDA is available, else gloo.
Without those variables (plain ``python script.py``) everything runs as a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Initialise the default process group from the environment (idempotent).

    ``device``: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu" or "cuda".
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but CUDA is not available; use 'cpu' or 'auto'")
    if not launched_by_torchrun():
        return DistEnv(device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"incomplete distributed environment: {missing} unset; launch with torchrun")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; lower "
                             "--nproc_per_node")
        torch.cuda.set_device(local)
        # NCCL for CUDA tensors, gloo for CPU ones (gradient-norm reductions over CPU-offloaded
        # gradients, objects gathered on the host): one group, dispatched by the tensor's device
        dev, backend = torch.device("cuda", local), "cuda:nccl,cpu:gloo"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def shutdown(before_destroy=None) -> None:
    """Barrier, then ``before_destroy()`` (e.g. stopping what still uses the group's store), then destroy the
    process group (no-op when not initialised)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            if before_destroy is not None:
                before_destroy()
            dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
