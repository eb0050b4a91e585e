"""The batch arithmetic: InternEvo's parallel layout and evotune's equal batch.

InternEvo's data-parallel size is ``world / (tensor * pipeline)`` in every tensor
mode (mtp, msp, fsp, isp: the tensor ranks of isp are sequence-parallel ranks that
share their packs; weight parallel does not change it); evotune's is
``world / sequence_parallel_size``. :func:`plan_batch` chooses evotune's sequence
parallel size and ``accumulative_counts`` so that ``dp * batch_size *
accumulative_counts`` equals InternEvo's ``dp * micro_num``: with the packs equal
(``max_length = seq_len * micro_bsz``), tokens per step are equal too, and the
packs of global step *s* are the same contiguous block of InternEvo's global
permutation (only their assignment to ranks differs). When no integer fits, the
error proposes the nearest world sizes. docs/migrating-from-internevo.md works
through examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from evotune.errors import EvotuneError

SEQUENCE_MODES = ("msp", "fsp", "isp")  # tensor modes whose ranks split the sequence
TENSOR_MODES = ("mtp",) + SEQUENCE_MODES

def _size(value: Any, default: int = 1) -> int:
    """InternEvo accepts ``zero1=8`` and ``zero1=dict(size=8)`` alike."""
    if value is None:
        return default
    if isinstance(value, dict):
        return int(value.get("size", default))
    return int(value)


@dataclass(frozen=True)
class InternEvoParallel:
    """The parallel layout InternEvo derives from ``parallel`` and the world size."""

    world_size: int
    tensor: int
    mode: str
    pipeline: int
    weight: int
    zero1: int  # as written: <= 0 means "all of the (weight-)data-parallel group"

    @property
    def data_parallel_size(self) -> int:
        # parallel_context.init_parallel_groups: sequence_parallel_size = tensor size,
        # data_parallel_size = world // pipeline // sequence_parallel_size, in every mode.
        return self.world_size // (self.pipeline * self.tensor)

    @property
    def weight_data_parallel_size(self) -> int:
        return self.world_size // (self.pipeline * self.weight)

    @property
    def zero_group(self) -> int:
        """Ranks one optimizer state is sharded over (InternEvo's zero1_parallel_size)."""
        group = self.weight_data_parallel_size if self.mode == "isp" else self.data_parallel_size
        return group if self.zero1 <= 0 else self.zero1

    def problems(self) -> list[str]:
        """What InternEvo's own checks would reject at this world size."""
        out = []
        if self.world_size % (self.tensor * self.pipeline):
            out.append(f"world size {self.world_size} is not a multiple of tensor {self.tensor} x "
                       f"pipeline {self.pipeline}")
        if self.world_size % (self.weight * self.pipeline):
            out.append(f"world size {self.world_size} is not a multiple of weight {self.weight} x "
                       f"pipeline {self.pipeline}")
        if not out and self.zero1 > 1:
            group = self.weight_data_parallel_size if self.mode == "isp" else self.data_parallel_size
            name = "weight data parallel size" if self.mode == "isp" else "data parallel size"
            if group % self.zero1:
                out.append(f"zero1 size {self.zero1} does not divide the {name} {group}")
        return out


def internevo_parallel(parallel: dict | None, world_size: int) -> InternEvoParallel:
    """InternEvo's layout for ``parallel`` at ``world_size`` (defaults as launch.py sets them)."""
    parallel = parallel or {}
    tensor = parallel.get("tensor", 1)
    mode = (tensor.get("mode") if isinstance(tensor, dict) else None) or "mtp"
    if mode not in TENSOR_MODES:
        raise EvotuneError(f"parallel.tensor.mode '{mode}' is not one of InternEvo's modes {TENSOR_MODES}")
    return InternEvoParallel(
        world_size=int(world_size), tensor=_size(tensor), mode=mode, pipeline=_size(parallel.get("pipeline")),
        weight=_size(parallel.get("weight")), zero1=_size(parallel.get("zero1"), default=-1),
    )


def smallest_internevo_world(parallel: dict | None) -> int:
    """The smallest world size at which InternEvo accepts ``parallel``."""
    base = internevo_parallel(parallel, 1)
    step = math.lcm(base.tensor * base.pipeline, base.weight * base.pipeline)
    world = step
    while internevo_parallel(parallel, world).problems():
        world += step
    return world


@dataclass(frozen=True)
class BatchPlan:
    """One optimizer step on both sides; the tokens are equal by construction."""

    internevo: InternEvoParallel
    seq_len: int
    micro_bsz: int
    micro_num: int
    world_size: int
    sequence_parallel_size: int
    accumulative_counts: int
    batch_size: int = 1

    @property
    def max_length(self) -> int:
        return self.seq_len * self.micro_bsz

    @property
    def packs_per_step(self) -> int:
        return self.internevo.data_parallel_size * self.micro_num

    @property
    def internevo_tokens_per_step(self) -> int:
        return self.internevo.data_parallel_size * self.micro_num * self.micro_bsz * self.seq_len

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.sequence_parallel_size

    @property
    def tokens_per_step(self) -> int:
        return self.data_parallel_size * self.batch_size * self.accumulative_counts * self.max_length


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def nearest_world_sizes(packs_per_step: int, sequence_parallel_size: int, world_size: int) -> list[int]:
    """The nearest world sizes below and above ``world_size`` whose dp divides ``packs_per_step``."""
    fits = [sequence_parallel_size * d for d in _divisors(packs_per_step)]
    below = [w for w in fits if w < world_size]
    above = [w for w in fits if w > world_size]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def plan_batch(internevo: InternEvoParallel, seq_len: int, micro_bsz: int, micro_num: int, world_size: int,
               sequence_parallel_size: int | None = None, num_heads: int | None = None) -> BatchPlan:
    """Choose evotune's sequence parallel size and accumulation for the same packs per step.

    ``sequence_parallel_size=None``: start from InternEvo's sequence-parallel degree
    (the tensor size for msp/fsp/isp, 1 for mtp) and take the smallest size up to
    tensor * pipeline (the GPUs of one InternEvo replica, where dp is InternEvo's
    own) that divides the world and makes the accumulation an integer; when
    ``num_heads`` (Ulysses gives every rank heads / sp heads) rules those out,
    the largest smaller size that fits.
    """
    packs = internevo.data_parallel_size * micro_num
    start = internevo.tensor if internevo.mode in SEQUENCE_MODES else 1

    def splits_heads(sp: int) -> bool:
        return not num_heads or num_heads % sp == 0

    if sequence_parallel_size is not None:
        candidates = [int(sequence_parallel_size)]
        if world_size % candidates[0]:
            raise EvotuneError(f"--sequence-parallel-size {candidates[0]} does not divide the world size "
                               f"{world_size}")
        if not splits_heads(candidates[0]):
            raise EvotuneError(f"--sequence-parallel-size {candidates[0]}: the model's {num_heads} attention heads "
                               f"cannot be split over {candidates[0]} ranks; choose a divisor of {num_heads}")
    else:
        limit = max(start, internevo.tensor * internevo.pipeline)
        usable = [sp for sp in _divisors(world_size) if splits_heads(sp)]
        candidates = ([sp for sp in usable if start <= sp <= limit]
                      + sorted((sp for sp in usable if sp < start), reverse=True)) or [start]
    for sp in candidates:
        dp = world_size // sp
        if world_size % sp == 0 and packs % dp == 0:
            return BatchPlan(internevo, seq_len, micro_bsz, micro_num, world_size, sp, packs // dp)
    sp = candidates[0]
    dp = max(world_size // sp, 1)
    proposals = ", ".join(
        f"{w} (dp {w // sp}, accumulative_counts {packs // (w // sp)})"
        for w in nearest_world_sizes(packs, sp, world_size)
    )
    other_sp = [s for s in _divisors(world_size)
                if s != sp and splits_heads(s) and packs % (world_size // s) == 0]
    alt = (f"; or keep {world_size} GPUs with --sequence-parallel-size "
           f"{' or '.join(str(s) for s in other_sp[:3])}") if other_sp else ""
    raise EvotuneError(
        f"no integer accumulation fits: InternEvo trains {packs} packs of {seq_len * micro_bsz} tokens per "
        f"optimizer step (dp {internevo.data_parallel_size} x micro_num {micro_num}); evotune on {world_size} "
        f"GPUs with sequence_parallel_size {sp} has dp {dp}, and {packs} packs do not split evenly over {dp} "
        f"ranks. Nearest world sizes that keep the batch exactly: {proposals} (--target-world-size){alt}"
    )
