"""The (dp, sp) device mesh: which ranks share data and which share a sequence.

``world_size = dp * sp``. Ranks are laid out sp-fastest, so the ``sp`` ranks of
one data-parallel group are neighbours (on one node when sp <= GPUs per node).
Data-parallel rank and size, which the sampler needs, are always read from the
mesh: the ``sp`` ranks of one group get the same ``dp_rank`` and see the same
packs (DESIGN.md §4).

FSDP shards parameters over every rank that holds the same parameters: with
sequence parallelism that is ``dp x sp`` flattened (``sp`` ranks hold the same
weights too), which :meth:`ParallelMesh.fsdp_mesh` must return once ``sp > 1``
is supported; until then it is the ``dp`` dimension, the whole world.

One process on the CPU runs without a process group; its mesh is None.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    def dp_group(self) -> dist.ProcessGroup | None:
        """The data-parallel group (for loss and token counts); None without a mesh."""
        return self.mesh.get_group("dp") if self.mesh is not None else None

    def fsdp_mesh(self, replicate: bool) -> DeviceMesh:
        """The mesh FSDP2 works on: 1-D over dp (ZeRO: shard over all ranks), or
        2-D (dp, sp) (plain data parallel: replicate over dp, shard over sp, here 1)."""
        return self.mesh if replicate else self.mesh["dp"]


def build_mesh(env: DistEnv, sequence_parallel_size: int = 1) -> ParallelMesh:
    """The mesh of this run; ``sequence_parallel_size`` other than 1 is refused for now."""
    sp = int(sequence_parallel_size or 1)
    if sp < 1 or env.world_size % sp:
        raise EvotuneError(f"sequence_parallel_size={sp} must divide the number of processes ({env.world_size})")
    if sp != 1:
        raise EvotuneError(f"sequence_parallel_size={sp}: sequence parallelism is not available yet; "
                           "set sequence_parallel_size = 1")
    dp = env.world_size // sp
    if not dist.is_initialized():
        return ParallelMesh(None, dp_size=1, dp_rank=0, sp_size=1, sp_rank=0)
    mesh = init_device_mesh(env.device.type, (dp, sp), mesh_dim_names=DIMS)
    return ParallelMesh(mesh, dp_size=dp, dp_rank=mesh.get_local_rank("dp"),
                        sp_size=sp, sp_rank=mesh.get_local_rank("sp"))
