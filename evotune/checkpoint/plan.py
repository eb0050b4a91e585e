"""A plan: the tensors of a checkpoint as shapes and dtypes now, values only when written.

Conversions of 7B+ models must not hold two copies of the weights. Readers
(:class:`evotune.checkpoint.hf.LazyWeights`,
:class:`evotune.checkpoint.internevo.InternEvoCheckpoint`, the DCP reader of
``evotune convert pth_to_hf``) produce an ordered ``name -> Planned`` mapping,
layout mappings (:mod:`evotune.checkpoint.internlm2`) rename and split it
without reading a tensor, and writers produce each tensor as they write it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass
class Planned:
    """A tensor to be produced later: its shape and dtype now, its values on ``load()``."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def plan_of(state: Mapping[str, torch.Tensor]) -> dict[str, Planned]:
    """The plan of tensors already in memory."""
    return {k: Planned(tuple(t.shape), t.dtype, (lambda t=t: t)) for k, t in state.items()}
