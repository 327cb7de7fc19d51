"""ParallelDims: the data-parallel and sequence-parallel degrees, checked against the world size.

Ranks are laid out on a 3-axis DeviceMesh ``(dp_replicate, dp_shard, sp)`` with ``sp`` innermost, so
the sequence-parallel peers of one data-parallel group are neighbouring ranks (same node: the
Ulysses all-to-all stays on NVLink). Two flattened axes are derived from it:

* ``dp``   = dp_replicate x dp_shard: the data-loading axis (each dp rank gets different prompts);
* ``fsdp`` = dp_shard x sp: the axis parameters are sharded over. The sp ranks join FSDP so that
  their (partial) gradients are averaged together with the data-parallel ones (see
  sequence_parallel.py for why that gives the exact gradient).

With dp_replicate > 1 the FSDP mesh is the 2-D (dp_replicate, fsdp) mesh: HSDP, sharded inside a
replica group and replicated (all-reduced) across groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: infer as world_size // (dp_replicate * sp)
    sp: int = 1
    world_size: int = 1
    mesh: Optional[object] = field(default=None, repr=False)

    def __post_init__(self):
        for name in ("dp_replicate", "sp", "world_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.dp_shard, int) or (self.dp_shard < 1 and self.dp_shard != -1):
            raise ValueError(f"parallel.dp_shard must be >= 1 or -1 (infer), got {self.dp_shard!r}")
        if self.dp_shard == -1:
            rest = self.dp_replicate * self.sp
            if self.world_size % rest:
                raise ValueError(
                    f"cannot infer parallel.dp_shard: world size {self.world_size} is not divisible by "
                    f"dp_replicate * sp = {self.dp_replicate} * {self.sp} = {rest}; change parallel.sp / "
                    f"parallel.dp_replicate or the number of processes (torchrun --nproc_per_node, --nnodes)"
                )
            self.dp_shard = self.world_size // rest
        product = self.dp_replicate * self.dp_shard * self.sp
        if product != self.world_size:
            raise ValueError(
                f"parallel degrees dp_replicate * dp_shard * sp = {self.dp_replicate} * {self.dp_shard} * {self.sp} "
                f"= {product} but the world size is {self.world_size}; make the product equal the number of "
                f"processes, or set parallel.dp_shard=-1 to infer it"
            )

    # ------------------------------------------------------------------ sizes

    @property
    def dp(self) -> int:
        """Number of data-parallel groups (different prompts)."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        return self.dp_shard * self.sp

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ coordinates of a rank

    def dp_rank(self, rank: int) -> int:
        """Index of the data-parallel group of global ``rank`` (sp peers share it)."""
        return rank // self.sp

    def sp_rank(self, rank: int) -> int:
        return rank % self.sp

    # ------------------------------------------------------------------ the mesh

    def build_mesh(self, device_type: str = "cpu", one_process: bool = False):
        """The named DeviceMesh (needs an initialised process group when world_size > 1).

        A one-process run has no mesh (and so no FSDP) unless ``one_process``: then a mesh of one rank
        is built over the initialised one-process group, and FSDP2 runs exactly as on many GPUs."""
        if not self.distributed and not one_process:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.sp),
                                mesh_dim_names=("dp_replicate", "dp_shard", "sp"))
        self._flat = {
            "dp": mesh["dp_replicate", "dp_shard"]._flatten(mesh_dim_name="dp"),
            "fsdp": mesh["dp_shard", "sp"]._flatten(mesh_dim_name="fsdp"),
        }
        if self.dp_replicate > 1:  # HSDP: a 2-D mesh over the same ranks in the same (row-major) order
            self._flat["hsdp"] = init_device_mesh(device_type, (self.dp_replicate, self.fsdp),
                                                  mesh_dim_names=("dp_replicate", "fsdp"))
        self.mesh = mesh
        return mesh

    def fsdp_mesh(self):
        """The mesh ``fully_shard`` gets: 1-D fsdp, or 2-D (dp_replicate, fsdp) for HSDP."""
        if self.mesh is None:
            return None
        return self._flat["hsdp" if self.dp_replicate > 1 else "fsdp"]

    def submesh(self, axis: str):
        """The 1-D mesh of an axis: "dp_replicate", "dp_shard", "sp", or the flattened "dp" / "fsdp"."""
        if self.mesh is None:
            return None
        return self._flat[axis] if axis in ("dp", "fsdp") else self.mesh[axis]

    def group(self, axis: str):
        """The process group of a mesh axis ("dp", "sp", "fsdp", ...), or None when not distributed."""
        if self.mesh is None:
            return None
        return self.submesh(axis).get_group()


def parallel_dims_from_config(pcfg, world_size: int) -> ParallelDims:
    """ParallelDims from a ``config.ParallelConfig`` (or anything with the same fields)."""
    return ParallelDims(dp_replicate=int(getattr(pcfg, "dp_replicate", 1)), dp_shard=int(getattr(pcfg, "dp_shard", -1)),
                        sp=int(getattr(pcfg, "sp", 1)), world_size=int(world_size))

