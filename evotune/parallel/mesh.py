"""The (dp, sp) device mesh: which ranks share data and which share a sequence.

``world_size = dp * sp``. Ranks are laid out sp-fastest, so the ``sp`` ranks of
one data-parallel group are neighbours (on one node when sp <= GPUs per node).
Data-parallel rank and size, which the sampler needs, are always read from the
mesh: the ``sp`` ranks of one group get the same ``dp_rank`` and see the same
packs (docs/data.md, "Order: the sampler").

FSDP shards parameters over every rank that holds the same parameters: with
sequence parallelism that is ``dp x sp`` flattened (``sp`` ranks hold the same
weights too), which :meth:`ParallelMesh.fsdp_mesh` returns; without it, the
``dp`` dimension, the whole world. FSDP then averages gradients over all
``dp x sp`` ranks, while an sp group's gradient is the sum of its ranks' (each
holds a share of the same packs): the loop multiplies each rank's loss by ``sp``
before backward (docs/sequence-parallel.md).

One process on the CPU runs without a process group; its mesh is None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from evotune.errors import EvotuneError
from evotune.parallel.env import DistEnv

DIMS = ("dp", "sp")


@dataclass(frozen=True)
class ParallelMesh:
    mesh: DeviceMesh | None  # ("dp", "sp"); None for one CPU process
    dp_size: int
    dp_rank: int
    sp_size: int
    sp_rank: int

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        """The sequence-parallel group (passed to the model's attention); None when sp is 1."""
        return self.mesh.get_group("sp") if self.sp_size > 1 else None

    def fsdp_mesh(self, replicate: bool) -> DeviceMesh:
        """The mesh FSDP2 works on: 1-D over every rank (ZeRO: shard over all ranks), or
        2-D (all ranks, 1) (plain data parallel: replicate over all ranks, shard over none).
        With sp > 1 it is built here, a collective call: every rank calls it once."""
        if self.sp_size == 1:
            return self.mesh if replicate else self.mesh["dp"]
        world = self.dp_size * self.sp_size
        flat = DeviceMesh(self.mesh.device_type, torch.arange(world).view(world, 1), mesh_dim_names=("dp_sp", "shard"))
        return flat if replicate else flat["dp_sp"]


def build_mesh(env: DistEnv, sequence_parallel_size: int = 1) -> ParallelMesh:
    """The mesh of this run: ``sequence_parallel_size`` must divide the number of processes."""
    sp = int(sequence_parallel_size or 1)
    if sp < 1 or env.world_size % sp:
        raise EvotuneError(f"sequence_parallel_size={sp} must divide the number of processes ({env.world_size})")
    dp = env.world_size // sp
    if not dist.is_initialized():
        return ParallelMesh(None, dp_size=1, dp_rank=0, sp_size=1, sp_rank=0)
    mesh = init_device_mesh(env.device.type, (dp, sp), mesh_dim_names=DIMS)
    return ParallelMesh(mesh, dp_size=dp, dp_rank=mesh.get_local_rank("dp"),
                        sp_size=sp, sp_rank=mesh.get_local_rank("sp"))
